"""PyTorch FSDP2 with CPU offload: `fully_shard` on every block and on the root, CPUOffloadPolicy(pin_memory=
True) (fp32 sharded parameters, gradients and AdamW state in pinned host memory; each block's parameters
copied to the GPU for its forward and backward), MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32),
world size 1, and torch.optim.AdamW(fused=True) stepping on the CPU: the set-up the FSDP2 docs and
torchtitan give for CPU offload."""
from __future__ import annotations

import os
import sys

import torch

from mtc.examples import models
from mtc.examples.baselines import (NotInstalled, checkpoint_blocks, cuda_device, free_port, main, measure,
                                    say, torch_training_step)


def train(preset: str, batch: tuple[int, int], steps: int, warmup: int, clip: float | None) -> dict:
    """PyTorch FSDP2, CPUOffloadPolicy."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
    except ImportError as error:
        raise NotInstalled(f"FSDP2 needs torch >= 2.6 ({error})") from error
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", free_port())
    device = cuda_device()
    torch.distributed.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        inputs = models.random_batches(preset, batch, 2, device)
        torch.manual_seed(0)
        model = models.build(preset, device="cpu")
        params = models.parameter_count(model)
        say(f"model built on the host ({params:,} parameters)")
        checkpoint_blocks(model)
        policy = {"mesh": init_device_mesh("cuda", (1,)),
                  "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                  "offload_policy": CPUOffloadPolicy(pin_memory=True)}
        for block in model.layers:
            fully_shard(block, **policy)
        fully_shard(model, **policy)
        model.inv_freq = model.inv_freq.to(device)  # a buffer, not sharded: the forward reads it on the GPU
        one_step = torch_training_step(model, inputs, clip)
        return measure(one_step, lambda: torch.cuda.synchronize(device), batch, steps, warmup, params, device,
                       {"optimizer": "torch.optim.AdamW(fused=True) on the CPU", "cpu_threads": torch.get_num_threads(),
                        "precision": "fp32 sharded parameters on the host, bf16 compute, fp32 gradient reduction",
                        "recompute": "every block (torch.utils.checkpoint)"})
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(train))
