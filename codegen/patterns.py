"""The block patterns the Triton kernels replace, found by structure in a template's fx graph (torch.fx's
and torch.export's spellings both) and each replaced by one call; everything unmatched stays as it was.

A call runs its kernel on a GPU (or on the CPU in Triton's interpreter, TRITON_INTERPRET=1) and the eager
spelling anywhere else, so a graph with kernels still runs where the plan's costs are traced (meta) and
on a CPU without the interpreter."""
import operator
import os

import torch
from torch import fx

KERNELS = ("rmsnorm", "swiglu", "rope", "linear_cross_entropy")


# The calls import their kernels on use: triton is there on Linux only, and mtc plans anywhere.


def _kernels_run_on(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or tensor.is_meta or os.environ.get("TRITON_INTERPRET") == "1"


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    from .kernels import rmsnorm as kernel

    if _kernels_run_on(x) and weight.dim() == 1 and weight.shape[0] == x.shape[-1]:
        return kernel.rmsnorm(x, weight, eps)
    return kernel.rmsnorm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    from .kernels import swiglu as kernel

    if _kernels_run_on(gate) and gate.shape == up.shape and gate.dtype == up.dtype:
        return kernel.swiglu(gate, up)
    return kernel.swiglu_reference(gate, up)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    from .kernels import rope as kernel

    tokens, head_dim = x.shape[-2:] if x.dim() == 4 else (None, None)
    tables = cos.shape == sin.shape and cos.shape[-2:] == (tokens, head_dim) and (
        cos.dim() in (2, 3) or (cos.dim() == 4 and cos.shape[1] == 1))
    if _kernels_run_on(x) and tables and head_dim % 2 == 0 and not (cos.requires_grad or sin.requires_grad):
        return kernel.rope(x, cos, sin, in_place)
    return kernel.rope_reference(x, cos, sin)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         reduction: str) -> torch.Tensor:
    from .kernels import linear_cross_entropy as kernel

    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if _kernels_run_on(hidden) and weight.dim() == 2 and hidden.dtype == weight.dtype:
        return kernel.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)
    return kernel.linear_cross_entropy_reference(hidden, weight, targets, ignore_index, reduction)


def _loss_working_bytes(hidden, weight, targets, ignore_index, reduction) -> tuple[int, int]:
    from .kernels import linear_cross_entropy as kernel

    return kernel.working_bytes(hidden, weight)


linear_cross_entropy.working_bytes = _loss_working_bytes
"""What the call holds for the backward and allocates while it runs, which the graph does not show: the
planner adds it (passes/costs)."""

_CALLS = {"rmsnorm": rmsnorm, "swiglu": swiglu, "rope": rope, "linear_cross_entropy": linear_cross_entropy}
_FUNCTIONS = {operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add", torch.rsqrt: "rsqrt",
              torch.nn.functional.silu: "silu", operator.getitem: "getitem", operator.neg: "neg", torch.neg: "neg",
              torch.cat: "cat", torch.nn.functional.linear: "linear", torch._C._nn.linear: "linear",
              torch.nn.functional.cross_entropy: "cross_entropy", getattr: "getattr"}


def _op(node) -> str | None:
    """A node's operation by name, whichever tracer wrote it (operator.mul, Tensor.mul, aten.mul.Tensor)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return node.target.overloadpacket.__name__
        return _FUNCTIONS.get(node.target)
    return None


def _cast_to(node) -> torch.dtype | None:
    """The dtype `node` casts to, if it is a dtype cast (x.float(), x.to(dtype), aten.to.dtype/_to_copy)."""
    if _op(node) == "float":
        return torch.float32
    if _op(node) in ("to", "_to_copy"):
        dtype = node.kwargs.get("dtype", node.args[1] if len(node.args) > 1 else None)
        return dtype if isinstance(dtype, torch.dtype) else None
    return None


def _dtype(node) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def _other(node: fx.Node, first):
    """A binary node's two arguments as (the one `first` picks, the other), or None."""
    a, b = node.args[:2]
    return (a, b) if first(a) else (b, a) if first(b) else None


