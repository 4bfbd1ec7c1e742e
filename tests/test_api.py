"""The public face: plans print, save and load; bad input gets a clear error; the CLI works."""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtc
from mtc.cli import main
from mtc.examples import models
from mtc.passes.trace import TraceError
from models import KwargsLM, llama, mlp_stack, tokens


def test_plan_round_trips_through_json_exactly(tmp_path):
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), clip_grad_norm=1.0, device="cpu")
    path = tmp_path / "plan.json"
    step.plan.save(path)
    loaded = mtc.Plan.load(path)
    assert loaded.to_json() == step.plan.to_json()
    assert str(loaded) == str(step.plan)
    assert json.loads(path.read_text())["format"] == "mtc-plan/4"


def test_printed_plan_has_one_line_per_instruction_with_stage_slot_and_bytes():
    plan = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu").plan
    text = str(plan)
    instructions = text.split("\n\n", 1)[1].splitlines()[1:]
    assert len(instructions) == len(plan.stream_plan.instrs)
    copy_in = next(line for line in instructions if " copy_in " in line and "layers.3" in line)
    assert "KiB" in copy_in and "prev.optimizer:layers.3" in copy_in
    assert "blocks: layers.* (LlamaBlock) x 8" in text
    assert plan.templates["LlamaBlock"] == [f"layers.{i}" for i in range(8)]


def test_gpu_mem_too_small_says_how_many_bytes_are_needed():
    with pytest.raises(ValueError) as error:
        mtc.compile(llama(), gpu_mem="1MB", example=tokens(), device="cpu")
    message = str(error.value)
    peak = error.value.schedule.peak_bytes
    assert "gpu_mem=" in message and f"needs {mtc.config.format_bytes(peak)} ({peak} bytes)" in message
    # The gpu_mem it names is enough for the smallest plan (one slot), and one byte less is not.
    needed = int(re.search(r"gpu_mem >= (\d+) bytes", message).group(1))
    smallest = mtc.plan(llama(), needed, tokens(), device="cpu").plan.schedule
    assert smallest.slots == 1 and smallest.peak_bytes == peak
    with pytest.raises(ValueError, match="too small"):
        mtc.plan(llama(), needed - 1, tokens(), device="cpu")
    roomy = mtc.plan(llama(), "1GB", tokens(), device="cpu").plan.schedule
    assert roomy.resident and roomy.peak_bytes > peak  # room to keep stages on the device, and it does


@pytest.mark.parametrize("gpu_mem", ["lots", 0, "-3GB"])
def test_unparseable_gpu_mem_is_rejected_before_any_work(gpu_mem):
    with pytest.raises(ValueError, match="gpu_mem="):
        mtc.compile(llama(), gpu_mem=gpu_mem, example=tokens(), device="cpu")


class ReturnsLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        return self.layer(x)


def test_a_model_that_returns_no_scalar_loss_is_rejected():
    with pytest.raises(TypeError, match="scalar"):
        mtc.compile(ReturnsLogits(), example=(torch.randn(2, 4),), device="cpu")


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # neither fx nor export can follow a branch on data
            return self.layer(x).sum()
        return self.layer(-x).sum()


def test_an_untraceable_model_names_the_module_and_the_line():
    with pytest.raises(TraceError) as error:
        mtc.compile(DataDependent(), example=(torch.randn(2, 4),), device="cpu")
    message = str(error.value)
    assert "DataDependent" in message and "test_api.py:" in message and "if x.sum() > 0" in message


def test_a_call_with_another_shape_or_dtype_is_an_error_not_a_recompile():
    ids, labels = tokens()
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=(ids, labels), device="cpu")
    expected = r"'input_ids' is tensor\(2, 9\) int64 but the plan was compiled for tensor\(2, 8\)"
    with pytest.raises(ValueError, match=expected):
        step(*tokens(seq=9))
    with pytest.raises(ValueError, match="int32"):
        step(ids.int(), labels)
    assert step.steps == 0


def test_keyword_examples_and_calls():
    ids, labels = tokens()
    step = mtc.compile(KwargsLM(), gpu_mem="1MB", example={"input_ids": ids, "labels": labels}, device="cpu")
    assert torch.isfinite(step(input_ids=ids, labels=labels))
    with pytest.raises(TypeError):
        step(input_ids=ids)


