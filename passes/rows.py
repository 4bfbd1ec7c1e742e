"""rows: does a stage treat the rows of the batch independently, and along which axis of each of its
inputs and outputs do the rows lie? Such a stage can run in token chunks (a few rows at a time, its
weights staying in their slot, its weight gradients summed over the chunks) to the same result.

The check follows every node of a stage's template on meta tensors, with a rule per operation: an
elementwise op, a matmul or attention keeps the row axis where it is; a layout op (transpose, view,
flatten, ...) moves it, or merges it with the axes after it (each row then covers a contiguous run of
that axis); a reduction must not reduce over it. Anything else that touches a row-carrying value,
random numbers (chunks would draw them differently) and tensors sized by the batch but made from
scratch make the stage not chunkable, and the first such node is named.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F

from mtc.codegen import patterns

ELEMENTWISE = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pow,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.pow, torch.rsqrt, torch.sqrt, torch.exp,
    torch.tanh, torch.sigmoid, torch.where, torch.abs, torch.cos, torch.sin, torch.clamp, torch.erf,
    F.silu, F.gelu, F.relu, F.sigmoid, F.tanh, F.softplus, torch._C._nn.gelu, torch._C._nn.silu,
    "add", "sub", "mul", "div", "neg", "pow", "rsqrt", "sqrt", "exp", "tanh", "sigmoid", "abs", "cos", "sin",
    "clamp", "relu", "masked_fill", "float", "half", "bfloat16", "to", "type", "type_as", "contiguous", "clone",
    "detach", patterns.swiglu,
}
REDUCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.var, torch.std, torch.logsumexp, torch.norm,
              "mean", "sum", "amax", "amin", "var", "std", "logsumexp", "norm"}
ALONG_AXIS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, torch.cumsum, F.normalize,
              "softmax", "log_softmax", "cumsum"}
"""Ops that work along one axis and keep the shape: that axis must not be the row axis."""
DIM_AT = {torch.norm: 2, "norm": 2, F.normalize: 2}
"""Where `dim` sits among the positional arguments when not second (after p); keepdim follows it, except
for var and std, whose positional form puts `unbiased` between."""
KEEPDIM_AT = {torch.norm: 3, "norm": 3, torch.var: 3, "var": 3, torch.std: 3, "std": 3}
LAST_AXIS_NORMS = {patterns.rmsnorm}
"""Normalise each vector along the last axis, which must not be the row axis; their other operands are weights."""
NORMS = {F.layer_norm, "layer_norm", "rms_norm"} | ({F.rms_norm} if hasattr(F, "rms_norm") else set())
LOSSES = {patterns.linear_cross_entropy, F.cross_entropy, "cross_entropy", "cross_entropy_loss"}
LINEAR = {F.linear, torch._C._nn.linear, "linear"}
MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "mm"}
ATTENTION = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention, "scaled_dot_product_attention"}
DROPOUT = {F.dropout, torch.dropout, "dropout"}
RANDOM = {torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like,
          torch.bernoulli, torch.normal, torch.multinomial, torch.randperm, "bernoulli", "normal", "uniform_",
          "random_", "exponential_", "multinomial"}
"""Random draws that do not depend on the rows: a chunked stage would still draw them once per chunk."""
RESHAPES = {torch.reshape, "view", "reshape"}
LAYOUT = RESHAPES | {
    "cat", torch.cat, "stack", torch.stack, "transpose", torch.transpose, "swapaxes", "permute", torch.permute,
    "unsqueeze", torch.unsqueeze, "flatten", torch.flatten, "unflatten", "expand", "expand_as",
    "repeat_interleave", torch.repeat_interleave, "chunk", torch.chunk, "split", torch.split, "tensor_split"}
"""Ops that move, merge or split axes: the row axis follows them (_layout)."""
SIZED_BY = RESHAPES | {"expand", "unflatten", operator.getitem, "size"}
"""Ops that may take sizes read off a row-carrying tensor (as `x.view(x.shape[0], ...)` does)."""


class Mixes(Exception):
    """A node does not keep the batch's rows apart."""


class Shape:
    """The shape of a row-carrying tensor (axis: where its rows lie), or one size read from it (axis None
    once it is the batch's own size)."""

    def __init__(self, axis: int | None):
        self.axis = axis


@dataclass
class StageRows:
    """Where the rows of the batch lie in a stage's inputs and outputs (None: the same for every row), or
    why the stage cannot run in chunks."""
    inputs: list
    outputs: list
    why_not: str | None = None


