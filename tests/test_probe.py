"""mtc/probe: shipped profiles by device name, a measured profile saved and used by plans."""
import pytest
import torch

import mtc
from mtc import probe
from mtc.cli import main
from mtc.examples import models

from models import llama, tokens


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H100 PCIe", "h100"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "rtx4090"), ("cpu", "cpu"),
    ("Some Future GPU", "h100"),
])
def test_the_shipped_profile_follows_the_device_name(name, expected):
    assert probe.shipped_profile(name).name == expected


def test_a_probed_profile_is_saved_and_used_by_the_next_plan(tmp_path, monkeypatch, capsys):
    path = tmp_path / "profile.json"
    monkeypatch.setenv("MTC_PROFILE", str(path))
    assert main(["probe", "--quick", "--device", "cpu"]) == 0
    assert f"saved {path}" in capsys.readouterr().out
    measured = probe.load(str(path))
    assert measured.name == "probed cpu" and "mtc probe --quick on cpu" in measured.source
    for rate in (measured.h2d_bytes_per_s, measured.flops_per_s, measured.optimizer_params_per_s, measured.host_bytes):
        assert rate > 0
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")
    assert step.plan.profile == measured
    assert "profile 'probed cpu'" in step.plan.summary()


def test_a_profile_can_be_named_and_travels_with_the_plan(tmp_path):
    planned = mtc.plan(models.build("8b", "meta"), "80GB", (torch.empty(1, 4096, dtype=torch.long, device="meta"),) * 2,
                       device="cuda", profile="h200")
    assert planned.plan.profile.name == "h200"
    path = tmp_path / "plan.json"
    planned.plan.save(path)
    assert mtc.Plan.load(path).profile == planned.plan.profile


@pytest.mark.parametrize("value", ["h900", 3])
def test_an_unknown_profile_is_refused_by_name(value):
    with pytest.raises(ValueError, match=r"profile=.* is not valid; expected a HardwareProfile, one of \['a100'"):
        mtc.plan(llama(), "3.5MB", tokens(), device="cpu", profile=value)