def _match_rmsnorm(out: fx.Node, weights: set) -> tuple | None:
    """(x, weight, eps) if out = weight · cast_back(xf · rsqrt(mean(xf², -1, keepdim) + eps)), xf = x in
    fp32, the cast back to x's dtype (type_as(·, x), a cast to its dtype, or none when x is fp32)."""
    if _op(out) != "mul" or len(out.args) != 2:
        return None
    picked = _other(out, lambda a: a in weights)
    if picked is None:
        return None
    weight, normed = picked
    back_to = None
    if _op(normed) == "type_as":
        normed, back_to = normed.args
    elif _cast_to(normed) is not None:
        normed, back_to = normed.args[0], _cast_to(normed)
    if _op(normed) != "mul":
        return None
    picked = _other(normed, lambda a: _op(a) == "rsqrt")
    if picked is None:
        return None
    rsqrt, xf = picked
    added = rsqrt.args[0]
    if _op(added) != "add" or not isinstance(added.args[1], float):
        return None
    mean, eps = added.args
    dims = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if _op(mean) != "mean" or dims not in (-1, [-1], (-1,)) or keepdim is not True:
        return None
    squared = mean.args[0]
    if _op(squared) != "pow" or squared.args[0] is not xf or squared.args[1] != 2:
        return None
    x = xf.args[0] if _cast_to(xf) == torch.float32 else xf
    # The kernel rounds the normalised row to x's dtype: the graph must cast back to exactly that.
    if isinstance(back_to, fx.Node):
        same = back_to is x
    elif back_to is not None:
        same = back_to == _dtype(x)
    else:
        same = x is xf  # no cast at all: x is already fp32
    return (x, weight, eps) if same else None


def _match_swiglu(out: fx.Node, weights: set) -> tuple | None:
    """(gate, up) if out = silu(gate) · up."""
    if _op(out) != "mul" or len(out.args) != 2:
        return None
    picked = _other(out, lambda a: _op(a) == "silu" and not a.kwargs.get("inplace", False))
    if picked is None or not isinstance(picked[1], fx.Node):
        return None
    activation, up = picked
    return activation.args[0], up


def _halves(first, second) -> fx.Node | None:
    """x if `first` and `second` are x's two halves along its last dimension (x.chunk(2, -1) or slices)."""
    if _op(first) == "getitem" or _op(second) == "getitem":
        chunk = first.args[0] if _op(first) == "getitem" else None
        if chunk is None or _op(second) != "getitem" or second.args[0] is not chunk or _op(chunk) != "chunk":
            return None
        dim = chunk.args[2] if len(chunk.args) > 2 else chunk.kwargs.get("dim", 0)
        if chunk.args[1] != 2 or dim != -1 or (first.args[1], second.args[1]) != (0, 1):
            return None
        return chunk.args[0]
    if _op(first) != "slice" or _op(second) != "slice" or first.args[0] is not second.args[0]:
        return None
    x = first.args[0]
    value = x.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.shape[-1] % 2:
        return None
    half, last = value.shape[-1] // 2, value.dim() - 1
    return x if (first.args[1:4] == (last, 0, half) and second.args[1] == last and second.args[2] == half
                 and second.args[3] >= 2 * half) else None


def _match_rope(out: fx.Node, weights: set) -> tuple | None:
    """(x, cos, sin) if out = x·cos + cat(-x₂, x₁)·sin, x₁ and x₂ the halves of x's last dimension."""
    if _op(out) != "add" or len(out.args) != 2 or not all(_op(a) == "mul" for a in out.args):
        return None
    for straight, rotated in (out.args, out.args[::-1]):
        picked = _other(rotated, lambda a: _op(a) == "cat")
        if picked is None:
            continue
        cat, sin = picked
        pieces, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if len(pieces) != 2 or dim != -1 or _op(pieces[0]) != "neg":
            continue
        x = _halves(pieces[1], pieces[0].args[0])
        if x is None or x not in straight.args[:2]:
            continue
        cos = straight.args[1] if straight.args[0] is x else straight.args[0]
        if isinstance(cos, fx.Node) and isinstance(sin, fx.Node):
            return x, cos, sin
    return None


