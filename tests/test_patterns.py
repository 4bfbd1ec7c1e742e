"""The kernel patterns: found in both tracers' spellings, nothing else touched, and training with them is
eager training."""
import os

import pytest
import torch

import mtc
from models import VOCAB, assert_same_training, llama, run_both, tokens

pytest.importorskip("triton")
transformers = pytest.importorskip("transformers")


def _hf_llama(**overrides):
    config = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**{**config, **overrides}))


def _kernels_line(planned) -> str | None:
    return next((line for line in planned.plan.summary().splitlines() if line.startswith("kernels: ")), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_both_spellings_are_found_in_every_block(dtype):
    planned = mtc.plan(llama(), "3.5MB", tokens(), device="cpu", compute_dtype=dtype, kernels="all")
    assert _kernels_line(planned) == ("kernels: LlamaBlock rmsnorm x2, swiglu x1, rope x2; "
                                      "epilogue rmsnorm x1, linear_cross_entropy x1")
    # Blocks with kernels still treat the batch's rows apart, so they can run in token chunks.
    assert [rows.why_not for rows in planned.costs.row_axes[1:-1]] == [None] * 8
    ids = torch.randint(0, 256, (2, 16))
    planned = mtc.plan(_hf_llama(), "2MB", {"input_ids": ids, "labels": ids}, device="cpu", compute_dtype=dtype,
                       kernels="all")
    assert planned.traced.tracer == "export"
    assert _kernels_line(planned) == ("kernels: LlamaDecoderLayer rmsnorm x2, swiglu x1, rope x2; "
                                      "epilogue rmsnorm x1, linear_cross_entropy x1")
    # The fused loss never makes the logits, which the model also returns: that output is gone (a step
    # returns only the loss).
    epilogue = planned.partition.stages[-1].template.graph
    assert [a is None for a in epilogue.output_node().args[0]] == [True, False]


def test_kernels_are_chosen_by_name_and_other_spellings_are_left_alone():
    planned = mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels=["swiglu"])
    assert _kernels_line(planned) == "kernels: LlamaBlock swiglu x1"
    # By default all of them where they run (a GPU), and none on the CPU; "-name" switches one off.
    everything = ("kernels: LlamaBlock rmsnorm x2, swiglu x1, rope x2; epilogue rmsnorm x1, linear_cross_entropy x1")
    assert _kernels_line(mtc.plan(llama(), "3.5MB", tokens(), device="cuda")) == everything
    assert _kernels_line(mtc.plan(llama(), "3.5MB", tokens(), device="cpu")) is None
    planned = mtc.plan(llama(), "3.5MB", tokens(), device="cuda", kernels="-rope,-linear_cross_entropy")
    assert _kernels_line(planned) == "kernels: LlamaBlock rmsnorm x2, swiglu x1; epilogue rmsnorm x1"
    assert _kernels_line(mtc.plan(llama(), "3.5MB", tokens(), device="cuda", kernels="none")) is None
    # Gemma's norm multiplies by (1 + weight) and its MLP gates with GELU: neither is a kernel's pattern (its
    # rotary embedding is Llama's).
    ids = torch.randint(0, 256, (2, 16))
    gemma = transformers.AutoModelForCausalLM.from_config(transformers.GemmaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, head_dim=16))
    planned = mtc.plan(gemma, "2MB", {"input_ids": ids, "labels": ids}, device="cpu", kernels="all")
    assert _kernels_line(planned) == "kernels: GemmaDecoderLayer rope x2; epilogue linear_cross_entropy x1"
    # Gemma 2 caps its logits (tanh) between the head and the loss: not the fused loss's pattern.
    gemma2 = transformers.AutoModelForCausalLM.from_config(transformers.Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, head_dim=16, final_logit_softcapping=30.0))
    planned = mtc.plan(gemma2, "2MB", {"input_ids": ids, "labels": ids}, device="cpu", kernels="linear_cross_entropy")
    assert _kernels_line(planned) is None
    with pytest.raises(ValueError, match=r"kernels=\['rope2'\] is not valid: \['rope2'\] unknown"):
        mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels=["rope2"])
    with pytest.raises(ValueError, match=r"kernels='-rope,swiglu' is not valid: names and -names mixed"):
        mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels="-rope,swiglu")
    with pytest.raises(TypeError, match=r"kernels=1 is not valid: expected a string or a list"):
        mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels=1)


