"""DeepSpeed ZeRO-3 with parameters and optimizer state offloaded to the CPU (pinned), its CPU AdamW
(DeepSpeedCPUAdam, chosen by DeepSpeed for an AdamW optimizer whose state is offloaded), bf16, the model
built under deepspeed.zero.Init: the set-up DeepSpeed documents for training a model larger than one GPU
on that GPU and its host ("ZeRO-Offload", "ZeRO-Infinity" tutorials). Bucket and prefetch sizes are
DeepSpeed's defaults; overlap_comm and contiguous_gradients are on, as those tutorials set them.

Single process, without the deepspeed launcher (RANK/WORLD_SIZE/LOCAL_RANK set here). Installing it where
it cannot be downloaded: README.md beside this file.
"""
from __future__ import annotations

import os
import sys

import torch

from mtc.examples import models
from mtc.examples.baselines import (HYPERPARAMETERS, NotInstalled, checkpoint_blocks, cuda_device, free_port, main,
                                    measure, say)


def config(sequences: int, clip: float | None) -> dict:
    hp = HYPERPARAMETERS
    offload = {"device": "cpu", "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": sequences, "gradient_accumulation_steps": 1,
            "gradient_clipping": clip or 0.0, "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": hp.lr, "betas": list(hp.betas), "eps": hp.eps,
                                                      "weight_decay": hp.weight_decay}},
            "zero_optimization": {"stage": 3, "offload_param": offload, "offload_optimizer": offload,
                                  "overlap_comm": True, "contiguous_gradients": True},
            "steps_per_print": 1 << 30}


def train(preset: str, batch: tuple[int, int], steps: int, warmup: int, clip: float | None) -> dict:
    """DeepSpeed ZeRO-3, parameters and optimizer offloaded to the CPU."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", free_port()), ("DS_SKIP_CUDA_CHECK", "1")):
        os.environ.setdefault(name, value)
    try:
        import deepspeed
    except ImportError as error:
        raise NotInstalled(f"deepspeed is not importable ({error}); see examples/baselines/README.md") from error
    device = cuda_device()
    inputs = models.random_batches(preset, batch, 2, device)
    settings = config(batch[0], clip)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=settings):
        # Llama.__init__ ends with self.apply(init_weights), which zero.Init runs on gathered parameters.
        model = models.build(preset, device=device)
    params = sum(p.ds_numel for p in model.parameters())
    say(f"model built under zero.Init ({params:,} parameters)")
    checkpoint_blocks(model)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=settings)
    say("deepspeed.initialize done")
    # bf16 mode casts buffers too; the rotary frequencies stay fp32, as in the other systems.
    engine.module.inv_freq = models.rope_inv_freq(model.cfg.hidden // model.cfg.heads, model.cfg.rope_theta).to(device)

    def one_step(index):
        loss = engine(*inputs[index % 2])
        engine.backward(loss)
        engine.step()
        return loss.detach()

    return measure(one_step, lambda: torch.cuda.synchronize(device), batch, steps, warmup, params, device,
                   {"deepspeed": deepspeed.__version__, "config": settings,
                    "optimizer": type(engine.optimizer.optimizer).__name__ if hasattr(engine.optimizer, "optimizer")
                    else type(engine.optimizer).__name__, "recompute": "every block (torch.utils.checkpoint)"})


if __name__ == "__main__":
    sys.exit(main(train))
