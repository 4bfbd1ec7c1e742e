"""costs: bytes and FLOPs per stage, by running every template on meta tensors (no memory, no compute).

The same pass checks what the runtime relies on: the model returns a scalar loss that depends on
its parameters, and which values between stages carry gradients.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from mtc.codegen.tiles import TILE_TOKENS, TokenTiles

from .partition import Partition, resolve_output
from .rows import RowAxes, StageRows
from .tiles import UNKNOWN, TokenAxes, find_tail


class LossError(TypeError):
    """The model's forward does not return a scalar loss."""


@dataclass
class StageCost:
    name: str
    template: str
    params: int
    """Parameters whose weights stream with this stage (shared ones are counted once, resident)."""
    weight_bytes: int
    """Bytes of those weights in the compute dtype: one copy-in."""
    grad_bytes: int
    """Bytes of their gradient in the compute dtype: one copy-out."""
    saved_bytes: int
    """Bytes of the stage's tensor inputs, kept from its forward until its backward recomputes it."""
    forward_bytes: int
    """Peak transient bytes while the forward runs without autograd."""
    backward_bytes: int
    """Peak transient bytes while the stage is recomputed and differentiated: its activations, two of the
    largest intermediate's size for the gradients in flight, and the weight gradients."""
    forward_flops: int
    """Matrix-multiply and attention FLOPs of one forward (causal attention counted as half the square)."""
    activation_bytes: int = 0
    """What autograd saves in the forward for the backward, besides the weights and the stage's inputs (at
    most every intermediate once; attention as a fused kernel keeps it: q, k, v, output, log-sum-exp).
    Held from forward to backward when the stage keeps its activations instead of recomputing them."""
    offload_bytes: int = 0
    """Bytes of the inputs only this stage's backward reads again (Partition.offloadable_inputs): what
    crosses to the host and back when the stage offloads its input."""
    rows: int = 0
    """Rows of the batch, when the stage treats them independently (passes/rows); 0 when it does not.
    With two or more it can run in token chunks of fewer rows."""
    one_row_forward_bytes: int = 0
    """forward_bytes and backward_bytes for one row of the batch (when rows > 0): a chunk's working set
    lies between them and the whole batch's, linearly in its rows."""
    one_row_backward_bytes: int = 0
    tiles: int = 0
    """Token tiles the stage's position-wise tail (passes/tiles) runs in at this shape; 0 when it has none."""
    tiled_forward_bytes: int = 0
    """forward_bytes and backward_bytes with the tail in those tiles (a recomputed stage's, codegen/tiles)."""
    tiled_backward_bytes: int = 0


@dataclass
class Costs:
    stages: list[StageCost]
    resident_bytes: int
    """Shared (tied) weights and their gradients, and all buffers: on the device for the whole step."""
    shared: StageCost | None
    """The weights read by several stages (tied embeddings): copied in once, updated once, a step."""
    grad_inputs: dict[str, bool]
    """Value name -> whether it carries a gradient (depends on a parameter)."""
    loss: object
    """How to find the loss in the model output: ('tensor',), ('attr', 'loss') or ('key', 'loss')."""
    row_axes: list[StageRows] = dataclasses.field(default_factory=list)
    """Per stage: where its inputs and outputs hold the batch's rows, or why it cannot run in chunks."""
    tile_tokens: int = TILE_TOKENS
    """Tokens per tile of a tiled tail (StageCost.tiles)."""
    ranks: int = 1
    """Data-parallel ranks, each with these costs on its own rows of the batch (runtime/distributed)."""


