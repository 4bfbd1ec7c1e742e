"""Data-parallel scaling on one host's GPUs: tokens/s of a preset on N GPUs against one.

    torchrun --nproc_per_node 1 -m mtc.examples.data_parallel --preset 3b --batch 4x4096 --json one.json
    torchrun --nproc_per_node 2 -m mtc.examples.data_parallel --preset 3b --batch 4x4096 --json two.json

--batch is each GPU's (so N GPUs train on N times the tokens a step). A step is as long as the slowest rank's:
the median step of `--steps` after 2 warm-up steps (mtc.bench.time_steps), taken as the largest over the ranks.
Rank 0 prints one line and writes the JSON.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist

import mtc
from mtc.bench import time_steps
from mtc.config import parse_batch
from mtc.examples import models
from mtc.runtime.distributed import launched, local_rank, process_group


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="3b")
    parser.add_argument("--batch", default="4x4096", help="sequences x tokens, on each GPU")
    parser.add_argument("--gpu-mem", default="80GB")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("data_parallel measures GPUs and torch sees none")
    if launched():
        process_group("cuda")
    rank, ranks = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batch = parse_batch(args.batch)
    device = torch.device("cuda", local_rank())
    torch.cuda.set_device(device)
    inputs = models.random_batches(args.preset, batch, 2, device, seed=rank)  # each rank its own rows
    model = models.build(args.preset, device="meta")
    params = models.parameter_count(model)
    started = time.perf_counter()
    step = mtc.compile(model, gpu_mem=args.gpu_mem, example=inputs[0], device=device, init=models.init_weights,
                       optimizer=mtc.AdamW(lr=1e-4), clip_grad_norm=1.0, progress=rank == 0)
    compile_s = time.perf_counter() - started
    row = time_steps(lambda i: step(*inputs[i % 2]), step.synchronize, args.steps, 2, batch[0] * batch[1], params,
                     device)
    seconds = row["step_s"]
    if ranks > 1:
        slowest = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=step.parallel.host_group)
        seconds = float(slowest)
    tokens_per_s = ranks * batch[0] * batch[1] / seconds
    if rank != 0:
        return
    schedule = step.plan.schedule
    result = {"preset": args.preset, "batch_per_gpu": args.batch, "gpu_mem": args.gpu_mem, "gpus": ranks,
              "params": params, "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "compile_s": compile_s, "step_s": seconds,
              "rank0_step_s": row["step_s"], "tokens_per_s": tokens_per_s,
              "model_tflops_per_gpu": 6 * params * batch[0] * batch[1] / seconds / 1e12,
              "predicted_step_s": step.plan.predicted_step_seconds(), "slots": schedule.slots,
              "resident": len(schedule.resident), "losses": row["losses"]}
    print(f"{args.preset} {args.batch} per GPU on {ranks} GPU(s): step {seconds:.3f} s (predicted "
          f"{result['predicted_step_s']:.3f}), {tokens_per_s:,.0f} tokens/s, {result['model_tflops_per_gpu']:.0f} "
          f"model TFLOP/s per GPU; {schedule.slots} slots, {len(schedule.resident)} resident", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
