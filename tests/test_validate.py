"""passes/validate: every plan the scheduler makes is valid; broken plans are caught. No GPU, no model."""
import copy
import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtc.codegen.stream_plan import lower, lower_bound_seconds, predicted_step_seconds
from mtc.config import H100
from mtc.passes.costs import Costs, StageCost
from mtc.passes.schedule import ALLOCATOR_HEADROOM, TIE, MemoryBudgetError, fixed_plan, schedule_pass
from mtc.passes.validate import InvalidPlan, validate

KiB = 1024


@st.composite
def stage_costs(draw, name, rows=0):
    """rows > 1: the stage may keep the batch's rows apart (token chunks); one row's working sets are a
    share of the batch's."""
    params = draw(st.integers(0, 4096))
    activations = draw(st.integers(0, 192 * KiB))
    saved = draw(st.integers(0, 64 * KiB))
    forward, backward = draw(st.integers(0, 64 * KiB)), activations + draw(st.integers(0, 64 * KiB))
    rows = rows if rows > 1 and draw(st.booleans()) else 0
    share = draw(st.floats(0.0, 1.0)) if rows else 0.0
    return StageCost(name, "T", params, weight_bytes=2 * params, grad_bytes=4 * params,
                     saved_bytes=saved, forward_bytes=forward, backward_bytes=backward,
                     forward_flops=draw(st.integers(0, 10**9)), activation_bytes=activations,
                     offload_bytes=draw(st.integers(0, saved)), rows=rows,
                     one_row_forward_bytes=int(forward * share), one_row_backward_bytes=int(backward * share))


@st.composite
def chains(draw):
    count = draw(st.integers(1, 10))
    rows = draw(st.sampled_from([0, 2, 3, 4]))
    stages = [draw(stage_costs(f"stage{i}", rows)) for i in range(count)]
    shared = draw(st.none() | stage_costs("shared"))
    resident = draw(st.integers(0, 8 * KiB)) + (shared.weight_bytes + shared.grad_bytes if shared else 0)
    return Costs(stages, resident, shared, {}, ("tensor",))


def plan_for(costs, gpu_mem=1 << 40, clip=False):
    return lower(schedule_pass(costs, gpu_mem, clip))


@settings(max_examples=300, deadline=None)
@given(costs=chains(), gpu_mem=st.integers(1, 4 << 20), clip=st.booleans())
def test_every_plan_the_scheduler_makes_is_valid(costs, gpu_mem, clip):
    try:
        plan = plan_for(costs, gpu_mem, clip)
    except MemoryBudgetError as error:
        assert error.schedule.peak_bytes > int(gpu_mem * (1 - ALLOCATOR_HEADROOM))
        assert str(error.schedule.peak_bytes) in str(error)  # says how many bytes are needed
        return
    assert plan.schedule.peak_bytes <= int(gpu_mem * (1 - ALLOCATOR_HEADROOM))
    validate(plan, H100)


@settings(max_examples=60, deadline=None)
@given(costs=chains(), clip=st.booleans(), faster=st.sampled_from(
    ["h2d_bytes_per_s", "d2h_bytes_per_s", "flops_per_s", "optimizer_params_per_s"]))
def test_more_bandwidth_never_predicts_a_slower_step(costs, clip, faster):
    plan = plan_for(costs, clip=clip)
    quicker = dataclasses.replace(H100, **{faster: getattr(H100, faster) * 2})
    assert predicted_step_seconds(plan, quicker) <= predicted_step_seconds(plan, H100) * (1 + 1e-12)
    assert predicted_step_seconds(plan, H100) >= lower_bound_seconds(plan, H100) * (1 - 1e-12)
    # Planned for the quicker machine, the plan is no slower there than the first one here (ties: TIE).
    replanned = lower(schedule_pass(costs, 1 << 40, clip, profile=quicker))
    assert predicted_step_seconds(replanned, quicker) <= predicted_step_seconds(plan, H100) * (1 + TIE) * (1 + 1e-12)


def _chain(count=4, shared=False, clip=False, resident=0):
    stages = [StageCost(f"stage{i}", "T", 1000, 2000, 4000, 100, 100, 1000, 10**6) for i in range(count)]
    share = StageCost("shared", "-", 10, 20, 40, 0, 0, 0, 0) if shared else None
    return lower(schedule_pass(Costs(stages, 60 if shared else 0, share, {}, ("tensor",)), 1 << 40, clip, slots=2,
                               resident=resident))


