"""schedule: stage costs + gpu_mem -> which stages stay on the device, which stream through which slot,
and what each stage leaves for its backward (its activations, its input on the device or on the host).

A search, every candidate that fits lowered and simulated on the hardware profile, the fastest kept:
- k weight slots, 1 to MAX_SLOTS, so copies run up to k - 1 stages ahead of compute;
- which stages are *resident*: their weights, gradient, fp32 master and AdamW moments live on the
  device all step and the GPU updates them, with no copies and no CPU work; the others stream
  (through a slot in forward and again in backward);
- each stage's activation policy: *recompute* (only its boundary input stays on the device; its
  internals are recomputed in its backward), *keep* (what autograd saves stays on the device from its
  forward to its backward: no recompute, a quarter less compute for the stage) or *offload* (as
  recompute, but the boundary input goes to host memory on the copy-out lane after the forward and
  comes back on the copy-in lane ahead of the backward: nothing held on the device in between, at the
  price of PCIe time the weights share). See _policies;
- ALLOCATOR_HEADROOM of gpu_mem left unplanned for the caching allocator.
"""
from __future__ import annotations

import itertools
import dataclasses
from dataclasses import asdict, dataclass, field

from mtc.config import OPTIMIZER_CHUNK, format_bytes

from .costs import Costs, StageCost

RESIDENT_STATE_BYTES = 12
"""Per resident parameter, besides its weight and gradient in the compute dtype: fp32 master, exp_avg, exp_avg_sq."""
ALIGN_SLACK = 1 << 12
"""Upper bound on a group's alignment padding (16 elements per tensor, up to 256 tensors a stage)."""


class MemoryBudgetError(ValueError):
    """gpu_mem cannot hold the plan's peak working set."""

    def __init__(self, message: str, schedule: "Schedule"):
        super().__init__(message)
        self.schedule = schedule


@dataclass(frozen=True)
class Use:
    stage: int
    phase: str
    """'forward', 'loss' (forward and backward of the last stage, back to back) or 'backward'."""
    slot: int | None
    """None for a resident stage."""


