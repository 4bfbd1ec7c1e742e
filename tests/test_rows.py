"""passes/rows: which stages keep the batch's rows apart (and may run in token chunks), and why not."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtc

from models import BlockLM as LM
from models import gpt2, llama, tokens


class Rowwise(nn.Module):
    """Rows merged with the sequence for a matmul and split again: each row stays a run of the merged axis."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        b, s, h = x.shape
        y = self.proj(x.reshape(b * s, h)).view(b, s, h)
        return x + torch.softmax(y, dim=-1) * y.mean(-1, keepdim=True)


class CentredOverBatch(Rowwise):
    def forward(self, x):
        return self.proj(x - x.mean(0))


class NormOverBatch(Rowwise):
    """torch.norm(x, p, dim): the dim comes third."""

    def forward(self, x):
        return self.proj(x / torch.norm(x, 2, 0, True))


class VarianceKeptOverSequence(Rowwise):
    """var(dim, unbiased, keepdim) positionally: the rows stay on axis 0 only because keepdim is read right."""

    def forward(self, x):
        seq_major = x.transpose(0, 1)  # the rows on axis 1, after the reduced axis
        return self.proj((seq_major / seq_major.var(0, False, True)).transpose(0, 1))


class SeqMajorFlatten(Rowwise):
    def forward(self, x):
        return self.proj(x.transpose(0, 1).flatten(0, 1)).view(x.shape[1], x.shape[0], -1).transpose(0, 1)


class RowIndex(Rowwise):
    def forward(self, x):
        return self.proj(x) + torch.arange(x.shape[0], dtype=x.dtype, device=x.device)[:, None, None]


class BatchWrittenIn(Rowwise):
    """As torch.export traces a reshape: the batch's size a number in the graph, which a chunk would not have."""

    def forward(self, x):
        return self.proj(x.reshape(-1, 16)).view(2, x.shape[1], 16)


class Noisy(Rowwise):
    def forward(self, x):
        return F.dropout(self.proj(x), p=0.1, training=True)


def row_axes(model, batch=2):
    planned = mtc.plan(model, "1GB", tokens(batch, 8), device="cpu")
    return {s.name: (s.rows, r) for s, r in zip(planned.costs.stages, planned.costs.row_axes)}


def test_llama_and_gpt2_blocks_keep_rows_apart_and_the_loss_does_not():
    for model in (llama(), gpt2()):
        axes = row_axes(model)
        *chunkable, loss = axes.values()
        assert all(rows == 2 and r.why_not is None for rows, r in chunkable)
        assert loss[0] == 0 and "cross_entropy" in loss[1].why_not
    blocks = row_axes(llama())["layers.0"][1]
    assert blocks.inputs == [0, None, None] and blocks.outputs == [0]  # hidden states; rotary tables


def test_a_batch_of_one_row_has_nothing_to_chunk():
    from mtc.passes.schedule import chunk_counts
    planned = mtc.plan(llama(), "1GB", tokens(1, 8), device="cpu")
    assert [s.rows for s in planned.costs.stages] == [1] * 9 + [0]
    assert chunk_counts(planned.costs) == [1]


def test_reductions_read_their_dim_and_keepdim_where_each_op_puts_them():
    rows, axes = row_axes(LM(VarianceKeptOverSequence))["blocks.1"]
    assert rows == 2 and axes.why_not is None and axes.outputs == [0]


def test_rows_merged_with_the_sequence_stay_apart():
    rows, axes = row_axes(LM(Rowwise))["blocks.1"]
    assert rows == 2 and axes.why_not is None and axes.inputs == [0] and axes.outputs == [0]


@pytest.mark.parametrize("block, why", [
    (CentredOverBatch, "(mean) works along the row axis"),
    (NormOverBatch, "(norm) works along the row axis"),
    (SeqMajorFlatten, "(flatten) flattens the row axis into an axis outside it"),
    (RowIndex, "(arange) makes a tensor sized by the batch"),
    (Noisy, "(dropout) draws random numbers"),
    (BatchWrittenIn, "(view) sizes the row axis by a number written into the graph"),
])
def test_blocks_that_mix_rows_or_draw_random_numbers_are_named(block, why):
    axes = row_axes(LM(block))
    rows, first = axes["blocks.0"]
    assert rows == 0 and why in first.why_not
    if block is Noisy:  # rows still apart: later stages know where they lie
        assert axes["blocks.1"][1].inputs == [0]
    else:  # rows mixed: nothing after knows where they are
        assert axes["blocks.1"][1].why_not == "no input holds the batch's rows"


def test_chunked_plans_refuse_no_more_than_needed():
    """The smallest plan of a 4-row batch of 64 tokens runs its blocks one row a chunk, and needs less than
    unchunked; with 8 tokens a row the chunks' whole outputs and gradients outweigh their savings."""
    from mtc.passes.schedule import chunk_counts, fixed_plan, smallest_plan
    costs = mtc.plan(llama(), "1GB", tokens(4, 64), device="cpu").costs
    assert chunk_counts(costs) == [1, 2, 4]
    smallest = smallest_plan(costs, 10**9, False)
    whole = fixed_plan(costs, 10**9, False, 1, [], [], smallest.offload)
    assert smallest.chunks == 4 and smallest.peak_bytes < whole.peak_bytes
    assert smallest_plan(mtc.plan(llama(), "1GB", tokens(4, 8), device="cpu").costs, 10**9, False).chunks == 1
