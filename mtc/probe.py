"""probe: measure this machine's rates into a HardwareProfile, save it, and find the profile a plan uses.

`mtc probe` measures what the planner simulates: pinned copy rates each way (alone and beside the host
AdamW), a decoder block's forward and backward, AdamW on the host (alone, and beside copies running as
they do in a step: host memory bandwidth is shared) and on the device, and host RAM. `--calibrate
PRESET` then runs a real step of that model and scales each rate to what the step showed (calibrate).
The profile goes to ~/.cache/mtc/profile-<device>.json (or $MTC_PROFILE), where mtc.compile and
`mtc plan` find it; without one they use the shipped profile for the device's name.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import tempfile
import threading
import time

import torch

from mtc.config import A100, CPU, H100, H200, RTX4090, AdamW, HardwareProfile
from mtc.runtime.preflight import host_meminfo

PROFILE_ENV = "MTC_PROFILE"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def profile_path(name: str) -> str:
    """Where the probed profile of device `name` is kept ($MTC_PROFILE overrides)."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return os.environ.get(PROFILE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "mtc", f"profile-{slug}.json")


def shipped_profile(name: str) -> HardwareProfile:
    """The shipped profile for a device name (torch.cuda.get_device_name, or "cpu")."""
    lowered = name.lower()
    if lowered == "cpu":
        return CPU
    for key, profile in (("h200", H200), ("h100", H100), ("a100", A100), ("4090", RTX4090)):
        if key in lowered:
            return profile
    return H100


def profile_for(device: torch.device, device_known: bool = True) -> HardwareProfile:
    """The profile `mtc probe` saved for this device if there is one, else the shipped one.

    device_known=False (planning for a GPU this machine does not have): the file $MTC_PROFILE names, or
    the shipped H100 profile.
    """
    name = device_name(device) if device_known else "planned GPU"
    path = profile_path(name)
    if os.path.exists(path):
        return load(path)
    return shipped_profile(name) if device_known else H100


def resolve_profile(value) -> HardwareProfile:
    """A HardwareProfile, the name of a shipped one, or the path of a saved one."""
    from mtc.config import PROFILES

    if isinstance(value, HardwareProfile):
        return value
    if isinstance(value, str) and value in PROFILES:
        return PROFILES[value]
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
        return load(value)
    raise ValueError(f"profile={value!r} is not valid; expected a HardwareProfile, one of {sorted(PROFILES)}, "
                     f"or the path of a profile `mtc probe` saved")


