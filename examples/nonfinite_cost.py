"""What the non-finite check (compile's skip_nonfinite) costs on a GPU: one state store, four plans.

    python -m mtc.examples.nonfinite_cost [--preset 3b] [--batch 4x4096] [--gpu-mem 80GB] [--json out.json]

Without clipping, each block's update can start as its gradient lands; the check needs the global gradient
norm first, as clipping does, so the updates wait for the end of the backward. Each row is that setting's
plan (Step.replan) timed on the same weights: median step of `--steps` after 2 warm-up steps.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import mtc
from mtc.bench import time_steps
from mtc.examples import models

ROWS = (("none", None, False), ("none", None, True), ("1.0", 1.0, True), ("1.0", 1.0, False),
        ("none (again)", None, False))
"""(clipping as printed, clip_grad_norm, skip_nonfinite); the first setting again last, to show the drift."""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="3b")
    parser.add_argument("--batch", default="4x4096")
    parser.add_argument("--gpu-mem", default="80GB")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("nonfinite_cost measures a GPU and torch sees none")
    batch = tuple(int(n) for n in args.batch.split("x"))
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, mtc.parse_bytes(args.gpu_mem) / total), device)
    inputs = models.random_batches(args.preset, batch, 2, device)
    model = models.build(args.preset, device="meta")
    params = models.parameter_count(model)
    step = mtc.compile(model, gpu_mem=args.gpu_mem, example=inputs[0], device=device, init=models.init_weights,
                       optimizer=mtc.AdamW(lr=1e-4), clip_grad_norm=ROWS[0][1], skip_nonfinite=ROWS[0][2])
    result = {"preset": args.preset, "batch": args.batch, "gpu_mem": args.gpu_mem, "params": params,
              "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    print(f"{'clipping':14s} {'check':6s} {'step s':>8s} {'predicted':>9s} {'tokens/s':>10s}  plan")
    for index, (clipping, clip, skip) in enumerate(ROWS):
        if index:
            step = step.replan(clip_grad_norm=clip, skip_nonfinite=skip)
        row = time_steps(lambda i: step(*inputs[i % 2]), step.synchronize, args.steps, 2, batch[0] * batch[1],
                         params, device)
        schedule = step.plan.schedule
        row.update(clipping=clipping, check=skip, predicted_step_s=step.plan.predicted_step_seconds(),
                   slots=schedule.slots, resident=len(schedule.resident), skipped=step.skipped_steps)
        result["rows"].append(row)
        print(f"{clipping:14s} {'on' if skip else 'off':6s} {row['step_s']:8.3f} {row['predicted_step_s']:9.3f} "
              f"{row['tokens_per_s']:10,.0f}  {schedule.slots} slots, {row['resident']} resident", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