def _problems(plan) -> list[str]:
    with pytest.raises(InvalidPlan) as error:
        validate(plan)
    return error.value.problems


def _first(plan, op, stage=None):
    return next(i for i in plan.instrs if i.op == op and (stage is None or i.stage == stage))


@pytest.mark.parametrize("shared, clip, resident", [(False, False, 0), (True, False, 0), (True, True, 0),
                                                     (False, False, 2), (True, True, 2), (False, True, 4)])
def test_the_reference_chain_is_valid(shared, clip, resident):
    plan = _chain(shared=shared, clip=clip, resident=resident)
    validate(plan, H100)
    copied = {i.stage for i in plan.instrs if i.op in ("copy_in", "copy_out")}
    assert copied.isdisjoint(range(resident)) and set(range(resident, 4)) <= copied
    gpu_updates = [i.stage for i in plan.instrs if i.op == "optimizer" and i.stream == "compute"]
    assert sorted(gpu_updates) == list(range(resident))


@settings(max_examples=60, deadline=None)
@given(costs=chains(), gpu_mem=st.integers(1, 4 << 20), clip=st.booleans())
def test_resident_stages_are_chosen_to_make_the_step_no_slower(costs, gpu_mem, clip):
    try:
        chosen = schedule_pass(costs, gpu_mem, clip)
    except MemoryBudgetError:
        return
    streaming = schedule_pass(costs, gpu_mem, clip, slots=chosen.slots, resident=0)
    assert predicted_step_seconds(lower(chosen), H100) <= predicted_step_seconds(lower(streaming), H100) + 1e-4
    assert chosen.peak_bytes <= gpu_mem * (1 - ALLOCATOR_HEADROOM)


@settings(max_examples=60, deadline=None)
@given(costs=chains(), clip=st.booleans())
def test_with_room_for_everything_nothing_is_recomputed(costs, clip):
    schedule = schedule_pass(costs, 1 << 40, clip)
    assert [schedule.policy(i) for i in range(len(costs.stages))] == ["keep"] * len(costs.stages)
    assert not [i for i in lower(schedule).instrs if i.op in ("offload", "fetch")]
    assert all(i.op != "backward" or i.work_bytes == costs.stages[i.stage].backward_bytes
               - costs.stages[i.stage].activation_bytes for i in lower(schedule).instrs)


def test_with_room_for_everything_nothing_streams():
    stages = [StageCost(f"stage{i}", "T", 10**6, 2 * 10**6, 2 * 10**6, 100, 100, 1000, 10**12) for i in range(6)]
    schedule = schedule_pass(Costs(stages, 0, None, {}, ("tensor",)), 1 << 40, True)
    assert schedule.resident == list(range(6))
    assert not [i for i in lower(schedule).instrs if i.op in ("copy_in", "copy_out")]


def test_a_resident_stage_that_is_copied_in_is_rejected():
    plan = _chain(resident=2)
    copy_in = _first(plan, "copy_in", 2)
    copy_in.stage = 1
    assert any("resident stage1 is copied in" in p for p in _problems(plan))


def test_a_compute_that_does_not_wait_for_its_copy_in_is_rejected():
    plan = _chain()
    compute = _first(plan, "forward", 2)
    compute.waits.remove(compute.reads)
    assert any(p.startswith("1:") and "before its weights' copy-in" in p for p in _problems(plan))


def test_a_copy_in_that_may_overwrite_a_slot_in_use_is_rejected():
    plan = _chain()
    copy_in = _first(plan, "copy_in", 2)
    copy_in.waits.clear()  # no longer waits for the previous reader of its slot
    assert any("may overwrite slot" in p for p in _problems(plan))


def test_a_copy_in_that_may_overwrite_the_previous_steps_reader_is_rejected():
    plan = _chain()
    copy_in = _first(plan, "copy_in", 1)
    assert copy_in.waits == []  # the first use of its slot in the step
    copy_in.waits_prev_step = [w for w in copy_in.waits_prev_step if plan.instrs[w].op != "backward"]
    assert any("previous step's backward of stage1" in p for p in _problems(plan))


