"""mtc.compile: wire the stages of the pipeline. No algorithm lives here."""
from __future__ import annotations

import dataclasses
import errno
import gc
import hashlib
import importlib
import inspect
import json
import os
import time

import torch

from mtc.codegen.patterns import kernels_pass
from mtc.codegen.stream_plan import chrome_trace, lower
from mtc.codegen.tiles import TILE_TOKENS
from mtc.config import AdamW, format_bytes, is_finite_number, parse_bytes
from mtc.passes.costs import Costs, SymbolicCosts, costs_pass, reshaped, symbolic_costs
from mtc.passes.partition import partition_pass
from mtc.passes.schedule import fixed_plan, schedule_pass
from mtc.passes.trace import trace_pass
from mtc.passes.validate import validate
from mtc.plan import Plan
from mtc.probe import profile_for, resolve_profile
from mtc.runtime.distributed import DataParallel, launched, local_rank
from mtc.runtime.engine import Engine, NonFiniteError, default_cpu_threads
from mtc.runtime.preflight import (available_host_bytes, check_gpu_memory, describe_host_memory, free_disk_bytes,
                                   process_status_bytes)
from mtc.checkpoint import DiskSpaceError
from mtc.runtime.store import DISK, FIXED_HOST_BYTES, Group, HostMemoryError, StateStore, planned_host_bytes
from mtc.runtime.watchdog import Watchdog


MAX_CONSECUTIVE_SKIPS = 10
"""Skipped steps in a row that stop training: a run whose every step overflows is not going to recover."""


