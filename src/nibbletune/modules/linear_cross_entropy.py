"""The output head and the next-token loss as one op, a chunk of tokens at a time: no [tokens, vocab] logits.

For hidden states h [N, H], the head's weight W [V, H], targets y [N] (IGNORE_INDEX: untrained)
and an optional final-logit softcap c (Gemma 2/3: z' = c tanh(z / c)):

    z_t = h_t W^T  (compute dtype, then float32),   l_t = logsumexp(z'_t) - z'_t[y_t]
    loss = sum over trained t of l_t

and, with p_t = softmax(z'_t) and e_y the one-hot of y_t,

    dL/dz'_t = p_t - e_y                                   [V]
    dL/dz_t  = (p_t - e_y) * (1 - (z'_t / c)^2)            (softcap only: d/dz c tanh(z/c))
    dL/dh_t  = (dL/dz_t) W            dL/dW = sum_t (dL/dz_t)^T h_t

The gradients are computed in forward, chunk by chunk, while the chunk's logits exist, and kept
(dL/dh is [N, H], as small as h); backward only scales them by the incoming gradient of the
scalar loss. So the float32 logits of one chunk (`CHUNK_ELEMENTS` of them) are the largest
temporary, instead of [N, V] logits, their float32 copy, the log-softmax and its gradient (about
5 x 4 x N x V bytes unfused: 1 GB for 1024 tokens of a 49k vocabulary). Untrained positions
(prompts, padding) are dropped before the head: they cost nothing.

Numerics follow the unfused path (`training.batches.token_loss_sum` on `lm_head(h)`): the
matmul runs in the weight's dtype, log-softmax in float32, and the gradient is cast back to the
compute dtype before its matmul.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
CHUNK_ELEMENTS = 1 << 24
"""Logits per chunk (64 MiB in float32): 341 tokens of a 49k vocabulary, 64 of a 262k one."""


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed next-token cross-entropy of h @ W^T; see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_elements):
        trained = targets != IGNORE_INDEX
        positions = trained.nonzero().squeeze(1)
        kept, labels = hidden.index_select(0, positions), targets.index_select(0, positions)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_kept = torch.empty_like(kept) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk = max(1, chunk_elements // weight.shape[0])
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, kept.shape[0], chunk):
                h, y = kept[start:start + chunk], labels[start:start + chunk]
                logits = (h.to(weight.dtype) @ weight.t()).float()  # [c, V]
                if softcap:
                    logits = torch.tanh(logits.div_(softcap)).mul_(softcap)
                lse = torch.logsumexp(logits, dim=1)
                rows = torch.arange(y.shape[0], device=y.device)
                loss += (lse - logits[rows, y]).sum()
                if not (need_hidden or need_weight):
                    continue
                if softcap:  # keep z' for the factor 1 - (z'/c)^2: the softmax goes into a new tensor
                    grad = (logits - lse[:, None]).exp_()
                    grad[rows, y] -= 1
                    grad.mul_(logits.div_(softcap).square_().neg_().add_(1))
                else:  # the softmax takes the place of the logits it came from
                    grad = logits.sub_(lse[:, None]).exp_()
                    grad[rows, y] -= 1
                grad = grad.to(weight.dtype)
                if need_hidden:
                    grad_kept[start:start + chunk] = (grad @ weight).to(grad_kept.dtype)
                if need_weight:
                    grad_weight.addmm_(grad.t().float(), h.float())
        ctx.save_for_backward(positions, grad_kept, grad_weight)
        ctx.hidden_shape, ctx.hidden_dtype, ctx.weight_dtype = hidden.shape, hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        positions, grad_kept, grad_weight = ctx.saved_tensors
        grad_hidden = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_hidden = torch.zeros(ctx.hidden_shape, dtype=ctx.hidden_dtype, device=grad_loss.device)
            grad_hidden.index_copy_(0, positions, grad_kept * grad_loss.to(grad_kept.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_w, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             softcap: float | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Sum over trained positions of cross-entropy(softcap(hidden @ weight^T), targets), never materializing the logits.

    hidden [N, H]; weight [V, H] (an output head without bias); targets [N] with IGNORE_INDEX for
    positions that are not trained. Differentiable in hidden and weight (module docstring).
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, softcap or 0.0, chunk_elements)
