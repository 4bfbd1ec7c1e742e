"""`mtc bench`: train a preset on the GPU, measure where the step's time goes, and compare it with the
same model and batch trained by the peers (mtc.examples.baselines), each in a process of its own.

What is counted (printed with the results too):
- tokens/s: batch x sequence tokens per step / seconds per step in steady state: steps issued back to
  back, each step's end marked by an event on the compute stream; the median interval between
  consecutive ends (the CPU updates of a step overlap the next one, so each interval pays for one
  step's updates). The mean over the same steps is in the JSON as mean_step_s.
- model TFLOP/s: 6 * P * T per step (P: every parameter, embedding and head included, tied ones once;
  T: tokens per step). Recomputation and attention's T^2 terms are not counted. mtc's JSON also has
  tflops_with_attention: 3x the forward FLOPs the costs pass counts (every matmul, and attention's
  QK^T and PV with the causal half skipped), recomputation not counted.
- lower bound: the busiest resource in one measured step: compute-stream busy time, bytes copied in /
  the measured pinned host-to-device rate, bytes copied out / the device-to-host rate, the CPU
  optimizer's busy time; achieved/bound = bound / measured step time.
- optimizer hidden: the share of the CPU optimizer's busy time during which the compute stream was busy.
- memory: the mtc run is held to gpu_mem with torch.cuda.set_per_process_memory_fraction; the baselines
  may use the whole device.
- loss: whether every timed step's loss was finite, and whether the last was below the first.
"""
from __future__ import annotations

import collections
import gc
import json
import math
import os
import resource
import statistics
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

import mtc
from mtc.codegen.patterns import kernel_names
from mtc.codegen.stream_plan import STREAMS, busy_seconds
from mtc.codegen.tiles import TILE_TOKENS
from mtc.config import format_bytes, parse_bytes
from mtc.examples import models
from mtc.examples.baselines import HYPERPARAMETERS
from mtc import probe
from mtc.passes.schedule import MemoryBudgetError
from mtc.probe import copy_rates, lane_seconds

GB = 1e9


