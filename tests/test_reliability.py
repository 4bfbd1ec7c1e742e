"""Faults: non-finite steps are skipped whole, and a failing optimizer thread surfaces at once."""
import copy
import math

import pytest
import torch

import mtc
from mtc.runtime import engine as engine_module

from models import PoisonedLM, llama, poisoned_batches, tokens

INF = math.inf
HP = mtc.AdamW(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def eager_skipping(model, pattern, clip):
    """torch.optim.AdamW(fused=True) that leaves out the steps whose loss or gradient norm is not finite."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=HP.lr, betas=HP.betas, eps=HP.eps,
                                  weight_decay=HP.weight_decay, fused=True)
    losses, skipped = [], []
    for number, batch in enumerate(poisoned_batches(pattern), start=1):
        optimizer.zero_grad()
        loss = model(*batch)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip is not None else INF)
        losses.append(loss.item())
        if torch.isfinite(loss) and torch.isfinite(norm):
            optimizer.step()
        else:
            skipped.append(number)
    return losses, skipped


# 0: clean; 1: NaN gradients behind a finite loss; inf: a NaN loss. The first step, runs of them, the last.
PATTERNS = [(1, 0, 0, INF, 1, 0, 0, 1), (0, INF, INF, INF, 0, 1, 0, 0), (INF, 0, 1, 0, 0, 0, 0, 0)]


@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("gpu_mem", ["60KB", "1MB"], ids=["streamed", "partly-resident"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=["scattered", "a-run", "first"])
def test_non_finite_steps_update_nothing_and_the_rest_is_eagers(pattern, gpu_mem, clip):
    torch.manual_seed(0)
    model = PoisonedLM()
    reference = copy.deepcopy(model)
    batches = list(poisoned_batches(pattern))
    step = mtc.compile(model, gpu_mem=gpu_mem, example=batches[0], optimizer=HP, clip_grad_norm=clip,
                       device="cpu")
    resident = len(step.plan.schedule.resident)  # the device's updates and the host's both skip
    assert (resident == 0) if gpu_mem == "60KB" else (0 < resident < len(step.plan.schedule.stages)), resident
    losses = [float(step(*batch)) for batch in batches]
    step.synchronize()
    reference_losses, reference_skipped = eager_skipping(reference, pattern, clip)
    assert step.skipped_steps == reference_skipped == [i + 1 for i, v in enumerate(pattern) if v]
    assert losses == pytest.approx(reference_losses, rel=1e-5, nan_ok=True)
    mine = dict(step.named_parameters())
    for name, expected in reference.named_parameters():
        assert torch.allclose(mine[name], expected.detach(), rtol=1e-5, atol=1e-7), name
    counts = {float(group.step) for group in step._store.all_groups()}
    assert counts == {len(pattern) - len(reference_skipped)}  # a skipped step does not count for AdamW either


def test_without_the_check_a_nan_gradient_reaches_the_weights():
    batches = list(poisoned_batches((0, 1)))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batches[0], optimizer=HP, device="cpu",
                       skip_nonfinite=False)
    assert not step.plan.schedule.clip  # nothing to wait for: each update starts as its gradient lands
    for batch in batches:
        step(*batch)
    assert step.skipped_steps == []
    assert not all(torch.isfinite(p).all() for _, p in step.named_parameters())


def test_a_run_of_skipped_steps_stops_training_with_the_last_good_state():
    pattern = (0, 0, INF, 1, INF, 0)
    batches = list(poisoned_batches(pattern))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batches[0], optimizer=HP, device="cpu",
                       max_consecutive_skips=3)
    for batch in batches[:5]:
        step(*batch)
    good = {name: p.clone() for name, p in step.named_parameters()}
    with pytest.raises(mtc.NonFiniteError, match=r"the last 3 steps \(3, 4, 5\).*after step 2"):
        step(*batches[5])
    assert step.steps == 5  # the refused call issued nothing
    assert all(torch.equal(p, good[name]) for name, p in step.named_parameters())
    step(*batches[5])  # told once: a caller that has changed something may go on
    assert step.steps == 6 and step.skipped_steps == [3, 4, 5]


@pytest.mark.parametrize("failing_call", [1, 3])
def test_an_exception_in_the_optimizer_thread_reaches_the_caller_within_one_step(monkeypatch, failing_call):
    batch = next(poisoned_batches((0,)))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batch, device="cpu")
    real, calls = engine_module.adamw_step, []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == failing_call:
            raise FloatingPointError("injected")
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "adamw_step", failing)
    step(*batch)  # the first step's updates include the failing call
    with pytest.raises(RuntimeError, match="CPU optimizer failed") as error:
        step(*batch)
        step(*batch)  # a second step would already be too late
    cause = error.value.__cause__
    assert isinstance(cause, FloatingPointError)
    assert "failing" in {frame.name for frame in __import__("traceback").extract_tb(cause.__traceback__)}


def test_the_watchdog_reports_a_step_far_past_its_prediction_with_every_threads_stack(monkeypatch, capsys):
    import time

    batch = next(poisoned_batches((0,)))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batch, device="cpu", watchdog=2)
    step._engine.watchdog.limit = 0.3  # the floor is for real runs; this step's prediction is milliseconds
    real, stall = engine_module.adamw_step, []

    def stalled(*args, **kwargs):
        if stall:
            time.sleep(stall.pop())
        return real(*args, **kwargs)
    monkeypatch.setattr(engine_module, "adamw_step", stalled)
    step(*batch)  # the first step, which compiles kernels on a GPU, is not watched
    step.synchronize()
    stall.append(1.5)  # the second step's first update stalls
    step(*batch)
    step.synchronize()
    report = capsys.readouterr().err
    assert report.count("mtc watchdog:") == 1, report  # once, for the stalled step
    assert "mtc watchdog: step 2 of this plan has run" in report and "it has not finished" in report
    assert "--- thread mtc-optimizer" in report and "in stalled" in report  # where the optimizer thread waits
    step(*batch)  # on time again: nothing more to say
    step.synchronize()
    time.sleep(0.6)
    assert "mtc watchdog" not in capsys.readouterr().err


def test_a_budget_beyond_the_devices_free_memory_is_refused_with_what_fits(monkeypatch):
    from mtc.runtime import preflight

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 << 30, 80 << 30))
    preflight.check_gpu_memory(30 << 30, torch.device("cuda"))  # all that is free is fine
    with pytest.raises(ValueError, match=r"gpu_mem=74.51 GiB is more than cuda has free: 30.00 GiB of 80.00 GiB "
                                         r"\(50.00 GiB held by this or other processes\); pass gpu_mem='30720MiB'"):
        preflight.check_gpu_memory(mtc.parse_bytes("80GB"), torch.device("cuda"))


def _cgroup(tmp_path, limit, usage, inactive):
    """A cgroup v2 memory controller's files, as preflight reads them."""
    for name, text in (("memory.max", limit), ("memory.current", usage),
                       ("memory.stat", f"anon 1\ninactive_file {inactive}\n")):
        (tmp_path / name).write_text(f"{text}\n")
    return [(str(tmp_path / "memory.max"), str(tmp_path / "memory.current"), str(tmp_path / "memory.stat"),
             "inactive_file")]


def test_a_cgroup_limit_below_memavailable_is_what_the_store_may_take(monkeypatch, tmp_path):
    from mtc.runtime import preflight

    monkeypatch.setattr(preflight, "_CGROUP_FILES", _cgroup(tmp_path, "max", 5 << 30, 0))
    assert preflight.cgroup_memory() is None  # 'max': no limit
    monkeypatch.setattr(preflight, "_CGROUP_FILES", _cgroup(tmp_path, 300_000, 250_000, 10_000))
    assert preflight.cgroup_memory() == (300_000, 60_000)  # page cache it may reclaim counts as free
    assert preflight.available_host_bytes() == 60_000
    with pytest.raises(MemoryError, match=r"only 58.59 KiB is available \(MemAvailable [\d.]+ [GM]iB, a cgroup limit "
                                          r"of 292.97 KiB with 58.59 KiB left\)"):
        mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")


def test_a_locked_memory_limit_below_what_is_pinned_is_warned_about(monkeypatch):
    from mtc.runtime import preflight

    monkeypatch.setattr(preflight.resource, "getrlimit", lambda which: (8 << 20, 8 << 20))
    with pytest.warns(UserWarning, match=r"ulimit -l is 8.00 MiB but mtc will page-lock 1.00 GiB"):
        preflight.check_locked_memory(1 << 30)
    monkeypatch.setattr(preflight.resource, "getrlimit", lambda which: (preflight.resource.RLIM_INFINITY,) * 2)
    preflight.check_locked_memory(1 << 40)  # unlimited: nothing to say


def test_pinning_that_fails_leaves_the_memory_pageable_and_says_how_much_slower(monkeypatch):
    from mtc.runtime import preflight

    class RefusingDriver:
        @staticmethod
        def cudaHostRegister(pointer, size, flags):  # noqa: N802 - the CUDA runtime's name
            return 2  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: RefusingDriver)
    monkeypatch.setattr(preflight, "pageable_slowdown", lambda: "7.1 GB/s against 52.0 GB/s pinned (7.3x slower)")
    monkeypatch.setattr(preflight, "_unpinned", {"bytes": 0, "warned": False})
    buffer = torch.zeros(1000)
    with pytest.warns(UserWarning, match=r"could not page-lock 3.91 KiB .*error 2.*goes on with pageable memory, "
                                         r"whose copies to the GPU measured 7.1 GB/s against 52.0 GB/s pinned"):
        assert preflight.pin_in_place(buffer) is False
    assert preflight.pin_in_place(torch.zeros(10)) is False  # warned once; counted always
    assert preflight.unpinned_bytes() == 4040