def test_a_broken_profile_file_says_so(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{\"name\": 1}")
    with pytest.raises(ValueError, match="is not a hardware profile"):
        mtc.plan(llama(), "3.5MB", tokens(), device="cpu", profile=str(path))


@pytest.mark.parametrize("preset", ["qwen2.5-14b", "qwen2.5-32b", "qwen2.5-72b"])
def test_the_megatrain_setups_plan_on_paper_with_their_host_memory(preset, capsys):
    assert main(["plan", "--preset", preset, "--batch", "1x4096", "--gpu-mem", "141GB", "--profile", "h200",
                 "--host-mem", "1.5TB"]) == 0
    lines = capsys.readouterr().out.splitlines()
    host = next(line for line in lines if line.startswith("host: "))
    needed = float(host.split()[1]) * {"GiB": 2**30, "TiB": 2**40}[host.split()[2]]
    params = models.parameter_count(models.build(preset, "meta"))
    assert 0 < needed <= 14 * params  # 14 B per streamed parameter, nothing for resident ones
    assert "of 1396.98 GiB host RAM" in host
    assert float(next(line for line in lines if line.startswith("predicted TFLOP/s: ")).split()[2]) > 0


def test_a_state_larger_than_host_memory_is_refused_before_anything_is_built(capsys):
    # 118.7B parameters at 14 B each do not fit 1.5 TB with fp32 master weights and moments.
    assert main(["plan", "--preset", "120b", "--batch", "1x4096", "--gpu-mem", "141GB", "--profile", "h200",
                 "--host-mem", "1.5TB"]) == 2
    error = capsys.readouterr().err
    assert "host_mem=1396.98 GiB is too small: the training state needs" in error and "use a host with" in error


def test_calibration_scales_each_lane_to_what_the_step_measured():
    """With the calibrated rates, the plan predicts each lane's busy time as the traced step measured it."""
    from mtc.codegen.stream_plan import STREAMS, duration

    torch.manual_seed(0)
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu", profile="cpu", schedule="spine")
    calibrated, report = probe.calibrate(step, [tokens(seed=1), tokens(seed=2)])
    plan = step.plan.stream_plan
    for lane, field in (("compute", "flops_per_s"), ("cpu", "optimizer_params_per_s"), ("h2d", "h2d_bytes_per_s")):
        again = sum(duration(plan, i, calibrated) for i in plan.on(lane))
        assert again == pytest.approx(report["measured_busy_s"][lane], rel=1e-9)
        assert getattr(calibrated, field) != getattr(step.plan.profile, field)
    assert set(report["measured_busy_s"]) == set(STREAMS) and "calibrated in-step" in calibrated.name


def test_lane_seconds_are_the_median_of_the_traced_steps_after_the_first():
    """A slow step (or a slow first one) does not set the rates: the median of the steps after the first."""
    from types import SimpleNamespace

    cpu, compute = SimpleNamespace(stream="cpu"), SimpleNamespace(stream="compute")
    seconds = {7: 9.0, 8: 2.0, 9: 5.0, 10: 1.0}  # step -> host update seconds; step 7 is the first traced

    class Engine:
        def start_trace(self):
            self.steps = []

        def stop_trace(self):
            return [row for s in self.steps for row in ((s, cpu, 0.0, seconds[s] / 2), (s, cpu, 1.0, 1.0 + seconds[s] / 2),
                                                        (s, compute, 0.0, 0.25))]

    engine = Engine()
    step = type("Step", (), {"_engine": engine, "__call__": lambda self, *a: engine.steps.append(7 + len(engine.steps))})()
    busy = probe.lane_seconds(step, [()], steps=3)
    assert busy["cpu"] == 2.0 and busy["compute"] == 0.25 and busy["h2d"] == 0.0
    assert len(engine.steps) == 4


@pytest.mark.parametrize("argv, message", [
    (["--calibrate", "nope"], "--calibrate='nope' is not a preset"),
    (["--calibrate", "tiny"], "--calibrate times a step on the GPU"),
])
def test_calibration_is_refused_by_name(argv, message, capsys):
    assert main(["probe", "--quick", "--device", "cpu"] + argv) == 2
    assert message in capsys.readouterr().err


def test_the_solver_keeps_to_host_memory_by_offloading_less():
    # 8B at 128k tokens on 80GB: the fastest plan streams every block and offloads their inputs, 17.5 GiB more
    # than the 126 GiB host holds beside the state. The solver now recomputes them instead (it used to pick the
    # fastest plan, then refuse it). Below what any plan needs, the refusal names the least one needs.
    from mtc.train import TrainedModel
    from mtc.runtime.store import FIXED_HOST_BYTES, HostMemoryError

    ids = torch.empty(1, 131072, dtype=torch.long, device="meta")
    planned = mtc.plan(TrainedModel("8b").meta_model(), "80GB", {"input_ids": ids, "labels": ids}, clip=True,
                       device="cuda", profile="h100")
    assert planned.plan.header["host_bytes"] + FIXED_HOST_BYTES <= 126 << 30
    assert planned.plan.schedule.offload == []
    with pytest.raises(HostMemoryError, match=r"host_mem=90.00 GiB is too small: the training state needs 86.48 GiB"):
        mtc.plan(TrainedModel("8b").meta_model(), "80GB", {"input_ids": ids, "labels": ids}, clip=True,
                 device="cuda", profile="h100", host_mem="90GiB")
    # Past 215,552 tokens every plan that fits the GPU offloads block inputs, and the refusal counts them.
    ids = torch.empty(1, 215680, dtype=torch.long, device="meta")
    with pytest.raises(HostMemoryError, match=r"for every streamed parameter; \d+\.\d\d GiB of it the offloaded "
                                              r"block inputs\)"):
        mtc.plan(TrainedModel("8b").meta_model(), "80GB", {"input_ids": ids, "labels": ids}, clip=True,
                 device="cuda", profile="h100")
