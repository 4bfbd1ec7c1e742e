"""tiles: run a stage's position-wise tail (passes/tiles) in tiles of tokens.

The tail becomes one module call. Its forward runs the tail a tile of positions at a time without
autograd and keeps only the tail's inputs; its backward runs each tile again with autograd and
differentiates it at once, so at most one tile's intermediates are alive. Weight gradients add up over
the tiles in fp32 (one rounding to the weights' dtype at the end, as a single matmul would round);
input gradients are written tile by tile into whole-size buffers.

A recomputed stage's replay (runtime/templates.backward) needs the tail's outputs only as the place its
output gradients flow from: under `replaying()` the forward returns them unfilled instead of computing
them, so tiling adds no FLOPs to a recomputed stage (the tail runs once in the replay's backward, as it
would have run once in the replay).
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import math
import operator

import torch
import torch.fx as fx

from mtc.passes.tiles import Tail

TILE_TOKENS = 16384
"""Tokens per tile (positions times the rows of the batch). At 16k tokens a Llama-3-8B MLP's matmuls
are as large as at 4x4096, which run at 535-584 TFLOP/s on an H100 (BENCHMARKS.md, 2026-11-22), and
one tile's intermediates are 0.45 GiB each."""

_replaying = contextvars.ContextVar("mtc_tiles_replaying", default=False)


@contextlib.contextmanager
def replaying():
    """Mark a stage's forward as a replay whose outputs only carry gradients back (see the module doc)."""
    token = _replaying.set(True)
    try:
        yield
    finally:
        _replaying.reset(token)


def tile_count(positions: int, tokens_per_position: int, tile_tokens: int) -> int:
    """Tiles for `positions` positions of `tokens_per_position` tokens each: at most tile_tokens a tile."""
    return max(1, min(positions, math.ceil(positions * tokens_per_position / tile_tokens)))


