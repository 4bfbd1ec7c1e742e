"""templates: run one stage's template forward, or recompute it and differentiate it locally.

A stage's autograd graph never outlives its backward: the forward runs without autograd, keeps
only its inputs, and the backward replays it (same RNG state, buffers protected from a second
update) with the weights still resident, then calls torch.autograd.grad over this stage alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Kept:
    """What a stage's forward leaves for its backward."""
    inputs: list
    rng: tuple
    mutates_buffers: bool


def _rng_state(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def forward(fn, weights: list, buffers: list, inputs: list, device: torch.device) -> tuple[tuple, Kept]:
    rng = _rng_state(device)
    versions = [b._version for b in buffers]
    with torch.no_grad():
        outputs = fn(*weights, *buffers, *inputs)
    mutates = any(b._version != v for b, v in zip(buffers, versions))
    return outputs, Kept(inputs, rng, mutates)


def backward(fn, weights: list, buffers: list, kept: Kept, carries_grad: list[bool], output_grads: list,
             device: torch.device, loss_of=None):
    """Recompute the stage and return (gradients of its inputs, gradients of its weights, loss).

    output_grads[i] is the gradient of output i, or None. With loss_of (the last stage), the loss is
    found in the outputs and differentiated instead, and the forward is not a replay.
    """
    replay = loss_of is None
    leaves_w = [w.detach().requires_grad_(w.is_floating_point()) for w in weights]
    leaves_x = [x.detach().requires_grad_(flag) if isinstance(x, torch.Tensor) else x
                for x, flag in zip(kept.inputs, carries_grad)]
    if replay:
        if kept.mutates_buffers:  # running statistics were updated by the forward: not again
            buffers = [b.clone() for b in buffers]
        now = _rng_state(device)
        _set_rng_state(kept.rng, device)
        try:
            with torch.enable_grad():
                outputs = fn(*leaves_w, *buffers, *leaves_x)
        finally:  # the step's own random stream goes on as if no replay had happened
            _set_rng_state(now, device)
    else:
        with torch.enable_grad():
            outputs = fn(*leaves_w, *buffers, *leaves_x)
    if replay:
        pairs = [(o, g) for o, g in zip(outputs, output_grads)
                 if g is not None and isinstance(o, torch.Tensor) and o.requires_grad]
        loss = None
    else:
        loss = loss_of(outputs)
        pairs = [(loss, None)]
    wrt = [t for t in leaves_w + leaves_x if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
                 if pairs and wrt else [None] * len(wrt))
    by_leaf = {id(t): next(grads) for t in wrt}
    weight_grads = [by_leaf.get(id(w)) for w in leaves_w]
    input_grads = [by_leaf.get(id(x)) if isinstance(x, torch.Tensor) else None for x in leaves_x]
    return input_grads, weight_grads, (loss.detach() if loss is not None else None)
