"""partition: one flat fx.Graph -> a chain of stages (prologue, blocks, epilogue), each a template call.

The blocks are the longest run of sibling modules of one class (a ModuleList of layers), found from
the `nn_module_stack` that both fx and export record on every node. A model without such a run is
cut at its top-level children. Structurally equal stages share one template: a pure function
`template(*weights, *buffers, *inputs) -> tuple(outputs)` with no state, so a block's code is bound
to whichever weight slot holds it by passing views.
"""
from __future__ import annotations

import copy
import keyword
import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.node import _get_qualified_name

from .trace import Traced


class ValueName(str):
    """The name of a graph value inside the model's output structure (other leaves are constants)."""


def resolve_output(output, values: dict):
    """The model's output structure with every ValueName replaced by its value."""
    return pytree.tree_map(lambda leaf: values[leaf] if isinstance(leaf, ValueName) else leaf, output)


@dataclass
class Template:
    name: str
    graph: fx.Graph
    """Placeholders: weights, then buffers, then inputs. Output: a tuple of the stage's outputs."""
    weight_names: list[str]
    """Local weight names (block prefix stripped), in placeholder order."""
    n_buffers: int
    n_inputs: int
    tail: object = None
    """passes/tiles.Tail: the nodes after the last attention that keep tokens apart; a str saying why
    there are none; None until the costs pass has looked."""
    _compiled: dict = field(default_factory=dict, repr=False)

    def function(self, device, tile_tokens: int | None = None) -> fx.GraphModule:
        """The template as a callable for one device; with tile_tokens, its tail runs in token tiles of that
        many tokens (codegen/tiles). Export bakes the trace-time device into factory calls and moves
        (arange(..., device='cpu'), x.to('cpu')); those constants are pointed at `device`."""
        device = torch.device(device)
        key = device, tile_tokens
        if key not in self._compiled:
            root, graph = torch.nn.Module(), self.graph
            if tile_tokens is not None:
                from mtc.codegen.tiles import TokenTiles, tiled_graph  # codegen builds on passes

                graph, tail_graph = tiled_graph(graph, self.tail)
                root.token_tiles = TokenTiles(_on_device(tail_graph, device), self.tail, tile_tokens)
            self._compiled[key] = fx.GraphModule(root, _on_device(graph, device), class_name=self.name)
        return self._compiled[key]


def _on_device(graph: fx.Graph, device: torch.device) -> fx.Graph:
    """A copy of `graph` with its device constants pointed at `device`."""
    graph = copy.deepcopy(graph)
    for node in graph.nodes:
        if isinstance(node.kwargs.get("device"), (torch.device, str)):
            node.update_kwarg("device", device)
        node.args = tuple(device if isinstance(a, torch.device) else a for a in node.args)
    return graph


@dataclass
class Stage:
    name: str
    template: Template
    params: list[str]
    """Canonical parameter names bound to the template's weight placeholders, in order."""
    buffers: list[str]
    inputs: list[str]
    """Names of values (graph nodes) this stage reads from earlier stages or the graph inputs."""
    outputs: list[str]
    """Names of values this stage produces that later stages or the model output read."""
    nodes: list[str] = field(default_factory=list, repr=False)


@dataclass
class Partition:
    stages: list[Stage]
    templates: list[Template]
    graph_inputs: list[str]
    output: object
    """The model output's structure, with each fx.Node replaced by its ValueName."""
    shared_params: list[str]
    """Parameters read by more than one stage (tied weights): kept resident for the whole step."""
    chain: str
    """What the blocks are, e.g. 'layers.* (LlamaBlock) x 32' or 'top-level children'."""

    def offloadable_inputs(self, index: int) -> list[str]:
        """Inputs of stage `index` that no later stage and not the model output read, made by an earlier
        stage: between its forward and its backward, only its backward needs them (a block's boundary
        input, but not the rotary tables every block reads)."""
        later = {name for stage in self.stages[index + 1:] for name in stage.inputs}
        later |= {leaf for leaf in pytree.tree_leaves(self.output) if isinstance(leaf, ValueName)}
        return [name for name in self.stages[index].inputs
                if name not in later and name not in self.graph_inputs]

    def summary(self) -> str:
        lines = [f"{len(self.stages)} stages, {len(self.templates)} templates; blocks: {self.chain}"]
        for stage in self.stages:
            lines.append(f"  {stage.name:<16} template {stage.template.name:<14} params {len(stage.params):>3}"
                         f"  in {len(stage.inputs)}  out {len(stage.outputs)}  nodes {len(stage.nodes)}")
        if self.shared_params:
            lines.append(f"  shared (resident): {', '.join(self.shared_params)}")
        return "\n".join(lines)