def _flattens_to_rows(flat: fx.Node, logits: fx.Node) -> bool:
    """Whether `flat` is the logits as (tokens, vocabulary): view/reshape(·, -1, V), V their last size (as
    traced, or read off their shape)."""
    sizes = flat.args[1:]
    sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else tuple(sizes)
    if len(sizes) != 2 or sizes[0] != -1:
        return False
    last = sizes[1]
    value = logits.meta.get("val")
    if isinstance(last, int):
        return isinstance(value, torch.Tensor) and value.shape[-1] == last
    # x.shape[-1], read off the logits or their cast
    return (_op(last) == "getitem" and last.args[1] == -1 and _op(last.args[0]) == "getattr"
            and last.args[0].args[1] == "shape" and last.args[0].args[0] in (logits, flat.args[0]))


_REDUCTIONS = {0: "none", 1: "mean", 2: "sum"}  # aten's enum


def _match_linear_cross_entropy(out: fx.Node, weights: set) -> tuple | None:
    """(hidden, weight, targets, ignore_index, reduction) if out = cross_entropy(flat(fp32(linear(hidden,
    weight))), targets) with no class weights or label smoothing, the logits read by nothing else but the
    graph's output (which a step never returns: see apply_kernels) and shape queries."""
    if _op(out) not in ("cross_entropy", "cross_entropy_loss"):
        return None
    bound = fx.operator_schemas.normalize_function(out.target, out.args, out.kwargs,
                                                   normalize_to_only_use_kwargs=True)
    if bound is None:
        return None
    ce = bound.kwargs
    reduction = _REDUCTIONS.get(ce.get("reduction", "mean"), ce.get("reduction", "mean"))
    if (ce.get("weight") is not None or ce.get("label_smoothing", 0.0) != 0.0 or reduction not in ("mean", "sum")
            or ce.get("size_average") is not None or ce.get("reduce") is not None):
        return None
    flat, targets = ce.get("input", ce.get("self")), ce["target"]  # aten names the logits self
    if _op(flat) not in ("view", "reshape") or not isinstance(targets, fx.Node):
        return None
    logits = flat.args[0]
    cast = logits if _cast_to(logits) == torch.float32 else None
    if cast is not None:
        logits = cast.args[0]
    linear_args = logits.args if _op(logits) == "linear" else ()
    if len(linear_args) not in (2, 3) or (len(linear_args) == 3 and linear_args[2] is not None) \
            or logits.kwargs.get("bias") is not None:
        return None
    hidden, weight = linear_args[:2]
    if cast is None and _dtype(logits) != torch.float32:  # the softmax is taken in fp32: eager must do so too
        return None
    if not _flattens_to_rows(flat, logits):
        return None
    for made, reader in ((logits, cast or flat), (cast, flat)):  # besides the next step of the pattern
        if made is not None and any(r is not reader and r.op != "output" and _op(r) != "getattr" for r in made.users):
            return None
    return hidden, weight, targets, ce.get("ignore_index", -100), reduction


_MATCHERS = {"rmsnorm": _match_rmsnorm, "swiglu": _match_swiglu, "rope": _match_rope,
             "linear_cross_entropy": _match_linear_cross_entropy}


def kernel_names(kernels, device: torch.device | None = None) -> tuple[str, ...]:
    """The `kernels=` option as names. "auto": all of them on a GPU with triton, none elsewhere (on a CPU
    the calls would run the eager spelling anyway); "all"; "none"; some of KERNELS; or "-name"s: those
    switched off from "auto"'s choice. Names may come as a list or comma-separated."""
    if not isinstance(kernels, (str, list, tuple)) or not all(isinstance(k, str) for k in kernels):
        raise TypeError(f"kernels={kernels!r} is not valid: expected a string or a list of kernel names")
    given = tuple(k for k in kernels.split(",") if k) if isinstance(kernels, str) else tuple(kernels)
    if given in (("all",), ("none",), ("auto",)):
        if given == ("auto",):
            return KERNELS if device is not None and device.type == "cuda" and _triton_present() else ()
        return KERNELS if given == ("all",) else ()
    off = [k[1:] for k in given if k.startswith("-")]
    unknown = [k for k in (off or given) if k not in KERNELS]
    if unknown or (off and len(off) != len(given)):
        raise ValueError(f"kernels={kernels!r} is not valid: " + (f"{unknown} unknown" if unknown else
                         "names and -names mixed") + f"; expected \"auto\", \"all\", \"none\", some of "
                         f"{KERNELS}, or some of them as -name (switched off)")
    return tuple(k for k in kernel_names("auto", device) if k not in off) if off else given


