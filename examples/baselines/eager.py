"""The ceiling: the same model GPU-resident in eager PyTorch (fp32 weights, bf16 autocast, fused AdamW on
the GPU), blocks recomputed in backward. Needs the whole training state (16 B/param) on the GPU."""
from __future__ import annotations

import sys

import torch

from mtc.examples import models
from mtc.examples.baselines import checkpoint_blocks, cuda_device, main, measure, torch_training_step


def train(preset: str, batch: tuple[int, int], steps: int, warmup: int, clip: float | None) -> dict:
    """GPU-resident eager PyTorch."""
    device = cuda_device()
    inputs = models.random_batches(preset, batch, 2, device)
    torch.manual_seed(0)
    model = models.build(preset, device=device)
    params = models.parameter_count(model)
    checkpoint_blocks(model)
    one_step = torch_training_step(model, inputs, clip, autocast=True)
    return measure(one_step, lambda: torch.cuda.synchronize(device), batch, steps, warmup, params, device,
                   {"optimizer": "torch.optim.AdamW(fused=True) on the GPU", "precision": "fp32 weights, bf16 autocast",
                    "recompute": "every block (torch.utils.checkpoint)"})


if __name__ == "__main__":
    sys.exit(main(train))