def compile(model: torch.nn.Module, gpu_mem="80GB", example=None, optimizer: AdamW | None = None,
            clip_grad_norm: float | None = None, device=None, compute_dtype: torch.dtype | None = None,
            init=None, cpu_threads: int | None = None, progress: bool = True, profile=None,
            schedule: str = "solve", kernels="auto", tile_tokens: int = TILE_TOKENS, skip_nonfinite: bool = True,
            max_consecutive_skips: int = MAX_CONSECUTIVE_SKIPS, watchdog: float | None = 10.0,
            distributed: bool | None = None, nvme=None, host_mem=None) -> "Step":
    """Plan and build a streamed training step for `model`, called exactly as `example` calls it.

    A model built on the meta device is initialised block by block straight into the host store:
    `init(module)` initialises one module's own parameters and buffers (default: its
    reset_parameters()). cpu_threads: threads for the CPU optimizer (default: all cores but four; on a GPU
    this is torch.set_num_threads, which is process-wide).
    profile: the hardware the plan is simulated on: a HardwareProfile, a shipped name ("h100", "h200",
    "a100", "rtx4090", "cpu") or a saved profile's path (default: what `mtc probe` saved for this device,
    else the shipped profile for its name).
    kernels: Triton kernels in place of the patterns they replace: "auto" (the default: all of them on a
    GPU, none on the CPU), "all", "none", some of "rmsnorm", "swiglu", "rope", "linear_cross_entropy", or
    some as "-name" (switched off). The plan's "kernels:" line says what went in where. The fused loss never
    makes the logits, so a model that returns them beside the loss returns None there.
    tile_tokens: tokens per tile when a recomputed block runs what follows its attention in token tiles
    (codegen/tiles); the plan's "token tiles:" line says which blocks do.
    skip_nonfinite: a step whose loss or global gradient norm is not finite (inf or NaN) updates nothing:
    weights, moments and step counts stay as they were, and step.skipped_steps names it. The updates then
    wait for the global norm, as with clipping (without either, each block's update starts as its gradient
    lands). max_consecutive_skips: that many skipped steps in a row raise NonFiniteError at the next call.
    watchdog: report on stderr, with every thread's stack, a step still running after this many times the
    plan's predicted step time (and at least runtime/watchdog.FLOOR_SECONDS); None: no watchdog.
    distributed: data parallel over torch.distributed (runtime/distributed): every rank compiles the same model
    and calls the step with its own rows of the batch (`example` is one rank's), and the ranks train one model
    as a single process would on all their rows together (the loss each returns is its own rows'). Each host
    keeps only its rank's shard of the training state. None (the default): when torchrun (or another launcher)
    started several processes, or a process group of several ranks is initialised; the process group is made
    (NCCL on GPUs, gloo on CPUs) if it is not. On a GPU the device is then cuda:LOCAL_RANK unless given.
    nvme: a directory (on a fast disk) where streamed stages may keep their fp32 optimizer state when the host's
    RAM cannot hold it all (runtime/disk): the plan puts there the fewest stages that make the rest fit, and
    times their updates with the profile's disk rates (`mtc probe --nvme DIR` measures them). None: RAM only.
    host_mem: the host RAM mtc may plan for, the process included (default: what the host can give now).
    """
    if nvme is not None and not (isinstance(nvme, (str, os.PathLike)) and os.fspath(nvme)):
        raise TypeError(f"nvme={nvme!r} is not valid; expected None or a directory's path")
    nvme = os.path.abspath(os.fspath(nvme)) if nvme is not None else None
    if nvme is not None and os.path.exists(nvme) and not os.path.isdir(nvme):
        raise ValueError(f"nvme={nvme!r} is not valid: it is a file; expected a directory (made if it does not exist)")
    parallel = _data_parallel(distributed)
    device = _rank_device(device) if parallel else _device(device)
    parallel = DataParallel(device) if parallel else None
    if parallel is not None and parallel.ranks == 1:  # one rank: nothing to share, the plain path
        parallel = None
    optimizer = optimizer if optimizer is not None else AdamW()
    if not isinstance(optimizer, AdamW):
        raise TypeError(f"optimizer={optimizer!r} is not supported; pass mtc.AdamW(lr=..., ...)")
    clip_grad_norm = _clip_norm(clip_grad_norm)
    # More threads than cores only slow the update; a bool is an int to Python but no count of threads.
    cores = os.cpu_count() or 1
    if cpu_threads is not None and not (type(cpu_threads) is int and 1 <= cpu_threads <= cores):
        raise ValueError(f"cpu_threads={cpu_threads!r} is not valid; expected None or an integer from 1 to {cores}, "
                         f"the cores os.cpu_count() reports")
    if not isinstance(progress, bool):
        raise TypeError(f"progress={progress!r} is not valid; expected True or False")
    if init is not None and not callable(init):
        raise TypeError(f"init={init!r} is not callable; expected None or a function init(module)")
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite={skip_nonfinite!r} is not valid; expected True or False")
    if isinstance(max_consecutive_skips, bool) or not isinstance(max_consecutive_skips, int) \
            or max_consecutive_skips < 1:
        raise ValueError(f"max_consecutive_skips={max_consecutive_skips!r} is not valid; expected an integer >= 1")
    if watchdog is not None and not (is_finite_number(watchdog) and watchdog >= 1):
        raise ValueError(f"watchdog={watchdog!r} is not valid; expected None or a finite number >= 1 (a multiple of "
                         f"the predicted step time)")
    settings = dict(model=model, example=example, optimizer=optimizer, clip_grad_norm=clip_grad_norm, device=device,
                    compute_dtype=compute_dtype, cpu_threads=cpu_threads, profile=profile, kernels=kernels,
                    tile_tokens=tile_tokens, skip_nonfinite=skip_nonfinite, max_consecutive_skips=max_consecutive_skips,
                    watchdog=watchdog, parallel=parallel, nvme=nvme,
                    host_mem=parse_bytes(host_mem, "host_mem") if host_mem is not None else None)
    if parallel is not None and cpu_threads is None:  # the ranks on a host share its cores
        settings["cpu_threads"] = max(1, cores // parallel.local_ranks - (cores - default_cpu_threads()))
        if device.type == "cpu":
            torch.set_num_threads(max(1, cores // parallel.local_ranks))
    # Preflight: nothing large is allocated before the device and the host are known to have room.
    _on_every_rank(parallel, check_gpu_memory, parse_bytes(gpu_mem, "gpu_mem"), device)
    planned = _plan_everywhere(settings, gpu_mem, schedule)
    _on_every_rank(parallel, check_disk_space, planned.plan.header["disk_bytes"], nvme, parallel)
    store = StateStore([s.params for s in planned.partition.stages], planned.partition.shared_params,
                       planned.params, planned.buffers, planned.compute_dtype, device, model=model, init=init,
                       progress=progress and (parallel is None or parallel.rank == 0),
                       resident=planned.plan.schedule.resident, parallel=parallel, disk=planned.plan.schedule.disk,
                       nvme=nvme)
    return Step(planned, store, _engine(planned, store, settings), settings)


def _on_every_rank(parallel: DataParallel | None, check, *args) -> None:
    """check(*args); under data parallel, if it raises on any rank it raises on every rank (the others would
    otherwise wait in the next collective until the process group times out)."""
    try:
        check(*args)
    except Exception:
        if parallel is not None:
            parallel.largest(1)
        raise
    if parallel is not None and parallel.largest(0):
        raise RuntimeError(f"another rank failed {check.__name__}; its error says why")


def _plan_everywhere(settings: dict, gpu_mem, schedule: str) -> "Planned":
    """plan() with compile's settings; under data parallel every rank plans for the least host memory any rank
    has, and the plans are checked to be one and the same (the ranks pair their collectives by it)."""
    parallel = settings["parallel"]
    budget = _host_budget(settings["device"], parallel, settings["nvme"] is not None) \
        if settings["host_mem"] is None else {"host_mem": settings["host_mem"]}
    if parallel is not None and "host_mem" in budget:
        budget["host_mem"] = parallel.smallest(budget["host_mem"])
    planned = plan(settings["model"], gpu_mem, settings["example"], clip=settings["clip_grad_norm"] is not None,
                   device=settings["device"], compute_dtype=settings["compute_dtype"], profile=settings["profile"],
                   schedule=schedule, kernels=settings["kernels"], tile_tokens=settings["tile_tokens"],
                   skip_nonfinite=settings["skip_nonfinite"], ranks=parallel.ranks if parallel else 1,
                   nvme=settings["nvme"] is not None, **budget)
    if parallel is not None:
        digest = hashlib.sha256(json.dumps(planned.plan.stream_plan.to_json(), sort_keys=True).encode()).hexdigest()
        parallel.same_everywhere(digest, "plan")
    return planned


def _engine(planned: "Planned", store: StateStore, settings: dict) -> Engine:
    factor = settings["watchdog"]
    return Engine(planned.plan.stream_plan, planned.partition, store, planned.costs.grad_inputs,
                  settings["optimizer"], settings["clip_grad_norm"], settings["device"], planned.compute_dtype,
                  planned.traced.unflatten_output, settings["cpu_threads"], planned.costs.row_axes,
                  settings["skip_nonfinite"], Watchdog(planned.plan.predicted_step_seconds(), factor) if factor else None,
                  settings["parallel"])


def _data_parallel(distributed) -> bool:
    """Whether compile(distributed=...) runs data parallel (see compile)."""
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed={distributed!r} is not valid; expected None (detect torchrun), True or False")
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    found = launched() or (initialised and dist.get_world_size() > 1)
    if distributed and not (found or initialised):
        raise ValueError("distributed=True but this process was not started by torchrun (RANK, WORLD_SIZE, "
                         "MASTER_ADDR and MASTER_PORT are unset) and no process group is initialised; launch with "
                         "torchrun --nproc_per_node N, or call torch.distributed.init_process_group first")
    return found if distributed is None else distributed


def _rank_device(device) -> torch.device:
    """Under data parallel: a GPU without an index (or none given, with a GPU) is this rank's, cuda:LOCAL_RANK."""
    device = _device(device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank()) if device.index is None else device
        torch.cuda.set_device(device)
    return device


class Planned:
    """Everything the planning passes produced, for compile() and for `mtc plan`."""

    def __init__(self, **fields):
        self.__dict__.update(fields)
        self._symbolic = None

    @property
    def shape(self) -> tuple[int, int] | None:
        """(batch, sequence length) of the example: its first tensor input of two or more dimensions."""
        return next((tuple(v.shape[:2]) for v in self.inputs if isinstance(v, torch.Tensor) and v.dim() >= 2), None)

    def costs_at(self, batch: int, seq: int) -> Costs:
        """The costs pass for another batch and sequence length, on the same trace and partition."""
        inputs = reshaped(self.inputs, *self.shape, batch, seq)
        return costs_pass(self.partition, self.params, self.buffers, inputs, self.compute_dtype,
                          self.traced.unflatten_output, self.tile_tokens)

    def symbolic_costs(self) -> SymbolicCosts:
        """Each stage's bytes and FLOPs as polynomials of batch b and sequence length s (fitted once)."""
        if self.shape is None:
            raise ValueError("the example has no tensor input of shape (batch, sequence, ...)")
        if self._symbolic is None:
            self._symbolic = symbolic_costs(self.costs_at, *self.shape)
        return self._symbolic


SCHEDULES = ("solve", "spine")
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""What compute_dtype may be: the floating dtypes the blocks run in (float8 has no CPU kernels for most ops)."""


def plan(model, gpu_mem="80GB", example=None, clip: bool = False, device=None, compute_dtype=None,
         profile=None, host_mem=None, schedule: str = "solve", kernels="auto",
         tile_tokens: int = TILE_TOKENS, skip_nonfinite: bool = True, host_mem_source: str | None = None,
         ranks: int = 1, nvme: bool = False) -> Planned:
    """Run the planning passes only: nothing is allocated, so a meta-device model plans for free.

    host_mem: host RAM to plan for (default: the profile's); a plan whose store would not fit is refused, naming
    host_mem_source (where host_mem came from) if given.
    clip: the step clips by the global gradient norm. schedule, tile_tokens, skip_nonfinite: as in compile
    (with clip or skip_nonfinite, the updates wait for the global norm). ranks: data-parallel ranks, each
    running the plan on the example's shapes (host_mem is then each rank's). nvme: streamed stages may keep their
    optimizer state on disk where host_mem cannot hold it (compile's nvme).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model={type(model).__name__} is not valid; expected a torch.nn.Module")
    if not isinstance(clip, bool):
        raise TypeError(f"clip={clip!r} is not valid; expected True or False (whether the step clips gradients)")
    if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype in COMPUTE_DTYPES):
        raise ValueError(f"compute_dtype={compute_dtype!r} is not valid; expected None or one of "
                         f"{', '.join(map(str, COMPUTE_DTYPES))}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not valid; expected one of {', '.join(map(repr, SCHEDULES))}")
    if isinstance(tile_tokens, bool) or not isinstance(tile_tokens, int) or tile_tokens < 1:
        raise ValueError(f"tile_tokens={tile_tokens!r} is not valid; expected a number of tokens >= 1")
    if isinstance(ranks, bool) or not isinstance(ranks, int) or ranks < 1:
        raise ValueError(f"ranks={ranks!r} is not valid; expected a number of data-parallel ranks >= 1")
    gpu_mem = parse_bytes(gpu_mem, "gpu_mem")
    host_mem = parse_bytes(host_mem, "host_mem") if host_mem is not None else None
    device = _device(device, must_exist=False)
    compute_dtype = compute_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args, kwargs = _split_example(example)
    for where, value in [*((f"example[{i}]", v) for i, v in enumerate(args)),
                         *((f"example[{k!r}]", v) for k, v in kwargs.items())]:
        if isinstance(value, torch.Tensor) and 0 in value.shape:  # the costs pass cuts batches and token tiles
            raise ValueError(f"{where}={_describe(value)} is not valid: it holds nothing; expected every dimension >= 1")
    timings = {}
    gated = clip or skip_nonfinite

    def timed(name, fn, *a):
        start = time.perf_counter()
        result = fn(*a)
        timings[name] = time.perf_counter() - start
        return result

    # trace -> partition -> kernels -> costs -> schedule -> lower -> validate; each consumes the one before
    # (the kernels go in before the costs, which must see what the blocks will run).
    traced = timed("trace", trace_pass, model, args, kwargs, compute_dtype)
    partition = timed("partition", partition_pass, traced)
    kernels_used = timed("kernels", kernels_pass, partition, kernels, device)
    params = dict(model.named_parameters())
    buffers = {**dict(model.named_buffers()), **traced.constants}
    inputs = traced.flatten_inputs(args, kwargs)
    costs = dataclasses.replace(timed("costs", costs_pass, partition, params, buffers, inputs, compute_dtype,
                                      traced.unflatten_output, tile_tokens), ranks=ranks)
    # Unless given: a profile `mtc probe` saved for this GPU, else the shipped one for its name.
    profile = resolve_profile(profile) if profile is not None else profile_for(
        device, device_known=device.type != "cuda" or torch.cuda.is_available())
    host_mem = host_mem or profile.host_bytes or None
    if schedule == "spine":
        schedule = timed("schedule", lambda: fixed_plan(costs, gpu_mem, gated, slots=2, resident=[], check=True))
    else:
        schedule = timed("schedule", schedule_pass, costs, gpu_mem, gated, None, None, profile,
                         host_mem - FIXED_HOST_BYTES if host_mem else None,
                         lambda s: planned_host_bytes(s, compute_dtype, device), nvme)
    stream_plan = timed("lower", lower, schedule)
    timed("validate", validate, stream_plan, profile)
    host_bytes = planned_host_bytes(schedule, compute_dtype, device)
    disk_bytes = sum(Group.disk_bytes(schedule.stages[i].params, compute_dtype, DISK, ranks) for i in schedule.disk)
    if host_mem is not None and host_bytes + FIXED_HOST_BYTES > host_mem:
        offloaded = sum(schedule.stages[i].offload_bytes for i in schedule.offload)
        inputs = f"; {format_bytes(offloaded)} of it the offloaded block inputs" if offloaded else ""
        needs = f"(fp32 master and two moments, plus the bf16 copy that streams, for every streamed parameter{inputs})"
        if schedule.disk:  # spilled() put every streamed stage there and it still does not fit
            needs = (f"even with the optimizer state of all {len(schedule.disk)} streamed stages on disk "
                     f"({format_bytes(disk_bytes)} there; what stays is the weights that stream and the buffers the "
                     f"disk state is read into{inputs})")
        raise HostMemoryError(
            f"host_mem={format_bytes(host_mem)}{f', {host_mem_source},' if host_mem_source else ''} is too small: the "
            f"training state needs {format_bytes(host_bytes)} {needs} and about {format_bytes(FIXED_HOST_BYTES)} more "
            f"for the process; keep more stages on the GPU (a larger gpu_mem)"
            f"{'' if nvme else ', keep optimizer state on a fast disk (nvme=DIR)'} or use a host with "
            f"{format_bytes(host_bytes + FIXED_HOST_BYTES)}")
    templates = {}
    for stage in partition.stages:
        templates.setdefault(stage.template.name, []).append(stage.name)
    header = {"model": type(model).__name__, "tracer": traced.tracer, "device": str(device),
              "compute_dtype": str(compute_dtype).replace("torch.", ""), "chain": partition.chain,
              "profile": profile.to_json(), "passes": timings, "host_bytes": host_bytes, "host_mem": host_mem,
              "disk_bytes": disk_bytes,
              "not_chunkable": {s.name: r.why_not for s, r in zip(partition.stages, costs.row_axes) if r.why_not},
              "inputs": [_describe(v) for v in inputs], "kernels": kernels_used,
              "tails": {t.name: t.tail.describe() for t in partition.templates if not isinstance(t.tail, str)},
              "no_tail": {t.name: t.tail for t in partition.templates if isinstance(t.tail, str)}}
    planned = Planned(plan=Plan(header, templates, stream_plan), traced=traced, partition=partition, costs=costs,
                      params=params, buffers=buffers, compute_dtype=compute_dtype, device=device, inputs=inputs,
                      tile_tokens=tile_tokens,
                      input_specs=[_describe(v) for v in inputs], input_names=list(partition.graph_inputs))
    if os.environ.get("MTC_DEBUG"):
        write_debug_directory(planned, profile)
    return planned


def write_debug_directory(planned: Planned, profile) -> str:
    """One file per stage of the pipeline, and kernels/<name>.py for each kernel the blocks call, under
    $MTC_DEBUG_DIR (default ./mtc_debug/<model>-<time>)."""
    root = os.environ.get("MTC_DEBUG_DIR") or os.path.join(
        "mtc_debug", f"{planned.plan.header['model']}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(root, exist_ok=True)
    files = {
        "graph.txt": str(planned.traced.graph),
        "blocks.txt": planned.partition.summary() + "\n\n" + "\n\n".join(
            f"# template {t.name}\n{t.function('meta').code}" for t in planned.partition.templates),
        "schedule.txt": planned.plan.summary(),
        "stream_plan.txt": str(planned.plan.stream_plan),
        "timeline.json": json.dumps(chrome_trace(planned.plan.stream_plan, profile)),
    }
    # The kernels the blocks call (their calls are in blocks.txt), as the source that runs.
    for kernel in sorted({name for used in planned.plan.header["kernels"].values() for name in used}):
        files[f"kernels/{kernel}.py"] = inspect.getsource(importlib.import_module(f"mtc.codegen.kernels.{kernel}"))
    for name, text in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
        with open(os.path.join(root, name), "w") as f:
            f.write(text)
    print(f"mtc: wrote {', '.join(files)} to {root}")
    return root


class Step:
    """A compiled training step: `loss = step(*args, **kwargs)` runs forward, backward and AdamW."""

    def __init__(self, planned: Planned, store: StateStore, engine: Engine, settings: dict):
        self._planned, self._store, self._engine, self._settings = planned, store, engine, settings
        self.plan = planned.plan
        self.steps = 0
        self.data_position = None
        """What mtc.load gave back of the caller's data position (mtc.save's data_position)."""

    def replan(self, gpu_mem=None, example=None, schedule: str = "solve", profile=None, clip_grad_norm="same",
               skip_nonfinite: bool | None = None) -> "Step":
        """A step for another budget or batch shape that trains the same state: the model is traced and
        planned again (nothing is re-initialised), stages move between host and device as the new plan
        places them, and this step stops working (the new one owns the state). profile, clip_grad_norm,
        skip_nonfinite: as in compile (default: this step's). If the new plan cannot be set up (out of device
        or host memory), the state goes back where it was and this step keeps working."""
        self._retired()
        changes = {"clip_grad_norm": _clip_norm(clip_grad_norm)} if clip_grad_norm != "same" else {}
        if skip_nonfinite is not None and not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite={skip_nonfinite!r} is not valid; expected None, True or False")
        self.synchronize()
        settings = {**self._settings, "example": example if example is not None else self._settings["example"],
                    "profile": profile if profile is not None else self._settings["profile"]}
        settings.update(changes)
        if skip_nonfinite is not None:
            settings["skip_nonfinite"] = skip_nonfinite
        planned = _plan_everywhere(settings, gpu_mem if gpu_mem is not None else self.plan.schedule.gpu_mem, schedule)
        if [s.params for s in planned.partition.stages] != [s.params for s in self._planned.partition.stages]:
            raise ValueError("the new example partitions the model differently; compile it again instead")
        self._engine = None  # its device buffers go before the new plan's are made
        try:
            self._free_cache()
            _on_every_rank(self.parallel, check_disk_space, planned.plan.header["disk_bytes"], settings["nvme"],
                           self.parallel)
            self._store.place(planned.plan.schedule.resident, planned.plan.schedule.disk, settings["nvme"])
            self._free_cache()
            replanned = Step(planned, self._store, _engine(planned, self._store, settings), settings)
            replanned.steps, replanned.data_position = self.steps, self.data_position  # the same run goes on
            return replanned
        except BaseException:
            self._free_cache()
            self._store.place(self.plan.schedule.resident, self.plan.schedule.disk, settings["nvme"])
            self._engine = _engine(self._planned, self._store, self._settings)
            raise

    def _free_cache(self) -> None:
        """Hand what the caching allocator keeps back to the device before the next plan allocates."""
        gc.collect()
        if self._settings["device"].type == "cuda":
            torch.cuda.empty_cache()

    def _retired(self) -> None:
        if self._engine is None:
            raise RuntimeError("this step was replanned; use the Step that replan() returned")

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        self._retired()
        inputs = self._planned.traced.flatten_inputs(args, kwargs)
        for name, expected, value in zip(self._planned.input_names, self._planned.input_specs, inputs):
            if _describe(value) != expected:
                raise ValueError(f"step() argument {name!r} is {_describe(value)} but the plan was compiled for "
                                 f"{expected}; mtc plans for fixed shapes: compile again with this example")
            if isinstance(value, torch.Tensor) and value.device.type not in ("cpu", self._settings["device"].type):
                device = self._settings["device"]
                raise ValueError(f"step() argument {name!r} is on {value.device}; expected a tensor on the CPU"
                                 + (f" or on {device}" if device.type != "cpu" else ""))
        self._stop_after_consecutive_skips()
        loss = self._engine.step(inputs)
        self.steps += 1
        return loss

    def _stop_after_consecutive_skips(self) -> None:
        engine, limit = self._engine, self._settings["max_consecutive_skips"]
        unchecked = engine.step_index - engine.counted_steps  # issued steps the optimizer thread has not seen yet
        if not engine.skip_nonfinite or engine.consecutive_skips + unchecked < limit:
            return
        self.synchronize()  # only near the limit: every issued step has landed or been skipped
        if engine.consecutive_skips < limit:
            return
        skipped, engine.consecutive_skips = self.skipped_steps, 0  # a caller may lower lr and go on
        raise NonFiniteError(
            f"the last {limit} steps ({', '.join(map(str, skipped[-limit:]))}) each had a non-finite loss or "
            f"gradient norm and were skipped (max_consecutive_skips={limit}); the weights and AdamW state are those "
            f"after step {skipped[-limit] - 1}: save them, then lower the learning rate or check the data")

    @property
    def parallel(self):
        """The data-parallel ranks this step trains with (runtime/distributed.DataParallel), or None."""
        return self._settings["parallel"]

    @property
    def skipped_steps(self) -> list[int]:
        """The steps (numbered from 1, as step.steps counts) whose loss or gradient norm was not finite and
        which therefore updated nothing, as far as the CPU optimizer has got (synchronize() first for all)."""
        first = self.steps - self._engine.step_index  # a loaded step goes on from the checkpoint's count
        return [first + index + 1 for index in self._engine.skipped]

    def named_parameters(self):
        """(name, fp32 master weight) for every parameter, under the model's own names, once every
        update issued so far has landed. Under data parallel every rank must iterate it (each gets the whole
        weights, gathered a group at a time)."""
        self.synchronize()
        return self._store.named_parameters()

    def synchronize(self) -> None:
        """Wait for the device and the CPU optimizer to finish every step issued so far."""
        if self._engine is not None:
            self._engine.synchronize()

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm before clipping, when clip_grad_norm is set."""
        self.synchronize()
        return self._engine.last_grad_norm


def _clip_norm(clip_grad_norm) -> float | None:
    """clip_grad_norm as the step uses it: None, or a finite number > 0 as a float (torch reads an int as int64)."""
    if clip_grad_norm is not None and not (is_finite_number(clip_grad_norm) and clip_grad_norm > 0):
        raise ValueError(f"clip_grad_norm={clip_grad_norm!r} is not valid; expected None or a finite number > 0")
    return float(clip_grad_norm) if clip_grad_norm is not None else None


def check_disk_space(needed: int, nvme: str | None, parallel: DataParallel | None = None) -> None:
    """Refuse a plan whose disk stages' state (`needed` bytes on each rank) would not fit in the nvme directory's
    free space, which the ranks of one host share."""
    needed *= parallel.local_ranks if parallel else 1
    if not needed:
        return
    _, free = free_disk_bytes(nvme)
    if needed > free:
        raise DiskSpaceError(errno.ENOSPC, f"nvme={nvme!r} has {format_bytes(free)} free but the plan keeps "
                             f"{format_bytes(needed)} of optimizer state there; free {format_bytes(needed - free)}, "
                             f"choose a directory on a larger disk, or give a larger gpu_mem (more stages on the GPU)")


def _host_budget(device: torch.device, parallel: DataParallel | None = None, nvme: bool = False) -> dict:
    """plan()'s host_mem for compile on a GPU: what the host can give now and what this process already holds
    (the process's own share is part of FIXED_HOST_BYTES, which CUDA's libraries dominate); off Linux, the
    profile's. On the CPU the store's own check against what is available suffices. Under data parallel the
    ranks on a host share what it can give."""
    available, held = available_host_bytes(), process_status_bytes("VmRSS") or 0
    if available is None or (device.type != "cuda" and not nvme):  # with nvme, what spills to disk depends on it
        return {}
    share, ranks = (parallel.local_ranks, f", shared by its {parallel.local_ranks} ranks") if parallel else (1, "")
    return {"host_mem": available // share + held, "host_mem_source": f"what this host can give now "
            f"({describe_host_memory()}{ranks}) and the {format_bytes(held)} this process holds"}


def _device(device, must_exist: bool = True) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as error:  # ValueError: an index past int64
        raise ValueError(f"device={device!r} is not a device; expected None, 'cpu' or 'cuda[:N]'") from error
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device={str(device)!r} is not supported; expected None, 'cpu' or 'cuda[:N]'")
    if must_exist and device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    return device


def _split_example(example) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    raise TypeError(f"example={type(example).__name__} is not valid; expected a tuple of positional arguments "
                    f"or a dict of keyword arguments, exactly as the model will be called")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    return repr(value)
