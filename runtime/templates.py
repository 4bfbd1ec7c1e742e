"""templates: run one stage's template forward, and differentiate it locally.

A stage's autograd graph covers that stage alone (its inputs and weights are detached leaves), and
the backward calls torch.autograd.grad over it. Two activation policies:
- recompute: the forward runs without autograd and keeps only its inputs; the backward replays it (same
  RNG state, buffers protected from a second update) with the weights on the device again (a tail in
  token tiles is not run by the replay but by its own backward, codegen/tiles);
- keep: the forward records autograd's graph and it lives until the backward. A streamed stage's
  weights sit in a slot that other stages overwrite in between, so what autograd saves from the slot is
  kept as a place in it and read back from the slot holding the weights at the backward.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from mtc.codegen.tiles import replaying


@dataclass
class Recorded:
    """A forward's autograd graph, kept for its backward."""
    outputs: tuple
    leaves_w: list
    leaves_x: list
    slot: torch.Tensor | None = None
    """The slot holding the stage's weights now: where saved slot tensors are read back from."""


@dataclass
class Kept:
    """What a stage's forward leaves for its backward."""
    inputs: list
    rng: tuple
    mutates_buffers: bool
    recorded: Recorded | None = None
    """With the keep policy: the recorded graph (no replay)."""


@dataclass(frozen=True)
class _InSlot:
    offset: int
    size: tuple
    stride: tuple


def _slot_hooks(slot: torch.Tensor | None, recorded: Recorded):
    """Saved tensors that live in `slot` become their place in it, read back from recorded.slot."""
    if slot is None:  # the weights stay where they are: autograd may keep them as they are
        return contextlib.nullcontext()
    slot_storage = slot.untyped_storage().data_ptr()

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() != slot_storage:
            return tensor
        if tensor.dtype != slot.dtype:
            raise TypeError(f"a saved {tensor.dtype} view of a {slot.dtype} weight slot cannot be kept")
        return _InSlot(tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))

    def unpack(packed):
        if not isinstance(packed, _InSlot):
            return packed
        return recorded.slot.as_strided(packed.size, packed.stride, packed.offset)

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward(fn, weights: list, buffers: list, inputs: list, device: torch.device,
            keep: tuple | None = None) -> tuple[tuple, Kept]:
    """Run the stage; keep=(carries_grad, slot) records its graph for the backward (slot: the weight slot
    the weights are read from, None when they stay where they are)."""
    rng = _rng_state(device)
    versions = [b._version for b in buffers]
    recorded = None
    if keep is None:
        with torch.no_grad():
            outputs = fn(*weights, *buffers, *inputs)
    else:
        carries_grad, slot = keep
        recorded = Recorded((), *_leaves(weights, inputs, carries_grad))
        with torch.enable_grad(), _slot_hooks(slot, recorded):
            recorded.outputs = fn(*recorded.leaves_w, *buffers, *recorded.leaves_x)
        outputs = tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in recorded.outputs)
    mutates = any(b._version != v for b, v in zip(buffers, versions))
    return outputs, Kept(inputs, rng, mutates, recorded)


def _leaves(weights: list, inputs: list, carries_grad: list[bool]) -> tuple[list, list]:
    leaves_w = [w.detach().requires_grad_(w.is_floating_point()) for w in weights]
    leaves_x = [x.detach().requires_grad_(flag) if isinstance(x, torch.Tensor) else x
                for x, flag in zip(inputs, carries_grad)]
    return leaves_w, leaves_x


def backward(fn, weights: list, buffers: list, kept: Kept, carries_grad: list[bool], output_grads: list,
             device: torch.device, loss_of=None, slot: torch.Tensor | None = None):
    """Differentiate the stage: return (gradients of its inputs, gradients of its weights, loss).

    output_grads[i] is the gradient of output i, or None. With loss_of (the last stage), the loss is
    found in the outputs and differentiated instead, and the forward is not a replay. A stage whose
    forward kept its graph is not recomputed; `slot` is where its weights are now.
    """
    if kept.recorded is not None:
        recorded, kept.recorded = kept.recorded, None  # the graph goes with this backward
        recorded.slot = slot
        return _differentiate(recorded.outputs, output_grads, recorded.leaves_w, recorded.leaves_x, None)
    leaves_w, leaves_x = _leaves(weights, kept.inputs, carries_grad)
    if loss_of is not None:
        with torch.enable_grad():
            loss = loss_of(fn(*leaves_w, *buffers, *leaves_x))
        # The loss's graph keeps what its backward needs; the other outputs (a Hugging Face model's logits)
        # are freed before it runs, as the plan counts them.
        return _differentiate([], output_grads, leaves_w, leaves_x, loss)
    if kept.mutates_buffers:  # running statistics were updated by the forward: not again
        buffers = [b.clone() for b in buffers]
    now = _rng_state(device)
    _set_rng_state(kept.rng, device)
    try:
        with torch.enable_grad(), replaying():
            outputs = fn(*leaves_w, *buffers, *leaves_x)
    finally:  # the step's own random stream goes on as if no replay had happened
        _set_rng_state(now, device)
    return _differentiate(outputs, output_grads, leaves_w, leaves_x, None)