def save(profile: HardwareProfile, path: str) -> None:
    """Write atomically: a crash mid-write leaves any earlier profile intact."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp", delete=False) as f:
        json.dump(profile.to_json(), f, indent=1)
    os.replace(f.name, path)


def load(path: str) -> HardwareProfile:
    try:
        with open(path) as f:
            return HardwareProfile.from_json(json.load(f))
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a hardware profile ({error}); run `mtc probe` to write one") from error


# -- measurements -----------------------------------------------------------------------------------

def probe(device: torch.device, cpu_threads: int | None = None, quick: bool = False) -> HardwareProfile:
    """Measure this machine. quick=True uses small sizes (seconds, rougher numbers)."""
    from mtc.runtime.engine import default_cpu_threads

    threads = cpu_threads or default_cpu_threads()
    torch.set_num_threads(threads)
    params = 1 << (22 if quick else 26)
    host_optimizer = _host_adamw_rate(params)
    name = device_name(device)
    if device.type == "cuda":
        copies = copy_rates(device, 1 << (24 if quick else 29))
        # As in a step: copies in and out now and then (COPY_DUTY) while the host optimizer runs; its
        # mean rate over many passes, not the best one, which would be a pass the copies missed.
        stop = threading.Event()
        runner = threading.Thread(target=_copy_loop, args=(device, 1 << (24 if quick else 28), stop))
        runner.start()
        try:
            host_contended = _host_adamw_rate(params, passes=12)
        finally:
            stop.set()
            runner.join()
        copy_contended = _copies_beside(device, 1 << (24 if quick else 29), lambda: _host_adamw_rate(params))
        rates = dict(h2d_bytes_per_s=min(copies["h2d"], copy_contended["h2d"]),
                     d2h_bytes_per_s=min(copies["d2h"], copy_contended["d2h"]),
                     flops_per_s=_block_rate(device, quick), optimizer_params_per_s=host_contended,
                     gpu_optimizer_params_per_s=_device_adamw_rate(device, params))
        detail = (f"alone: H2D {copies['h2d'] / 1e9:.1f} GB/s, D2H {copies['d2h'] / 1e9:.1f} GB/s, both "
                  f"{copies['both'] / 1e9:.1f} GB/s, host AdamW {host_optimizer / 1e9:.2f} G params/s")
    else:
        copy = _host_copy_rate(1 << (24 if quick else 28))
        rates = dict(h2d_bytes_per_s=copy, d2h_bytes_per_s=copy, flops_per_s=_gemm_rate(device, 512 if quick else 2048),
                     optimizer_params_per_s=host_optimizer, gpu_optimizer_params_per_s=host_optimizer)
        detail = "copies are host memcpy"
    return HardwareProfile(
        f"probed {name}", host_bytes=host_meminfo("MemTotal") or 0, **rates,
        source=f"mtc probe{' --quick' if quick else ''} on {name}, {os.cpu_count()} cores, {threads} optimizer threads, "
               f"{time.strftime('%Y-%m-%d')}; {detail}")


def calibrate(step, inputs: list, warmup: int = 1) -> tuple[HardwareProfile, dict]:
    """The step's profile with each lane's rate scaled by predicted / measured busy time in a traced step:
    the rates this model's kernels and this host's optimizer reach inside a step, with everything else
    running beside them (the probe measures them one or two at a time; on the H100 and H200 machines of
    BENCHMARKS.md the host AdamW reached 0.7-0.85 of its probed rate inside a step). The device AdamW rate,
    which a step that updates nothing on the device cannot show, is timed on its own (as `mtc probe` does).
    Returns the profile and what it rests on."""
    from mtc.codegen.stream_plan import busy_seconds

    for index in range(warmup + 1):
        step(*inputs[index % len(inputs)])
    step.synchronize()
    measured = lane_seconds(step, inputs, steps=CALIBRATION_STEPS)
    profile = step.plan.profile
    predicted = busy_seconds(step.plan.stream_plan, profile)
    rate = {"h2d": "h2d_bytes_per_s", "d2h": "d2h_bytes_per_s", "compute": "flops_per_s",
            "cpu": "optimizer_params_per_s"}
    scaled = {field: getattr(profile, field) * predicted[lane] / measured[lane]
              for lane, field in rate.items() if measured[lane] > 0 and predicted[lane] > 0}
    device = step._settings["device"]
    if device.type == "cuda":  # the spine step updates nothing on the device: time the engine's own kernel
        scaled["gpu_optimizer_params_per_s"] = _device_adamw_rate(device, 1 << 26)
    calibrated = dataclasses.replace(profile, name=f"{profile.name}, calibrated in-step", **scaled,
                                     source=f"{profile.source}; lane rates scaled to a traced step of "
                                            f"{step.plan.header['model']} ({', '.join(step.plan.header['inputs'])})")
    return calibrated, {"probed": profile.to_json(), "calibrated": calibrated.to_json(),
                        "measured_busy_s": measured, "predicted_busy_s": predicted}


CALIBRATION_STEPS = 4
"""Steps a calibration's lane rates are the median of: on the H200 machines (2026-11-22) the host AdamW lane
of one plan varied by 10-20% from step to step and from minute to minute, and one step's rate had set
every row's prediction."""


def lane_seconds(step, inputs: list, steps: int = 1) -> dict:
    """Busy seconds per stream, the median over `steps` traced steps after a first traced one."""
    from mtc.codegen.stream_plan import STREAMS

    engine = step._engine
    engine.start_trace()
    for index in range(steps + 1):
        step(*inputs[index % len(inputs)])
    rows = engine.stop_trace()
    first = min(r[0] for r in rows)
    busy = {(s, stream): 0.0 for s in range(first + 1, first + steps + 1) for stream in STREAMS}
    for s, instr, start, end in rows:
        if s > first:
            busy[s, instr.stream] += end - start
    return {stream: statistics.median(busy[s, stream] for s in range(first + 1, first + steps + 1))
            for stream in STREAMS}


def calibrated_on(preset: str, batch: tuple[int, int], gpu_mem: str, device: torch.device,
                  profile: HardwareProfile, cpu_threads: int | None = None) -> tuple[HardwareProfile, dict]:
    """calibrate() on the spine plan (every lane busy) of an example preset built on the meta device."""
    import mtc
    from mtc.examples import models

    model = models.build(preset, device="meta")
    inputs = models.random_batches(preset, batch, 2, device)
    step = mtc.compile(model, gpu_mem=gpu_mem, example=inputs[0], clip_grad_norm=1.0, device=device,
                       init=models.init_weights, cpu_threads=cpu_threads, profile=profile, schedule="spine")
    return calibrate(step, inputs)


