"""passes/tiles and codegen/tiles: which part of a stage runs in token tiles, and what that saves."""
import operator

import pytest
import torch

import mtc
from mtc.examples import models
from models import gpt2, llama, tokens


def _tail_nodes(planned, template_index=1):
    template = planned.partition.stages[template_index].template
    by_name = {n.name: n for n in template.graph.nodes}
    return template.tail, [by_name[name] for name in template.tail.nodes]


@pytest.mark.parametrize("kernels", ["none", "all"])
def test_a_llama_blocks_tail_is_everything_after_its_attention(kernels):
    planned = mtc.plan(llama(), "1GB", tokens(2, 16), device="cpu", kernels=kernels)
    tail, nodes = _tail_nodes(planned)
    # It starts from the attention's output (along its queries, axis 2) and the block's input (axis 1); the
    # other inputs are the weights of the output projection, the second norm and the MLP.
    starts = {name: axis for name, axis in zip(tail.inputs, tail.input_axes) if axis is not None}
    assert starts == {"embedding": 1, "scaled_dot_product_attention": 2}
    assert sorted(n for n, axis in zip(tail.inputs, tail.input_axes) if axis is None) == sorted(
        ["attn_o_weight", "norm2_weight", "mlp_gate_weight", "mlp_up_weight", "mlp_down_weight"])
    targets = [n.target for n in nodes]
    assert sum(t is torch._C._nn.linear or getattr(t, "__name__", "") == "linear" for t in targets) == 4
    if kernels == "all":
        from mtc.codegen import patterns
        assert patterns.rmsnorm in targets and patterns.swiglu in targets and patterns.rope not in targets
    assert tail.outputs == [nodes[-1].name] and tail.output_axes == [1]


def test_the_tiled_graph_calls_the_tail_once_and_returns_what_it_returned():
    planned = mtc.plan(llama(), "1GB", tokens(2, 16), device="cpu")
    template = planned.partition.stages[1].template
    plain, tiled = template.function("cpu"), template.function("cpu", 4)
    assert [n.op for n in tiled.graph.nodes].count("call_module") == 1
    assert len(list(tiled.graph.nodes)) == len(list(plain.graph.nodes)) - len(template.tail.nodes) + 2
    assert any(n.target is operator.getitem for n in tiled.graph.nodes)


@pytest.mark.parametrize("build, reason", [
    (lambda: gpt2(dropout=0.1), "`dropout_2` (dropout) draws random numbers"),
    (llama, None),
    (gpt2, None),
])
def test_random_numbers_keep_the_tail_out(build, reason):
    tail = mtc.plan(build(), "1GB", tokens(2, 8), device="cpu").partition.stages[1].template.tail
    if reason is None:
        assert not isinstance(tail, str)
    else:
        assert isinstance(tail, str) and reason in tail


def test_a_hugging_face_block_says_why_it_has_no_tail():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 128, (1, 16))
    planned = mtc.plan(model, "1GB", {"input_ids": ids, "labels": ids}, device="cpu")
    tail = planned.plan.header["no_tail"]["LlamaDecoderLayer"]
    assert "sizes the row axis by a number written into the graph" in tail


def test_an_8b_block_at_128k_tokens_needs_less_than_half_the_memory_in_tiles():
    """8B, one sequence of 131072 tokens: 8 tiles of 16384. The untiled backward holds the MLP's three
    (131072, 14336) bf16 intermediates (3.5 GiB each) and their gradients; a tile holds one eighth."""
    model = models.build("8b", device="meta")
    ids = torch.empty(1, 131072, dtype=torch.long, device="meta")
    planned = mtc.plan(model, "80GB", (ids, ids), device="cuda", profile="h100", clip=True)
    block = planned.costs.stages[1]
    assert block.tiles == 8
    assert block.tiled_backward_bytes < 0.5 * block.backward_bytes
    assert block.tiled_forward_bytes < 0.7 * block.forward_bytes
    schedule = planned.plan.schedule
    assert [i for i in range(len(schedule.stages)) if schedule.tiled(i)] == [
        i for i in range(1, 33) if schedule.policy(i) != "keep"]
    tiled = sum(schedule.tiled(i) for i in range(len(schedule.stages)))
    assert (f"token tiles: {tiled} stages run the part after their attention in 8 tiles of at most 16384 tokens"
            in planned.plan.summary())
    # One tile per sequence does nothing: at 4x4096 nothing is tiled.
    short = torch.empty(4, 4096, dtype=torch.long, device="meta")
    planned = mtc.plan(model, "80GB", (short, short), device="cuda", profile="h100", clip=True)
    assert planned.costs.stages[1].tiles == 1
    assert not any(planned.plan.schedule.tiled(i) for i in range(len(planned.plan.schedule.stages)))
    assert "token tiles: none at this shape" in planned.plan.summary()


def test_tile_tokens_is_refused_by_name():
    with pytest.raises(ValueError, match=r"tile_tokens=0 is not valid; expected a number of tokens >= 1"):
        mtc.plan(llama(), "1GB", tokens(2, 8), device="cpu", tile_tokens=0)