def split_rows(values: list, axes: list, rows: int, chunks: int) -> list[list]:
    """Each chunk's values: a row-carrying tensor narrowed to the chunk's rows along its row axis (each row
    a run of size / rows along it), anything else whole."""
    per_chunk = -(-rows // chunks)
    pieces = []
    for start in range(0, rows, per_chunk):
        count = min(per_chunk, rows - start)
        pieces.append([v.narrow(a, start * (v.shape[a] // rows), count * (v.shape[a] // rows))
                       if a is not None and isinstance(v, torch.Tensor) else v for v, a in zip(values, axes)])
    return pieces


def join_rows(pieces: list[list], axes: list, sum_the_rest: bool) -> list:
    """Chunks' results back into whole values: row-carrying ones concatenated along their row axis; the
    others are the same in every chunk (outputs: the first is taken) or add up (gradients: summed)."""
    joined = []
    for index, axis in enumerate(axes):
        parts = [piece[index] for piece in pieces]
        if not isinstance(parts[0], torch.Tensor):
            joined.append(parts[0])
        elif axis is not None:
            joined.append(torch.cat(parts, dim=axis))
        elif sum_the_rest:
            present = [p for p in parts if p is not None]
            joined.append(None if not present else present[0] if len(present) == 1 else sum(present[1:], present[0]))
        else:
            joined.append(parts[0])
    return joined


def forward_in_chunks(fn, weights: list, buffers: list, inputs: list, device: torch.device, axes,
                      rows: int, chunks: int) -> tuple[tuple, Kept]:
    """A recomputed stage's forward over the batch's `rows` in `chunks` slices (axes: its StageRows)."""
    rng = _rng_state(device)
    with torch.no_grad():
        pieces = [list(fn(*weights, *buffers, *piece)) for piece in split_rows(inputs, axes.inputs, rows, chunks)]
    return tuple(join_rows(pieces, axes.outputs, sum_the_rest=False)), Kept(inputs, rng, False)


def backward_in_chunks(fn, weights: list, buffers: list, kept: Kept, carries_grad: list[bool], output_grads: list,
                       device: torch.device, axes, rows: int, chunks: int):
    """backward() of a recomputed stage, chunk by chunk: its input gradients joined, its weight gradients
    summed (in their dtype, as gradient accumulation over micro-batches does)."""
    grads_of = split_rows(output_grads, axes.outputs, rows, chunks)
    input_pieces, weight_grads = [], None
    for inputs, grads in zip(split_rows(kept.inputs, axes.inputs, rows, chunks), grads_of):
        input_grads, grads_w, _ = backward(fn, weights, buffers, Kept(inputs, kept.rng, False), carries_grad,
                                           grads, device)
        input_pieces.append(input_grads)
        weight_grads = grads_w if weight_grads is None else [
            a if b is None else b if a is None else a.add_(b) for a, b in zip(weight_grads, grads_w)]
    return join_rows(input_pieces, axes.inputs, sum_the_rest=True), weight_grads, None


def _differentiate(outputs, output_grads, leaves_w, leaves_x, loss):
    if loss is None:
        pairs = [(o, g) for o, g in zip(outputs, output_grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
    else:
        pairs = [(loss, None)]
    wrt = [t for t in leaves_w + leaves_x if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                 if pairs and wrt else [None] * len(wrt))
    by_leaf = {id(t): next(grads) for t in wrt}
    weight_grads = [by_leaf.get(id(w)) for w in leaves_w]
    input_grads = [by_leaf.get(id(x)) if isinstance(x, torch.Tensor) else None for x in leaves_x]
    return input_grads, weight_grads, (loss.detach() if loss is not None else None)