def _best_seconds(work, repeats: int = 3, synchronize=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        work()
        synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def _host_adamw_rate(params: int, passes: int = 0) -> float:
    """Params/s of the engine's host update (bf16 gradient widened, fused AdamW, bf16 weights out): the
    best of three passes, or the mean of `passes`."""
    from mtc.runtime.optimizer import adamw_step, scratch_for
    from mtc.runtime.store import STREAMED, Group

    group = Group("probe", [("w", torch.Size([params]))], torch.bfloat16, STREAMED, torch.device("cpu"))
    scratch = scratch_for([group])
    hp = AdamW(lr=1e-4)
    adamw_step(group, hp, scratch)  # first touch of the moments' pages
    if passes:
        start = time.perf_counter()
        for _ in range(passes):
            adamw_step(group, hp, scratch)
        return passes * params / (time.perf_counter() - start)
    return params / _best_seconds(lambda: adamw_step(group, hp, scratch))


def _device_adamw_rate(device: torch.device, params: int) -> float:
    from mtc.runtime.optimizer import adamw_step, scratch_for
    from mtc.runtime.store import RESIDENT, Group

    group = Group("probe", [("w", torch.Size([params]))], torch.bfloat16, RESIDENT, device)
    scratch = scratch_for([group], device)
    hp = AdamW(lr=1e-4)
    adamw_step(group, hp, scratch)
    seconds = _best_seconds(lambda: adamw_step(group, hp, scratch), synchronize=lambda: torch.cuda.synchronize(device))
    return params / seconds


def copy_rates(device: torch.device, size: int) -> dict:
    """Pinned host<->device bytes/s, one way and both at once."""
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    back = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    gpu_in, gpu_out = (torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2))
    streams = torch.cuda.Stream(device), torch.cuda.Stream(device)

    def copies(*pairs):
        for stream, (dst, src) in zip(streams, pairs):
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)

    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    return {"h2d": size / _best_seconds(lambda: copies((gpu_in, host)), 5, sync),
            "d2h": size / _best_seconds(lambda: copies((back, gpu_out)), 5, sync),
            "both": 2 * size / _best_seconds(lambda: copies((gpu_in, host), (back, gpu_out)), 5, sync)}


COPY_DUTY = 0.25
"""Share of the time copies run beside the host optimizer in a step: 20-28% in every 8B row of the H100
sweep of 2026-11-22 (BENCHMARKS.md); the host optimizer's rate is probed with copies running that much."""


def _copy_loop(device: torch.device, size: int, stop: threading.Event) -> None:
    """Copies in and out in turn, one at a time, idle (1 - COPY_DUTY) of the time, as in a step."""
    host, back = (torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    gpu_in, gpu_out = (torch.empty(size, dtype=torch.uint8, device=device) for _ in range(2))
    stream = torch.cuda.Stream(device)
    while not stop.is_set():
        for dst, src in ((gpu_in, host), (back, gpu_out)):
            start = time.perf_counter()
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
            stop.wait((time.perf_counter() - start) * (1 - COPY_DUTY) / COPY_DUTY)


def _copies_beside(device: torch.device, size: int, host_work) -> dict:
    """Bytes/s of each direction alone while `host_work` runs in another thread (a step's copies in and
    out seldom overlap each other, and the host optimizer runs beside both)."""
    stop = threading.Event()

    def keep_busy():
        while not stop.is_set():
            host_work()
    worker = threading.Thread(target=keep_busy)
    worker.start()
    try:
        return copy_rates(device, size)
    finally:
        stop.set()
        worker.join()


def _gemm_rate(device: torch.device, tokens: int) -> float:
    """FLOP/s of a block's largest matmul: tokens x 4096 @ 4096 x 14336 (bf16 on a GPU, fp32 on the CPU)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden, width = (4096, 14336) if device.type == "cuda" else (tokens, tokens)
    a = torch.randn(tokens, hidden, dtype=dtype, device=device)
    b = torch.randn(hidden, width, dtype=dtype, device=device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    a @ b
    return 2 * tokens * hidden * width / _best_seconds(lambda: a @ b, 5, sync)


def _block_rate(device: torch.device, quick: bool) -> float:
    """FLOP/s a Llama-3-8B decoder block sustains in bf16 over 4096 tokens (quick: a quarter-width block
    over 1024), counted as the planner counts them (its matmuls, and causal attention as half the
    square) but timed with everything it runs (norms, rotary, SwiGLU, casts; the Triton kernels in
    place, as compile puts them on a GPU): its forward without autograd, then again with it and its
    backward, as a recomputed stage runs in a step."""
    from mtc.codegen.patterns import apply_kernels, kernel_names
    from mtc.examples.models import LlamaBlock, LlamaConfig

    scale, tokens = (4, 1024) if quick else (1, 4096)
    cfg = LlamaConfig(vocab_size=256, hidden=4096 // scale, layers=1, heads=32 // scale, kv_heads=8 // scale,
                      intermediate=14336 // scale)
    block = torch.fx.symbolic_trace(LlamaBlock(cfg).to(device, torch.bfloat16))
    apply_kernels(block.graph, {n for n in block.graph.nodes if n.op == "get_attr"}, kernel_names("auto", device))
    block.recompile()
    x = torch.randn(1, tokens, cfg.hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
    angles = torch.rand(tokens, cfg.hidden // cfg.heads, device=device)
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    matmul_params = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    head_dim = cfg.hidden // cfg.heads
    forward_flops = 2 * tokens * matmul_params + 2 * cfg.heads * tokens * tokens * 2 * head_dim // 2

    def step():
        with torch.no_grad():
            block(x, cos, sin)
        block(x, cos, sin).sum().backward()
    step()
    return 4 * forward_flops / _best_seconds(step, 5, lambda: torch.cuda.synchronize(device))


def _host_copy_rate(size: int) -> float:
    src, dst = torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)
    dst.copy_(src)
    return size / _best_seconds(lambda: dst.copy_(src))
