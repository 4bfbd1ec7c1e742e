"""tiles: find the part of a stage that treats every token on its own, after its last attention.

At long sequences a block's working set is its MLP: at 128k tokens one Llama-3-8B layer's gate, up and
activation are 3.5 GiB each. Attention must see the whole sequence, but what follows it (the output
projection, the residual add, the norm, the MLP, the second add) works token by token. That *tail* can
run in tiles of a few thousand tokens, each recomputed in the backward from the tail's inputs, so the
working set no longer grows with the sequence (codegen/tiles runs it).

The check is passes/rows' with the tokens as the rows: every value gets the axis its tokens lie along,
and a node that mixes tokens (attention, a reduction over the sequence, rotary tables read as if the
same for every token) gets UNKNOWN instead of ending the walk. Attention's output lies along its
queries' axis (-2): that is where a tail can start. The tail is then the nodes, from the output
backwards, that keep tokens apart and whose every user is in the tail.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .rows import ATTENTION, LINEAR, MATMUL, Mixes, RowAxes, Shape, _leaves, _op

ARANGE = {torch.arange, "arange"}


class _Unknown:
    def __repr__(self):
        return "UNKNOWN"


UNKNOWN = _Unknown()
"""Where the tokens of a value lie is not known (it mixes them, or was made from a value that does)."""


class TokenAxes(RowAxes):
    """RowAxes over tokens instead of the batch's rows, going on past the nodes that mix them."""

    def __init__(self, tokens: int, input_axes: dict[str, object]):
        super().__init__(tokens, input_axes)
        self.positionwise: set[fx.Node] = set()
        """Nodes that keep tokens apart: run on a slice of the tokens, they give that slice of the result."""
        self.why: dict[fx.Node, str] = {}
        """Why a node that reads token-carrying values is not position-wise."""

    def visit(self, node: fx.Node, args: tuple, kwargs: dict, result) -> None:
        axis_of = lambda a: self.axis.get(a) if isinstance(a, fx.Node) else None  # noqa: E731
        axes, kwaxes = fx.node.map_aggregate(node.args, axis_of), fx.node.map_aggregate(node.kwargs, axis_of)
        self.node = node
        if _op(node.target) in ATTENTION and isinstance(result, torch.Tensor):
            self.axis[node] = result.dim() - 2  # the output's positions are its queries'
            return
        if any(a is UNKNOWN for a in _leaves((axes, kwaxes))):
            self.axis[node] = UNKNOWN
            return
        if _op(node.target) in ARANGE and len(args) == 1 and isinstance(axes[0], Shape) and axes[0].axis is None:
            # arange(tokens): the positions, a table along the tokens (learned or rotary position embeddings).
            # Made again in a tile it would count from 0: it can feed a tail, not be part of one.
            self.axis[node] = 0
            self.why[node] = self._where("counts the positions, which a tile would count from its own start")
            return
        blocker, self.blocker = self.blocker, None
        try:
            self.axis[node] = self._rule(node, args, kwargs, axes, kwaxes, result)
            if self.blocker is None and node.op in ("call_function", "call_method"):
                self.positionwise.add(node)
            elif self.blocker is not None:
                self.why[node] = self.blocker
        except Mixes as why:
            self.axis[node] = UNKNOWN
            self.why[node] = self._where(why)
        self.blocker = blocker


@dataclass
class Tail:
    """The nodes of a template, by name, that run in token tiles."""
    nodes: list[str]
    """In graph order."""
    inputs: list[str]
    """Values the tail reads from before it (graph order): stage inputs, weights, earlier results."""
    input_axes: list
    """Where each input's tokens lie (None: the same for every token, as weights are)."""
    outputs: list[str]
    """Tail values the stage returns."""
    output_axes: list[int]

    def describe(self) -> str:
        starts = [f"`{name}`" for name, axis in zip(self.inputs, self.input_axes) if axis is not None]
        return f"{len(self.nodes)} ops on {', '.join(starts)}"


def find_tail(graph: fx.Graph, tokens: TokenAxes) -> Tail | str:
    """The stage's tail, or why it has none."""
    nodes = list(graph.nodes)
    output = nodes[-1]
    tail: set[fx.Node] = set()
    for node in reversed(nodes[:-1]):
        if node in tokens.positionwise and all(user in tail or user is output for user in node.users):
            tail.add(node)
    if not any(_op(n.target) in LINEAR | MATMUL for n in tail):
        attention = [i for i, n in enumerate(nodes) if _op(n.target) in ATTENTION]
        stops = [n for n in nodes[attention[-1] if attention else 0:] if n in tokens.why]
        if stops:  # the last node that mixes tokens
            return f"no position-wise part with a matmul follows {tokens.why[stops[-1]]}"
        return "nothing after its last attention multiplies by a weight"
    ordered = [n for n in nodes if n in tail]
    inputs = [n for n in nodes if n not in tail and any(user in tail for user in n.users)]
    input_axes = [tokens.axis.get(n) for n in inputs]
    bad = [n.name for n, axis in zip(inputs, input_axes) if axis is not None and not isinstance(axis, int)]
    if bad:
        return f"its position-wise part reads {', '.join(bad)}, whose tokens lie along no one axis"
    outputs = [n for n in ordered if output in n.users]
    output_axes = [tokens.axis.get(n) for n in outputs]
    if not all(isinstance(axis, int) for axis in output_axes):
        return "its position-wise part returns a value that is the same for every token"
    if any(n.op == "placeholder" for n in ordered):
        raise AssertionError("a placeholder cannot be in a tail")
    return Tail([n.name for n in ordered], [n.name for n in inputs], input_axes, [n.name for n in outputs],
                output_axes)