_COMPUTE = ("call_function", "call_method", "call_module")


def partition_pass(traced: Traced) -> Partition:
    graph = traced.graph
    compute = [n for n in graph.nodes if n.op in _COMPUTE]
    stacks = [_module_paths(n) for n in compute]
    members, chain = _block_chain(stacks)
    groups = _segment(compute, stacks, members)

    output_node = next(n for n in graph.nodes if n.op == "output")

    attr_users = {}  # parameter name -> stages that read it
    stages, templates, by_signature = [], [], {}
    for index, (name, nodes) in enumerate(groups):
        stage, signature, graph_of_stage = _build_stage(name, nodes, index, output_node, traced, groups)
        for param in stage.params:
            attr_users.setdefault(param, set()).add(index)
        template = by_signature.get(signature)
        if template is None:
            template = Template(_template_name(nodes, name, templates), graph_of_stage[0], graph_of_stage[1],
                                len(stage.buffers), len(stage.inputs))
            by_signature[signature] = template
            templates.append(template)
        stage.template = template
        stages.append(stage)

    shared = sorted(p for p, users in attr_users.items() if len(users) > 1)
    output = fx.node.map_arg(output_node.args[0], lambda n: ValueName(n.name))
    graph_inputs = [n.name for n in graph.nodes if n.op == "placeholder"]
    return Partition(stages, templates, graph_inputs, output, shared, chain)


