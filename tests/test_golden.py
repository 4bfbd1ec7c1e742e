"""The plan of a fixed 4-block model at four budgets, pinned as text: a refactor that changes a schedule
shows up here as a diff. Regenerate on purpose with MTC_UPDATE_GOLDEN=1."""
import os
import pathlib

import pytest
import torch

import mtc
from mtc.examples import models

GOLDEN = pathlib.Path(__file__).parent / "golden"
# Streams every stage and offloads inputs to fit; streams every stage; keeps some resident; keeps all of
# them (simulated on the h100 profile).
BUDGETS = {"offloaded": "880KB", "streamed": "1MB", "partly_resident": "1.5MB", "resident": "6MB"}


def four_blocks():
    torch.manual_seed(0)
    return models.Llama(models.LlamaConfig(vocab_size=128, hidden=64, layers=4, heads=4, kv_heads=2,
                                           intermediate=128))


def plan_text(gpu_mem) -> str:
    example = (torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 16, dtype=torch.long))
    plan = mtc.plan(four_blocks(), gpu_mem, example, clip=True, device="cpu", profile="h100").plan
    lines = [line for line in str(plan).splitlines() if not line.startswith("passes: ")]  # timings vary
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_plan_matches_golden(name):
    text, path = plan_text(BUDGETS[name]), GOLDEN / f"plan_{name}.txt"
    if os.environ.get("MTC_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"the plan at gpu_mem={BUDGETS[name]} changed; diff it against {path}"


def test_the_budgets_give_their_policies():
    schedules = {name: mtc.plan(four_blocks(), gpu_mem, (torch.zeros(2, 16, dtype=torch.long),) * 2, clip=True,
                                device="cpu", profile="h100").plan.schedule for name, gpu_mem in BUDGETS.items()}
    assert schedules["offloaded"].resident == [] and schedules["offloaded"].offload
    assert schedules["streamed"].resident == [] and schedules["streamed"].offload == []
    assert 0 < len(schedules["partly_resident"].resident) < 6
    assert schedules["resident"].resident == list(range(6))