def _rotate(x, cos, sin):
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def test_rope_rotates_in_place_only_a_projection_nothing_else_reads():
    from mtc.codegen import patterns

    def in_place_flags(fn):
        graph = torch.fx.symbolic_trace(fn).graph
        assert patterns.apply_kernels(graph, set(), ["rope"]) == {"rope": 1}
        return [n.args[3:] for n in graph.nodes if n.target is patterns.rope]

    def read_once(h, w, cos, sin):
        return _rotate(torch.nn.functional.linear(h, w).unflatten(-1, (2, 4)).transpose(1, 2), cos, sin)

    def read_twice(h, w, cos, sin):
        q = torch.nn.functional.linear(h, w).unflatten(-1, (2, 4)).transpose(1, 2)
        return _rotate(q, cos, sin), q

    def not_a_product(q, cos, sin):  # a stage input: kept for the backward, so never overwritten
        return _rotate(q, cos, sin)

    assert in_place_flags(read_once) == [(True,)]
    assert in_place_flags(read_twice) == [()] and in_place_flags(not_a_product) == [()]
    # Both tracers' Llama attention: queries and keys rotate in place.
    for planned in (mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels="rope"),
                    mtc.plan(_hf_llama(), "2MB", {"input_ids": tokens()[0], "labels": tokens()[0]}, device="cpu",
                             kernels="rope")):
        graph = planned.partition.stages[1].template.graph
        assert [n.args[3:] for n in graph.nodes if n.target is patterns.rope] == [(True,), (True,)]


def test_the_planner_counts_what_the_fused_loss_holds_and_allocates():
    # The fused loss keeps the gradients it made for the backward and allocates a chunk's logits while it
    # runs: neither is a node of the graph, so the call declares them and the costs add them.
    from mtc.codegen.kernels import linear_cross_entropy as kernel

    fused = mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels="linear_cross_entropy").costs.stages[-1]
    eager = mtc.plan(llama(), "3.5MB", tokens(), device="cpu").costs.stages[-1]
    hidden, weight = torch.empty(2 * 8, 128, device="meta"), torch.empty(VOCAB, 128, device="meta")
    held, transient = kernel.working_bytes(hidden, weight)
    assert transient == 16 * VOCAB * 4 + 16 * 4  # one chunk: its logits and the per-token losses
    assert fused.backward_bytes >= held + transient + fused.grad_bytes
    # Its FLOPs are counted as eager's forward (the logits), which the plan triples for forward and backward.
    assert fused.forward_flops == eager.forward_flops == 2 * 16 * 128 * VOCAB


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the kernels run on a GPU or in Triton's interpreter")
def test_training_with_kernels_is_eager_training():
    # The kernels sum in another order: gradients agree with eager's to about 2e-6 (measured), and AdamW
    # with a small eps turns such a difference in a near-zero gradient into an lr-sized step (1.5e-2 here
    # after 5 steps). With eps above the gradients' size the update is proportional to them, and training
    # with kernels stays within the spine's 1e-5 of eager.
    hp = mtc.AdamW(lr=1e-2, betas=(0.9, 0.95), eps=1e-2, weight_decay=0.1)
    torch.manual_seed(0)
    step, reference, losses, reference_losses = run_both(llama(), "3.5MB", clip=1.0, hp=hp, kernels="all")
    assert "rmsnorm x2, swiglu x1, rope x2" in _kernels_line(step._planned)
    assert_same_training(step, reference, losses, reference_losses)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="the kernels run on a GPU or in Triton's interpreter")
def test_a_hugging_face_model_trains_the_same_with_kernels():
    # torch.export's spelling, and rotary tables of (batch, 1, tokens, head_dim); the same AdamW as above.
    import copy

    hp = mtc.AdamW(lr=1e-2, betas=(0.9, 0.95), eps=1e-2, weight_decay=0.1)
    model = _hf_llama()
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16), generator=generator) for _ in range(3)]
    steps = [mtc.compile(copy.deepcopy(model), "2MB", {"input_ids": batches[0], "labels": batches[0]}, optimizer=hp,
                         clip_grad_norm=1.0, device="cpu", progress=False, kernels=kernels) for kernels in ((), "all")]
    assert "rope x2" in _kernels_line(steps[1]._planned)
    losses = [[step(input_ids=ids, labels=ids).item() for ids in batches] for step in steps]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    plain, fast = (dict(step.named_parameters()) for step in steps)
    for name, value in plain.items():
        assert float((fast[name] - value).abs().max() / value.abs().max()) <= 1e-5, name


def test_the_debug_directory_holds_the_kernels_the_blocks_call(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MTC_DEBUG", "1")
    monkeypatch.setenv("MTC_DEBUG_DIR", str(tmp_path / "on"))
    mtc.plan(llama(), "3.5MB", tokens(), device="cpu", kernels=["rmsnorm", "rope"])
    assert sorted(p.name for p in (tmp_path / "on" / "kernels").iterdir()) == ["rmsnorm.py", "rope.py"]
    assert "def _rmsnorm_fwd_kernel" in (tmp_path / "on" / "kernels" / "rmsnorm.py").read_text()
    blocks = (tmp_path / "on" / "blocks.txt").read_text()
    assert "mtc_codegen_patterns_rmsnorm(embedding, norm1_weight" in blocks and "swiglu" not in blocks
    monkeypatch.setenv("MTC_DEBUG_DIR", str(tmp_path / "off"))
    mtc.plan(llama(), "3.5MB", tokens(), device="cpu")
    assert (tmp_path / "off" / "schedule.txt").exists() and not (tmp_path / "off" / "kernels").exists()
