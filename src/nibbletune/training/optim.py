"""Optimizers over the adapter parameters: AdamW, 8-bit AdamW and paged AdamW.

All three make the update of torch's single-tensor AdamW (decoupled weight decay):

    p      <- p * (1 - lr * wd)
    m      <- lerp(m, g, 1 - beta1)                  (= beta1 m + (1 - beta1) g)
    v      <- beta2 v + (1 - beta2) g^2
    p      <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

and differ only in where the moments m, v live between steps:

* `AdamW8bit` keeps them as 8-bit codes of bitsandbytes' dynamic map with one float32
  absmax per block of 256 values (2 bytes + 2/256 x 4 bytes per parameter instead of 8).
  Tensors under 4096 values keep float32 moments, as bitsandbytes does. torchao's
  `AdamW8bit` was tried here: it works on CPU but compiles a kernel on its first step
  (about 14 s on 2 cores, and a C compiler is required) and stores its moments as a tensor
  subclass that safetensors cannot write, so this small version is used instead.
* `PagedAdamW` keeps them in a file and streams them through a resident buffer of at most
  `budget_bytes` per step; the arithmetic is the single-tensor AdamW one, op for op, so the
  results equal `torch.optim.AdamW(foreach=False)` bit for bit.
"""

from __future__ import annotations

import os
import tempfile

import torch

from ..quant.blockwise import quantize_blockwise_codes
from ..quant.codebooks import dynamic_map, dynamic_map_midpoints

BLOCKSIZE_8BIT = 256
MIN_8BIT_NUMEL = 4096


def build_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float,
                    paged_dir: str | None = None) -> torch.optim.Optimizer:
    """The optimizer named in the config ('adamw', 'adamw8bit', 'paged_adamw')."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "paged_adamw":
        return PagedAdamW(params, lr=lr, weight_decay=weight_decay, directory=paged_dir)
    raise ValueError(f"unknown optimizer {name!r}")


def _adamw_update(param, grad, exp_avg, exp_avg_sq, step: float, lr, beta1, beta2, eps, weight_decay) -> None:
    """One single-tensor AdamW update in place (the op sequence of torch.optim.adam._single_tensor_adam)."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