def run(preset: str, batch: tuple[int, int], gpu_mem: str = "80GB", steps: int = 5, warmup: int = 2,
        clip: float | None = 1.0, vs: tuple[str, ...] = (), trace_path: str | None = None,
        cpu_threads: int | None = None, peer_timeout_s: float | None = None, progress=None, kernels="auto",
        tile_tokens: int = TILE_TOKENS, traced: bool = True) -> dict:
    """mtc on `preset` at `batch`, then each baseline named in `vs` (mtc.examples.baselines.BASELINES) in a
    process of its own, once this process has let go of mtc's host and device memory; one that runs past
    peer_timeout_s is stopped and reported failed. progress(result, name) is called as each system's
    figures come in (name "mtc" first), with the result so far. traced=False leaves out the two steps
    timed per instruction (lanes, bounds, overlap), which at long sequences take minutes."""
    if not torch.cuda.is_available():
        raise RuntimeError("mtc bench measures a GPU and torch sees none")
    device = torch.device("cuda", torch.cuda.current_device())
    sequences, seq = batch
    tokens = sequences * seq
    inputs = models.random_batches(preset, batch, 2, device)
    result = {"preset": preset, "batch": f"{sequences}x{seq}", "tokens_per_step": tokens, "gpu_mem": gpu_mem,
              "clip": clip, "kernels": list(kernel_names(kernels, device)),
              "device": torch.cuda.get_device_name(device),
              "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "ceilings": _ceilings(device)}

    # Hold the run to gpu_mem: past it the caching allocator frees its cache and retries, and fails
    # rather than borrow memory the budget does not have.
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(gpu_mem, "gpu_mem") / total), device)
    rss_before = _rss_bytes()
    started = time.perf_counter()
    model = models.build(preset, device="meta")
    params = models.parameter_count(model)
    step = mtc.compile(model, gpu_mem=gpu_mem, example=inputs[0], clip_grad_norm=clip, device=device,
                       init=models.init_weights, cpu_threads=cpu_threads, optimizer=HYPERPARAMETERS, kernels=kernels,
                       tile_tokens=tile_tokens)
    store = step._store
    schedule = step.plan.schedule
    mine = {"params": params, "compile_s": time.perf_counter() - started, "slots": step.plan.schedule.slots,
            "planned_peak_bytes": step.plan.schedule.peak_bytes, "predicted_step_s": step.plan.predicted_step_seconds(),
            "kept_activations": len(step.plan.schedule.keep), "offloaded_inputs": len(step.plan.schedule.offload),
            "profile": step.plan.profile.name, "store_build_s": store.build_seconds,
            "host_state_bytes": store.host_bytes, "host_state_params": store.host_params,
            "host_state_bytes_per_param": store.host_bytes / max(1, store.host_params),
            "resident_stages": len(step.plan.schedule.resident), "stages": len(step.plan.schedule.stages),
            "tiled_stages": sum(schedule.tiled(i) for i in range(len(schedule.stages))), "tile_tokens": tile_tokens,
            "cpu_threads": step._engine.cpu_threads}
    mine["host_rss_added_bytes_per_param"] = (_rss_bytes() - rss_before) / params
    mine.update(time_steps(lambda i, step=step: step(*inputs[i % 2]), step.synchronize, steps, warmup, tokens, params,
                            device))
    mine["tflops_with_attention"] = 3 * sum(s.forward_flops for s in schedule.stages) / mine["step_s"] / 1e12
    if traced:
        mine.update(_traced_steps(step, inputs, result["ceilings"], mine["step_s"], trace_path))
    mine["peak_host_rss_bytes"] = peak_rss_bytes()
    mine["peak_host_rss_bytes_per_param"] = mine["peak_host_rss_bytes"] / params
    mine["within_gpu_mem"] = mine["peak_gpu_reserved_bytes"] <= parse_bytes(gpu_mem, "gpu_mem")
    result["mtc"] = mine
    del step, store, model
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0, device)

    if progress:
        progress(result, "mtc")
    result["vs"] = {}
    for name in vs:
        theirs = result["vs"][name] = baseline(name, preset, batch, steps, warmup, clip, peer_timeout_s)
        if "step_s" in theirs:
            theirs["mtc_speedup"] = theirs["step_s"] / mine["step_s"]
        if progress:
            progress(result, name)
    return result


def baseline(name: str, preset: str, batch: tuple[int, int], steps: int, warmup: int, clip: float | None,
             timeout_s: float | None = None) -> dict:
    """One baseline's figures, from a process of its own: {"not_installed": why} when its package is
    missing, {"does_not_fit": ...} when it runs out of device memory, {"failed": ...} on any other error
    or when it runs past timeout_s (it and every process it started are then killed)."""
    from mtc.examples.baselines import BASELINES

    if name not in BASELINES:
        raise ValueError(f"baseline={name!r} is not known; expected one of {', '.join(BASELINES)}")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "result.json")
        command = [sys.executable, "-m", f"mtc.examples.baselines.{BASELINES[name]}", "--preset", preset,
                   "--batch", f"{batch[0]}x{batch[1]}", "--steps", str(steps), "--warmup", str(warmup),
                   "--clip", str(clip or 0), "--json", path]
        started = time.perf_counter()
        status, last_lines = run_peer(command, timeout_s)
        if status != 0 or not os.path.exists(path):
            return {"failed": f"exit status {status}: " + " | ".join(last_lines)}
        with open(path) as f:
            result = json.load(f)
    result["process_s"] = time.perf_counter() - started
    return result


def run_peer(command: list[str], timeout_s: float | None) -> tuple[int, list[str]]:
    """Runs `command` in a session of its own, its output going to our stderr as it comes (a peer's set-up
    takes minutes); returns its exit status and its last lines, to say why should it fail. Past timeout_s,
    or when we are stopped, it and every process it started are killed."""
    last_lines = collections.deque(maxlen=3)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace", start_new_session=True)
    echo = threading.Thread(target=_echo, args=(process.stdout, last_lines), daemon=True)
    echo.start()
    stopped = []
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stopped.append(f"stopped after {timeout_s:g} s")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        echo.join(timeout=10)  # a process that left our session may still hold the pipe
    return process.returncode, stopped + list(last_lines)


