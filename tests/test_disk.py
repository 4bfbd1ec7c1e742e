"""The NVMe tier (runtime/disk): stages whose optimizer state is kept in files train exactly as in RAM, their state
moves through checkpoints and replans, the plan counts the disk, and a directory without room is refused."""
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import mtc
from mtc.codegen.stream_plan import busy_seconds, disk_bytes_per_param
from mtc.runtime import disk as disk_module
from mtc.runtime.store import DISK, FIXED_HOST_BYTES

from models import llama, run_both, tokens

compile_module = importlib.import_module("mtc.compile")  # the module, which mtc.compile (the function) hides
BUDGET = "5MB"
HOST = FIXED_HOST_BYTES + (16 << 20)
"""A host that holds the process and 16 MiB of training state: 6 of the tiny llama's 10 stages must go to disk."""


def _disk_stages(step) -> list[int]:
    return step.plan.schedule.disk


def test_state_on_disk_trains_as_eager(tmp_path):
    torch.manual_seed(0)
    step, reference, losses, reference_losses = run_both(llama(), BUDGET, clip=1.0, nvme=str(tmp_path), host_mem=HOST,
                                                            progress=False)
    disk = _disk_stages(step)
    assert disk and len(disk) < len(step.plan.schedule.stages), "some stages on disk, not all"
    assert all(step._store.groups[i].kind == DISK and step._store.groups[i].exp_avg is None for i in disk)
    files = os.listdir(tmp_path / f".mtc-state-{os.getpid()}")
    assert sorted(files) == sorted(f"stage{i}.bin" for i in disk)
    tier = step._store.disk
    mine = dict(step.named_parameters())  # after the optimizer: the sixth step's first read ahead has landed
    # Each step reads and writes every disk stage's state once, and the tier's own reads are the only ones counted.
    assert tier.bytes_written == 5 * tier.nbytes
    assert tier.bytes_read == 5 * tier.nbytes + tier.files[tier.order[0]].nbytes
    assert "disk: " in step.plan.summary()
    assert losses == reference_losses  # the same arithmetic, in another place: bitwise
    for name, expected in reference.named_parameters():
        assert torch.equal(mine[name], expected.detach()), name


def test_bf16_state_with_its_master_on_disk_is_bitwise_the_ram_run(tmp_path):
    """bf16 compute: the master weights go to disk too (the stream copy stays in RAM); the run equals the one whose
    state is all in RAM, bit for bit."""
    batches = [tokens(seed=i) for i in range(4)]

    def run(**options):
        torch.manual_seed(0)
        step = mtc.compile(llama(), BUDGET, batches[0], clip_grad_norm=1.0, device="cpu", progress=False,
                           compute_dtype=torch.bfloat16, **options)
        return step, [step(*b).item() for b in batches], dict(step.named_parameters())

    on_disk, losses, weights = run(nvme=str(tmp_path), host_mem=HOST)
    assert _disk_stages(on_disk)
    assert on_disk._store.groups[_disk_stages(on_disk)[0]].disk_names == ("master", "exp_avg", "exp_avg_sq")
    in_ram, expected_losses, expected = run()
    assert not _disk_stages(in_ram)
    assert losses == expected_losses
    assert all(torch.equal(weights[n], w) for n, w in expected.items())


def test_a_checkpoint_of_disk_state_resumes_and_replans(tmp_path):
    batches = [tokens(seed=i) for i in range(6)]
    torch.manual_seed(0)
    whole = mtc.compile(llama(), BUDGET, batches[0], clip_grad_norm=1.0, device="cpu", progress=False)
    expected = [whole(*b).item() for b in batches]
    torch.manual_seed(0)
    first = mtc.compile(llama(), BUDGET, batches[0], clip_grad_norm=1.0, device="cpu", progress=False,
                        nvme=str(tmp_path / "state"), host_mem=HOST)
    losses = [first(*b).item() for b in batches[:3]]
    mtc.save(first, tmp_path / "ckpt", progress=False)
    with torch.device("meta"):
        model = llama()
    resumed = mtc.load(tmp_path / "ckpt", model, BUDGET, batches[0], device="cpu", progress=False,
                       nvme=str(tmp_path / "again"), host_mem=HOST)
    assert _disk_stages(resumed)
    losses += [resumed(*b).item() for b in batches[3:5]]
    moved = resumed.replan(gpu_mem="50MB")  # more on the device: stages leave the disk
    assert _disk_stages(moved) != _disk_stages(resumed)
    losses.append(moved(*batches[5]).item())
    assert losses == expected
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(moved.named_parameters(), whole.named_parameters()))


