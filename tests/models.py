"""Small models and an eager reference loop shared by the tests."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtc
from mtc.examples import models

VOCAB = 128


def tokens(batch=2, seq=8, seed=None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return (torch.randint(0, VOCAB, (batch, seq), generator=generator),
            torch.randint(0, VOCAB, (batch, seq), generator=generator))


def llama():
    return models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden=128, layers=8, heads=4, kv_heads=2,
                                           intermediate=256))


def gpt2(dropout=0.0):
    # No key bias: its gradient is zero in exact arithmetic, see GPT2Config.qkv_bias.
    return models.GPT2(models.GPT2Config(vocab_size=VOCAB, hidden=128, layers=8, heads=4, max_seq=16,
                                         dropout=dropout, qkv_bias=False))


def mlp_stack():
    return models.MLPStack(VOCAB)


class KwargsLM(nn.Module):
    """fx cannot trace a `**kwargs` forward; torch.export can."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 32), nn.GELU()) for _ in range(3))
        self.head = nn.Linear(32, VOCAB)

    def forward(self, input_ids, **kwargs):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), kwargs["labels"].flatten())


class BlockLM(nn.Module):
    """An embedding of width 16, three blocks made by `block()`, a head with a mean cross-entropy."""

    def __init__(self, block):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(block() for _ in range(3))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = block(h)
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


class PoisonedLM(nn.Module):
    """BlockLM's shape, called with (input_ids, labels, poison): poison (batch, seq) is 0 for a clean step;
    1 somewhere keeps the loss finite but makes every gradient NaN (a masked sqrt of a negative number:
    torch.where's backward multiplies its NaN derivative by 0); inf somewhere makes the loss NaN."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids, labels, poison):
        h = self.embed(input_ids)
        poison = poison[..., None].type_as(h)  # bf16 compute on a GPU
        h = h * (1 + 0 * poison)
        for block in self.blocks:
            h = block(h)
        z = (1 - 2 * poison) * (h * h + 1)
        h = h + 0.1 * torch.where(z > 0, torch.sqrt(z), torch.zeros_like(z))
        return F.cross_entropy(self.head(h).flatten(0, 1), labels.flatten())


def poisoned_batches(pattern):
    """One batch per step; pattern[i] is what step i + 1's poison holds at one place (0: nothing)."""
    for index, value in enumerate(pattern):
        ids, labels = tokens(seed=index)
        poison = torch.zeros(ids.shape)
        poison[index % 2, index % 8] = value
        yield ids, labels, poison


def BatchNormLM():  # noqa: N802 - a model, as the other builders here
    """Blocks whose forward updates running statistics: a replay must not update them again."""
    return BlockLM(lambda: nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(8), nn.Tanh()))


def run_both(model, gpu_mem, clip=None, steps=5, kwargs=False, hp=None, seed=0, schedule="solve", replan=None,
             shape=(2, 8), kernels=(), **compile_options):
    """Train a copy eagerly with torch.optim.AdamW and the model with mtc on token batches of `shape`;
    return both. replan={step index: Step.replan keyword arguments} switches plans before that step."""
    hp = hp or mtc.AdamW(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    reference = copy.deepcopy(model)
    call = (lambda ids, labels: {"input_ids": ids, "labels": labels}) if kwargs else (lambda ids, labels: (ids, labels))
    example = call(*tokens(*shape, seed=1000))
    step = mtc.compile(model, gpu_mem=gpu_mem, example=example, optimizer=hp, clip_grad_norm=clip, device="cpu",
                       schedule=schedule, kernels=kernels, **compile_options)
    # fused=True: the same AdamW kernel mtc runs. The for-loop variant rounds differently, and AdamW
    # turns a rounding difference in a near-zero gradient into an lr-sized one (measured: 2.6e-5).
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                  weight_decay=hp.weight_decay, fused=True)
    losses, reference_losses = [], []
    for index in range(steps):
        batch = call(*tokens(*shape, seed=seed + index))
        if replan and index in replan:
            step = step.replan(**replan[index])
        torch.manual_seed(index)
        losses.append(float(step(**batch) if kwargs else step(*batch)))
        torch.manual_seed(index)
        loss = reference(**batch) if kwargs else reference(*batch)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        optimizer.step()
        reference_losses.append(loss.item())
    return step, reference, losses, reference_losses


def assert_same_training(step, reference, losses, reference_losses, rtol=1e-5):
    assert losses == pytest.approx(reference_losses, rel=rtol)
    mine = dict(step.named_parameters())
    assert set(mine) == {name for name, _ in reference.named_parameters()}
    for name, expected in reference.named_parameters():
        expected = expected.detach()
        error = float((mine[name] - expected).abs().max() / expected.abs().max())
        assert error <= rtol, f"{name}: max |mtc - eager| / max |eager| = {error:.2e} > {rtol:.0e}"