def costs_pass(partition: Partition, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
               inputs: list, compute_dtype: torch.dtype, unflatten_output,
               tile_tokens: int = TILE_TOKENS) -> Costs:
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    env = dict(zip(partition.graph_inputs, (meta(v) for v in inputs)))
    weights = {name: torch.empty(p.shape, dtype=_compute(p, compute_dtype), device="meta", requires_grad=True)
               for name, p in params.items()}
    shared = set(partition.shared_params)
    # The batch: the leading size of the first input of two or more axes; its rows lie along axis 0 of
    # every input that leads with it.
    rows = next((v.shape[0] for v in inputs if isinstance(v, torch.Tensor) and v.dim() >= 2), 1)
    row_env = {name: 0 if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows else None
               for name, v in env.items()}
    # The tokens: axis 1 of every input that leads with (batch, sequence).
    shape = next((tuple(v.shape[:2]) for v in inputs if isinstance(v, torch.Tensor) and v.dim() >= 2), None)
    token_env = {name: None if not isinstance(v, torch.Tensor) or v.dim() == 0
                 else 1 if shape and tuple(v.shape[:2]) == shape else UNKNOWN for name, v in env.items()}
    results, row_axes = [], []
    tiled_by_signature = {}  # equal blocks at equal shapes: one tiled profile, not one per block
    for index, stage in enumerate(partition.stages):
        stage_inputs = [env[name] for name in stage.inputs]
        weights_and_buffers = [weights[p] for p in stage.params] + [meta(buffers[b]) for b in stage.buffers]
        args = weights_and_buffers + stage_inputs
        function = stage.template.function("meta")
        placeholders = [n.name for n in function.graph.nodes if n.op == "placeholder"]
        input_placeholders = placeholders[len(weights_and_buffers):]
        tracker = RowAxes(rows, dict(zip(input_placeholders, (row_env[name] for name in stage.inputs))))
        tokens = TokenAxes(shape[1] if shape else 1, dict(zip(input_placeholders,
                                                              (token_env[name] for name in stage.inputs))))
        profile = _MemoryProfile(function, [tracker, tokens])
        saved = _SavedForBackward(known=args)
        with FlopCounterMode(display=False) as flops, saved, torch.enable_grad():
            outputs = profile.run(*args)
        env.update(zip(stage.outputs, outputs))
        output_axes = tracker.output_axes(output_node(function))
        input_axes = [row_env[name] for name in stage.inputs]
        why_not = tracker.why_not or (None if any(a is not None for a in input_axes)
                                      else "no input holds the batch's rows")
        row_axes.append(StageRows(input_axes, output_axes, why_not))
        row_env.update(zip(stage.outputs, [None] * len(stage.outputs) if tracker.mixing else output_axes))
        token_env.update(zip(stage.outputs, tokens.output_axes(output_node(function))))
        if stage.template.tail is None:
            stage.template.tail = find_tail(function.graph, tokens)
        own_bytes = own_bytes_of(stage, weights, shared)
        signature = (stage.template.name, own_bytes, *(
            (tuple(v.shape), v.dtype, v.requires_grad) if isinstance(v, torch.Tensor) else repr(v) for v in args))
        if signature not in tiled_by_signature:
            tiled_by_signature[signature] = _tiled_costs(stage.template, args, own_bytes, tile_tokens)
        tiled = tiled_by_signature[signature]
        one_row = None
        if why_not is None:  # the working sets of one row: a chunk's lie between those and the batch's
            one_row, one_row_saved = _MemoryProfile(function), _SavedForBackward(known=weights_and_buffers)
            with one_row_saved, torch.enable_grad():
                one_row.run(*weights_and_buffers, *(_one_row(v, a, rows) for v, a in
                                                    zip(stage_inputs, row_axes[-1].inputs)))
        own = [p for p in stage.params if p not in shared]
        grad_bytes = own_bytes  # in the compute dtype until it reaches the host
        saved_inputs = sum(t.nbytes for t in stage_inputs if isinstance(t, torch.Tensor))
        activations = min(saved.bytes, profile.saved_total)  # as _backward_bytes counts them
        offloadable = sum(env[name].nbytes for name in partition.offloadable_inputs(index)
                          if isinstance(env[name], torch.Tensor))
        results.append(StageCost(
            stage.name, stage.template.name, sum(weights[p].numel() for p in own), own_bytes, grad_bytes,
            saved_inputs, profile.peak_forward, _backward_bytes(profile, own_bytes, saved.bytes),
            int(flops.get_total_flops()) + profile.attention_flops, activations, offloadable,
            rows if one_row else 0, one_row.peak_forward if one_row else 0,
            _backward_bytes(one_row, own_bytes, one_row_saved.bytes) if one_row else 0, *tiled))

    output = unflatten_output(resolve_output(partition.output, env))
    loss, how = find_loss(output)
    if not (loss.dim() == 0 and loss.is_floating_point()):
        raise LossError(f"the model's loss must be a scalar floating-point tensor; got shape "
                        f"{tuple(loss.shape)} and dtype {loss.dtype}")
    if not loss.requires_grad:
        raise LossError("the model's loss does not depend on any parameter, so there is nothing to train")
    grad_inputs = {name: isinstance(v, torch.Tensor) and v.requires_grad for name, v in env.items()}
    shared_cost = None
    if shared:
        shared_cost = StageCost("shared", "-", sum(weights[p].numel() for p in shared),
                                sum(weights[p].nbytes for p in shared), sum(weights[p].numel() * 4 for p in shared),
                                0, 0, 0, 0)
    buffer_bytes = sum(b.nbytes for b in buffers.values() if isinstance(b, torch.Tensor))
    resident = buffer_bytes + (shared_cost.weight_bytes + shared_cost.grad_bytes if shared_cost else 0)
    return Costs(results, resident, shared_cost, grad_inputs, how, row_axes, tile_tokens)