def test_a_directory_without_room_or_not_a_directory_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    free = type("Usage", (), {"free": 1000})()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)
    with pytest.raises(OSError, match=r"nvme=.* has 1000 B free but the plan keeps .* of optimizer state there"):
        mtc.compile(llama(), BUDGET, tokens(), device="cpu", progress=False, nvme=str(tmp_path), host_mem=HOST)
    assert os.listdir(tmp_path) == []
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=r"nvme=.*a-file' is not valid: it is a file; expected a directory"):
        mtc.compile(llama(), BUDGET, tokens(), device="cpu", progress=False, nvme=tmp_path / "a-file", host_mem=HOST)
    with pytest.raises(TypeError, match=r"nvme=3 is not valid; expected None or a directory's path"):
        mtc.compile(llama(), BUDGET, tokens(), device="cpu", progress=False, nvme=3)


def test_the_plan_times_disk_updates_by_the_disk_and_reports_its_wear():
    with torch.device("meta"):
        model = llama()
    host = HOST
    planned = mtc.plan(model, BUDGET, tokens(), device="cpu", host_mem=host, nvme=True, profile="h100")
    schedule, profile = planned.plan.schedule, planned.plan.profile
    assert schedule.disk
    stage = schedule.stages[schedule.disk[-1]]
    moved = disk_bytes_per_param(stage) * stage.params
    update = next(i for i in planned.plan.stream_plan.instrs if i.op == "optimizer" and i.stage == schedule.disk[-1])
    from mtc.codegen.stream_plan import duration
    assert duration(planned.plan.stream_plan, update, profile) == pytest.approx(
        max(stage.params / profile.optimizer_params_per_s,
            moved / profile.disk_read_bytes_per_s + moved / profile.disk_write_bytes_per_s))
    assert "TB written a day" in planned.plan.summary()
    without = mtc.plan(model, BUDGET, tokens(), device="cpu", host_mem=host * 100, nvme=True, profile="h100")
    assert not without.plan.schedule.disk  # RAM enough: nothing goes to disk
    cpu = [busy_seconds(p.plan.stream_plan, profile)["cpu"] for p in (without, planned)]
    assert cpu[0] < cpu[1]
    with pytest.raises(MemoryError, match=r"needs .* even with the optimizer state of all \d+ streamed stages on disk"):
        mtc.plan(model, BUDGET, tokens(), device="cpu", host_mem=FIXED_HOST_BYTES + (1 << 20), nvme=True,
                 profile="h100")


def test_the_tier_holds_no_more_than_its_slabs_and_a_failed_update_loses_nothing(tmp_path):
    step = mtc.compile(llama(), BUDGET, tokens(), device="cpu", progress=False, nvme=str(tmp_path), host_mem=HOST)
    step(*tokens())
    step.synchronize()
    store, tier = step._store, step._store.disk
    group = store.groups[_disk_stages(step)[0]]
    assert len(tier.free) == disk_module.SLABS - 1  # the next step's first disk stage is read ahead
    with store.state_of(group):  # the checkpoints' and named_parameters' way in: drops that, takes an idle slab
        assert len(tier.free) == disk_module.SLABS - 1
        before = {name: getattr(group, name).clone() for name in group.disk_names}

    def failing():
        group.exp_avg.add_(1.0)  # half done
        raise RuntimeError("the update failed")

    with pytest.raises(RuntimeError, match="the update failed"):
        tier.update(group, failing)
    assert len(tier.free) == disk_module.SLABS and group.exp_avg is None
    with store.state_of(group):  # the file holds the state from before the update
        assert all(torch.equal(getattr(group, name), value) for name, value in before.items())