def _echo(lines, last_lines: collections.deque) -> None:
    for line in lines:
        sys.stderr.write(line)
        if line.strip():
            last_lines.append(line.strip())


def summary(name: str, figures: dict) -> str:
    """One line on how a system's run ended, for progress while the others run."""
    if "step_s" in figures:
        return (f"{name}: {figures['step_s']:.3f} s/step, {figures['tokens_per_s']:,.0f} tokens/s, loss finite "
                f"{_yes(figures.get('loss_finite'))}")
    return _why_not(name, figures) or f"{name}: no figures"


def _why_not(name: str, figures: dict) -> str | None:
    """'name: not installed / does not fit / failed: why' for a system that gave no figures, else None."""
    status = next((k for k in ("not_installed", "does_not_fit", "failed") if k in figures), None)
    return f"{name}: {status.replace('_', ' ')}: {figures[status]}" if status else None


def sweep(preset: str, batches: list[tuple[int, int]], budgets: list[str], schedules=("solve", "spine"),
          steps: int = 4, warmup: int = 1, clip: float | None = None, cpu_threads: int | None = None,
          progress=print, calibrate: bool = True, kernels="auto") -> dict:
    """Measured against predicted, for every batch x gpu_mem x schedule, on one state store (built once;
    each row replans it). Each row is held to its gpu_mem like run().

    calibrate: first run the spine plan (every lane busy) at the first batch and the largest budget, and
    plan every row with the rates its steps showed (see mtc.probe.calibrate) instead of the machine's probed
    profile."""
    if not torch.cuda.is_available():
        raise RuntimeError("mtc bench measures a GPU and torch sees none")
    device = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(device).total_memory
    model = models.build(preset, device="meta")
    params = models.parameter_count(model)
    rows, step, profile, calibration = [], None, None, None
    if calibrate:
        calibration_inputs = models.random_batches(preset, batches[0], 2, device, seed=1)
        largest = max(budgets, key=lambda b: parse_bytes(b, "gpu_mem"))
        torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(largest, "gpu_mem") / total), device)
        step = mtc.compile(model, gpu_mem=largest, example=calibration_inputs[0], clip_grad_norm=clip, device=device,
                           init=models.init_weights, cpu_threads=cpu_threads, optimizer=mtc.AdamW(lr=1e-4),
                           schedule="spine", kernels=kernels)
        profile, calibration = probe.calibrate(step, calibration_inputs, warmup)
        progress(calibration)
    for sequences, seq in batches:
        inputs = models.random_batches(preset, (sequences, seq), 2, device)
        for gpu_mem in budgets:
            for schedule in schedules:
                row = {"preset": preset, "batch": f"{sequences}x{seq}", "gpu_mem": gpu_mem, "schedule": schedule,
                       "clip": clip, "kernels": list(kernel_names(kernels, torch.device("cuda")))}
                torch.cuda.set_per_process_memory_fraction(min(1.0, parse_bytes(gpu_mem, "gpu_mem") / total), device)
                try:
                    if step is None:
                        step = mtc.compile(model, gpu_mem=gpu_mem, example=inputs[0], clip_grad_norm=clip,
                                           device=device, init=models.init_weights, cpu_threads=cpu_threads,
                                           optimizer=mtc.AdamW(lr=1e-4), schedule=schedule, kernels=kernels)
                    else:
                        step = step.replan(gpu_mem=gpu_mem, example=inputs[0], schedule=schedule, profile=profile)
                except MemoryBudgetError as error:
                    row["does_not_fit"] = str(error).split(";")[0]
                    rows.append(row)
                    progress(row)
                    continue
                planned = step.plan.schedule
                row.update(slots=planned.slots, resident=len(planned.resident), kept=len(planned.keep),
                           offloaded=len(planned.offload), chunks=planned.chunks,
                           stages=len(planned.stages), predicted_step_s=step.plan.predicted_step_seconds(),
                           predicted_peak_bytes=planned.peak_bytes)
                try:
                    row.update(time_steps(lambda i, step=step, inputs=inputs: step(*inputs[i % 2]), step.synchronize,
                                           steps, warmup, sequences * seq, params, device))
                except torch.OutOfMemoryError as error:
                    row["out_of_memory"] = str(error).splitlines()[0]
                    step.synchronize()
                else:
                    row["busy_s"] = lane_seconds(step, inputs)
                    row["predicted_busy_s"] = busy_seconds(step.plan.stream_plan, step.plan.profile)
                    row["measured_over_predicted"] = row["step_s"] / row["predicted_step_s"]
                    row["peak_over_predicted"] = row["peak_gpu_allocated_bytes"] / row["predicted_peak_bytes"]
                    row["within_gpu_mem"] = row["peak_gpu_reserved_bytes"] <= parse_bytes(gpu_mem, "gpu_mem")
                rows.append(row)
                progress(row)
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return {"calibration": calibration, "rows": rows}


