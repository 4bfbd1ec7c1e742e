"""stream_plan: lower a Schedule to a static list of instructions, each on one stream, ordered
across streams only by the events it waits on. The list order is a valid sequential order too:
the CPU engine runs it as written; the CUDA engine issues each stream's part in that order.

Streams: h2d (weight copy-in; offloaded inputs fetched back), compute (forward, backward, the clip norm,
AdamW of resident stages), d2h (gradient copy-out; inputs offloaded), cpu (AdamW of streamed stages and
the shared group, on the host).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from mtc.config import HardwareProfile, format_bytes
from mtc.passes.costs import StageCost
from mtc.passes.schedule import Schedule, backward_work_bytes, forward_work_bytes, held_bytes

STREAMS = ("h2d", "compute", "d2h", "cpu")
SHARED = -1
"""The stage index of the shared (tied, resident) weight group."""


@dataclass
class Instr:
    id: int
    stream: str
    op: str
    """copy_in, forward, loss, backward, copy_out, free_grad, clip, optimizer; offload (a stage's input
    to the host), free_input (its device copy released), fetch (back to the device)."""
    stage: int | None
    """Index into the plan's stages; SHARED for the resident group; None for clip."""
    slot: int | None = None
    bytes: int = 0
    """Bytes this instruction moves (copies) or allocates until released (compute)."""
    waits: list[int] = field(default_factory=list)
    """Instructions of this step, on other streams, that must complete first (events)."""
    waits_prev_step: list[int] = field(default_factory=list)
    """Instructions of the previous step that must complete first (weights updated before copy-in)."""
    reads: int | None = None
    """For compute: the copy_in whose slot contents it reads."""
    releases: list[int] = field(default_factory=list)
    """Instructions whose allocations this one frees."""
    work_bytes: int = 0
    """Transient bytes while this instruction runs."""


@dataclass
class StreamPlan:
    schedule: Schedule
    instrs: list[Instr]

    @property
    def stages(self) -> list[StageCost]:
        return self.schedule.stages

    def stage_name(self, stage: int | None) -> str:
        if stage is None:
            return "all"
        return "shared" if stage == SHARED else self.stages[stage].name

    def group(self, stage: int) -> StageCost:
        return self.schedule.shared if stage == SHARED else self.stages[stage]

    def on(self, stream: str) -> list[Instr]:
        return [i for i in self.instrs if i.stream == stream]

    def to_json(self) -> dict:
        return {"schedule": self.schedule.to_json(), "instrs": [asdict(i) for i in self.instrs]}

    @classmethod
    def from_json(cls, data: dict) -> "StreamPlan":
        return cls(Schedule.from_json(data["schedule"]), [Instr(**i) for i in data["instrs"]])

    def __str__(self) -> str:
        lines = [f"{'id':>4} {'stream':<8}{'op':<11}{'stage':<18}{'slot':>4} {'bytes':>11}  waits"]
        for instr in self.instrs:
            waits = [f"{self.instrs[w].op}:{self.stage_name(self.instrs[w].stage)}" for w in instr.waits]
            waits += [f"prev.{self.instrs[w].op}:{self.stage_name(self.instrs[w].stage)}"
                      for w in instr.waits_prev_step]
            slot = "-" if instr.slot is None else str(instr.slot)
            size = format_bytes(instr.bytes) if instr.bytes else "-"
            lines.append(f"{instr.id:>4} {instr.stream:<8}{instr.op:<11}{self.stage_name(instr.stage):<18}"
                         f"{slot:>4} {size:>11}  {', '.join(waits)}")
        return "\n".join(lines)


