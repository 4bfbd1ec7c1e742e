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