def test_updates_come_in_the_order_the_next_forward_needs_them():
    plan = _chain(shared=True, clip=True)
    updates = [i.stage for i in plan.instrs if i.op == "optimizer"]
    assert updates == [-1, 0, 1, 2, 3]  # shared first, then stage by stage


def test_forward_out_of_order_is_rejected():
    plan = _chain()
    first, second = _first(plan, "forward", 1), _first(plan, "forward", 2)
    first.stage, second.stage = second.stage, first.stage
    problems = _problems(plan)
    assert any(p.startswith("4:") for p in problems)
    assert any(p.startswith("1:") for p in problems)  # they now read the other stage's weights


def test_an_over_budget_slot_is_rejected():
    plan = _chain()
    copy_in = _first(plan, "copy_in", 1)
    compute = _first(plan, "forward", 1)
    copy_in.slot = compute.slot = plan.schedule.slots  # a third slot in a two-slot plan
    assert any(p.startswith("2:") and "slots" in p for p in _problems(plan))


def test_a_plan_over_gpu_mem_is_rejected():
    plan = _chain()
    plan.schedule.gpu_mem = plan.schedule.peak_bytes - 1
    assert any(p.startswith("2:") and "over gpu_mem" in p for p in _problems(plan))


def test_a_wait_on_a_later_instruction_is_rejected():
    plan = _chain()
    first = plan.instrs[0]
    first.waits.append(len(plan.instrs) - 1)
    assert any(p.startswith("3:") and "deadlock" in p for p in _problems(plan))


def test_an_update_before_the_gradient_lands_is_rejected():
    plan = _chain()
    _first(plan, "optimizer", 1).waits.clear()
    assert any("may be updated before its gradient is copied out" in p for p in _problems(plan))


def test_a_missing_update_and_a_leak_are_rejected():
    plan = _chain()
    copy_of = copy.deepcopy(plan)
    update = _first(copy_of, "optimizer", 0)
    update.op = "clip"
    assert any(p.startswith("7:") for p in _problems(copy_of))
    free = _first(plan, "free_grad", 0)
    free.releases = []
    problems = _problems(plan)
    assert any(p.startswith("8:") for p in problems) and any(p.startswith("6:") for p in problems)


def test_a_copy_in_that_ignores_the_previous_steps_update_is_rejected():
    plan = _chain(shared=True)
    _first(plan, "copy_in", -1).waits_prev_step = []
    assert any("previous step's update" in p for p in _problems(plan))


@pytest.mark.parametrize("clip", [False, True])
def test_a_long_chain_gets_a_valid_plan_no_slower_than_streaming_everything(clip):
    """Past EXHAUSTIVE_STAGES the scheduler samples the streamed runs; its plan must still hold."""
    stages = [StageCost(f"stage{i}", "T", 10**6, 2 * 10**6, 2 * 10**6, 10**5, 10**5, 10**6, 10**11)
              for i in range(60)]
    costs = Costs(stages, 0, None, {}, ("tensor",))
    streaming = schedule_pass(costs, 1 << 40, clip, slots=4, resident=0)
    gpu_mem = int((streaming.peak_bytes + 10 * 16 * 10**6) / (1 - ALLOCATOR_HEADROOM))
    chosen = schedule_pass(costs, gpu_mem, clip)
    plan = lower(chosen)
    validate(plan, H100)
    assert 0 < len(chosen.resident) < 60
    assert predicted_step_seconds(plan, H100) <= predicted_step_seconds(lower(streaming), H100) * (1 + 1e-9)
    # With room for everything: keeping every stage resident is a candidate, and nothing beats it by more than
    # the tie margin. (Streaming some can win: their host updates hide behind the backward and take the GPU
    # update's time off the compute stream.)
    roomy = schedule_pass(costs, 1 << 40, clip)
    resident = schedule_pass(costs, 1 << 40, clip, slots=4, resident=60)
    assert resident.resident == list(range(60))
    assert predicted_step_seconds(lower(roomy), H100) <= predicted_step_seconds(lower(resident), H100) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(costs=chains(), gpu_mem=st.integers(1, 4 << 20), clip=st.booleans())
