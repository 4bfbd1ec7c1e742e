"""Peer systems trained on the same model, batch and precision as `mtc bench`, each in a process of its own
(`mtc bench --vs eager,deepspeed,fsdp,megatrain`), so that one's host and device memory cannot help or hinder the next.

Each module has `train(preset, batch, steps, warmup, clip) -> dict` and runs as
`python -m mtc.examples.baselines.<module> --preset 3b --batch 4x4096 --json out.json`. The figures are counted
as mtc bench counts its own (mtc.bench.time_steps: steady-state median step, 6PT model FLOPs, peak device
memory; peak host RSS). What each is and how to install it: README.md beside this file.
"""
from __future__ import annotations

import argparse
import json
import socket
import time

import torch

from mtc.config import AdamW

BASELINES = {"eager": "eager", "deepspeed": "deepspeed_zero3", "fsdp": "fsdp2", "megatrain": "megatrain"}
"""`--vs` name -> module of this package."""


_STARTED = time.perf_counter()


def say(message: str) -> None:
    """Progress, with the seconds since this process started: a peer's set-up takes minutes."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", flush=True)


class NotInstalled(RuntimeError):
    """The peer's package is missing: reported as such, not as a failure."""


class Checkpointed(torch.nn.Module):
    """A block whose internals are recomputed in its backward (torch.utils.checkpoint, non-reentrant): every
    baseline trains with this recompute policy, as the peers' documented single-GPU set-ups do at these
    batch sizes and as mtc's plans do for the blocks they do not keep."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return torch.utils.checkpoint.checkpoint(self.block, *args, use_reentrant=False)


class NoGPU(RuntimeError):
    """Reported as a failure: every baseline trains on a GPU."""


def cuda_device() -> torch.device:
    if not torch.cuda.is_available():
        raise NoGPU("the baselines train on a CUDA GPU and torch sees none")
    return torch.device("cuda", torch.cuda.current_device())


def free_port() -> str:
    """A TCP port nothing listens on now, for a one-process group (two benches at once must not collide)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def checkpoint_blocks(model) -> None:
    model.layers = torch.nn.ModuleList(Checkpointed(block) for block in model.layers)


HYPERPARAMETERS = AdamW(lr=1e-4)
"""Every system's AdamW (mtc bench trains mtc with the same)."""


def torch_training_step(model, inputs: list, clip: float | None, autocast: bool = False):
    """`one_step(index) -> loss` for a model trained by torch.optim.AdamW(fused=True) on wherever its
    parameters live, clipping by global norm as torch.nn.utils.clip_grad_norm_ does."""
    hp = HYPERPARAMETERS
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                  weight_decay=hp.weight_decay, fused=True)

    def one_step(index):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(*inputs[index % len(inputs)])
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return one_step


def measure(one_step, synchronize, batch: tuple[int, int], steps: int, warmup: int, params: int,
            device: torch.device, settings: dict) -> dict:
    """mtc bench's figures for `one_step(index) -> loss`, and the settings the baseline ran with."""
    from mtc.bench import peak_rss_bytes, time_steps

    say(f"set up; {warmup} untimed steps, then {steps} timed")
    result = time_steps(one_step, synchronize, steps, warmup, batch[0] * batch[1], params, device)
    say(f"{result['step_s']:.3f} s/step")
    peak = peak_rss_bytes()
    result.update(params=params, peak_host_rss_bytes=peak, peak_host_rss_bytes_per_param=peak / params,
                  settings=settings, device=torch.cuda.get_device_name(device), torch=torch.__version__)
    return result


def main(train, argv=None) -> int:
    parser = argparse.ArgumentParser(description=train.__doc__)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--batch", required=True, help="sequences x tokens, e.g. 4x4096")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--clip", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--json", required=True, help="where the figures go")
    args = parser.parse_args(argv)
    sequences, _, seq = args.batch.partition("x")
    try:
        result = train(args.preset, (int(sequences), int(seq)), args.steps, args.warmup, args.clip or None)
    except NotInstalled as error:
        result = {"not_installed": str(error)}
    except NoGPU as error:
        result = {"failed": str(error)}
    except torch.OutOfMemoryError as error:
        result = {"does_not_fit": str(error).splitlines()[0]}
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0