@pytest.mark.parametrize("kwargs, match", [
    ({"example": "ids"}, "example=str"),
    ({"example": tokens()[:1]}, r"example does not match MLPStack.forward\(input_ids.*missing a required argument: 'labels'"),
    ({"example": tokens(), "optimizer": torch.optim.SGD}, "optimizer="),
    ({"example": tokens(), "clip_grad_norm": -1.0}, "clip_grad_norm=-1.0"),
    ({"example": tokens(), "device": "tpu"}, "device="),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        mtc.compile(mlp_stack(), **kwargs)


def test_weights_are_streamed_not_resident():
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")
    engine = step._engine
    assert len(engine.slots) == step.plan.schedule.slots == 2
    assert sum(s.numel() * s.element_size() for s in engine.slots) < sum(
        p.numel() * 4 for _, p in step.named_parameters()) / 3
    copies = [i for i in step.plan.stream_plan.instrs if i.op == "copy_in"]
    assert len(copies) == 2 * len(step.plan.schedule.stages) - 1  # twice a step, the loss stage once


def test_cli_plans_an_8b_model_without_memory_or_gpu(capsys, tmp_path):
    path = tmp_path / "8b.json"
    assert main(["plan", "--preset", "8b", "--gpu-mem", "80GB", "--batch", "4x4096", "--save", str(path)]) == 0
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters in 34 stages" in out and "cuda bfloat16" in out
    assert main(["show", str(path)]) == 0
    assert "copy_in" in capsys.readouterr().out


def test_cli_plan_ends_with_the_prediction_and_writes_the_predicted_timeline(capsys, tmp_path):
    trace = tmp_path / "predicted.json"
    assert main(["plan", "--preset", "1b", "--batch", "1x2048", "--trace", str(trace)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    predicted, bound = float(lines[-2].split()[-2]), float(lines[-1].split()[-2])
    assert lines[-2].startswith("predicted step: ") and lines[-1].startswith("lower bound: ")
    assert predicted >= bound > 0
    assert any(line.split()[0] == "layers.0" and ("streamed/cpu" in line or "resident/gpu" in line)
               for line in lines if line.strip())
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    assert {e["tid"] for e in events} >= {1} and max(e["ts"] + e["dur"] for e in events) > 0


def test_cli_plan_that_does_not_fit_explains_where_the_bytes_go(capsys):
    # Eager cross-entropy holds the 128k-vocabulary logits of 16k tokens, in bf16 and fp32, and their gradient.
    assert main(["plan", "--preset", "8b", "--gpu-mem", "24GB", "--batch", "4x4096", "--kernels", "none"]) == 2
    err = capsys.readouterr().err
    assert "epilogue" in err and "is too small: this plan needs" in err
    # The fused loss (on by default on a GPU) never holds them: the same model and batch fit.
    assert main(["plan", "--preset", "8b", "--gpu-mem", "24GB", "--batch", "4x4096"]) == 0
    assert "linear_cross_entropy x1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [(["plan", "--batch", "4by4096"], "--batch='4by4096'"),
                                         (["plan", "--gpu-mem", "huge"], "--gpu-mem='huge'"),
                                         (["train", "--steps", "0"], "--steps=0")])
def test_cli_bad_input(argv, match, capsys):
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_cli_train_runs_the_default_job_and_the_loss_falls(capsys):
    assert main(["train", "--steps", "30", "--batch", "4x64"]) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.split("loss ")[-1].split(" in ")[0].split(" -> "))
    assert last < first - 0.5


class DictOutput(nn.Module):
    """Returns what Hugging Face models return with labels: the loss beside other outputs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
        self.head = nn.Linear(16, 128)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = torch.tanh(block(h))
        logits = self.head(h)
        return {"loss": F.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits, "cache": None}


def test_an_output_with_a_loss_entry_trains_on_that_loss():
    torch.manual_seed(0)
    model = DictOutput()
    ids, labels = tokens()
    expected = model(ids, labels)["loss"].item()
    step = mtc.compile(model, gpu_mem="1MB", example=(ids, labels), device="cpu")
    assert float(step(ids, labels)) == pytest.approx(expected, rel=1e-6)


def test_cli_finds_the_longest_sequence_that_fits(capsys):
    def longest(*options):
        assert main(["plan", "--preset", "125m", "--batch", "2x128", "--gpu-mem", "3GB", "--max-seq", "131072",
                     *options]) == 0
        line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("longest sequence that fits: "))
        return int(line.split()[4]), line

    seq, line = longest()
    assert 128 <= seq < 131072 and seq % 128 == 0
    # Without token tiles (one tile larger than any sequence) the MLP's working set stops it sooner.
    untiled, _ = longest("--tile-tokens", str(2**40))
    assert 128 <= untiled < seq
    model = models.build("125m", device="meta")

    def plan(tokens):
        return mtc.plan(model, "3GB", (torch.empty(2, tokens, dtype=torch.long, device="meta"),) * 2, clip=True,
                        device="cuda")
    plan(seq)  # fits
    with pytest.raises(ValueError, match="too small"):
        plan(seq + 128)
    assert f"at {seq + 128} tokens the GPU's working set stops it: gpu_mem=2.79 GiB" in line
    # With less host RAM the state moves to the GPU while it can; then host RAM is what stops the sequence.
    host_seq, line = longest("--host-mem", "7GB")
    assert 128 <= host_seq < seq and f"at {host_seq + 128} tokens host RAM stops it: host_mem=6.52 GiB" in line


@pytest.mark.parametrize("preset, layers, params", [("8b", 32, 8_030_261_248), ("8b:40", 40, 9_775_157_248),
                                                    ("3b:2", 2, 0)])
def test_a_preset_can_name_another_number_of_blocks(preset, layers, params):
    from mtc.examples import models

    model = models.build(preset, "meta")
    assert len(model.layers) == layers and models.preset_config(preset).hidden == models.PRESETS[preset.partition(":")[0]].hidden
    if params:
        assert models.parameter_count(model) == params


@pytest.mark.parametrize("preset", ["9b", "8b:", "8b:0", "8b:x", "8b:-3"])
def test_a_preset_that_names_no_shape_is_refused_by_name(preset, capsys):
    with pytest.raises(SystemExit) as exit:  # argparse's own refusal, status 2
        main(["plan", "--preset", preset])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert f"preset={preset!r} is not known" in error and "as 8b:40" in error


def test_a_process_that_exits_right_after_a_step_finishes_that_steps_updates():
    # The CPU thread updates streamed stages after step() returns; at exit it would be killed mid-update.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import mtc
        from mtc.runtime import engine
        from models import llama, tokens
        update = engine.adamw_step
        def slow_update(*args):
            time.sleep(0.2)
            update(*args)
            print("updated", flush=True)
        engine.adamw_step = slow_update
        step = mtc.compile(llama(), "5MB", tokens(), device="cpu", progress=False)
        print(len(list(step._store.all_groups())), flush=True)
        step(*tokens())
        print("returned", flush=True)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.split()
    groups, after_return = int(lines[0]), lines[lines.index("returned") + 1:]
    assert after_return and lines.count("updated") == groups