def output_node(function: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(function.graph.nodes) if n.op == "output")


def own_bytes_of(stage, weights: dict, shared: set) -> int:
    """Bytes of the weights that stream with the stage (not the shared ones)."""
    return sum(weights[p].nbytes for p in stage.params if p not in shared)


def _tiled_costs(template, args: list, own_bytes: int, tile_tokens: int) -> tuple[int, int, int]:
    """(tiles, forward bytes, backward bytes) of the stage with its tail in token tiles; zeros without a tail."""
    if isinstance(template.tail, str):
        return 0, 0, 0
    profile, saved = _MemoryProfile(template.function("meta", tile_tokens)), _SavedForBackward(known=args)
    with saved, torch.enable_grad():
        profile.run(*args)
    # What the tail leaves for the rest of the backward: its (unfilled) outputs, which the replay holds until
    # the backward ends, and its inputs' whole gradients, alive through attention's backward. 8B at 128k
    # tokens measured 13.4 GiB for a tiled block's backward on the H100 where the sum without them gave 11.6.
    return (profile.tiles, profile.peak_forward,
            _backward_bytes(profile, own_bytes, saved.bytes) + profile.tile_carried_bytes)


def _tile_bytes(tiles: TokenTiles, args: list, outputs) -> tuple[int, int, int]:
    """(tiles, bytes a tiled tail's backward holds besides its inputs, bytes it leaves to the rest of the
    stage's backward). The first: one tile's recomputed working set, the whole gradients of its
    token-carrying inputs, the fp32 sums of its weights' gradients. The second: those whole gradients and
    the tail's outputs."""
    spans = tiles.tiles(args)
    start, count = spans[0]
    piece = tiles.slice(args, tiles.input_axes, tiles.positions(args), start, count)
    leaves = [torch.empty(v.shape, dtype=v.dtype, device="meta").requires_grad_(v.requires_grad)
              if isinstance(v, torch.Tensor) else v for v in piece]
    profile, saved = _MemoryProfile(tiles.tail), _SavedForBackward(known=leaves)
    with saved, torch.enable_grad():
        profile.run(*leaves)
    differentiated = [(v, a) for v, a in zip(args, tiles.input_axes) if isinstance(v, torch.Tensor) and v.requires_grad]
    tile_weight_grads = sum(leaf.nbytes for leaf, a in zip(leaves, tiles.input_axes)
                            if isinstance(leaf, torch.Tensor) and leaf.requires_grad and a is None)
    whole_grads = sum(v.nbytes for v, a in differentiated if a is not None)
    sums = sum(4 * v.numel() for v, a in differentiated if a is None)
    output_bytes = sum(t.nbytes for t in outputs if isinstance(t, torch.Tensor))
    return (len(spans), _backward_bytes(profile, tile_weight_grads, saved.bytes) + whole_grads + sums,
            whole_grads + output_bytes)


def _backward_bytes(profile: "_MemoryProfile", weight_grad_bytes: int, saved_bytes: int) -> int:
    """A recomputed backward's working set: the activations, two of the largest intermediate's size for
    the gradients in flight, the weight gradients, and the largest working set a kernel allocates inside."""
    return (min(saved_bytes, profile.saved_total) + 2 * profile.largest + weight_grad_bytes
            + max([*profile.transients.values(), *profile.backward_transients.values()], default=0))


