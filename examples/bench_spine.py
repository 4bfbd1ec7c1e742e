"""Check the spine on a GPU, then time it against the same model trained GPU-resident.

    python examples/bench_spine.py --out results.json [--preset 1b --batch 2x2048]

1. correctness: a small Llama, fp32 compute on the device, 5 steps against eager PyTorch on the same
   device with torch.optim.AdamW(fused=True); then bf16 compute against the fp32 reference.
2. calibration: the plan's predicted working set of one block's backward vs the measured peak.
3. timing: mtc (bf16 compute, fp32 master + AdamW on the host) vs the ceiling, the same model
   GPU-resident (fp32 master, bf16 autocast, fused AdamW on the GPU), same tokens, same clipping.
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import time

import torch

import mtc
from mtc.examples import models


def small_llama():
    return models.Llama(models.LlamaConfig(vocab_size=512, hidden=256, layers=4, heads=4, kv_heads=2,
                                           intermediate=512))


def batch(vocab, shape, seed, device):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=generator)
    return ids.to(device), torch.randint(0, vocab, shape, generator=generator).to(device)


def correctness(device) -> dict:
    torch.manual_seed(0)
    model = small_llama()
    reference = copy.deepcopy(model).to(device)
    hp = mtc.AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    step = mtc.compile(model, gpu_mem="64MB", example=batch(512, (2, 64), 99, device), optimizer=hp,
                       clip_grad_norm=1.0, device=device, compute_dtype=torch.float32)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
                                  fused=True)
    bf16 = mtc.compile(small_llama(), gpu_mem="64MB", example=batch(512, (2, 64), 99, device), optimizer=hp,
                       clip_grad_norm=1.0, device=device)
    losses, reference_losses, bf16_losses = [], [], []
    for index in range(5):
        ids, labels = batch(512, (2, 64), index, device)
        losses.append(float(step(ids, labels)))
        bf16_losses.append(float(bf16(ids, labels)))
        loss = reference(ids, labels)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        reference_losses.append(loss.item())
    mine = dict(step.named_parameters())
    param_error = max(float((mine[n] - p.detach().cpu()).abs().max() / p.detach().abs().max())
                      for n, p in reference.named_parameters())
    loss_error = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses))
    bf16_error = max(abs(a - b) / abs(b) for a, b in zip(bf16_losses, reference_losses))
    return {"fp32_loss_rel_error": loss_error, "fp32_param_rel_error": param_error,
            "bf16_loss_rel_error": bf16_error, "losses": losses, "reference_losses": reference_losses}


def calibration(model, example, device) -> dict:
    """Predicted vs measured transient bytes of the first block's recompute + backward."""
    planned = mtc.plan(model, "1TB", example, device=device)
    partition, costs = planned.partition, planned.plan.schedule.stages
    params = {n: p.detach().to(device, torch.bfloat16) for n, p in planned.params.items()}
    buffers = {n: b.to(device) for n, b in planned.buffers.items()}
    values = dict(zip(partition.graph_inputs, (t.to(device) for t in example)))
    with torch.no_grad():  # the prologue makes the block's real inputs
        prologue = partition.stages[0]
        outputs = prologue.template.function(device)(*[params[n] for n in prologue.params],
                                                     *[buffers[n] for n in prologue.buffers],
                                                     *[values[n] for n in prologue.inputs])
    values.update(zip(prologue.outputs, outputs))
    block = partition.stages[1]
    weights = [params[n].requires_grad_() for n in block.params]
    inputs = [values[n].detach().requires_grad_(values[n].is_floating_point()) for n in block.inputs]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    (out,) = block.template.function(device)(*weights, *[buffers[n] for n in block.buffers], *inputs)
    grads = torch.autograd.grad(out, weights + [inputs[0]], torch.ones_like(out))
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    del grads, out
    return {"tokens": example[0].numel(), "predicted_backward_bytes": costs[1].backward_bytes,
            "measured_backward_peak_bytes": measured}


