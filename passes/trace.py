"""trace: nn.Module -> one flat fx.Graph whose parameters are all get_attr nodes.

torch.fx first (tracing *through* every module, so a Linear is `linear(x, weight, bias)` and every
weight use is visible); torch.export (non-strict) when fx cannot trace. Both give the same thing
downstream: a graph, the flat list of its inputs, and the names of parameters and buffers.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree


class TraceError(RuntimeError):
    """Neither torch.fx nor torch.export could trace the model."""


@dataclass
class Traced:
    graph: fx.Graph
    tracer: str
    """'fx' or 'export'."""
    flatten_inputs: object
    """(args, kwargs) -> the graph's placeholder values, in order."""
    param_names: dict[str, str]
    """get_attr target -> canonical parameter name (tied weights share one)."""
    buffer_names: dict[str, str]
    """get_attr target -> canonical buffer / constant name."""
    constants: dict[str, torch.Tensor] = field(default_factory=dict)
    """Tensors the graph reads that the model does not own (export's lifted constants)."""
    out_spec: object = None
    """export returns flat outputs; this rebuilds the model's output structure from them."""

    def unflatten_output(self, values):
        return values if self.out_spec is None else pytree.tree_unflatten(list(values), self.out_spec)


class _ThroughEveryModule(fx.Tracer):
    """Trace into torch.nn modules too, so every weight appears as a get_attr node; buffers too, so that
    arithmetic on a buffer is traced rather than folded into a constant computed from today's value."""

    def __init__(self):
        super().__init__(param_shapes_constant=False)
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, module, qualified_name):
        return False


def trace_pass(model: torch.nn.Module, args: tuple, kwargs: dict,
               compute_dtype: torch.dtype = torch.float32) -> Traced:
    """compute_dtype: what the plan computes in. Export bakes the dtypes it sees into the graph (Hugging
    Face's `x.to(input_dtype)` after a norm's fp32 upcast becomes `to(float32)`), so it traces with the
    floating parameters in that dtype; fx traces symbolically and needs no such care."""
    signature = inspect.signature(model.forward)
    try:  # a wrong example is the user's mistake, not the tracers': say so before either tries
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(f"example does not match {type(model).__name__}.forward{signature}: {error}") from None
    try:
        return _trace_fx(model, args, kwargs)
    except Exception as fx_error:  # fx fails on shape-dependent Python, **kwargs, ...
        try:
            with _without_kv_cache(model), _causal_attention_without_mask(model, args, kwargs):
                return _trace_export(model, args, kwargs, compute_dtype)
        except Exception as export_error:
            where = _user_frame(export_error) or _user_frame(fx_error) or "unknown location"
            raise TraceError(
                f"cannot trace {type(model).__name__}: torch.fx failed with "
                f"{type(fx_error).__name__}: {_first_line(fx_error)}; torch.export failed at {where} with "
                f"{type(export_error).__name__}: {_first_line(export_error)}") from export_error