class _AdamBase(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _params_with_grad(self):
        """(group, param, state) for every parameter that has a gradient, in group order."""
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    yield group, param, self.state[param]


# ---------------------------------------------------------------------------- 8-bit states


def quantize_8bit(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat float32 values -> (uint8 codes of the dynamic map, float32 absmax per block of 256).

    The blockwise quantizer of the 4-bit weights (`quant.blockwise`), with the 8-bit dynamic map.
    """
    return quantize_blockwise_codes(values.reshape(-1), dynamic_map_midpoints(values.device), None, BLOCKSIZE_8BIT)


def dequantize_8bit(codes: torch.Tensor, absmax: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of `quantize_8bit` (up to the code book's resolution)."""
    numel = codes.numel()
    pad = (-numel) % BLOCKSIZE_8BIT
    values = dynamic_map(codes.device)[codes.long()]
    blocks = torch.nn.functional.pad(values, (0, pad)).view(-1, BLOCKSIZE_8BIT) * absmax[:, None]
    return blocks.view(-1)[:numel].view(shape)


class AdamW8bit(_AdamBase):
    """AdamW whose moments are stored blockwise in 8 bits between steps (see module docstring)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, param, state in self._params_with_grad():
            beta1, beta2 = group["betas"]
            quantized = param.numel() >= MIN_8BIT_NUMEL
            if not state:
                state["step"] = torch.tensor(0.0)
                zeros = torch.zeros_like(param, dtype=torch.float32)
                if quantized:
                    for name in ("exp_avg", "exp_avg_sq"):
                        state[f"{name}_codes"], state[f"{name}_absmax"] = quantize_8bit(zeros)
                else:
                    state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
            state["step"] += 1
            if quantized:
                exp_avg = dequantize_8bit(state["exp_avg_codes"], state["exp_avg_absmax"], param.shape)
                exp_avg_sq = dequantize_8bit(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], param.shape)
            else:
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            work = param if param.dtype == torch.float32 else param.float()
            _adamw_update(work, param.grad.float(), exp_avg, exp_avg_sq, state["step"].item(),
                          group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            if work is not param:
                param.copy_(work)
            if quantized:
                state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_8bit(exp_avg)
                state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_8bit(exp_avg_sq)
        return loss


# ---------------------------------------------------------------------------- paged states


class PagedAdamW(_AdamBase):
    """AdamW with its moments in a file, paged through a bounded resident buffer each step.

    Layout: for parameter i with n_i values, the file holds exp_avg then exp_avg_sq, float32,
    at a fixed offset. A step walks the parameters in pieces of at most `budget_bytes / 8`
    values (two moments x 4 bytes), reads both moments of a piece into the buffer, applies
    the update to the matching slice of the parameter and writes them back. Pieces split
    only the flat index range, and every op is elementwise, so the result does not depend
    on the budget. `state_dict()` reads the moments back as ordinary tensors, so a
    checkpoint looks like torch AdamW's.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 budget_bytes: int = 64 * 2**20, directory: str | None = None):
        super().__init__(params, lr, betas, eps, weight_decay)
        self.piece_numel = max(1024, (budget_bytes // 8) // 1024 * 1024)
        self._file = tempfile.TemporaryFile(dir=directory, prefix="nibbletune-paged-adamw-")  # noqa: SIM115 (lives with the optimizer)
        self._offsets: dict[int, int] = {}
        offset = 0
        for group in self.param_groups:
            for param in group["params"]:
                self._offsets[id(param)] = offset
                offset += 2 * param.numel() * 4
        os.ftruncate(self._file.fileno(), offset)  # zeros, sparse until written
        self._buffer = torch.empty(2 * self.piece_numel, dtype=torch.float32)
        self.resident_bytes = self._buffer.numel() * 4

    def _moment_slices(self, param, start: int, stop: int):
        """Byte offsets of exp_avg[start:stop] and exp_avg_sq[start:stop] in the file."""
        base = self._offsets[id(param)]
        return base + 4 * start, base + 4 * (param.numel() + start)

    def _read(self, offset: int, out: torch.Tensor) -> None:
        view = memoryview(out.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.preadv(self._file.fileno(), [view[done:]], offset + done)

    def _write(self, offset: int, values: torch.Tensor) -> None:
        view = memoryview(values.numpy()).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._file.fileno(), view[done:], offset + done)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group, param, state in self._params_with_grad():
            beta1, beta2 = group["betas"]
            if not state:
                state["step"] = torch.tensor(0.0)
            state["step"] += 1
            step = state["step"].item()
            flat_param, flat_grad = param.view(-1), param.grad.view(-1)
            for start in range(0, param.numel(), self.piece_numel):
                stop = min(start + self.piece_numel, param.numel())
                n = stop - start
                exp_avg, exp_avg_sq = self._buffer[:n], self._buffer[self.piece_numel:self.piece_numel + n]
                avg_at, sq_at = self._moment_slices(param, start, stop)
                self._read(avg_at, exp_avg)
                self._read(sq_at, exp_avg_sq)
                moments = (exp_avg, exp_avg_sq)
                if param.device.type != "cpu":
                    moments = tuple(m.to(param.device, non_blocking=True) for m in moments)
                _adamw_update(flat_param[start:stop], flat_grad[start:stop], *moments, step,
                              group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
                self._write(avg_at, moments[0].cpu())
                self._write(sq_at, moments[1].cpu())
        return loss

    def state_dict(self):
        state_dict = super().state_dict()
        index = 0
        for group in self.param_groups:
            for param in group["params"]:
                if index in state_dict["state"]:
                    exp_avg = torch.empty(param.numel(), dtype=torch.float32)
                    exp_avg_sq = torch.empty(param.numel(), dtype=torch.float32)
                    avg_at, sq_at = self._moment_slices(param, 0, param.numel())
                    self._read(avg_at, exp_avg)
                    self._read(sq_at, exp_avg_sq)
                    entry = dict(state_dict["state"][index])
                    entry["exp_avg"], entry["exp_avg_sq"] = exp_avg.view(param.shape), exp_avg_sq.view(param.shape)
                    state_dict["state"][index] = entry
                index += 1
        return state_dict

    def load_state_dict(self, state_dict):
        moments = {}
        trimmed = {"state": {}, "param_groups": state_dict["param_groups"]}
        for index, entry in state_dict["state"].items():
            entry = dict(entry)
            moments[int(index)] = (entry.pop("exp_avg", None), entry.pop("exp_avg_sq", None))
            trimmed["state"][index] = entry
        super().load_state_dict(trimmed)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, (exp_avg, exp_avg_sq) in moments.items():
            param = params[index]
            avg_at, sq_at = self._moment_slices(param, 0, param.numel())
            if exp_avg is not None:
                self._write(avg_at, exp_avg.detach().float().cpu().contiguous().view(-1))
                self._write(sq_at, exp_avg_sq.detach().float().cpu().contiguous().view(-1))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held in memory (PagedAdamW: its resident buffer)."""
    if isinstance(optimizer, PagedAdamW):
        return optimizer.resident_bytes
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


__all__ = ["AdamW8bit", "PagedAdamW", "build_optimizer", "dequantize_8bit", "optimizer_state_bytes", "quantize_8bit"]