class TokenTiles(torch.nn.Module):
    """The tail of one template, called with the tail's inputs; returns its outputs as a tuple."""

    def __init__(self, tail_graph: fx.Graph, tail: Tail, tile_tokens: int):
        super().__init__()
        self.tail = fx.GraphModule(torch.nn.Module(), tail_graph, class_name="tail")
        self.input_axes, self.output_axes = tail.input_axes, tail.output_axes
        self.tile_tokens = tile_tokens
        self._meta_outputs: dict[tuple, list[torch.Tensor]] = {}

    def forward(self, *inputs):
        return _Tiled.apply(self, *inputs)

    def meta_outputs(self, inputs) -> list[torch.Tensor]:
        """The outputs as meta tensors, from a run on meta inputs (once per input shapes)."""
        key = tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for v in inputs)
        if key not in self._meta_outputs:
            meta = [v.to("meta") if isinstance(v, torch.Tensor) else v for v in inputs]
            with torch.no_grad():
                self._meta_outputs[key] = list(self.tail(*meta))
        return self._meta_outputs[key]

    def empty_outputs(self, inputs) -> list[torch.Tensor]:
        device = next(v.device for v in inputs if isinstance(v, torch.Tensor))
        return [torch.empty(o.shape, dtype=o.dtype, device=device) for o in self.meta_outputs(inputs)]

    def positions(self, inputs) -> int:
        """Positions along the token axis of the tail's inputs."""
        return next(v.shape[a] for v, a in zip(inputs, self.input_axes) if a is not None)

    def tiles(self, inputs) -> list[tuple[int, int]]:
        """(first position, positions) of each tile."""
        first, axis = self.meta_outputs(inputs)[0], self.output_axes[0]
        positions = self.positions(inputs)
        per_position = math.prod(first.shape[:axis]) * (first.shape[axis] // positions)
        count = tile_count(positions, per_position, self.tile_tokens)
        size = -(-positions // count)
        return [(start, min(size, positions - start)) for start in range(0, positions, size)]

    def slice(self, values, axes, positions: int, start: int, count: int) -> list:
        """Each token-carrying value narrowed to the tile (its tokens a run of size / positions each)."""
        return [v.narrow(a, start * (v.shape[a] // positions), count * (v.shape[a] // positions))
                if a is not None and isinstance(v, torch.Tensor) else v for v, a in zip(values, axes)]


class _Tiled(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tiles: TokenTiles, *inputs):
        ctx.tiles = tiles
        ctx.tensor_at = [i for i, v in enumerate(inputs) if isinstance(v, torch.Tensor)]
        ctx.others = [None if isinstance(v, torch.Tensor) else v for v in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_at))
        outputs = tiles.empty_outputs(inputs)
        if not _replaying.get():
            positions = tiles.positions(inputs)
            for start, count in tiles.tiles(inputs):
                pieces = tiles.tail(*tiles.slice(inputs, tiles.input_axes, positions, start, count))
                for whole, piece in zip(tiles.slice(outputs, tiles.output_axes, positions, start, count), pieces):
                    whole.copy_(piece)
        ctx.mark_non_differentiable(*(o for o in outputs if not o.is_floating_point()))
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *output_grads):
        tiles = ctx.tiles
        inputs = list(ctx.others)
        for index, value in zip(ctx.tensor_at, ctx.saved_tensors):
            inputs[index] = value
        wanted = [ctx.needs_input_grad[1 + i] for i in range(len(inputs))]
        positions = tiles.positions(inputs)
        # Token-carrying inputs: a whole-size gradient, filled tile by tile. The others (weights): an fp32 sum.
        grads = [None if not want else torch.zeros(v.shape, dtype=v.dtype if a is not None else torch.float32,
                                                   device=v.device)
                 for v, a, want in zip(inputs, tiles.input_axes, wanted)]
        for start, count in tiles.tiles(inputs):
            leaves = [v.detach().requires_grad_(want) if isinstance(v, torch.Tensor) else v
                      for v, want in zip(tiles.slice(inputs, tiles.input_axes, positions, start, count), wanted)]
            with torch.enable_grad():
                outputs = tiles.tail(*leaves)
            pairs = [(o, g) for o, g in zip(outputs, tiles.slice(list(output_grads), tiles.output_axes, positions,
                                                               start, count))
                     if g is not None and o.requires_grad]
            wrt = [leaf for leaf, want in zip(leaves, wanted) if want]
            if not pairs or not wrt:
                continue
            found = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True))
            for index, want in enumerate(wanted):
                if not want:
                    continue
                grad = next(found)
                if grad is None:
                    continue
                axis = tiles.input_axes[index]
                if axis is None:
                    grads[index].add_(grad)
                else:
                    tiles.slice([grads[index]], [axis], positions, start, count)[0].copy_(grad)
        grads = [g.to(v.dtype) if g is not None and g.dtype != v.dtype else g for g, v in zip(grads, inputs)]
        return (None, *grads)


def tiled_graph(graph: fx.Graph, tail: Tail) -> tuple[fx.Graph, fx.Graph]:
    """(A copy of `graph` with the tail replaced by a call to the submodule `token_tiles`, the tail's own
    graph: placeholders for its inputs, its outputs as a tuple)."""
    graph = copy.deepcopy(graph)
    by_name = {node.name: node for node in graph.nodes}
    tail_nodes = [by_name[name] for name in tail.nodes]
    sub = fx.Graph()
    env = {by_name[name]: sub.placeholder(name) for name in tail.inputs}
    for node in tail_nodes:
        env[node] = sub.node_copy(node, lambda n: env[n])
    sub.output(tuple(env[by_name[name]] for name in tail.outputs))
    with graph.inserting_before(next(iter(reversed(graph.nodes)))):  # the output: after every input
        call = graph.call_module("token_tiles", tuple(by_name[name] for name in tail.inputs))
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(tail.outputs))]
    for name, result in zip(tail.outputs, results):
        by_name[name].replace_all_uses_with(result)
    for node in reversed(tail_nodes):
        graph.erase_node(node)
    return graph, sub
