"""A model whose training state outgrows host RAM, trained with part of its optimizer state on disk (compile's
nvme): the plan without the disk is refused first, to show that RAM alone does not hold it.

    python -m mtc.examples.nvme_tier --preset 8b:52 --batch 4x4096 --gpu-mem 80GB --nvme /path/on/nvme --json out.json

Measures the directory's disk first (runtime/disk.disk_rates, the tier's own I/O) and plans with those rates; then
times `--steps` steps after one warm-up step and reports tokens/s and the disk bytes a second the tier moved,
against the measured rates.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time

import torch

import mtc
from mtc.bench import time_steps
from mtc.config import parse_batch
from mtc.examples import models
from mtc.probe import profile_for
from mtc.runtime.disk import disk_rates


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="8b:52")
    parser.add_argument("--batch", default="4x4096")
    parser.add_argument("--gpu-mem", default="80GB")
    parser.add_argument("--nvme", required=True, metavar="DIR")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("nvme_tier measures a GPU run and torch sees none")
    device = torch.device("cuda", torch.cuda.current_device())
    batch = parse_batch(args.batch)
    read, write, direct = disk_rates(args.nvme, 2 << 30)
    print(f"disk {args.nvme}: read {read / 1e9:.2f} GB/s, write {write / 1e9:.2f} GB/s "
          f"({'O_DIRECT' if direct else 'page cache'})", flush=True)
    profile = dataclasses.replace(profile_for(device), disk_read_bytes_per_s=read, disk_write_bytes_per_s=write)
    inputs = models.random_batches(args.preset, batch, 2, device)
    model = models.build(args.preset, device="meta")
    params = models.parameter_count(model)
    result = {"preset": args.preset, "batch": args.batch, "gpu_mem": args.gpu_mem, "params": params,
              "device": torch.cuda.get_device_name(device), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"), "disk_read_bytes_per_s": read, "disk_write_bytes_per_s": write,
              "o_direct": direct}
    budget = importlib.import_module("mtc.compile")._host_budget(device)  # what compile plans for
    try:
        mtc.plan(model, args.gpu_mem, inputs[0], clip=True, device=device, profile=profile, **budget)
        result["ram_only"] = "fits"
    except MemoryError as error:
        result["ram_only"] = f"refused: {error}"
    print(f"RAM alone: {result['ram_only'][:400]}", flush=True)
    started = time.perf_counter()
    step = mtc.compile(model, gpu_mem=args.gpu_mem, example=inputs[0], device=device, init=models.init_weights,
                       optimizer=mtc.AdamW(lr=1e-4), clip_grad_norm=1.0, profile=profile, nvme=args.nvme)
    result["compile_s"] = time.perf_counter() - started
    print(step.plan.summary(), flush=True)
    tier = step._store.disk
    moved = (tier.bytes_read, tier.bytes_written) if tier else (0, 0)
    clock = time.perf_counter()
    row = time_steps(lambda i: step(*inputs[i % 2]), step.synchronize, args.steps, 1, batch[0] * batch[1], params,
                     device)
    wall = time.perf_counter() - clock  # the warm-up step and the timed ones, and their disk traffic
    schedule = step.plan.schedule
    result.update(row, predicted_step_s=step.plan.predicted_step_seconds(), slots=schedule.slots,
                  resident=len(schedule.resident), disk_stages=len(schedule.disk),
                  disk_bytes=step.plan.header["disk_bytes"], host_bytes=step.plan.header["host_bytes"])
    if tier:
        read_bytes, written_bytes = tier.bytes_read - moved[0], tier.bytes_written - moved[1]
        result.update(disk_read_bytes=read_bytes, disk_written_bytes=written_bytes,
                      disk_read_achieved_bytes_per_s=read_bytes / wall,
                      disk_write_achieved_bytes_per_s=written_bytes / wall)
    print(f"{args.preset} ({params / 1e9:.2f}B) {args.batch}: step {row['step_s']:.2f} s (predicted "
          f"{result['predicted_step_s']:.2f}), {row['tokens_per_s']:,.0f} tokens/s; {len(schedule.disk)} stages' state "
          f"on disk ({result['disk_bytes'] / 2**30:.1f} GiB); disk moved "
          f"{result.get('disk_read_achieved_bytes_per_s', 0) / 1e9:.2f} GB/s read, "
          f"{result.get('disk_write_achieved_bytes_per_s', 0) / 1e9:.2f} GB/s written over the run", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