def test_on_short_chains_the_scheduler_matches_a_brute_force_search(costs, gpu_mem, clip):
    """Chains of up to 4 stages: every slot count, every resident set, every stage's activation policy
    (keep, recompute, or offload where it has an input to offload) and every token chunk count, simulated."""
    count = len(costs.stages)
    if count > 4:
        return
    budget = int(gpu_mem * (1 - ALLOCATOR_HEADROOM))
    times = []
    subsets = lambda items: [list(c) for n in range(len(items) + 1) for c in itertools.combinations(items, n)]  # noqa: E731
    policies = itertools.product(*[("keep", "recompute", "offload") for _ in range(count - 1)])
    policies = [p for p in policies if all(costs.stages[i].offload_bytes or x != "offload" for i, x in enumerate(p))]
    rows = max(s.rows for s in costs.stages)
    for slots, kept, policy, chunks in itertools.product(range(1, 5), subsets(range(count)), policies,
                                                         range(1, max(rows, 1) + 1)):
        keep = [i for i, p in enumerate(policy) if p == "keep"]
        offload = [i for i, p in enumerate(policy) if p == "offload"]
        schedule = fixed_plan(costs, gpu_mem, clip, min(slots, count), kept, keep, offload, chunks=chunks)
        if schedule.peak_bytes <= budget:
            times.append(predicted_step_seconds(lower(schedule), H100))
    try:
        chosen = predicted_step_seconds(lower(schedule_pass(costs, gpu_mem, clip)), H100)
    except MemoryBudgetError:
        assert not times
        return
    assert min(times) <= chosen <= min(times) * (1 + TIE)


@settings(max_examples=60, deadline=None)
@given(costs=chains(), gpu_mem=st.integers(1, 4 << 20), clip=st.booleans(), more=st.floats(1.0, 4.0))
def test_more_gpu_memory_never_predicts_a_slower_step(costs, gpu_mem, clip, more):
    """Invariant 10 for the scheduler: a larger budget only adds candidates (ties are within TIE)."""
    try:
        tight = predicted_step_seconds(lower(schedule_pass(costs, gpu_mem, clip)), H100)
    except MemoryBudgetError:
        return
    roomy = predicted_step_seconds(lower(schedule_pass(costs, int(gpu_mem * more), clip)), H100)
    assert roomy <= tight * (1 + TIE) * (1 + 1e-12)


def _activation_heavy(count=8):
    """Stages whose inputs, not weights, fill the device."""
    stages = [StageCost(f"stage{i}", "T", 1000, 2000, 2000, 10**6, 10**5, 2 * 10**6, 10**9,
                        activation_bytes=10**6, offload_bytes=10**6) for i in range(count)]
    return Costs(stages, 0, None, {}, ("tensor",))


def test_when_the_inputs_do_not_fit_the_plan_offloads_them():
    costs = _activation_heavy()
    everything_held = fixed_plan(costs, 1 << 40, False, 1, [], [])
    gpu_mem = int(everything_held.peak_bytes / (1 - ALLOCATOR_HEADROOM)) - 2 * 10**6  # one input too many
    schedule = schedule_pass(costs, gpu_mem, False)
    assert schedule.offload and schedule.peak_bytes <= gpu_mem * (1 - ALLOCATOR_HEADROOM)
    plan = lower(schedule)
    validate(plan, H100)
    for stage in schedule.offload:
        fetch, offload = _first(plan, "fetch", stage), _first(plan, "offload", stage)
        assert fetch.bytes == offload.bytes == costs.stages[stage].offload_bytes and offload.id in fetch.waits


def test_an_input_freed_before_its_copy_to_the_host_is_rejected():
    costs = _activation_heavy()
    plan = lower(fixed_plan(costs, 1 << 40, False, 2, [], [], offload=[2, 3]))
    validate(plan)
    _first(plan, "free_input", 2).waits.clear()
    assert any("freed on the device before its copy to the host" in p for p in _problems(plan))
    plan = lower(fixed_plan(costs, 1 << 40, False, 2, [], [], offload=[2, 3]))
    _first(plan, "fetch", 3).stage = 4  # stage 3's input never comes back
    assert any("stage3 offloads its input but has 1 offloads, 1 frees and 0 fetches" in p for p in _problems(plan))
