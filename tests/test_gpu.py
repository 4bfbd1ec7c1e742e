"""The same plan on a CUDA device (skipped without one)."""
import copy

import pytest
import torch

import mtc
from mtc.passes import schedule
from mtc.examples import models
from models import llama, tokens

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("policy", ["solved", "keep", "recompute", "offload"])
def test_fp32_on_the_gpu_matches_eager_on_the_gpu(policy, monkeypatch):
    if policy != "solved":  # every stage streamed through the slots; every activation kept (read back from
        # the slots), recomputed, or its input offloaded to the host and fetched back
        monkeypatch.setattr(schedule, "_resident_sets", lambda count: [[]])
        monkeypatch.setattr(schedule, "_policies", lambda costs, *args: [(
            list(range(len(costs.stages) - 1)) if policy == "keep" else [],
            list(range(len(costs.stages) - 1)) if policy == "offload" else [])])
    torch.manual_seed(0)
    model = llama()
    reference = copy.deepcopy(model).cuda()
    hp = mtc.AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    step = mtc.compile(model, gpu_mem="3.5MB" if policy == "solved" else "1GB", example=tokens(), optimizer=hp,
                       clip_grad_norm=1.0, device="cuda", compute_dtype=torch.float32)
    if policy != "solved":
        stages = len(step.plan.schedule.stages)
        assert step.plan.schedule.resident == [] and [step.plan.schedule.policy(i) for i in range(1, stages - 1)] == \
            [policy] * (stages - 2)  # the blocks (the prologue's input is the token ids: nothing to offload)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
                                  fused=True)
    for seed in range(3):
        ids, labels = (t.cuda() for t in tokens(seed=seed))
        loss = float(step(ids, labels))
        expected = reference(ids, labels)
        optimizer.zero_grad()
        expected.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        # GPU kernels (cuBLAS, SDPA) differ from the CPU's and the update runs on the host: not bitwise.
        assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
    torch.manual_seed(0)
    model = llama()
    step = mtc.compile(model, gpu_mem="3.5MB", example=tokens(), device="cuda")
    assert step.plan.header["compute_dtype"] == "bfloat16"
    before = {n: p.clone() for n, p in step.named_parameters()}
    losses = [float(step(*(t.cuda() for t in tokens(seed=s)))) for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, master in step.named_parameters():
        assert master.dtype == torch.float32 and not torch.equal(master, before[name]), name


def _125m_pair(batch=(4, 256)):
    """mtc on a ~125M Llama (bf16 compute, streamed) and the same weights eager on the GPU (autocast)."""
    torch.manual_seed(0)
    model = models.build("125m")
    reference = copy.deepcopy(model).cuda()
    generator = torch.Generator().manual_seed(0)
    # Two batches seen ten times each: the loss must fall, so both runs are seen to learn.
    batches = [tuple(torch.randint(0, 32000, batch, generator=generator).cuda() for _ in range(2))
               for _ in range(2)] * 10
    hp = mtc.AdamW(lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    # 1.5 GB: four stages resident (updated on the GPU), ten streamed (updated by the CPU thread).
    step = mtc.compile(model, gpu_mem="1.5GB", example=batches[0], optimizer=hp, clip_grad_norm=1.0,
                       device="cuda")
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
                                  fused=True)
    return step, reference, optimizer, batches


def test_streamed_125m_trains_like_eager_autocast():
    step, reference, optimizer, batches = _125m_pair()
    schedule = step.plan.schedule
    assert 0 < len(schedule.resident) < len(schedule.stages) and schedule.slots > 0  # both kinds of stage
    losses, expected = [], []
    for ids, labels in batches:
        losses.append(float(step(ids, labels)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = reference(ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        expected.append(loss.item())
    assert losses[0] == pytest.approx(expected[0], rel=1e-3)
    # bf16 noise: mtc computes the embedding and the residual stream in bf16 (as Megatron-style bf16 training
    # does), autocast keeps them in fp32; the gap grows as the runs learn.
    assert losses == pytest.approx(expected, rel=2e-2)
    assert losses[-1] < 0.9 * losses[0]  # and both really train


def test_no_device_or_pinned_allocations_after_warmup():
    step, _, _, batches = _125m_pair()
    for ids, labels in batches[:2]:
        step(ids, labels)
    step.synchronize()
    stats = torch.cuda.memory_stats()
    host = torch.cuda.host_memory_stats().get("num_host_alloc") if hasattr(torch.cuda, "host_memory_stats") else None
    for ids, labels in batches[2:6]:
        step(ids, labels)
    step.synchronize()
    after = torch.cuda.memory_stats()
    assert after["segment.all.allocated"] == stats["segment.all.allocated"]
    assert after["reserved_bytes.all.current"] == stats["reserved_bytes.all.current"]
    if host is not None:
        assert torch.cuda.host_memory_stats().get("num_host_alloc") == host


def test_measured_timeline_keeps_the_plan_order_across_streams():
    """The events really order the streams: measured on the device, every compute starts after the copy-in
    it reads has ended, every copy-out after its backward, every host update after its copy-out."""
    step, _, _, batches = _125m_pair()
    step(*batches[0])
    engine = step._engine
    engine.start_trace()
    for ids, labels in batches[1:3]:
        step(ids, labels)
    rows = engine.stop_trace()
    assert len(rows) == 2 * len(step.plan.stream_plan.instrs)
    assert {instr.stream for _, instr, _, _ in rows} == {"h2d", "compute", "d2h", "cpu"}
    when = {(n, instr.id): (start, end) for n, instr, start, end in rows}
    slack = 200e-6  # host clock against device events
    for n, instr, start, end in rows:
        assert end >= start >= 0
        for wait in instr.waits:
            assert start >= when[n, wait][1] - slack, f"{instr.op} {instr.stage} started before {wait} ended"
    for lane in ("h2d", "compute", "d2h"):
        intervals = sorted((s, e) for _, i, s, e in rows if i.stream == lane)
        assert all(a[1] <= b[0] + slack for a, b in zip(intervals, intervals[1:])), f"{lane} overlaps itself"


def test_token_chunks_on_the_gpu_give_eagers_gradients():
    """4 rows in 4 token chunks (the budget fits no plan with the whole batch): one step's gradients are
    eager's on the GPU up to summation order."""
    torch.manual_seed(0)
    model = llama()
    reference = copy.deepcopy(model).cuda()
    ids, labels = (t.cuda() for t in tokens(4, 64, seed=0))
    step = mtc.compile(model, gpu_mem="4.6MB", example=(ids, labels), optimizer=mtc.AdamW(lr=0.0),
                       device="cuda", compute_dtype=torch.float32)
    assert step.plan.schedule.chunks == 4
    _assert_one_step_is_eagers(step, reference, ids, labels)


@pytest.mark.parametrize("kernels", ["none", "all"])
def test_token_tiles_on_the_gpu_give_eagers_gradients(kernels):
    """One sequence of 1024 tokens, the blocks' tails in 4 tiles of 256 (fp32): one step's gradients are
    eager's on the GPU up to summation order, with the Triton kernels in the tail or without them."""
    torch.manual_seed(0)
    model = llama()
    reference = copy.deepcopy(model).cuda()
    ids, labels = (t.cuda() for t in tokens(1, 1024, seed=0))
    step = mtc.compile(model, gpu_mem="20MB", example=(ids, labels), optimizer=mtc.AdamW(lr=0.0),
                       device="cuda", compute_dtype=torch.float32, kernels=kernels, tile_tokens=256)
    schedule = step.plan.schedule
    assert sum(schedule.tiled(i) for i in range(len(schedule.stages))) >= 4
    _assert_one_step_is_eagers(step, reference, ids, labels)


def _assert_one_step_is_eagers(step, reference, ids, labels):
    """One step's loss and every parameter's gradient within 1e-5 of eager's (a summation order apart)."""
    from mtc.runtime.store import Group
    loss = float(step(ids, labels))
    expected = reference(ids, labels)
    expected.backward()
    step.synchronize()
    assert loss == pytest.approx(expected.item(), rel=1e-5)
    grads = {name: p.grad for name, p in reference.named_parameters()}
    for group in step._store.groups:
        for piece in group.slices:
            mine = Group.view(group.grad, piece).to(grads[piece.name].device)
            error = float((mine - grads[piece.name]).abs().max() / grads[piece.name].abs().max())
            assert error <= 1e-5, f"{piece.name}: {error:.2e}"


def test_a_checkpoint_of_a_gpu_step_resumes_its_trajectory(tmp_path):
    from safetensors.torch import load_file

    # Resident stages keep their master weights and moments on the GPU, streamed ones on the host: both are saved.
    torch.manual_seed(0)
    batches = [tuple(t.cuda() for t in tokens(seed=s)) for s in range(6)]
    hp = mtc.AdamW(lr=1e-3, weight_decay=0.1)
    first = mtc.compile(llama(), "3.5MB", batches[0], optimizer=hp, clip_grad_norm=1.0, device="cuda",
                        progress=False)
    assert 0 < len(first.plan.schedule.resident) < len(first.plan.schedule.stages)
    for batch in batches[:3]:
        first(*batch)
    mtc.save(first, tmp_path / "ckpt", progress=False)
    with torch.device("meta"):
        model = llama()
    resumed = mtc.load(tmp_path / "ckpt", model, "3.5MB", batches[0], device="cuda", progress=False)
    mtc.save(resumed, tmp_path / "again", progress=False)
    for kind in ("model", "optimizer"):
        saved, again = load_file(tmp_path / "ckpt" / f"{kind}.safetensors"), \
            load_file(tmp_path / "again" / f"{kind}.safetensors")
        assert saved.keys() == again.keys()
        for name, value in saved.items():
            assert torch.equal(value, again[name]), name
    # The first step goes on uninterrupted; the resumed one runs the same kernels on the same state.
    for batch in batches[3:]:
        assert float(resumed(*batch)) == float(first(*batch))
    for (name, a), (_, b) in zip(first.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_non_finite_step_on_the_gpu_leaves_every_group_as_it_was():
    """bf16 compute: a streamed group's gradient borrowed its stream copy (rewritten from the unchanged
    master); a resident one is skipped by the fused kernel's found_inf on the device."""
    from models import PoisonedLM, poisoned_batches

    torch.manual_seed(0)
    batches = [tuple(t.cuda() for t in batch) for batch in poisoned_batches((0, 1, float("inf"), 0))]
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batches[0], device="cuda")
    assert 0 < len(step.plan.schedule.resident) < len(step.plan.schedule.stages)  # updated on both sides
    step(*batches[0])

    def state():
        step.synchronize()
        return {(g.name, kind): getattr(g, kind).clone() for g in step._store.all_groups()
                for kind in ("master", "exp_avg", "exp_avg_sq", "step", "stream")}
    before = state()
    step(*batches[1])
    step(*batches[2])
    after = state()
    assert all(torch.equal(before[key], after[key]) for key in before), \
        [key for key in before if not torch.equal(before[key], after[key])]
    step(*batches[3])
    step.synchronize()
    assert step.skipped_steps == [2, 3]
    assert all(float(g.step) == 2 for g in step._store.all_groups())


def test_pinning_refused_by_the_driver_trains_from_pageable_memory(monkeypatch):
    from mtc.runtime import preflight

    cudart = torch.cuda.cudart()

    class RefusingDriver:
        """The CUDA runtime, but page-locking fails."""

        def __getattr__(self, name):
            return getattr(cudart, name)

        def cudaHostRegister(self, pointer, size, flags):  # noqa: N802 - the CUDA runtime's name
            return 2  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda driver=RefusingDriver(): driver)
    monkeypatch.setattr(preflight, "_unpinned", {"bytes": 0, "warned": False})
    torch.manual_seed(0)
    model = llama()
    reference = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"could not page-lock .* measured [\d.]+ GB/s against [\d.]+ GB/s pinned "
                                         r"\([\d.]+x slower\)"):
        step = mtc.compile(model, gpu_mem="3.5MB", example=tokens(), device="cuda", compute_dtype=torch.float32)
    assert preflight.unpinned_bytes() > 0
    monkeypatch.undo()
    pinned = mtc.compile(reference, gpu_mem="3.5MB", example=tokens(), device="cuda", compute_dtype=torch.float32)
    for seed in range(3):
        batch = [t.cuda() for t in tokens(seed=seed)]
        assert float(step(*batch)) == pytest.approx(float(pinned(*batch)), rel=1e-5)  # the same plan and kernels
    for (name, mine), (_, theirs) in zip(step.named_parameters(), pinned.named_parameters()):
        assert float((mine - theirs).abs().max() / theirs.abs().max()) <= 1e-5, name


def test_a_budget_larger_than_the_free_device_memory_is_refused():
    free, _ = torch.cuda.mem_get_info()
    with pytest.raises(ValueError, match=r"gpu_mem=.* is more than cuda(:0)? has free"):
        mtc.compile(llama(), gpu_mem=free + (1 << 30), example=tokens(), device="cuda")
