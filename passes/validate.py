"""validate: check a StreamPlan against the schedule invariants of DESIGN.md.

Independent of how the plan was made: it rebuilds the happens-before order from stream order and
events, replays device memory, and raises InvalidPlan listing every broken invariant.
"""
from __future__ import annotations

from mtc.codegen.stream_plan import (SHARED, STREAMS, StreamPlan, lower_bound_seconds,
                                     predicted_step_seconds)
from mtc.config import HardwareProfile

COMPUTE_OPS = ("forward", "loss", "backward")


class InvalidPlan(AssertionError):
    def __init__(self, problems: list[str]):
        super().__init__("invalid plan:\n  " + "\n  ".join(problems))
        self.problems = problems


def validate(plan: StreamPlan, profile: HardwareProfile | None = None) -> None:
    problems: list[str] = []
    structure_ok = _check_structure(plan, problems)  # 3: the rest needs a well-formed order
    if structure_ok:
        before = _happens_before(plan)
        _check_slots(plan, before, problems)        # 1, 2
        _check_memory(plan, problems)               # 2, 6, 8
        _check_order(plan, before, problems)        # 4, 5
        _check_gradients(plan, before, problems)    # 6, 7
        if profile is not None:                     # 9
            predicted, bound = predicted_step_seconds(plan, profile), lower_bound_seconds(plan, profile)
            if predicted < bound * (1 - 1e-9):
                problems.append(f"9: predicted step {predicted:.6f} s beats the lower bound {bound:.6f} s")
    if problems:
        raise InvalidPlan(problems)


def _check_structure(plan: StreamPlan, problems: list[str]) -> bool:
    """3. One stream runs its instructions in list order; a wait names an earlier instruction."""
    ok = True
    for index, instr in enumerate(plan.instrs):
        if instr.id != index:
            problems.append(f"3: instruction at position {index} has id {instr.id}")
            return False
        if instr.stream not in STREAMS:
            problems.append(f"3: instruction {index} is on unknown stream {instr.stream!r}")
            ok = False
        for wait in instr.waits + instr.releases + ([instr.reads] if instr.reads is not None else []):
            if not 0 <= wait < index:
                problems.append(f"3: instruction {index} ({instr.op}) depends on {wait}, which does not come "
                                f"before it: the streams could deadlock")
                ok = False
        for wait in instr.waits_prev_step:
            if not 0 <= wait < len(plan.instrs):
                problems.append(f"3: instruction {index} waits on unknown previous-step instruction {wait}")
                ok = False
    return ok


def _happens_before(plan: StreamPlan) -> list[int]:
    """before[i]: bitset of the instructions guaranteed complete when i starts (within a step)."""
    before, last_on = [], {}
    for instr in plan.instrs:
        bits = 0
        for dep in instr.waits + ([last_on[instr.stream]] if instr.stream in last_on else []):
            bits |= before[dep] | (1 << dep)
        before.append(bits)
        last_on[instr.stream] = instr.id
    return before


def _ordered(before, a: int, b: int) -> bool:
    """a completes before b starts."""
    return bool(before[b] >> a & 1)