def sweep_table(rows: list[dict]) -> str:
    """One line per row, with the solver's speed-up over the spine plan on the same batch and budget."""
    spine = {(r["batch"], r["gpu_mem"]): r.get("step_s") for r in rows if r["schedule"] == "spine"}
    lines = [f"{'batch':<8}{'gpu_mem':>8} {'plan':<6}{'slots/res/keep/offl':>20}{'predicted':>10}{'measured':>9}"
             f"{'meas/pred':>10}{'peak pred':>11}{'peak alloc':>11}{'alloc/pred':>11}{'reserved':>10}"
             f"{'vs spine':>9}"]
    for r in rows:
        head = f"{r['batch']:<8}{r['gpu_mem']:>8} {r['schedule']:<6}"
        if "does_not_fit" in r:
            lines.append(head + "  does not fit: " + r["does_not_fit"][:80])
            continue
        shape = f"{r['slots']}/{r['resident']}/{r['kept']}/{r['offloaded']} of {r['stages']}"
        shape += f" x{r['chunks']}" if r.get("chunks", 1) > 1 else ""
        if "step_s" not in r:
            lines.append(head + f"{shape:>20}{r['predicted_step_s']:>10.3f}  out of memory")
            continue
        base = spine.get((r["batch"], r["gpu_mem"]))
        lines.append(head + f"{shape:>20}{r['predicted_step_s']:>10.3f}{r['step_s']:>9.3f}"
                     f"{r['measured_over_predicted']:>10.3f}{format_bytes(r['predicted_peak_bytes']):>11}"
                     f"{format_bytes(r['peak_gpu_allocated_bytes']):>11}{r['peak_over_predicted']:>11.3f}"
                     f"{format_bytes(r['peak_gpu_reserved_bytes']):>10}"
                     f"{(base / r['step_s']) if base else float('nan'):>9.2f}")
    return "\n".join(lines)


def _ceilings(device) -> dict:
    rates = copy_rates(device, 1 << 29)
    return {"h2d_bytes_per_s": rates["h2d"], "d2h_bytes_per_s": rates["d2h"], "both_bytes_per_s": rates["both"]}