def _one_row(value, axis: int | None, rows: int):
    """A meta value cut to one row of the batch along its row axis."""
    if axis is None or not isinstance(value, torch.Tensor):
        return value
    return value.narrow(axis, 0, value.shape[axis] // rows)


def find_loss(output):
    """The loss in a model output: the output itself, output.loss, or output['loss']."""
    if isinstance(output, torch.Tensor):
        return output, ("tensor",)
    if isinstance(output, dict) and isinstance(output.get("loss"), torch.Tensor):
        return output["loss"], ("key", "loss")
    if isinstance(getattr(output, "loss", None), torch.Tensor):
        return output.loss, ("attr", "loss")
    raise LossError(f"the model's forward must return a scalar loss tensor, or an output with .loss "
                    f"(as Hugging Face models do when called with labels); it returned {type(output).__name__}")


def _compute(param: torch.Tensor, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if param.is_floating_point() else param.dtype


class _SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Bytes autograd keeps for the backward, each storage once, not counting the stage's own weights and
    inputs (the slot and the kept boundary hold those)."""

    def __init__(self, known):
        self.known = {id(t) for t in known if isinstance(t, torch.Tensor)}
        self.storages: dict[int, int] = {}
        self.keep = []  # hold what was saved so ids stay unique while counting

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if id(tensor) not in self.known and id(base) not in self.known:
                self.storages[id(base)] = base.nbytes
                self.keep.append(base)
            return tensor

        super().__init__(pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


ATTENTION = (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention)


class _FusedAttention(torch.autograd.Function):
    """scaled_dot_product_attention as the GPU runs it (a fused kernel): on meta, PyTorch decomposes it
    and would count its full score matrix, which flash and memory-efficient attention never hold."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, out,
                              query.new_empty(query.shape[:-1], dtype=torch.float32))  # log-sum-exp
        return out

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("costs only run forward")


def _attention_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, is_causal


def _attention_flops(query, key, value, is_causal: bool) -> int:
    """QK^T and PV: 2 * batch*heads * Sq * Sk * (d_qk + d_v), with the query's heads (grouped keys are not
    repeated); a causal mask skips half the square."""
    *batch, sq, d_qk = query.shape
    sk, d_v = key.shape[-2], value.shape[-1]
    flops = 2 * math.prod(batch) * sq * sk * (d_qk + d_v)
    return flops // 2 if is_causal else flops


class _MemoryProfile(fx.Interpreter):
    """Runs a template on meta tensors and records, per node, the bytes it allocates (views: none)."""

    def __init__(self, module, trackers=()):
        super().__init__(module)
        self.sizes = {}
        self.transients = {}
        """Bytes a node allocates and frees again while it runs (a kernel's working set)."""
        self.backward_transients = {}
        """The same for a node's backward only."""
        self.attention_flops = 0
        self.trackers = trackers
        """passes/rows.RowAxes and passes/tiles.TokenAxes: each visits every node."""
        self.tiles = self.tile_carried_bytes = 0
        """Token tiles of the tiled tail the template calls, if it calls one, and what its backward leaves."""

    def call_function(self, target, args, kwargs):
        if target in ATTENTION:
            query, key, value, is_causal = _attention_args(*args, **kwargs)
            self.attention_flops += _attention_flops(query, key, value, bool(is_causal))
            return _FusedAttention.apply(query, key, value)
        return super().call_function(target, args, kwargs)

    def run_node(self, node):
        result = super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        for tracker in self.trackers:
            tracker.visit(node, args, kwargs, result)
        if node.op not in ("placeholder", "output"):
            tensors = [t for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
            # One of several results (getitem of a tuple) was counted with the node that made them.
            picked = node.target is operator.getitem and isinstance(args[0], (tuple, list))
            self.sizes[node] = 0 if picked else sum(t.nbytes for t in tensors if t._base is None)
        declared = getattr(node.target, "working_bytes", None) if node.op == "call_function" else None
        if declared is not None:  # a kernel's own allocations, which the graph does not show (codegen/patterns)
            held, transient = declared(*args, **kwargs)
            self.sizes[node] += held
            self.transients[node] = transient
        if node.op == "call_function" and node.target in ATTENTION:
            # Fused attention's backward makes dq, dk and dv at once, and flash attention accumulates dq
            # in fp32 besides: 8B at 224k tokens went 4 GiB over its plan without this.
            query, key, value, _ = _attention_args(*args, **kwargs)
            self.backward_transients[node] = 3 * query.nbytes + key.nbytes + value.nbytes
        if node.op == "call_module" and isinstance(self.fetch_attr(node.target), TokenTiles):
            self.tiles, self.transients[node], self.tile_carried_bytes = _tile_bytes(
                self.fetch_attr(node.target), args, result)
        return result

    @property
    def saved_total(self) -> int:
        return sum(self.sizes.values())

    @property
    def largest(self) -> int:
        return max(self.sizes.values(), default=0)

    @property
    def peak_forward(self) -> int:
        """Peak of live intermediates when each is freed after its last user (outputs kept)."""
        nodes = list(self.module.graph.nodes)
        last_use = {}
        for index, node in enumerate(nodes):
            for used in node.all_input_nodes:
                last_use[used] = index
        live = peak = 0
        for index, node in enumerate(nodes):
            live += self.sizes.get(node, 0)
            peak = max(peak, live + self.transients.get(node, 0))
            for used in node.all_input_nodes:
                if last_use[used] == index and nodes[-1] not in used.users:
                    live -= self.sizes.get(used, 0)
        return peak


# -- costs as functions of the batch and the sequence length ----------------------------------------

BATCH, SEQ = sympy.symbols("b s", positive=True, integer=True)
MONOMIALS = (sympy.Integer(1), BATCH, SEQ, BATCH * SEQ, SEQ**2, BATCH * SEQ**2)
"""Terms a stage's bytes and FLOPs are made of: weights (1), per-sequence tables (s, s^2), per-token
activations and matmuls (b*s), attention (b*s^2)."""
SHAPED = ("saved_bytes", "forward_bytes", "backward_bytes", "forward_flops", "activation_bytes", "offload_bytes",
          "rows", "one_row_forward_bytes", "one_row_backward_bytes", "tiles", "tiled_forward_bytes",
          "tiled_backward_bytes")
"""StageCost fields that depend on the input shapes; the others (weights, gradients) do not."""
TILED = ("tiles", "tiled_forward_bytes", "tiled_backward_bytes")


@dataclass
class SymbolicCosts:
    """Every stage's shaped costs as sympy polynomials of b (batch) and s (sequence length), fitted
    exactly on a grid of shapes around the example and checked at a shape outside it. A field whose
    check fails (a peak that switches between intermediates as the shapes grow) is None: at() then
    runs the costs pass at the asked shape instead."""
    base: Costs
    expressions: list[dict[str, sympy.Expr | None]]
    costs_at: object
    """(batch, seq) -> Costs: the costs pass itself, for fields that are not polynomials."""

    def at(self, batch: int, seq: int) -> Costs:
        if any(e is None for fields in self.expressions for e in fields.values()):
            return self.costs_at(batch, seq)
        values = {BATCH: batch, SEQ: seq}
        stages = [dataclasses.replace(stage, **{f: int(e.subs(values)) for f, e in fields.items()})
                  for stage, fields in zip(self.base.stages, self.expressions)]
        return dataclasses.replace(self.base, stages=stages)

    def describe(self, stage: int) -> dict[str, str]:
        return {f: ("(not a polynomial: evaluated per shape)" if e is None else str(e))
                for f, e in self.expressions[stage].items()}


def symbolic_costs(costs_at, batch: int, seq: int) -> SymbolicCosts:
    """Fit SymbolicCosts from the costs pass at b in {batch, 2 batch} x s in {seq, 2 seq, 3 seq} (a grid
    on which the six monomials are independent), checked at (3 batch, 4 seq)."""
    grid = [(b, s) for b in (batch, 2 * batch) for s in (seq, 2 * seq, 3 * seq)]
    samples = [costs_at(b, s) for b, s in grid]
    check = costs_at(3 * batch, 4 * seq)
    system = sympy.Matrix([[m.subs({BATCH: b, SEQ: s}) for m in MONOMIALS] for b, s in grid])
    inverse = system.inv()
    expressions = []
    for index in range(len(samples[0].stages)):
        fields = {}
        for name in SHAPED:
            values = sympy.Matrix([getattr(c.stages[index], name) for c in samples])
            expression = sum(c * m for c, m in zip(inverse * values, MONOMIALS))
            exact = expression.subs({BATCH: 3 * batch, SEQ: 4 * seq}) == getattr(check.stages[index], name)
            # Tiles step with the tokens: a grid below one tile's worth would extrapolate no tiling.
            tiled = name in TILED and samples[0].stages[index].tiles
            fields[name] = sympy.expand(expression) if exact and not tiled else None
        expressions.append(fields)
    return SymbolicCosts(samples[0], expressions, costs_at)  # grid[0] is the example's own shape


def reshaped(inputs: list, batch: int, seq: int, new_batch: int, new_seq: int) -> list:
    """The inputs as meta tensors for another batch and sequence length: a leading (batch, seq) becomes
    (new_batch, new_seq), a leading batch alone new_batch; other inputs are kept."""
    def one(value):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            return value
        shape = list(value.shape)
        if shape[0] == batch:
            shape[0] = new_batch
            if len(shape) > 1 and shape[1] == seq:
                shape[1] = new_seq
        return torch.empty(shape, dtype=value.dtype, device="meta")
    return [one(v) for v in inputs]
