"""Run under torchrun (gloo): shard a 4-bit layer with FSDP2 and check its bytes and output survive.

The packed codes are chosen so that byte pairs read as NaN when viewed as bfloat16 (the patterns
bitsandbytes #1945 loses when NF4 storage is kept as bf16). Exits 0 when, on every rank, the
gathered codes, absmax and nested absmax are bit-identical to the originals and the sharded layer's
forward equals the unsharded one's. Argument: a directory where rank 0 writes `ok`.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn


def main(out_dir: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nibbletune.modules.linear_nf4 import LinearNF4
    from nibbletune.quant import quantize
    from nibbletune.training.distributed import storage_as_parameters

    dist.init_process_group("gloo")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=generator)
    layer = LinearNF4(quantize(weight, "nf4", 64, True), compute_dtype=torch.float32)
    nan_pairs = torch.tensor([0xC1, 0x7F, 0xFF, 0xFF, 0xC0, 0xFF, 0x81, 0x7F], dtype=torch.uint8)
    flat = layer.packed_codes.view(-1)
    flat[: nan_pairs.numel()] = nan_pairs
    assert torch.isnan(flat[: nan_pairs.numel()].view(torch.bfloat16)).all()
    originals = {name: getattr(layer, name).clone() for name in ("packed_codes", "absmax", "nested_absmax")}
    x = torch.randn(5, 64, generator=generator)
    expected = layer(x)

    holder = nn.Sequential(layer)
    storage_as_parameters(holder)
    fully_shard(holder, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    local = layer.packed_codes.to_local().numel()
    assert local < flat.numel(), f"rank {dist.get_rank()}: codes not sharded ({local} of {flat.numel()})"
    got = holder(x)
    holder.unshard()
    for name, original in originals.items():
        gathered = getattr(layer, name)
        gathered = gathered.full_tensor() if hasattr(gathered, "full_tensor") else gathered
        assert gathered.dtype == original.dtype and torch.equal(gathered.view(torch.uint8), original.view(torch.uint8)), name
    assert torch.equal(got, expected), "sharded forward differs"
    dist.barrier()
    if dist.get_rank() == 0:
        (Path(out_dir) / "ok").write_text("ok\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