def time_steps(one_step, synchronize, steps, warmup, tokens, params, device) -> dict:
    """Steady state: the clock runs from the device finishing one step to it finishing `steps` more, so
    the CPU updates that overlap the next step are counted once, as they are in a long run."""
    for index in range(warmup):
        one_step(index)
    synchronize()
    segments = torch.cuda.memory_stats(device).get("segment.all.allocated", 0)
    host = _host_allocations()
    torch.cuda.reset_peak_memory_stats(device)
    one_step(warmup)
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ends[0].record()
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    losses = []
    for index, end in enumerate(ends[1:]):
        losses.append(one_step(index))
        end.record()  # when the compute stream has finished this step
    torch.cuda.synchronize(device)
    mean = (time.perf_counter() - started) / steps
    synchronize()
    # The median of the per-step intervals: one slow step (a noisy host) does not move it.
    seconds = statistics.median(a.elapsed_time(b) / 1e3 for a, b in zip(ends, ends[1:]))
    # Counted before the losses are read: loss.item() stages through a pinned buffer of its own.
    allocations = {"device_mallocs_while_timed": torch.cuda.memory_stats(device).get("segment.all.allocated", 0)
                   - segments, "pinned_allocs_while_timed": (_host_allocations() - host) if host is not None else None}
    losses = [float(loss) for loss in losses]
    return {"step_s": seconds, "mean_step_s": mean, "tokens_per_s": tokens / seconds,
            "model_tflops": 6 * params * tokens / seconds / 1e12, "losses": losses,
            "loss_finite": all(math.isfinite(loss) for loss in losses),
            "loss_fell": losses[-1] < losses[0] if len(losses) > 1 else None,
            "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "peak_gpu_reserved_bytes": torch.cuda.max_memory_reserved(device), **allocations}


def _host_allocations() -> int | None:
    stats = getattr(torch.cuda, "host_memory_stats", None)
    return stats().get("num_host_alloc") if stats else None


def _traced_steps(step, inputs, ceilings, step_s, trace_path) -> dict:
    """Two steps back to back with every instruction timed; figures from the second."""
    engine = step._engine
    engine.start_trace()
    waited = engine.host_wait_seconds
    for index in range(2):
        step(*inputs[index])
    rows = engine.stop_trace()
    waited = engine.host_wait_seconds - waited
    if trace_path:
        with open(trace_path, "w") as f:
            json.dump(measured_chrome_trace(rows, engine.plan), f)
    second = [r for r in rows if r[0] == max(r[0] for r in rows)]
    busy = {stream: sum(end - start for _, instr, start, end in second if instr.stream == stream)
            for stream in STREAMS}
    bytes_in = sum(instr.bytes for _, instr, _, _ in second if instr.stream == "h2d")  # weights, fetched inputs
    bytes_out = sum(instr.bytes for _, instr, _, _ in second if instr.stream == "d2h")  # gradients, offloaded inputs
    bounds = {"compute": busy["compute"], "copy_in": bytes_in / ceilings["h2d_bytes_per_s"],
              "copy_out": bytes_out / ceilings["d2h_bytes_per_s"], "cpu_optimizer": busy["cpu"]}
    compute = [(start, end) for _, instr, start, end in rows if instr.stream == "compute"]
    # The first step's updates: the second step's forward is what they should hide behind.
    optimizer = [(start, end) for step, instr, start, end in rows if instr.stream == "cpu" and step != second[0][0]]
    optimizer_total = sum(end - start for start, end in optimizer)
    hidden = sum(_overlap(interval, compute) for interval in optimizer)
    bound = max(bounds.values())
    return {"busy_s": busy, "bytes_in_per_step": bytes_in, "bytes_out_per_step": bytes_out,
            "h2d_gb_per_s_average": bytes_in / step_s / GB, "d2h_gb_per_s_average": bytes_out / step_s / GB,
            "h2d_gb_per_s_while_copying": bytes_in / max(busy["h2d"], 1e-9) / GB,
            "d2h_gb_per_s_while_copying": bytes_out / max(busy["d2h"], 1e-9) / GB,
            "lower_bound_s": bound, "bound_by": max(bounds, key=bounds.get), "bounds_s": bounds,
            "achieved_over_bound": bound / step_s, "issuer_waited_for_updates_s": waited / 2,
            "optimizer_hidden_fraction": hidden / optimizer_total if optimizer_total else 1.0}


def _overlap(interval, intervals) -> float:
    start, end = interval
    return sum(max(0.0, min(end, e) - max(start, s)) for s, e in intervals)


def measured_chrome_trace(rows, plan) -> dict:
    """Measured intervals as a Chrome / Perfetto trace: one lane per stream, the CPU optimizer's included."""
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "mtc measured step"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": index, "args": {"name": stream}}
               for index, stream in enumerate(STREAMS)]
    for step, instr, start, end in rows:
        events.append({"name": f"{instr.op} {plan.stage_name(instr.stage)}", "ph": "X", "pid": 0,
                       "tid": STREAMS.index(instr.stream), "ts": start * 1e6, "dur": (end - start) * 1e6,
                       "args": {"step": step, "id": instr.id, "bytes": instr.bytes}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss does not: a
    process started by subprocess reports at least its parent's peak)."""
    from mtc.runtime.preflight import process_status_bytes

    return process_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def table(result: dict) -> str:
    """mtc and each baseline side by side; a baseline that did not run says why in its column's note."""
    systems = {"mtc": result["mtc"], **result.get("vs", {})}
    rows = [("step (s)", "step_s", "{:.3f}"), ("tokens/s", "tokens_per_s", "{:,.0f}"),
            ("model TFLOP/s (6PT)", "model_tflops", "{:.0f}"),
            ("mtc speedup (their step / mtc's)", "mtc_speedup", "{:.2f}x"),
            ("peak GPU allocated", "peak_gpu_allocated_bytes", None),
            ("peak GPU reserved", "peak_gpu_reserved_bytes", None),
            ("peak host RSS", "peak_host_rss_bytes", None),
            ("peak host RSS / param (B)", "peak_host_rss_bytes_per_param", "{:.1f}"),
            ("loss finite / fell", None, None)]
    width = 16
    lines = [f"mtc bench {result['preset']} {result['batch']} gpu_mem={result['gpu_mem']} clip={result['clip']} "
             f"on {result['device']} ({result['date']})",
             f"{'':<36}" + "".join(f"{name:>{width}}" for name in systems)]
    for label, key, form in rows:
        if key is None:
            cells = [f"{_yes(s['loss_finite'])} / {_yes(s['loss_fell'])}" if "loss_finite" in s else "-"
                     for s in systems.values()]
        else:
            cells = [_get(s, key, form) for s in systems.values()]
        lines.append(f"{label:<36}" + "".join(f"{cell:>{width}}" for cell in cells))
    lines += [why for why in (_why_not(name, theirs) for name, theirs in systems.items()) if why]
    mine = result["mtc"]
    if "tflops_with_attention" in mine:
        lines.append(f"mtc: {mine['tflops_with_attention']:.0f} model TFLOP/s counting attention's causal half too")
    if "bounds_s" not in mine:  # untraced
        return "\n".join(lines + [f"mtc: within gpu_mem: {_yes(mine['within_gpu_mem'])}; not traced"])
    bounds = ", ".join(f"{k} {v:.3f}" for k, v in mine["bounds_s"].items())
    lines += [f"mtc: lower bound {mine['lower_bound_s']:.3f} s ({mine['bound_by']}; {bounds}); "
              f"achieved/bound {mine['achieved_over_bound']:.2f}; within gpu_mem: {_yes(mine['within_gpu_mem'])}",
              f"mtc: H2D {mine['h2d_gb_per_s_average']:.1f} GB/s average, {mine['h2d_gb_per_s_while_copying']:.1f} "
              f"while copying; D2H {mine['d2h_gb_per_s_average']:.1f} / {mine['d2h_gb_per_s_while_copying']:.1f}; "
              f"optimizer hidden {100 * mine['optimizer_hidden_fraction']:.0f}%; device mallocs / pinned allocs "
              f"while timed {mine['device_mallocs_while_timed']} / {mine['pinned_allocs_while_timed']}",
              f"mtc: host state {mine['host_state_bytes_per_param']:.2f} B/param, RSS added by compile "
              f"{mine['host_rss_added_bytes_per_param']:.2f} B/param; {mine['slots']} slots, {mine['cpu_threads']} "
              f"optimizer threads"]
    return "\n".join(lines)


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "NO"


def _get(values: dict, key: str, form: str | None) -> str:
    if key not in values:
        return "-"
    return format_bytes(values[key]) if form is None else form.format(values[key])