class RowAxes:
    """Visits one stage's nodes in order: axis[node] is where the node's rows lie (None: the value is the
    same for every row); a tuple for a node that returns several tensors."""

    def __init__(self, rows: int, input_axes: dict[str, int | None]):
        self.rows = rows
        self.axis: dict[fx.Node, object] = {}
        self.input_axes = input_axes
        self.mixing: str | None = None
        """The first node that mixes rows, and why: from there on where the rows lie is not known."""
        self.blocker: str | None = None
        """The first node that keeps rows apart but would still change if run in chunks (random numbers,
        in-place updates), and why."""
        self.node: fx.Node | None = None

    def visit(self, node: fx.Node, args: tuple, kwargs: dict, result) -> None:
        if self.mixing is not None:
            return
        axis_of = lambda a: self.axis.get(a) if isinstance(a, fx.Node) else None  # noqa: E731
        axes, kwaxes = fx.node.map_aggregate(node.args, axis_of), fx.node.map_aggregate(node.kwargs, axis_of)
        self.node = node
        try:
            self.axis[node] = self._rule(node, args, kwargs, axes, kwaxes, result)
        except Mixes as why:
            self.mixing = self._where(why)

    @property
    def why_not(self) -> str | None:
        """Why the stage cannot run in chunks; None when it can."""
        return self.mixing or self.blocker

    def _block(self, why: str) -> None:
        self.blocker = self.blocker or self._where(why)

    def _where(self, why) -> str:
        target = self.node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        return f"`{self.node.name}` ({name}) {why}"

    def output_axes(self, node: fx.Node) -> list:
        return [self.axis.get(a) if isinstance(a, fx.Node) else None for a in _leaves(node.args[0])]

    # -- the rules ----------------------------------------------------------------------------------
    def _rule(self, node, args, kwargs, axes, kwaxes, result):
        if node.op == "placeholder":
            return self.input_axes.get(node.name)
        if node.op in ("get_attr", "output"):
            return None
        carried = [a for a in _leaves((axes, kwaxes)) if a is not None]
        target = _op(node.target)
        if target == "embedding" and isinstance(node.target, torch._ops.OpOverload):  # aten: (weight, indices)
            target, args, axes = F.embedding, (args[1], args[0], *args[2:]), (axes[1], axes[0], *axes[2:])
        if target in RANDOM or (target in DROPOUT and _arg(args, kwargs, 1, "p", 0.5)
                                and _arg(args, kwargs, 2, "training", True)):
            self._block("draws random numbers, which chunks would draw once each, not as the batch does")
            return _broadcast(_tensors(args, axes), result.dim()) if carried else None
        if isinstance(target, str) and target.endswith("_") and not target.startswith("_"):
            self._block("updates a tensor in place, which chunks would do once each")
        if not carried:
            return None
        if node.op == "call_module":
            raise Mixes("is a module call, opaque to the check")
        if any(isinstance(a, Shape) for a in carried):
            if not isinstance(result, torch.Tensor) and target is not getattr and target is not operator.getitem:
                return Shape(None)  # arithmetic on sizes: a size that depends on the batch
            if target not in SIZED_BY:
                raise Mixes("makes a tensor sized by the batch")
        if target is getattr:
            return self._attribute(args[1], axes[0])
        if target in DROPOUT:  # p = 0 or not training: the identity
            return axes[0]
        if target in ELEMENTWISE:
            return _broadcast(_tensors(args, axes) + _tensors(kwargs, kwaxes), result.dim())
        if target in REDUCTIONS or target in ALONG_AXIS:
            return _reduction(target, args, kwargs, axes[0])
        if target in NORMS:
            _free_of_rows(args[1:], axes[1:], kwaxes)
            if axes[0] >= args[0].dim() - len(_arg(args, kwargs, 1, "normalized_shape", ())):
                raise Mixes("normalises over the row axis")
            return axes[0]
        if target is patterns.rope:
            return _rope(args[0], axes[0], args[1:3], axes[1:3])
        if target in LOSSES:
            raise Mixes("averages or sums the loss over the rows")
        if target in LAST_AXIS_NORMS:
            _free_of_rows(args[1:], axes[1:], kwaxes)
            if axes[0] == args[0].dim() - 1:
                raise Mixes("normalises over the row axis")
            return axes[0]
        if target in LINEAR:
            _free_of_rows(args[1:], axes[1:], kwaxes)
            if axes[0] == args[0].dim() - 1:
                raise Mixes("contracts the row axis")
            return axes[0]
        if target in MATMUL:
            (a, a_axis), (b, b_axis) = _tensors(args[:2], axes[:2])
            if b_axis is None and a.dim() >= 2 and a_axis == a.dim() - 2:  # rows of a times a row-free b
                return result.dim() - 2
            return _leading([(a, a_axis), (b, b_axis)], result.dim(), 2)
        if target in ATTENTION:
            if _arg(args, kwargs, 4, "dropout_p", 0.0):
                self._block("draws random numbers (attention dropout), which chunks would draw once each")
            mask = _arg(args, kwargs, 3, "attn_mask", None)
            mask_axis = kwaxes.get("attn_mask") if "attn_mask" in kwargs else (axes[3] if len(axes) > 3 else None)
            operands = _tensors(args[:3], axes[:3]) + ([(mask, mask_axis)] if mask is not None else [])
            return _leading(operands, result.dim(), 2)
        if target is F.embedding:
            _free_of_rows(args[1:], axes[1:], kwaxes)
            return axes[0]
        if target is operator.getitem:
            return self._getitem(args, axes)
        if target == "size":
            dim = _arg(args, kwargs, 1, "dim", None)
            return Shape(axes[0]) if dim is None else Shape(None) if dim % args[0].dim() == axes[0] else None
        return self._layout(target, args, kwargs, axes, kwaxes, result)

    def _attribute(self, name: str, axis):
        if name == "shape":
            return Shape(axis)
        if name in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
            return None
        raise Mixes(f"reads .{name} of a row-carrying tensor")

    def _getitem(self, args, axes):
        value, index = args
        axis = axes[0]
        if isinstance(axis, Shape):  # a size read off the shape: the batch's own, or another one
            if isinstance(index, int) and index % len(value) == axis.axis:
                return Shape(None)
            if isinstance(index, int):
                return None
            raise Mixes("slices a shape across the row axis")
        if isinstance(axis, tuple):  # one of several outputs (chunk, split)
            return axis[index]
        return _index(value, axis, index)

    def _layout(self, target, args, kwargs, axes, kwaxes, result):
        if target not in LAYOUT:
            raise Mixes("is not an operation the row check knows")
        if target in ("cat", torch.cat, "stack", torch.stack):
            tensors, parts = args[0], axes[0]
            dim = _arg(args, kwargs, 1, "dim", 0)
            if any(p is None for p in parts) or len(set(parts)) != 1:
                raise Mixes("joins tensors whose rows lie along different axes, or with none")
            axis = parts[0]
            if target in ("stack", torch.stack):
                return axis + (dim % (tensors[0].dim() + 1) <= axis)
            if dim % tensors[0].dim() == axis:
                raise Mixes("concatenates along the row axis")
            return axis
        x, axis = args[0], axes[0]
        if not isinstance(x, torch.Tensor) or not isinstance(axis, int):
            raise Mixes("is not an operation the row check knows")
        others = [a for a in _leaves((axes[1:], kwaxes)) if a is not None and not isinstance(a, Shape)]
        if others:
            raise Mixes("combines rows with another row-carrying value in a way the row check does not know")
        dims = x.dim()
        if target in ("transpose", torch.transpose, "swapaxes"):
            a, b = (d % dims for d in args[1:3])
            return b if axis == a else a if axis == b else axis
        if target in ("permute", torch.permute):
            order = [d % dims for d in (args[1] if isinstance(args[1], (list, tuple)) else args[1:])]
            return order.index(axis)
        if target in ("unsqueeze", torch.unsqueeze):
            where = args[1] % (dims + 1)
            return axis + (where <= axis)
        if target in ("flatten", torch.flatten):
            start = _arg(args, kwargs, 1, "start_dim", 0) % max(dims, 1)
            end = _arg(args, kwargs, 2, "end_dim", -1) % max(dims, 1)
            if axis < start:
                return axis
            if axis > end:
                return axis - (end - start)
            if math.prod(x.shape[start:axis]) != 1:
                raise Mixes("flattens the row axis into an axis outside it")
            return start
        if target == "unflatten":
            where = args[1] % dims
            if axis != where:
                return axis + (len(args[2]) - 1 if axis > where else 0)
            return _reshaped(x, axis, result, self.rows)
        if target in RESHAPES:
            out_axis = _reshaped(x, axis, result, self.rows)
            _sized_by_its_own_shape(args[1:], axes[1:], out_axis)
            return out_axis
        if target in ("expand", "expand_as"):
            if result.shape[result.dim() - dims + axis] != x.shape[axis]:
                raise Mixes("expands the row axis")
            if target == "expand":
                _sized_by_its_own_shape(args[1:], axes[1:], result.dim() - dims + axis)
            return result.dim() - dims + axis
        if target in ("repeat_interleave", torch.repeat_interleave):
            if _arg(args, kwargs, 2, "dim", None) is None or _arg(args, kwargs, 2, "dim", None) % dims == axis:
                raise Mixes("repeats along the row axis")
            return axis
        if target in ("chunk", torch.chunk, "split", torch.split, "tensor_split"):
            dim = _arg(args, kwargs, 2, "dim", 0) % dims
            if dim == axis:
                raise Mixes("splits the row axis")
            return tuple(axis for _ in result)
        raise Mixes("is not an operation the row check knows")