@contextlib.contextmanager
def _without_kv_cache(model):
    """A Hugging Face model returns its KV cache unless its config says not to: training has no use for
    it, and export cannot return the cache object. The config is as it was afterwards."""
    config = getattr(model, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


CAUSAL = "mtc_causal"
"""The attention implementation Hugging Face models trace with when nothing but causality masks them."""


@contextlib.contextmanager
def _causal_attention_without_mask(model, args, kwargs):
    """A Hugging Face model given no attention_mask builds a dense (batch, 1, T, T) causal mask under export
    (it skips it only when not tracing) and hands it to SDPA: 16 GiB at 128k tokens, and no flash kernel.
    With full attention in every layer (no sliding windows) and SDPA chosen, it traces instead with
    transformers' registered-attention hooks: no mask, and SDPA with is_causal=True, the same attention.
    The config is as it was afterwards."""
    config = getattr(model, "config", None)
    layer_types = getattr(config, "layer_types", None) or ()
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    mask = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments.get("attention_mask")
    if (getattr(config, "_attn_implementation", None) != "sdpa" or mask is not None or sliding
            or any(t != "full_attention" for t in layer_types)):
        yield
        return
    try:
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # a transformers without the hooks: its own mask, as before
        yield
        return

    def causal_attention(module, query, key, value, attention_mask, **options):
        # Keys and values repeated for grouped queries, as mtc's own Llama does: SDPA's enable_gqa traced on
        # CUDA fake tensors gave the keys' head count to the output (torch 2.13).
        groups = getattr(module, "num_key_value_groups", 1)
        return sdpa_attention_forward(module, query, repeat_kv(key, groups), repeat_kv(value, groups), None,
                                      **options)

    AttentionInterface.register(CAUSAL, causal_attention)
    AttentionMaskInterface.register(CAUSAL, lambda *args, **options: None)
    config._attn_implementation = CAUSAL
    try:
        yield
    finally:
        config._attn_implementation = "sdpa"


def _trace_fx(model, args, kwargs) -> Traced:
    signature = inspect.signature(model.forward)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        raise TypeError("fx cannot trace a forward with *args or **kwargs")
    bound = signature.bind(*args, **kwargs)
    # Arguments the example leaves out keep their defaults as constants, so `if mask is None:` traces.
    concrete = {name: p.default for name, p in signature.parameters.items() if name not in bound.arguments}
    graph = _ThroughEveryModule().trace(model, concrete_args=concrete)
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.target in concrete]:
        # concrete_args leave a placeholder behind that nothing reads.
        if not node.users:
            graph.erase_node(node)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]

    def flatten_inputs(call_args, call_kwargs):
        call = signature.bind(*call_args, **call_kwargs).arguments
        missing = [name for name in names if name not in call]
        if missing:
            raise TypeError(f"step() is missing argument(s) {missing} that the example provided")
        extra = [name for name in call if name not in names]
        if extra:
            raise TypeError(f"step() got argument(s) {extra} that the example did not provide")
        return [call[name] for name in names]

    params, buffers, constants = _attributes(model, model, graph)
    return Traced(graph, "fx", flatten_inputs, params, buffers, constants)


@contextlib.contextmanager
def _on_meta_in(model, dtype: torch.dtype):
    """The model's floating parameters as meta tensors of `dtype` and its buffers as meta tensors of their
    own dtypes (the runtime keeps buffers as they are), the originals back afterwards."""
    swapped = []
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for name, tensor in list(tensors.items()):
                if tensor is None or (tensor.is_meta and (kind == "_buffers" or tensor.dtype == dtype)):
                    continue
                swapped.append((tensors, name, tensor))
                if kind == "_buffers":
                    tensors[name] = tensor.to("meta")
                elif tensor.is_floating_point():
                    tensors[name] = torch.nn.Parameter(torch.empty(tensor.shape, dtype=dtype, device="meta"),
                                                       tensor.requires_grad)
                else:
                    tensors[name] = torch.nn.Parameter(tensor.to("meta"), tensor.requires_grad)
    try:
        yield
    finally:
        for tensors, name, tensor in swapped:
            tensors[name] = tensor


def _on_meta(value):
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def _trace_export(model, args, kwargs, compute_dtype: torch.dtype = torch.float32) -> Traced:
    if compute_dtype == torch.float32:
        exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    else:  # on the meta device: the device constants it bakes are retargeted anyway (Template.function)
        with _on_meta_in(model, compute_dtype):
            meta_args, meta_kwargs = pytree.tree_map(_on_meta, (tuple(args), dict(kwargs)))
            exported = torch.export.export(model, meta_args, meta_kwargs, strict=False)
    module = exported.module()
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # export's input guard
            graph.erase_node(node)
    _inline_wrapped_regions(module)
    for node in list(graph.nodes):
        # Export's checks that a tensor has the trace's dtype and device: the plan runs the graph in
        # another dtype (bf16) and on other devices (meta, cuda).
        if node.op == "call_function" and node.target in _METADATA_CHECKS and not node.users:
            graph.erase_node(node)
    graph.lint()
    in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))[1]

    def flatten_inputs(call_args, call_kwargs):
        leaves, spec = pytree.tree_flatten((tuple(call_args), dict(call_kwargs)))
        if spec != in_spec:
            raise TypeError(f"step() was called with a different argument structure than the example: "
                            f"{spec} vs {in_spec}")
        return leaves

    params, buffers, constants = _attributes(model, module, graph)
    out_spec = graph._codegen.pytree_info.out_spec
    return Traced(graph, "export", flatten_inputs, params, buffers, constants, out_spec)