def test_mtc_train_stops_a_run_that_only_overflows_and_saves_its_last_good_state(tmp_path, capsys):
    from safetensors.torch import load_file

    from mtc.cli import main

    # lr 1e12: the first update throws the weights so far that every later loss overflows
    code = main(["train", "--device", "cpu", "--batch", "2x32", "--steps", "40", "--lr", "1e12",
                 "--checkpoint", str(tmp_path / "run")])
    assert code == 2
    error = capsys.readouterr().err
    assert "the last 10 steps (2, 3, 4, 5, 6, 7, 8, 9, 10, 11) each had a non-finite loss" in error
    assert f"That state is saved in {tmp_path / 'run'}" in error
    state = load_file(tmp_path / "run" / "optimizer.safetensors")
    assert {float(v) for k, v in state.items() if k.startswith("step.")} == {1.0}  # one update, ten skipped
    weights = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_replan_turns_the_check_and_clipping_on_and_off_on_the_same_state():
    batches = list(poisoned_batches((0, 1, 0)))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batches[0], optimizer=HP, device="cpu",
                       skip_nonfinite=False)
    step(*batches[0])
    step = step.replan(skip_nonfinite=True)
    assert step.plan.schedule.clip and step._settings["clip_grad_norm"] is None
    step(*batches[1])
    step.synchronize()
    assert step.skipped_steps == [2]
    step = step.replan(clip_grad_norm=0.1)
    step(*batches[2])
    assert step._settings["clip_grad_norm"] == 0.1 and step.last_grad_norm > 0.1 and step.steps == 3
    with pytest.raises(ValueError, match=r"clip_grad_norm=-1 is not valid"):
        step.replan(clip_grad_norm=-1)


def test_a_checkpoint_keeps_whether_non_finite_steps_are_skipped(tmp_path):
    batches = list(poisoned_batches((0, 1)))
    step = mtc.compile(PoisonedLM(), gpu_mem="60KB", example=batches[0], optimizer=HP, device="cpu",
                       skip_nonfinite=False)
    step(*batches[0])
    mtc.save(step, tmp_path / "ckpt", progress=False)
    resumed = mtc.load(tmp_path / "ckpt", PoisonedLM(), "60KB", batches[0], device="cpu", progress=False)
    assert not resumed.plan.schedule.clip  # the saved run's choice: updates as gradients land
    resumed(*batches[1])
    assert resumed.skipped_steps == [] and not all(torch.isfinite(p).all() for _, p in resumed.named_parameters())
    again = mtc.load(tmp_path / "ckpt", PoisonedLM(), "60KB", batches[0], device="cpu", progress=False,
                     skip_nonfinite=True)
    again(*batches[1])
    again.synchronize()
    assert again.skipped_steps == [2]