def _module_paths(node: fx.Node) -> list[tuple[str, str]]:
    """(path, class name) of the modules a node was traced inside, outermost first, root left out."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for path, cls in stack.values():
        if path:
            paths.append((path, cls if isinstance(cls, str) else cls.__qualname__))
    return paths


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _block_chain(stacks) -> tuple[set[str], str]:
    """The sibling modules of one class that cover the most nodes, each in one contiguous run."""
    spans, classes = {}, {}
    for index, stack in enumerate(stacks):
        for path, cls in stack:
            first, last, count = spans.get(path, (index, index, 0))
            spans[path] = (first, index, count + 1)
            classes[path] = cls
    siblings = {}
    for path in spans:
        siblings.setdefault((_parent(path), classes[path]), []).append(path)
    best, best_score = None, (0, 0)
    for (parent, cls), paths in siblings.items():
        if len(paths) < 2:
            continue
        ordered = sorted(paths, key=lambda p: spans[p][0])
        contiguous = all(all(p == path for p, _ in stacks[i] if (_parent(p), classes[p]) == (parent, cls))
                         for path in ordered for i in range(spans[path][0], spans[path][1] + 1))
        score = (sum(spans[p][2] for p in paths), len(paths))
        if contiguous and score > best_score:
            best, best_score = (parent, cls, ordered), score
    if best is not None:
        parent, cls, ordered = best
        return set(ordered), f"{parent + '.' if parent else ''}* ({cls}) x {len(ordered)}"
    top = {stack[0][0] for stack in stacks if stack}
    return top, "top-level children (no repeated block found)"


def _segment(compute, stacks, members):
    """Cut the node list into named stages: prologue, one stage per member run, epilogue."""
    owner = [next((p for p, _ in stack if p in members), None) for stack in stacks]
    owned = [i for i, o in enumerate(owner) if o is not None]
    if not owned:
        return [("model", compute)]
    first, last = owned[0], owned[-1]
    groups, seen = [], {}
    if first > 0:
        groups.append(("prologue", compute[:first]))
    current = None
    for index in range(first, last + 1):
        # A node outside every member (a top-level op between blocks) stays with the block before it.
        if owner[index] is not None and owner[index] != current:
            current = owner[index]
            seen[current] = seen.get(current, 0) + 1
            name = current if seen[current] == 1 else f"{current}#{seen[current]}"
            groups.append((name, []))
        groups[-1][1].append(compute[index])
    if last + 1 < len(compute):
        groups.append(("epilogue", compute[last + 1:]))
    return groups


def _build_stage(name, nodes, index, output_node, traced, groups):
    in_stage = {n.name for n in nodes}
    params, buffers, inputs, outputs = [], [], [], []
    attr_nodes, input_nodes = {}, {}
    for node in nodes:
        for used in node.all_input_nodes:
            if used.op == "get_attr":
                attr_nodes.setdefault(used.name, used)
            elif used.name not in in_stage:
                input_nodes.setdefault(used.name, used)
    later = {n.name for _, group in groups[index + 1:] for n in group} | {output_node.name}
    for node in nodes:
        if any(user.name in later for user in node.users):
            outputs.append(node.name)

    prefix = name.split("#")[0] + "." if name not in ("prologue", "epilogue", "model") else ""
    weights = [n for n in attr_nodes.values() if n.target in traced.param_names]
    buffer_nodes = [n for n in attr_nodes.values() if n.target not in traced.param_names]
    params = [traced.param_names[n.target] for n in weights]
    buffers = [traced.buffer_names[n.target] for n in buffer_nodes]
    inputs = list(input_nodes)

    graph = fx.Graph()
    env = {}
    local_names = []
    for node in weights + buffer_nodes:
        full = traced.param_names.get(node.target) or traced.buffer_names[node.target]
        local = full[len(prefix):] if prefix and full.startswith(prefix) else full
        local_names.append(local)
        env[node.name] = graph.placeholder(_identifier(local))
    for value in inputs:
        env[value] = graph.placeholder(value)
        if "val" in input_nodes[value].meta:  # the traced value (export's): its dtype tells the kernel patterns
            env[value].meta["val"] = input_nodes[value].meta["val"]
    for node in nodes:
        env[node.name] = graph.node_copy(node, lambda n: env[n.name])
    graph.output(tuple(env[name] for name in outputs))
    graph.lint()

    position = {n: i for i, n in enumerate([n.name for n in weights + buffer_nodes] + inputs + [n.name for n in nodes])}
    signature = (tuple(local_names[:len(weights)]), len(buffers), len(inputs), len(outputs),
                 tuple(_node_signature(n, position) for n in nodes),
                 tuple(position[o] for o in outputs))
    stage = Stage(name, None, params, buffers, inputs, outputs, [n.name for n in nodes])
    return stage, signature, (graph, local_names[:len(weights)])


def _identifier(name: str) -> str:
    """'0.weight' -> 'p_0_weight': a placeholder name must be a Python identifier."""
    name = re.sub(r"\W", "_", name)
    return name if name.isidentifier() and not keyword.iskeyword(name) else f"p_{name}"


def _node_signature(node, position):
    target = node.target if isinstance(node.target, str) else _get_qualified_name(node.target)
    refer = lambda n: ("ref", position[n.name])  # noqa: E731
    return (node.op, target, repr(fx.node.map_arg(node.args, refer)), repr(fx.node.map_arg(node.kwargs, refer)))


def _template_name(nodes, stage_name, templates):
    stacks = [_module_paths(n) for n in nodes]
    base = next((cls for stack in stacks for path, cls in stack if path == stage_name.split("#")[0]), stage_name)
    base = base.rsplit(".", 1)[-1]
    taken = {t.name for t in templates}
    name, suffix = base, 2
    while name in taken:
        name, suffix = f"{base}{suffix}", suffix + 1
    return name