def _triton_present() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernels_pass(partition, kernels, device: torch.device | None = None) -> dict[str, dict[str, int]]:
    """Every template's graph with the named kernels (kernel_names) in place of their patterns; per
    template, how many of each went in (templates with none are left out)."""
    names = kernel_names(kernels, device)
    used = {}
    for template in {id(stage.template): stage.template for stage in partition.stages}.values():
        weights = [n for n in template.graph.nodes if n.op == "placeholder"][:len(template.weight_names)]
        counts = apply_kernels(template.graph, set(weights), names)
        if counts:
            used[template.name] = counts
    return used


def apply_kernels(graph: fx.Graph, weights: set, kernels=KERNELS) -> dict[str, int]:
    """Replace in `graph` every match of the named kernels by one call (`weights`: the nodes that are
    weights); returns how many of each were replaced."""
    replaced = {}
    for name in kernels:
        for node in list(graph.nodes):
            match = _MATCHERS[name](node, weights)
            if match is None:
                continue
            with graph.inserting_before(node):
                call = graph.call_function(_CALLS[name], match)
            call.meta.update({k: v for k, v in node.meta.items() if k in ("val", "nn_module_stack")})
            node.replace_all_uses_with(call)
            graph.erase_node(node)
            if name == "linear_cross_entropy":
                _unreturn_logits(graph, *match[:2])
            replaced[name] = replaced.get(name, 0) + 1
    _erase_unused(graph)
    for node in graph.nodes:
        if node.target is rope and _fresh_and_read_once(node.args[0]):
            node.args = (*node.args[:3], True)  # in place
    graph.lint()
    return replaced


_VIEWS = {"view", "reshape", "unflatten", "transpose", "permute", "alias", "unsqueeze"}


def _fresh_and_read_once(x: fx.Node) -> bool:
    """Whether `x` is a product of its stage (a projection's output, through views of it) that one node reads
    and nothing saves for a backward (a linear keeps its input, not its output): that reader may overwrite it."""
    node = x
    while isinstance(node, fx.Node) and len(node.users) == 1:
        if _op(node) == "linear":
            return True
        if _op(node) not in _VIEWS:
            return False
        node = node.args[0]
    return False


def _unreturn_logits(graph: fx.Graph, hidden: fx.Node, weight: fx.Node) -> None:
    """The fused loss never makes the logits: a graph output that was them (a Hugging Face model's logits)
    becomes None. A step returns only the loss, so nothing it returned is lost."""
    output = graph.output_node()
    for node in output.all_input_nodes:
        made = node.args[0] if _cast_to(node) is not None else node
        if _op(made) == "linear" and tuple(made.args[:2]) == (hidden, weight):
            output.replace_input_with(node, None)


_PURE = {"mul", "add", "rsqrt", "mean", "pow", "float", "to", "_to_copy", "type_as", "silu", "getitem", "neg", "cat",
         "chunk", "slice", "linear", "view", "reshape", "getattr", "alias"}
"""The operations the patterns are made of: none changes its inputs, so one nobody reads can go."""


def _erase_unused(graph: fx.Graph) -> None:
    """The matched patterns' insides, now unread (not graph-wide dead code elimination: an in-place method
    call whose result is unused is not dead)."""
    for node in reversed(list(graph.nodes)):
        if not node.users and node.op in ("call_function", "call_method") and _op(node) in _PURE:
            graph.erase_node(node)
