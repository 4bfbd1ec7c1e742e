"""passes/costs: bytes and FLOPs per stage, and their polynomials of batch and sequence length."""
import pytest
import torch

import mtc
from mtc.examples import models
from mtc.passes.costs import BATCH, SEQ, TILED
from models import gpt2, llama, tokens


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 8), (4, 16), (7, 3)])
def test_the_fitted_polynomials_equal_the_costs_pass_at_other_shapes(build, batch, seq):
    torch.manual_seed(0)
    planned = mtc.plan(build(), "1GB", tokens(batch=2, seq=4), device="cpu")
    symbolic = planned.symbolic_costs()
    # Token tiles step with the tokens: a stage with a tiled tail (the blocks) has its tiled fields evaluated
    # per shape; every other field is a polynomial.
    for stage, fields in zip(planned.costs.stages, symbolic.expressions):
        assert all((e is None) == (stage.tiles > 0 and name in TILED) for name, e in fields.items())
    assert [stage.tiles > 0 for stage in planned.costs.stages] == [False] + [True] * 8 + [False]
    assert symbolic.at(batch, seq).stages == planned.costs_at(batch, seq).stages


def test_a_decoder_layer_costs_what_its_shapes_say():
    """8B layer: 2 FLOPs per weight per token, causal attention half of 2*b*heads*s^2*(d + d)."""
    model = models.build("8b", device="meta")
    example = (torch.empty(1, 256, dtype=torch.long, device="meta"),) * 2
    symbolic = mtc.plan(model, "80GB", example, device="cuda").symbolic_costs()
    layer = symbolic.expressions[1]
    params = 4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336
    assert layer["forward_flops"] == 2 * params * BATCH * SEQ + 32 * 128 * 2 * BATCH * SEQ**2
    assert layer["saved_bytes"].coeff(BATCH * SEQ) == 4096 * 2  # the bf16 residual stream
    assert layer["activation_bytes"].as_poly(BATCH, SEQ).degree(SEQ) == 1  # fused attention: no s^2 held


def test_cli_solves_other_batch_shapes_from_the_polynomials(capsys):
    from mtc.cli import main

    assert main(["plan", "--preset", "125m", "--batch", "2x128", "--gpu-mem", "3GB",
                 "--batches", "2x128,4x256,64x4096"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[lines.index(next(l for l in lines if l.startswith("batch "))):]}
    own = float(next(l for l in lines if l.startswith("predicted step: ")).split()[2])
    assert float(rows["2x128"].split()[4]) == pytest.approx(own, rel=1e-3)  # the example's own shape
    direct = mtc.plan(models.build("125m", device="meta"), "3GB",
                      (torch.empty(4, 256, dtype=torch.long, device="meta"),) * 2, clip=True, device="cuda")
    assert float(rows["4x256"].split()[4]) == pytest.approx(direct.plan.predicted_step_seconds(), rel=1e-3)
    assert "does not fit" in rows["64x4096"]