def _check_slots(plan: StreamPlan, before, problems):
    """1. Weights are read only after their copy-in and before the slot is overwritten. 2. <= k slots."""
    slots = {i.slot for i in plan.instrs if i.op == "copy_in" and i.stage != SHARED}
    if len(slots) > plan.schedule.slots or not slots <= set(range(plan.schedule.slots)):
        problems.append(f"2: uses slots {sorted(slots)} but the plan has {plan.schedule.slots}")
    copy_ins = [i for i in plan.instrs if i.op == "copy_in" and i.stage != SHARED]
    resident = set(plan.schedule.resident)
    for copy_in in copy_ins:
        if copy_in.stage in resident:
            problems.append(f"1: resident {plan.stage_name(copy_in.stage)} is copied in by instruction {copy_in.id}")
    for compute in (i for i in plan.instrs if i.op in COMPUTE_OPS):
        name = f"{compute.op} of {plan.stage_name(compute.stage)}"
        if compute.stage in resident:
            if compute.reads is not None or compute.slot is not None:
                problems.append(f"1: {name} reads a slot, but the stage's weights are resident")
            continue
        load = plan.instrs[compute.reads] if compute.reads is not None else None
        if load is None or load.op != "copy_in" or load.stage != compute.stage or load.slot != compute.slot:
            problems.append(f"1: {name} does not read a copy-in of its own weights into slot {compute.slot}")
            continue
        if not _ordered(before, load.id, compute.id):
            problems.append(f"1: {name} may start before its weights' copy-in (instruction {load.id}) completes")
        for other in copy_ins:
            if other.id == load.id or other.slot != compute.slot:
                continue
            if not (_ordered(before, other.id, load.id) or _ordered(before, compute.id, other.id)):
                problems.append(f"1: copy-in {other.id} ({plan.stage_name(other.stage)}) may overwrite slot "
                                f"{compute.slot} while {name} reads it")
    # Across steps: a slot's first copy-in must wait for the previous step's last reader of that slot.
    for slot in slots:
        first = next(i for i in copy_ins if i.slot == slot)
        last = [i for i in plan.instrs if i.op in COMPUTE_OPS and i.slot == slot][-1:]
        if last and last[0].id not in first.waits_prev_step:
            problems.append(f"1: copy-in {first.id} may overwrite slot {slot} while the previous step's "
                            f"{last[0].op} of {plan.stage_name(last[0].stage)} reads it")
    shared_in = [i for i in plan.instrs if i.op == "copy_in" and i.stage == SHARED]
    if plan.schedule.shared:
        if len(shared_in) != 1:
            problems.append(f"1: the shared weights are copied in {len(shared_in)} times, not once")
        else:
            for compute in (i for i in plan.instrs if i.op in COMPUTE_OPS):
                if not _ordered(before, shared_in[0].id, compute.id):
                    problems.append(f"1: {compute.op} of {plan.stage_name(compute.stage)} may run before the "
                                    f"shared weights arrive")


def _check_memory(plan: StreamPlan, problems):
    """2. Device bytes <= gpu_mem at every allocation. 6. Free after last use. 8. No leaks."""
    schedule = plan.schedule
    live: dict[int, int] = {}
    static = schedule.slots * schedule.slot_bytes + schedule.resident_bytes
    released: set[int] = set()
    for instr in plan.instrs:
        computes = instr.stream == "compute" and instr.op in COMPUTE_OPS
        if computes:  # what it releases (its kept input) is still in use while it runs
            now = static + sum(live.values()) + instr.bytes + instr.work_bytes
            if now > schedule.gpu_mem:
                problems.append(f"2: {instr.op} of {plan.stage_name(instr.stage)} needs {now} bytes on the "
                                f"device, over gpu_mem={schedule.gpu_mem}")
        for freed in instr.releases:
            if freed in released or freed not in live:
                problems.append(f"6: instruction {instr.id} frees {freed}, which holds no allocation")
            released.add(freed)
            live.pop(freed, None)
        if computes:
            live[instr.id] = instr.bytes  # even 0 bytes: every allocation must be released once
    if live:
        problems.append(f"8: allocations of instructions {sorted(live)} are never freed: the step leaks "
                        f"{sum(live.values())} bytes")


def _check_order(plan: StreamPlan, before, problems):
    """4. Forward in order, loss, backward in reverse. 5. A backward finds its kept input."""
    computes = [i for i in plan.instrs if i.op in COMPUTE_OPS]
    count = len(plan.stages)
    expected = ([("forward", s) for s in range(count - 1)] + [("loss", count - 1)]
                + [("backward", s) for s in reversed(range(count - 1))])
    actual = [(i.op, i.stage) for i in computes]
    if actual != expected:
        problems.append(f"4: compute order is {_describe(plan, actual)}, expected {_describe(plan, expected)}")
    forwards = {i.stage: i for i in computes if i.op == "forward"}
    offloaded = set(plan.schedule.offload)
    for backward in (i for i in computes if i.op == "backward"):
        forward = forwards.get(backward.stage)
        if backward.stage in offloaded:
            _check_offload(plan, before, forward, backward, problems)
        elif forward is None or forward.id not in backward.releases or not _ordered(before, forward.id, backward.id):
            problems.append(f"5: backward of {plan.stage_name(backward.stage)} does not consume the input its "
                            f"forward kept")