def lower(schedule: Schedule) -> StreamPlan:
    instrs: list[Instr] = []

    def emit(stream, op, stage, **fields) -> Instr:
        instr = Instr(len(instrs), stream, op, stage, **fields)
        instrs.append(instr)
        return instr

    shared_in = None
    if schedule.shared:
        shared_in = emit("h2d", "copy_in", SHARED, bytes=schedule.shared.weight_bytes)
    resident = set(schedule.resident)
    last_reader: dict[int, Instr] = {}
    forward_of: dict[int, Instr] = {}
    copy_out_of: dict[int, Instr] = {}
    backward_of: dict[int, Instr] = {}
    pending_free: list[tuple[Instr, Instr]] = []
    offloads: dict[int, Instr] = {}
    pending_input_free: list[tuple[Instr, Instr]] = []
    backwards: list[Instr] = []
    optimizers: dict[int, Instr] = {}
    for index, use in enumerate(schedule.uses):
        stage = schedule.stages[use.stage]
        waits = [shared_in.id] if shared_in and index == 0 else []
        fetch = None
        if use.phase == "backward" and use.stage in schedule.offload:
            # Ahead of the weights, but not before the backward two stages on has finished: the fetched
            # input then lives through one other backward (the memory model counts it there).
            fetch = emit("h2d", "fetch", use.stage, bytes=stage.offload_bytes,
                         waits=[offloads[use.stage].id] + [b.id for b in backwards[-2:-1]])
            waits.append(fetch.id)
        copy_in = None
        if use.stage not in resident:
            previous = last_reader.get(use.slot)
            copy_in = emit("h2d", "copy_in", use.stage, slot=use.slot, bytes=stage.weight_bytes,
                           waits=[previous.id] if previous else [])
            waits.insert(0, copy_in.id)
        reads = copy_in.id if copy_in else None
        if use.phase == "forward":
            compute = emit("compute", "forward", use.stage, slot=use.slot, waits=waits, reads=reads,
                           bytes=held_bytes(schedule, use.stage), work_bytes=forward_work_bytes(schedule, use.stage))
            forward_of[use.stage] = compute
            for forward, offload in pending_input_free:  # the previous stage's input, once on the host
                emit("compute", "free_input", forward.stage, waits=[offload.id], releases=[forward.id])
            pending_input_free.clear()
            if use.stage in schedule.offload:
                offloads[use.stage] = emit("d2h", "offload", use.stage, bytes=stage.offload_bytes,
                                           waits=[compute.id])
                pending_input_free.append((compute, offloads[use.stage]))
        else:
            released = [forward_of[use.stage].id] if use.phase == "backward" and fetch is None else []
            kept_input = stage.saved_bytes if use.phase == "loss" else 0
            # A streamed stage's gradient goes to a slot-sized device buffer until its copy-out is done; a
            # resident stage's lives on the device (resident_bytes) until the GPU update consumes it.
            compute = emit("compute", use.phase, use.stage, slot=use.slot, waits=waits, reads=reads,
                           bytes=0 if copy_in is None else schedule.slot_bytes, releases=released,
                           work_bytes=backward_work_bytes(schedule, use.stage) + kept_input)
            backward_of[use.stage] = compute
            backwards.append(compute)
            for forward, offload in pending_input_free:  # the last offloading stage's input (before the loss)
                emit("compute", "free_input", forward.stage, waits=[offload.id], releases=[forward.id])
            pending_input_free.clear()
            if copy_in is None:
                if not schedule.clip:
                    optimizers[use.stage] = _emit_gpu_update(emit, compute)
            else:
                copy_out = copy_out_of[use.stage] = emit("d2h", "copy_out", use.stage, bytes=stage.grad_bytes,
                                                         waits=[compute.id])
                # Free the previous stage's gradient buffer now, not before this backward: by then its
                # copy-out has had a whole backward to finish, so the compute stream does not stall on it.
                if pending_free:
                    _emit_free(emit, *pending_free.pop())
                pending_free.append((compute, copy_out))
                if not schedule.clip:
                    optimizers[use.stage] = emit("cpu", "optimizer", use.stage, waits=[copy_out.id])
        if copy_in is not None:
            last_reader[use.slot] = compute
    if pending_free:
        _emit_free(emit, *pending_free.pop())
    if schedule.shared:
        last_compute = next(i for i in reversed(instrs) if i.op in ("backward", "loss"))
        copy_out_of[SHARED] = emit("d2h", "copy_out", SHARED, bytes=schedule.shared.grad_bytes,
                                   waits=[last_compute.id])
        if not schedule.clip:
            optimizers[SHARED] = emit("cpu", "optimizer", SHARED, waits=[copy_out_of[SHARED].id])
    if schedule.clip:
        # The global norm, on the device right after the last backward (per-parameter norms were taken
        # as each gradient was made). Updates follow in the order the next step's forward reads them.
        # The host's updates are listed (so issued) before the device's: issuing a device update launches
        # kernels chunk by chunk from the issuing thread, which would hold the host's back (measured on a
        # 3B plan, 26 resident stages: the first host update started 26 ms after the clip).
        # Data parallel: the norm is of the averaged gradients, whose shards the copy-outs reduce-scatter.
        clip = emit("compute", "clip", None,
                    waits=[c.id for c in copy_out_of.values()] if schedule.ranks > 1 else [])
        in_read_order = sorted(copy_out_of.keys() | resident, key=lambda s: (s != SHARED, s))
        for stage in in_read_order:
            if stage not in resident:
                optimizers[stage] = emit("cpu", "optimizer", stage, waits=[clip.id, copy_out_of[stage].id])
        for stage in in_read_order:
            if stage in resident:
                optimizers[stage] = _emit_gpu_update(emit, backward_of[stage])
    first_copy_in = {}
    for instr in instrs:
        if instr.op == "copy_in":
            instr.waits_prev_step = [optimizers[instr.stage].id]
            if instr.slot is not None:
                first_copy_in.setdefault(instr.slot, instr)
    # A slot's first copy of a step overwrites what the previous step's last reader of it read.
    for slot, copy_in in first_copy_in.items():
        copy_in.waits_prev_step.append(last_reader[slot].id)
    return StreamPlan(schedule, instrs)


def _emit_gpu_update(emit, backward: Instr) -> Instr:
    """A resident stage's AdamW on the device, after its backward on the same stream; it consumes the gradient."""
    return emit("compute", "optimizer", backward.stage, releases=[backward.id])