def test_a_killed_run_leaves_its_checkpoint_whole_and_its_state_is_cleared(tmp_path):
    """SIGKILL while the optimizer state is being written to disk: the last checkpoint loads, and the next run
    clears the killed one's state directory."""
    state = tmp_path / "state"
    command = [sys.executable, "-m", "mtc", "train", "--preset", "tiny", "--batch", "2x32", "--device", "cpu",
               "--steps", "1000", "--save-every", "2", "--host-mem", str(FIXED_HOST_BYTES + (12 << 20)),
               "--nvme", str(state), "--checkpoint", str(tmp_path / "run")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (tmp_path / "run" / "mtc.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert (state / f".mtc-state-{run.pid}").is_dir(), "the killed run had state on disk"
    steps = command.index("--steps")
    command[steps + 1] = "1"  # what the checkpoint holds is more: the resumed run only loads and checks
    done = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (state / f".mtc-state-{run.pid}").exists()


def test_aligned_slabs_and_a_filesystem_without_o_direct(tmp_path, monkeypatch):
    slab = disk_module.aligned_empty(5000)
    assert slab.data_ptr() % disk_module.BLOCK == 0 and slab.numel() == 8192
    file = disk_module.DiskFile(str(tmp_path / "f.bin"), ("exp_avg",), 1000)
    data = disk_module.aligned_empty(file.nbytes)
    file.views(data)["exp_avg"].copy_(torch.arange(1000.0))
    file.write(data)
    back = disk_module.aligned_empty(file.nbytes)
    file.read(back)
    assert torch.equal(file.views(back)["exp_avg"], torch.arange(1000.0))
    if not hasattr(os, "O_DIRECT"):
        return
    # A filesystem that refuses O_DIRECT when the file is opened (tmpfs), or only at the first read or write.
    real_open, real_pwritev = os.open, os.pwritev

    def open_refusing_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", open_refusing_direct)
    buffered = disk_module.DiskFile(str(tmp_path / "buffered.bin"), ("exp_avg",), 1000)
    assert not buffered.direct
    monkeypatch.setattr(os, "open", real_open)
    later = disk_module.DiskFile(str(tmp_path / "later.bin"), ("exp_avg",), 1000)
    later.direct = True  # as if this filesystem took O_DIRECT at open (tmp_path's may not)
    refusals = []

    def pwritev_refusing_direct(fd, buffers, offset):
        if fd == later.fd and later.direct:
            refusals.append(fd)
            raise OSError(22, "Invalid argument")
        return real_pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", pwritev_refusing_direct)
    for file in (buffered, later):
        file.write(data)
        back.zero_()
        file.read(back)
        assert torch.equal(file.views(back)["exp_avg"], torch.arange(1000.0)), file.path
    assert refusals and not later.direct  # reopened without O_DIRECT, the write done again


def test_the_command_line_measures_the_disk_then_trains_and_resumes_with_state_on_it(tmp_path, monkeypatch, capsys):
    from mtc import probe
    from mtc.cli import main

    profile, nvme, checkpoint = tmp_path / "profile.json", str(tmp_path / "nvme"), str(tmp_path / "run")
    monkeypatch.setenv("MTC_PROFILE", str(profile))
    assert main(["probe", "--quick", "--device", "cpu", "--nvme", nvme]) == 0
    measured = probe.load(str(profile))
    assert measured.disk_read_bytes_per_s > 0 and measured.disk_write_bytes_per_s > 0
    assert f"disk {nvme}: read" in measured.source
    assert os.listdir(nvme) == []  # the measurement's file is gone
    capsys.readouterr()
    # 12 MiB of host RAM for the training state: the tiny preset's 13 MiB must spill some stages to disk.
    train = ["train", "--preset", "tiny", "--device", "cpu", "--batch", "2x64", "--gpu-mem", "6MB", "--nvme", nvme,
             "--host-mem", f"{(FIXED_HOST_BYTES >> 20) + 12}MiB", "--checkpoint", checkpoint, "--save-every", "2"]
    assert main(train + ["--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "stages (stages" in out and f"disk at {measured.disk_read_bytes_per_s / 1e9:g} GB/s read" in out
    assert main(train + ["--steps", "4", "--resume"]) == 0
    assert "in steps 3-4" in capsys.readouterr().out