_METADATA_CHECKS = {torch.ops.aten._assert_tensor_metadata.default}


def _inline_wrapped_regions(module: fx.GraphModule) -> None:
    """Export keeps `with torch.no_grad():` and `with torch.autocast(...)` regions (Hugging Face's rotary
    embeddings) as calls of submodules; the passes work on one flat graph, so their nodes move into it.
    A no-grad region's outputs are detached, as they would be; autocast regions must be disabled ones (their
    ops then run in the dtypes they are given, as anywhere else in the graph)."""
    graph = module.graph
    wrappers = {torch.ops.higher_order.wrap_with_set_grad_enabled: 1, torch.ops.higher_order.wrap_with_autocast: 4}
    while True:
        node = next((n for n in graph.nodes if n.op == "call_function" and n.target in wrappers), None)
        if node is None:
            return
        if node.target is torch.ops.higher_order.wrap_with_autocast and node.args[2] is not False:
            raise NotImplementedError("an enabled torch.autocast region inside the model; mtc sets the compute "
                                      "dtype itself (compute_dtype=)")
        grad_enabled = node.args[0] if node.target is torch.ops.higher_order.wrap_with_set_grad_enabled else True
        submodule_node = node.args[wrappers[node.target]]
        region = getattr(module, submodule_node.target)
        values = dict(zip([n for n in region.graph.nodes if n.op == "placeholder"],
                          node.args[wrappers[node.target] + 1:]))
        outputs = None
        with graph.inserting_before(node):
            for inner in region.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.node.map_arg(inner.args[0], lambda n: values[n])
                    continue
                if inner.op == "get_attr":  # a nested region's submodule: carried over under a fresh name
                    name = f"{submodule_node.target}_{inner.target}"
                    module.add_submodule(name, getattr(region, inner.target))
                    values[inner] = graph.get_attr(name)
                    continue
                values[inner] = graph.node_copy(inner, lambda n: values[n])
            if not grad_enabled:
                outputs = type(outputs)(graph.call_function(torch.ops.aten.detach.default, (o,)) for o in outputs)
        for user in list(node.users):  # getitem(wrapper, i)
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(node)
        if not submodule_node.users:
            graph.erase_node(submodule_node)


def _attributes(model, traced_module, graph):
    """Map each get_attr target to the name under which the model lists that parameter or buffer.
    Anything else read by get_attr is a constant the tracer made (fx's `_tensor_constant0`)."""
    canonical = {id(p): name for name, p in model.named_parameters()}
    canonical_buffers = {id(b): name for name, b in model.named_buffers()}
    params, buffers = {}, {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            value = _fetch_attr(model, node.target)
        except AttributeError:
            continue
        if id(value) in canonical:
            params[node.target] = canonical[id(value)]
        elif id(value) in canonical_buffers:
            buffers[node.target] = canonical_buffers[id(value)]
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in params and node.target not in buffers:
            constants[node.target] = _fetch_attr(traced_module, node.target)
            buffers[node.target] = node.target
    return params, buffers, constants


def _fetch_attr(module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else ""


def _user_frame(error: Exception) -> str | None:
    """The innermost traceback frame outside torch: the model line that could not be traced."""
    torch_dir = os.path.dirname(torch.__file__)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)
              and not f.filename.startswith(os.path.dirname(__file__))]
    if not frames:
        return None
    frame = frames[-1]
    return f"{frame.filename}:{frame.lineno} in {frame.name} ({(frame.line or '').strip()})"