def _emit_free(emit, compute: Instr, copy_out: Instr):
    emit("compute", "free_grad", compute.stage, waits=[copy_out.id], releases=[compute.id])


def duration(plan: StreamPlan, instr: Instr, profile: HardwareProfile) -> float:
    """Predicted seconds for one instruction on the given hardware."""
    ranks = plan.schedule.ranks
    if instr.op in ("copy_in", "copy_out") and ranks > 1:
        # This rank's shard over PCIe, then the others' all-gathered (or, out, reduce-scattered first).
        pcie = profile.h2d_bytes_per_s if instr.op == "copy_in" else profile.d2h_bytes_per_s
        return instr.bytes / ranks / pcie + instr.bytes * (ranks - 1) / ranks / (profile.link_bytes_per_s or pcie)
    if instr.op in ("copy_in", "fetch"):
        return instr.bytes / profile.h2d_bytes_per_s
    if instr.op in ("copy_out", "offload"):
        return instr.bytes / profile.d2h_bytes_per_s
    if instr.op == "forward":
        return plan.stages[instr.stage].forward_flops / profile.flops_per_s
    if instr.op in ("backward", "loss"):
        # Backward: 2x the forward's FLOPs; its forward first (the loss stage's, or a recompute): 1x more.
        forward_too = instr.op == "loss" or instr.stage not in plan.schedule.keep
        return (3 if forward_too else 2) * plan.stages[instr.stage].forward_flops / profile.flops_per_s
    if instr.op == "optimizer" and instr.stream == "compute":
        return plan.group(instr.stage).params / profile.gpu_optimizer_params_per_s
    if instr.op == "optimizer":  # each rank updates its shard, on its share of the host's cores
        update = plan.group(instr.stage).params / ranks / profile.optimizer_params_per_s
        if instr.stage in plan.schedule.disk:  # its state read in and written back, overlapped with the update
            moved = disk_bytes_per_param(plan.stages[instr.stage]) * plan.stages[instr.stage].params / ranks
            return max(update, moved / profile.disk_read_bytes_per_s + moved / profile.disk_write_bytes_per_s)
        return update
    return 0.0  # clip: a norm of per-parameter norms on the device; free_grad: bookkeeping


def disk_bytes_per_param(stage: StageCost) -> int:
    """A disk stage's state bytes a parameter: two fp32 moments, and the fp32 master unless it is the stream copy
    (fp32 compute; runtime/store.Group.on_disk)."""
    return 8 if stage.weight_bytes >= 4 * stage.params else 12


def simulate(plan: StreamPlan, profile: HardwareProfile, steps: int = 3) -> list[list[tuple[float, float]]]:
    """(start, end) of every instruction over `steps` consecutive steps, each stream in list order."""
    timeline = []
    for _ in range(steps):
        previous = timeline[-1] if timeline else None
        stream_free = {s: max((previous[i.id][1] for i in plan.instrs if i.stream == s), default=0.0)
                       if previous else 0.0 for s in STREAMS}
        times: list[tuple[float, float]] = []
        for instr in plan.instrs:
            ready = max([stream_free[instr.stream]] + [times[w][1] for w in instr.waits]
                        + ([previous[w][1] for w in instr.waits_prev_step] if previous else []))
            end = ready + duration(plan, instr, profile)
            times.append((ready, end))
            stream_free[instr.stream] = end
        timeline.append(times)
    return timeline


def predicted_step_seconds(plan: StreamPlan, profile: HardwareProfile) -> float:
    """Steady-state step time: the third simulated step's end minus the second's."""
    timeline = simulate(plan, profile)
    return max(e for _, e in timeline[2]) - max(e for _, e in timeline[1])


def busy_seconds(plan: StreamPlan, profile: HardwareProfile) -> dict[str, float]:
    """Predicted seconds of work on each stream in one step."""
    busy = {stream: 0.0 for stream in STREAMS}
    for instr in plan.instrs:
        busy[instr.stream] += duration(plan, instr, profile)
    return busy


def lower_bound_seconds(plan: StreamPlan, profile: HardwareProfile) -> float:
    """No plan beats its busiest resource: max(compute, copy-in, copy-out, CPU optimizer)."""
    return max(busy_seconds(plan, profile).values())


def chrome_trace(plan: StreamPlan, profile: HardwareProfile) -> dict:
    """The predicted timeline of one steady-state step as a Chrome / Perfetto trace (chrome://tracing)."""
    timeline = simulate(plan, profile)
    origin = min(start for start, _ in timeline[2])
    events = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": f"mtc plan on '{profile.name}'"}}]
    events += [{"name": "thread_name", "ph": "M", "pid": 0, "tid": index, "args": {"name": stream}}
               for index, stream in enumerate(STREAMS)]
    for instr, (start, end) in zip(plan.instrs, timeline[2]):
        if end > start:
            events.append({"name": f"{instr.op} {plan.stage_name(instr.stage)}", "ph": "X", "pid": 0,
                           "tid": STREAMS.index(instr.stream), "ts": (start - origin) * 1e6,
                           "dur": (end - start) * 1e6, "args": {"id": instr.id, "bytes": instr.bytes}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}