def _sized_by_its_own_shape(sizes, size_axes, out_axis: int) -> None:
    """A view's size along the row axis must be read off a shape (or be -1): a number written into the graph
    (torch.export bakes the batch in) would give a chunk the whole batch's size."""
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes, size_axes = sizes[0], size_axes[0]
    if out_axis < len(sizes):
        size, tracked = sizes[out_axis], size_axes[out_axis]
        if isinstance(size, int) and size != -1 and not isinstance(tracked, Shape):
            raise Mixes("sizes the row axis by a number written into the graph (torch.export bakes the batch in)")


def _op(target):
    """A torch function or method name as the rules know it; an aten op (torch.export's graphs) by its name."""
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    return target


def _leaves(value) -> list:
    """The leaves of nested lists, tuples, dicts and slices (None and Shape are leaves too)."""
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, slice):  # fx maps into slices too
        return _leaves((value.start, value.stop, value.step))
    return [value]


def _tensors(values, axes) -> list[tuple[torch.Tensor, int | None]]:
    """(tensor, row axis) for every tensor among the arguments (axes mirrors values)."""
    return [(v, a) for v, a in zip(_leaves(values), _leaves(axes)) if isinstance(v, torch.Tensor)]


def _rope(x, axis, tables, table_axes) -> int:
    """The rotary kernel: x (batch, heads, tokens, head_dim) with tables of (tokens, head_dim) for every row,
    or of (batch or 1, [1,] tokens, head_dim), one per row (not broadcast from the right, as eager's spelling
    unsqueezes them)."""
    if axis != 0:
        raise Mixes("rotates a value whose rows are not its leading axis")
    for table, own in zip(tables, table_axes):
        if own is None and table.dim() >= 3 and table.shape[0] != 1:
            raise Mixes("pairs each row with a different slice of a value that is the same for every row")
        if own not in (None, 0):
            raise Mixes("combines values whose rows lie along different axes")
    return 0