def _check_offload(plan: StreamPlan, before, forward, backward, problems):
    """5 for an offloading stage: its input copied to the host after its forward, its device copy freed
    only after that copy, and copied back before its backward."""
    name = plan.stage_name(backward.stage)
    mine = [i for i in plan.instrs if i.stage == backward.stage]
    offloads = [i for i in mine if i.op == "offload"]
    frees = [i for i in mine if i.op == "free_input"]
    fetches = [i for i in mine if i.op == "fetch"]
    if len(offloads) != 1 or len(frees) != 1 or len(fetches) != 1 or forward is None:
        problems.append(f"5: {name} offloads its input but has {len(offloads)} offloads, {len(frees)} frees and "
                        f"{len(fetches)} fetches, not one each")
        return
    offload, free, fetch = offloads[0], frees[0], fetches[0]
    if not _ordered(before, forward.id, offload.id):
        problems.append(f"5: {name}'s input may be offloaded before its forward completes")
    if forward.id not in free.releases or not _ordered(before, offload.id, free.id):
        problems.append(f"5: {name}'s input may be freed on the device before its copy to the host completes")
    if not (_ordered(before, offload.id, fetch.id) and _ordered(before, fetch.id, backward.id)):
        problems.append(f"5: backward of {name} may start before its input is back from the host")


def _check_gradients(plan: StreamPlan, before, problems):
    """6, 7. Each gradient complete, copied out once, freed after its copy-out, updated once; the
    update follows every use of the weights and precedes the next step's copy-in."""
    groups = list(range(len(plan.stages))) + ([SHARED] if plan.schedule.shared else [])
    for group in groups:
        name = plan.stage_name(group)
        producers = [i for i in plan.instrs if i.op in ("backward", "loss")
                     and (i.stage == group or group == SHARED)]
        copy_outs = [i for i in plan.instrs if i.op == "copy_out" and i.stage == group]
        updates = [i for i in plan.instrs if i.op == "optimizer" and i.stage == group]
        if group in plan.schedule.resident:
            _check_resident_gradient(plan, before, group, producers, copy_outs, updates, problems)
            continue
        if len(copy_outs) != 1 or len(updates) != 1:
            problems.append(f"7: {name}'s gradient is copied out {len(copy_outs)} times and updated "
                            f"{len(updates)} times, not once each")
            continue
        copy_out, update = copy_outs[0], updates[0]
        for producer in producers:
            if not _ordered(before, producer.id, copy_out.id):
                problems.append(f"7: {name}'s gradient may be copied out before {producer.op} of "
                                f"{plan.stage_name(producer.stage)} completes")
        if not _ordered(before, copy_out.id, update.id):
            problems.append(f"7: {name} may be updated before its gradient is copied out")
        clips = [i for i in plan.instrs if i.op == "clip"]
        if plan.schedule.clip and (len(clips) != 1 or not _ordered(before, clips[0].id, update.id)):
            problems.append(f"7: {name} may be updated before the global gradient norm is known")
        for use in (i for i in plan.instrs if i.stage == group and i.op in ("copy_in",) + COMPUTE_OPS):
            if not _ordered(before, use.id, update.id):
                problems.append(f"7: {name} may be updated while instruction {use.id} ({use.op}) still reads it")
        for copy_in in (i for i in plan.instrs if i.op == "copy_in" and i.stage == group):
            if update.id not in copy_in.waits_prev_step:
                problems.append(f"7: copy-in {copy_in.id} of {name} does not wait for the previous step's update")
        if group != SHARED:
            frees = [i for i in plan.instrs if i.op == "free_grad" and i.stage == group]
            producer = producers[0] if producers else None
            if len(frees) != 1 or not _ordered(before, copy_out.id, frees[0].id) or \
                    (producer and producer.id not in frees[0].releases):
                problems.append(f"6: {name}'s gradient buffer is not freed exactly once after its copy-out")


def _check_resident_gradient(plan, before, group, producers, copy_outs, updates, problems):
    """7 for a resident stage: no copy-out; one update on the device, after its backward (and the clip),
    consuming the gradient; the next step's compute follows it on the same stream."""
    name = plan.stage_name(group)
    if copy_outs or len(updates) != 1 or updates[0].stream != "compute":
        problems.append(f"7: resident {name} must be updated once on the device without a copy-out; it has "
                        f"{len(copy_outs)} copy-outs and {len(updates)} updates")
        return
    update = updates[0]
    if not producers or producers[-1].id not in update.releases:
        problems.append(f"6: resident {name}'s update does not consume its gradient")
    for producer in producers:
        if not _ordered(before, producer.id, update.id):
            problems.append(f"7: {name} may be updated before {producer.op} completes")
    clips = [i for i in plan.instrs if i.op == "clip"]
    if plan.schedule.clip and (len(clips) != 1 or not _ordered(before, clips[0].id, update.id)):
        problems.append(f"7: {name} may be updated before the global gradient norm is known")


def _describe(plan, pairs) -> str:
    return " ".join(f"{op}:{plan.stage_name(stage)}" for op, stage in pairs)