def time_steps(run, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def time_eager(model, data, device, steps: int, tokens: int) -> dict:
    """The ceiling: the whole model GPU-resident, fp32 master, bf16 autocast, fused AdamW on the GPU."""
    resident = copy.deepcopy(model).to(device)
    optimizer = torch.optim.AdamW(resident.parameters(), lr=1e-4, fused=True)
    feed = iter(data * 2)

    def eager_step():
        ids, labels = (t.to(device, non_blocking=True) for t in next(feed))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = resident(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(resident.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats()
    step_s = statistics.median(time_steps(eager_step, steps + 1)[1:])
    return {"eager_step_s": step_s, "eager_tokens_per_s": tokens / step_s,
            "eager_peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def timing(preset: str, shape: tuple[int, int], device, steps: int) -> dict:
    torch.manual_seed(0)
    model = models.build(preset)
    params = models.parameter_count(model)
    data = [batch(model.head.weight.shape[0], shape, i, "cpu") for i in range(steps + 1)]
    tokens = shape[0] * shape[1]
    result = {"preset": preset, "batch": f"{shape[0]}x{shape[1]}", "params": params}

    result.update(time_eager(model, data, device, steps, tokens))
    torch.cuda.empty_cache()

    started = time.perf_counter()
    step = mtc.compile(model, gpu_mem="70GB", example=data[0], optimizer=mtc.AdamW(lr=1e-4), clip_grad_norm=1.0,
                       device=device)
    result["mtc_compile_s"] = time.perf_counter() - started
    result["mtc_predicted_step_s"] = step.plan.predicted_step_seconds()
    feed_mtc = iter(data * 2)
    torch.cuda.reset_peak_memory_stats()
    mtc_times = time_steps(lambda: step(*next(feed_mtc)), steps + 1)[1:]
    result["mtc_step_s"] = statistics.median(mtc_times)
    result["mtc_tokens_per_s"] = tokens / result["mtc_step_s"]
    result["mtc_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["mtc_planned_peak_bytes"] = step.plan.schedule.peak_bytes
    result["ratio_to_eager"] = result["mtc_tokens_per_s"] / result["eager_tokens_per_s"]
    result["model_tflops_mtc"] = 6 * params * tokens / result["mtc_step_s"] / 1e12
    result["peak_host_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["mtc_seconds_by_op"] = seconds_by_op(step, data[0])
    return result


def seconds_by_op(step, inputs) -> dict:
    """Where one in-order step's time goes: each instruction timed with the device synchronised."""
    engine, totals = step._engine, {}
    for op in {i.op for i in step.plan.stream_plan.instrs}:
        original = getattr(engine, "_" + op)

        def timed(instr, original=original, op=op):
            torch.cuda.synchronize()
            start = time.perf_counter()
            original(instr)
            torch.cuda.synchronize()
            totals[op] = totals.get(op, 0.0) + time.perf_counter() - start

        setattr(engine, "_" + op, timed)
    step(*inputs)
    for op in totals:
        delattr(engine, "_" + op)
    return totals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_spine.json")
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--batch", default="2x2048")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    report["correctness"] = correctness(device)
    print(json.dumps(report["correctness"], indent=1), flush=True)
    shape = tuple(int(x) for x in args.batch.split("x"))
    calibration_model = models.build(args.preset)
    report["calibration"] = calibration(calibration_model, batch(128256, shape, 0, "cpu"), device)
    del calibration_model
    print(json.dumps(report["calibration"], indent=1), flush=True)
    report["timing"] = timing(args.preset, shape, device, args.steps)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    t = report["timing"]
    print(f"\n{'system':<26}{'step s':>9}{'tokens/s':>11}{'peak GPU GiB':>14}")
    print(f"{'eager, GPU-resident':<26}{t['eager_step_s']:>9.3f}{t['eager_tokens_per_s']:>11,.0f}"
          f"{t['eager_peak_gpu_bytes'] / 2**30:>14.2f}")
    print(f"{'mtc spine (no overlap)':<26}{t['mtc_step_s']:>9.3f}{t['mtc_tokens_per_s']:>11,.0f}"
          f"{t['mtc_peak_gpu_bytes'] / 2**30:>14.2f}")
    print("mtc step by op (s): " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(t["mtc_seconds_by_op"].items())))
    print(f"mtc / eager = {t['ratio_to_eager']:.3f}; "
          f"predicted mtc step (overlapped plan) {t['mtc_predicted_step_s']:.3f} s")


if __name__ == "__main__":
    main()