def _broadcast(operands, out_dim: int) -> int:
    """Elementwise: every row-carrying operand's rows on one output axis (axes align from the right), and no
    operand that is the same for every row spreading values over that axis."""
    axes = {a + out_dim - v.dim() for v, a in operands if a is not None}
    if len(axes) != 1:
        raise Mixes("combines values whose rows lie along different axes")
    axis = axes.pop()
    for value, own in operands:
        at = axis - (out_dim - value.dim())
        if own is None and at >= 0 and value.shape[at] != 1:
            raise Mixes("pairs each row with a different slice of a value that is the same for every row")
    return axis


def _leading(operands, out_dim: int, matrix_dims: int) -> int:
    """matmul / attention: rows must lie in the leading (batch) axes of the operands, as in _broadcast."""
    axis = _broadcast(operands, out_dim)
    if axis >= out_dim - matrix_dims:
        raise Mixes("multiplies along the row axis")
    return axis


def _reduction(target, args, kwargs, axis) -> int:
    x = args[0]
    dims = _arg(args, kwargs, DIM_AT.get(target, 1), "dim", None)
    if dims is None:
        raise Mixes("reduces over every axis, the row axis too")
    dims = [d % x.dim() for d in ([dims] if isinstance(dims, int) else dims)]
    if axis in dims:
        raise Mixes("works along the row axis")
    if target in ALONG_AXIS or _arg(args, kwargs, KEEPDIM_AT.get(target, 2), "keepdim", False):
        return axis
    return axis - sum(d < axis for d in dims)


def _reshaped(x: torch.Tensor, axis: int, result: torch.Tensor, rows: int) -> int:
    """A view: each row is a contiguous run of the flat tensor within each index of the axes before the
    row axis; the rows survive on the output axis whose preceding axes hold as many elements, if its size
    is a multiple of the rows (each row a run of it)."""
    before = math.prod(x.shape[:axis])
    for out_axis in range(result.dim()):
        if math.prod(result.shape[:out_axis]) == before and result.shape[out_axis] % rows == 0:
            return out_axis
        if math.prod(result.shape[:out_axis]) > before:
            break
    raise Mixes("reshapes the row axis into other axes")


def _index(value: torch.Tensor, axis: int, index) -> int:
    """Basic indexing (ints, slices, None, ...): where the row axis goes; it must be taken whole."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, torch.Tensor) or isinstance(i, (list, bool)) for i in index):
        raise Mixes("indexes with a tensor or a list")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        fill = value.dim() - sum(i is not None for i in index if i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    source = out = 0
    for item in index:
        if item is None:
            out += 1
            continue
        if source == axis:
            if item != slice(None):
                raise Mixes("indexes into the row axis")
            return out
        source += 1
        out += 0 if isinstance(item, int) else 1
    return out + (axis - source)


def _free_of_rows(values, axes, kwaxes) -> None:
    """Weights and the like: operands that must be the same for every row."""
    if any(a is not None for a in _leaves((axes, kwaxes))):
        raise Mixes("takes row-carrying values where weights go")


def _arg(args, kwargs, index: int, name: str, default):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default