@dataclass
class Schedule:
    stages: list[StageCost]
    shared: StageCost | None
    """Weights read by several stages: resident for the whole step, one copy-in and one update."""
    uses: list[Use]
    """Every time a stage's weights are needed, in order, with the slot that holds them."""
    slots: int
    """Weight slots on the device (k)."""
    slot_bytes: int
    """Bytes of one slot: the largest streamed stage's weights."""
    resident_bytes: int
    """On the device all step: shared weights and their gradient, buffers, and the resident stages'
    weights, gradients, master weights and moments."""
    gpu_mem: int
    """The budget the plan was made for."""
    clip: bool
    """Whether updates wait for the global gradient norm (after the whole backward): to clip by it, or to skip
    a step whose loss or norm is not finite."""
    peak_bytes: int
    """Largest predicted device footprint over the step."""
    resident: list[int] = field(default_factory=list)
    """Stages whose weights and optimizer state stay on the device, updated there."""
    keep: list[int] = field(default_factory=list)
    """Stages whose activations stay on the device from forward to backward (not recomputed). The last
    stage never recomputes: its forward and backward run back to back."""
    offload: list[int] = field(default_factory=list)
    """Stages whose boundary input goes to host memory between their forward and their backward."""
    chunks: int = 1
    """Token chunks: a stage that recomputes or offloads and treats the batch's rows independently
    (StageCost.rows) runs its forward and its backward this many rows-chunks at a time, its weights in
    their slot throughout and its weight gradients summed over the chunks; its working set shrinks with
    the chunk, what it keeps between forward and backward does not."""
    tile_tokens: int = 0
    """Tokens per tile of the stages whose tail runs in token tiles (tiled())."""
    ranks: int = 1
    """Data-parallel ranks running this plan (runtime/distributed): a streamed stage's copies move 1/ranks of
    its bytes over PCIe and the rest between the GPUs, and each host updates 1/ranks of the state."""
    disk: list[int] = field(default_factory=list)
    """Streamed stages whose fp32 optimizer state is in a file (runtime/disk): read, updated and written back
    around each host update."""

    def policy(self, stage: int) -> str:
        """'keep', 'recompute' or 'offload': what the stage's backward starts from, and where it waits."""
        if stage in self.keep or stage == len(self.stages) - 1:
            return "keep"
        return "offload" if stage in self.offload else "recompute"

    def chunks_of(self, stage: int) -> int:
        """How many token chunks the stage runs in (1: the whole batch at once)."""
        rows = self.stages[stage].rows
        if self.chunks == 1 or rows <= 1 or self.policy(stage) == "keep" or self.tiled(stage):
            return 1
        return min(self.chunks, rows)

    def tiled(self, stage: int) -> bool:
        """Whether the stage runs its position-wise tail in token tiles (codegen/tiles): when it recomputes or
        offloads (a replay's tail costs nothing then), has more than one tile's worth of tokens and needs
        less memory so (the tiles' whole input gradients and fp32 weight gradients outweigh small tokens)."""
        cost = self.stages[stage]
        return cost.tiles > 1 and cost.tiled_backward_bytes < cost.backward_bytes and self.policy(stage) != "keep"

    def chunked(self) -> list[int]:
        """The stages that run in token chunks."""
        return [i for i in range(len(self.stages)) if self.chunks_of(i) > 1]

    def rows_per_chunk(self) -> int:
        """Rows of the batch in one token chunk (the batch's rows when nothing is chunked)."""
        rows = max((s.rows for s in self.stages), default=0)
        return -(-rows // self.chunks)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Schedule":
        shared = data["shared"] and StageCost(**data["shared"])
        return cls(**{**data, "stages": [StageCost(**s) for s in data["stages"]], "shared": shared,
                      "uses": [Use(**u) for u in data["uses"]]})


MAX_SLOTS = 4
"""Prefetch up to three stages ahead: enough to absorb a stage whose copy outlasts its compute (an
embedding or output head in forward) without holding a large share of the device for weights."""


TIE = 0.01
"""Predicted step times this close count as equal."""
ALLOCATOR_HEADROOM = 0.05
"""Share of gpu_mem the plan leaves unused: PyTorch's caching allocator reserved 4-7% more than the peak
it had allocated in the H100 runs of BENCHMARKS.md (3B and 8B Llama shapes)."""


def schedule_pass(costs: Costs, gpu_mem: int, clip: bool, slots: int | None = None,
                  resident: int | None = None, profile=None, host_budget: int | None = None,
                  host_bytes=None, spill: bool = False) -> Schedule:
    """Search the weight slots (1 to MAX_SLOTS, or exactly `slots`), the resident stages and the stages'
    activation policies and the token chunks (chunk_counts); keep the plan that fits and is predicted
    fastest on `profile`.

    Resident sets: every subset on chains of up to SUBSET_STAGES stages; on longer ones the complements
    of contiguous streamed runs (every run up to EXHAUSTIVE_STAGES, sampled beyond). A run that ends
    before the output head can beat one that ends at it: with clipping the CPU's updates then keep pace
    with the next forward instead of holding it back at its last stage. Activation policies: see
    _policies. Ties (within TIE) go to the plan that offloads fewest stages (PCIe time and host memory for
    no gain), then has fewest token chunks, then streams fewest, then recomputes fewest, then has more
    slots. `resident=r` asks for exactly stages [0, r).
    host_budget: host bytes the plan may use, host_bytes(schedule) what one uses: only plans within it count
    (more resident stages, fewer offloaded inputs use less); if none is, the one using least is returned,
    for the caller to refuse with its numbers. spill: a plan over host_budget may keep streamed stages' optimizer
    state on disk (spilled), and is then timed with the disk's reads and writes.
    """
    from mtc.codegen.stream_plan import lower, lower_bound_seconds, predicted_step_seconds
    from mtc.config import H100

    profile = profile or H100
    budget = int(gpu_mem * (1 - ALLOCATOR_HEADROOM))
    count = len(costs.stages)
    slot_counts = sorted({max(1, min(k, count)) for k in ([slots] if slots else range(1, MAX_SLOTS + 1))},
                         reverse=True)
    kept_sets = [list(range(resident))] if resident is not None else _resident_sets(count)
    # The busiest lane of a resident set's plan that keeps every activation: no policy, slot count or
    # chunking of that set is predicted faster (recompute and offload only add work, chunks none).
    bound = {tuple(kept): lower_bound_seconds(lower(fixed_plan(costs, gpu_mem, clip, 1, kept, range(count))),
                                              profile) for kept in kept_sets}
    candidates, seen = [], set()
    for chunks in chunk_counts(costs):
        for k in slot_counts:
            for kept in kept_sets:
                key = (chunks, min(k, count - len(kept)), tuple(kept))  # fewer streamed than slots: the same plan
                if key not in seen:
                    seen.add(key)
                    candidates.append((bound[tuple(kept)], len(candidates), chunks, k, kept))
    options, predicted, least_host, spills = [], {}, (float("inf"), None), {}
    fastest = float("inf")
    for least, order, chunks, k, kept in sorted(candidates):  # likeliest first; the order breaks exact ties
        if least > fastest * (1 + TIE) * (1 + 1e-12):  # the margin: the simulation's float sums round
            break  # neither this nor any later candidate can be within TIE of the fastest
        for keep, offload in _policies(costs, gpu_mem, clip, k, kept, budget, chunks):
            plan = fixed_plan(costs, gpu_mem, clip, k, kept, keep, offload, chunks=chunks)
            if host_budget is not None:
                if spill and host_bytes(plan) > host_budget:  # host bytes depend on the resident and offloaded only
                    spill_key = (tuple(kept), tuple(plan.offload))
                    if spill_key not in spills:
                        spills[spill_key] = spilled(plan, host_budget, host_bytes).disk
                    plan = dataclasses.replace(plan, disk=spills[spill_key])
                needs = host_bytes(plan)
                if needs > host_budget:
                    least_host = min(least_host, (needs, plan), key=lambda pair: pair[0])
                    continue
            # chunked or not: the same time
            twin = (plan.slots, tuple(kept), tuple(plan.keep), tuple(plan.offload), tuple(plan.disk))
            if twin not in predicted:
                predicted[twin] = predicted_step_seconds(lower(plan), profile)
            fastest = min(fastest, predicted[twin])
            options.append((predicted[twin], len(offload), chunks, count - len(kept), count - 1 - len(keep), -k,
                            order, plan))
    if not options:
        return least_host[1] or smallest_plan(costs, gpu_mem, clip, check=True)  # the latter raises, naming its need
    return min((o for o in options if o[0] <= fastest * (1 + TIE)), key=lambda o: o[1:7])[7]


def spilled(plan: Schedule, host_budget: int, host_bytes) -> Schedule:
    """The plan with the fewest streamed stages' optimizer state on disk that brings its host bytes within
    host_budget, taken from the last stage back: the host updates run in the order the next forward reads the
    weights, so the last stages' slower, disk-bound updates have the most time before they are needed. If even
    every streamed stage on disk is over the budget, that plan (for the caller to refuse)."""
    streamed = [i for i in reversed(range(len(plan.stages))) if i not in plan.resident]
    for count in range(1, len(streamed) + 1):
        candidate = dataclasses.replace(plan, disk=sorted(streamed[:count]))
        if host_bytes(candidate) <= host_budget or count == len(streamed):
            return candidate
    return plan


POLICY_SUBSET_STAGES = 4
"""Up to this many stages every assignment of keep / recompute / offload is tried; beyond, see _policies."""


def _policies(costs: Costs, gpu_mem: int, clip: bool, slots: int, resident: list[int],
              budget: int, chunks: int = 1) -> list[tuple[list[int], list[int]]]:
    """(keep, offload) sets worth simulating with these slots and resident stages; the rest recompute.

    On longer chains two families: nothing offloaded, and every stage that is not kept offloaded (as
    when activations, not weights, fill the device); in each, as many stages keep their activations as
    fit, in _keep_order (keeping more never makes the simulated step slower, and fitting is monotone:
    keeping more only adds bytes)."""
    def fits(keep, offload):
        return fixed_plan(costs, gpu_mem, clip, slots, resident, keep, offload, chunks=chunks).peak_bytes <= budget

    count = len(costs.stages)
    movable = [i for i in range(count - 1) if costs.stages[i].offload_bytes > 0]
    if count <= POLICY_SUBSET_STAGES:
        choices = [("keep", "recompute", "offload") if i in movable else ("keep", "recompute")
                   for i in range(count - 1)]
        found = []
        for assignment in itertools.product(*choices):
            keep = [i for i, p in enumerate(assignment) if p == "keep"]
            offload = [i for i, p in enumerate(assignment) if p == "offload"]
            if fits(keep, offload):
                found.append((keep, offload))
        return found
    order = _keep_order(costs.stages)
    found = []
    for offloading in (False, True):
        def family(n):
            keep = order[:n]
            return sorted(keep), [i for i in movable if i not in keep] if offloading else []
        if not fits(*family(0)) or (offloading and not movable):
            continue
        low, high = 0, len(order)  # the fitting prefixes are [0, low]
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(*family(middle)) else (low, middle - 1)
        found.append(family(low))
    return found


def _keep_order(stages: list[StageCost]) -> list[int]:
    """Stages (the last excepted: it never recomputes) by forward FLOPs saved per activation byte held,
    the free ones first; among equals the later first, whose activations are held for less of the step."""
    candidates = range(len(stages) - 1)
    return sorted(candidates, key=lambda i: (stages[i].activation_bytes > 0,
                                             -stages[i].forward_flops / max(1, stages[i].activation_bytes), -i))


SUBSET_STAGES = 8
"""Up to this many stages every resident set is tried (256 sets a slot count)."""
EXHAUSTIVE_STAGES = 40
"""Up to this many stages every streamed run is tried (465 runs for 30 stages)."""
LONGER_RUNS = 8
"""Beyond that: runs of every length from 0 to 4 and then up to this many more, at POSITIONS starts."""
POSITIONS = 16


def _resident_sets(count: int) -> list[list[int]]:
    """Candidate resident sets, best guesses first is not needed: every one is simulated."""
    if count <= SUBSET_STAGES:
        return [[i for i in range(count) if mask >> i & 1] for mask in range(1 << count)]
    if count <= EXHAUSTIVE_STAGES:
        runs = [(0, 0)] + [(a, b) for a in range(count) for b in range(a + 1, count + 1)]
    else:
        # A long chain: every run would be thousands of simulations. Memory decides how many stages can
        # stay; so: short runs (few resident is cheap to check), and runs leaving 0..LONGER_RUNS stages
        # resident beyond what short runs leave, at starts spread over the chain and at both ends.
        def starts(length):
            spread = {round(i * (count - length) / (POSITIONS - 1)) for i in range(POSITIONS)}
            return sorted(spread | {0, 1, max(0, count - length - 1), count - length})
        lengths = set(range(0, 5)) | set(range(count - LONGER_RUNS - 4, count + 1))
        runs = [(a, a + length) for length in sorted(lengths) if 0 <= length <= count for a in starts(length)]
    return [[i for i in range(count) if not a <= i < b] for a, b in dict.fromkeys(runs)]


def smallest_plan(costs: Costs, gpu_mem: int, clip: bool, check: bool = False) -> Schedule:
    """The plan with the least device memory: one slot, nothing resident, every input that can be offloaded
    offloaded, the rest recomputed, in the token chunks that need least (chunks cost the whole outputs and
    gradients they fill, which small working sets do not repay). Any plan fits only if this one does."""
    offload = list(range(len(costs.stages) - 1))
    chunks = min(chunk_counts(costs), key=lambda c: fixed_plan(costs, gpu_mem, clip, 1, [], [], offload,
                                                                  chunks=c).peak_bytes)
    return fixed_plan(costs, gpu_mem, clip, 1, [], [], offload, chunks=chunks, check=check)


def chunk_counts(costs: Costs) -> list[int]:
    """Token chunk counts worth searching: 1, and of 2, 4 and one row a chunk those that shrink some stage's
    working set (a chunked plan predicts the same time as its unchunked twin: it can only win by fitting
    where that does not)."""
    rows = max((s.rows for s in costs.stages), default=0)
    counts = [1] + sorted({c for c in (2, 4, rows) if 1 < c <= rows})
    plain = fixed_plan(costs, 1 << 62, False, 1, [], [])
    return [c for c in counts if c == 1 or any(
        forward_work_bytes(chunked, i) < forward_work_bytes(plain, i)
        or backward_work_bytes(chunked, i) < backward_work_bytes(plain, i)
        for chunked in [dataclasses.replace(plain, chunks=c)] for i in range(len(costs.stages)))]


def needed_gpu_mem(peak_bytes: int) -> int:
    """The smallest gpu_mem whose budget holds `peak_bytes`."""
    gpu_mem = -(-peak_bytes * 100 // round(100 * (1 - ALLOCATOR_HEADROOM)))
    while int(gpu_mem * (1 - ALLOCATOR_HEADROOM)) < peak_bytes:
        gpu_mem += 1
    return gpu_mem


def fixed_plan(costs: Costs, gpu_mem: int, clip: bool, slots: int, resident: list[int],
               keep: list[int] = (), offload: list[int] = (), check: bool = False, chunks: int = 1) -> Schedule:
    """k slots for the streamed stages; the `resident` stages on the device; the `keep` stages' activations
    held from forward to backward, the `offload` stages' inputs on the host in between, the others
    recomputed, in `chunks` token chunks where they can be."""
    stages = costs.stages
    count = len(stages)
    order = ([(i, "forward") for i in range(count - 1)] + [(count - 1, "loss")]
             + [(i, "backward") for i in reversed(range(count - 1))])
    kept = [stages[i] for i in resident]
    streamed = [s for i, s in enumerate(stages) if i not in resident]
    slots = min(slots, len(streamed))
    uses, streamed_uses = [], 0
    for stage, phase in order:
        slot = None
        if stage not in resident:
            slot, streamed_uses = streamed_uses % slots, streamed_uses + 1
        uses.append(Use(stage, phase, slot))
    slot_bytes = max((s.weight_bytes for s in streamed), default=0)
    on_device = sum(s.weight_bytes + s.grad_bytes + RESIDENT_STATE_BYTES * s.params for s in kept)
    # The GPU update widens one chunk of gradients at a time to fp32.
    scratch = 4 * min(OPTIMIZER_CHUNK, max((s.params for s in kept), default=-ALIGN_SLACK) + ALIGN_SLACK)
    resident_bytes = costs.resident_bytes + on_device + scratch
    schedule = Schedule(stages, costs.shared, uses, slots, slot_bytes, resident_bytes, gpu_mem, clip, 0,
                        sorted(resident), sorted(set(keep) - {count - 1}),
                        sorted(i for i in set(offload) - set(keep) - {count - 1} if stages[i].offload_bytes),
                        chunks, costs.tile_tokens, costs.ranks)
    peak, where = peak_memory(schedule)
    schedule.peak_bytes = peak
    budget = int(gpu_mem * (1 - ALLOCATOR_HEADROOM))
    if check and peak > budget:
        raise MemoryBudgetError(
            f"gpu_mem={format_bytes(gpu_mem)} ({gpu_mem} bytes) is too small: this plan needs "
            f"{format_bytes(peak)} ({peak} bytes) at its peak, in the {where}; that is {slots} weight slots of "
            f"{format_bytes(slot_bytes)}, {format_bytes(costs.resident_bytes)} resident, the boundary inputs "
            f"held on the device ({len(schedule.offload)} stages offload theirs to the host, {len(schedule.keep)} "
            f"keep all their activations) and the stage's working set{_chunked_note(schedule)}. With {ALLOCATOR_HEADROOM:.0%} left to the "
            f"allocator that takes gpu_mem >= {needed_gpu_mem(peak)} bytes; give that or a smaller batch.", schedule)
    return schedule


def _chunked_note(schedule: Schedule) -> str:
    chunked = schedule.chunked()
    if chunked:
        return f" ({len(chunked)} stages in token chunks of {schedule.rows_per_chunk()} rows)"
    if any(s.rows > 1 for s in schedule.stages):
        return " (token chunks would not lower this peak)"
    return " (no stage can run in token chunks)"


def held_bytes(schedule: Schedule, stage: int) -> int:
    """Bytes a stage's forward leaves on the device for its backward (an offloading stage's leave once
    their copy to the host is done)."""
    cost = schedule.stages[stage]
    return cost.saved_bytes + (cost.activation_bytes if schedule.policy(stage) == "keep" else 0)


def _chunk_bytes(whole: int, one_row: int, rows: int, chunks: int) -> int:
    """A working set for one chunk of rows: linear in its rows between one row's and the whole batch's."""
    chunk_rows = -(-rows // chunks)
    return one_row + (whole - one_row) * (chunk_rows - 1) // (rows - 1)


def forward_work_bytes(schedule: Schedule, stage: int) -> int:
    """Transient bytes of a stage's forward; in chunks, a chunk's, and the whole outputs they fill (at most
    the next stage's inputs)."""
    cost = schedule.stages[stage]
    chunks = schedule.chunks_of(stage)
    if schedule.tiled(stage):
        return cost.tiled_forward_bytes
    if chunks == 1:
        return cost.forward_bytes
    outputs = schedule.stages[stage + 1].saved_bytes
    return _chunk_bytes(cost.forward_bytes, cost.one_row_forward_bytes, cost.rows, chunks) + outputs


def backward_work_bytes(schedule: Schedule, stage: int) -> int:
    """Transient bytes of a stage's backward: a recompute rebuilds its activations first; an offloading
    stage's input is back on the device, and so is the next backward's, fetched while this one runs. In
    chunks, a chunk's working set, the whole input gradients they fill and the weight gradients summed so far."""
    cost = schedule.stages[stage]
    chunks = schedule.chunks_of(stage)
    if schedule.tiled(stage):
        work = cost.tiled_backward_bytes
    elif chunks > 1:
        work = (_chunk_bytes(cost.backward_bytes, cost.one_row_backward_bytes, cost.rows, chunks)
                + cost.saved_bytes + cost.grad_bytes)
    else:
        work = cost.backward_bytes - (cost.activation_bytes if stage in schedule.keep else 0)
    if stage in schedule.offload:
        work += cost.saved_bytes
    if stage - 1 in schedule.offload:
        work += schedule.stages[stage - 1].saved_bytes
    return work


def peak_memory(schedule: Schedule) -> tuple[int, str]:
    """Device bytes at each compute: slots + resident + held activations + working set + live grads."""
    static = schedule.slots * schedule.slot_bytes + schedule.resident_bytes
    kept, grads_in_flight, peak, where = 0, [], 0, ""
    for use in schedule.uses:
        stage = schedule.stages[use.stage]
        if use.phase == "forward":
            # What it will hold (input, and activations when it keeps them) besides its transient bytes.
            kept += held_bytes(schedule, use.stage)
            now = static + kept + forward_work_bytes(schedule, use.stage)
        else:
            # A gradient buffer (slot-sized, reused) lives until its copy-out is done, i.e. during the next
            # backward.
            if use.slot is not None:  # a resident stage's gradient is part of resident_bytes
                grads_in_flight = grads_in_flight[-1:] + [schedule.slot_bytes]
            own_input = stage.saved_bytes if use.phase == "loss" else 0  # the loss stage keeps nothing
            now = static + kept + own_input + backward_work_bytes(schedule, use.stage) + sum(grads_in_flight)
            if use.phase == "backward" and use.stage not in schedule.offload:
                kept -= held_bytes(schedule, use.stage)
        if use.phase != "backward" and use.stage - 1 in schedule.offload:
            kept -= held_bytes(schedule, use.stage - 1)  # its copy to the host is done by now
        if now > peak:
            peak, where = now, f"{use.phase} of {stage.name}"
    return peak, where
