"""store: the training state on the host, one set of flat buffers per weight group.

A group is one stage's own parameters (or the shared, tied ones). Per group: flat fp32 `master`,
`exp_avg` and `exp_avg_sq` (pageable: only the CPU optimizer reads them) and `stream`, the weights
in the compute dtype: the bytes that cross to the device, pinned when the device is a GPU.

Gradients land in `grad`. For a stage computed in bf16 that is `stream` itself: once a stage's
backward has its weights on the device, the host copy is not read again until the optimizer has
rewritten it, so the gradient can borrow it, and the host holds 4 + 8 + 2 = 14 bytes per parameter.
In fp32 `stream` is `master`, and the shared group's gradient (summed over stages in fp32) needs
its own fp32 buffer.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from mtc.config import format_bytes

from .disk import SLABS, DiskTier
from .preflight import available_host_bytes, check_locked_memory, describe_host_memory, pin_in_place

ALIGN = 16
"""Each parameter starts at a multiple of 16 elements (64 B in fp32) so its view is vector-aligned."""


class HostMemoryError(MemoryError):
    """The host cannot hold the training state."""


@dataclass
class Slice:
    name: str
    shape: torch.Size
    offset: int

    @property
    def numel(self) -> int:
        return self.shape.numel()


def layout(params: list[tuple[str, torch.Size]]) -> tuple[list[Slice], int]:
    slices, offset = [], 0
    for name, shape in params:
        slices.append(Slice(name, torch.Size(shape), offset))
        offset += -(-torch.Size(shape).numel() // ALIGN) * ALIGN
    return slices, offset


STREAMED, SHARED, RESIDENT, DISK = "streamed", "shared", "resident", "disk"
"""Kinds of group: a stage whose weights stream; the tied weights (on the device all step, updated on the
host); a stage kept whole on the device (weights, gradient, master and moments; updated there); a stage whose
weights stream and whose fp32 optimizer state is in a file (runtime/disk), the stream copy in RAM."""


class Group:
    def __init__(self, name: str, params: list[tuple[str, torch.Size]], compute_dtype: torch.dtype, kind: str,
                 device: torch.device, parallel=None):
        self.name, self.kind = name, kind
        self.slices, self.numel = layout(params)
        self.shard = (0, self.numel)
        if parallel is not None:
            self.numel = parallel.padded(self.numel)
            self.shard = parallel.shard(self.numel) if kind != RESIDENT else (0, self.numel)
        on = device if kind == RESIDENT else torch.device("cpu")
        self.disk_names = Group.on_disk(compute_dtype) if kind == DISK else ()
        """The state buffers kept in a file (None here but while DiskTier binds them)."""
        zeros = lambda dtype=torch.float32: torch.zeros(self.length, dtype=dtype, device=on)  # noqa: E731
        self.master = zeros() if "master" not in self.disk_names else None
        self.exp_avg = self.exp_avg_sq = None
        if not self.disk_names:
            self.exp_avg, self.exp_avg_sq = zeros(), zeros()
        self.step = torch.zeros((), dtype=torch.float32, device=on)
        self.stream = self.master if compute_dtype == torch.float32 else zeros(compute_dtype)
        grad_in_stream = kind in (STREAMED, DISK) and compute_dtype != torch.float32
        self.grad = self.stream if grad_in_stream else zeros(compute_dtype if kind == RESIDENT else torch.float32)
        if device.type == "cuda" and kind != RESIDENT:
            for buffer in {id(b): b for b in (self.stream, self.grad) if b is not self.master}.values():
                pin_in_place(buffer)

    @staticmethod
    def on_disk(compute_dtype: torch.dtype) -> tuple[str, ...]:
        """What a disk group keeps in its file: the moments, and the master weights unless they are the stream copy
        (fp32 compute), which the copy-ins read from RAM."""
        return ("exp_avg", "exp_avg_sq") if compute_dtype == torch.float32 else ("master", "exp_avg", "exp_avg_sq")

    @property
    def length(self) -> int:
        """Elements of each state buffer here: this rank's shard under data parallel, else the whole group."""
        return self.shard[1] - self.shard[0]

    def bind(self, state: dict[str, torch.Tensor] | None) -> None:
        """A disk group's state buffers, read into RAM by DiskTier (None: released again)."""
        for name in self.disk_names:
            setattr(self, name, state[name] if state is not None else None)

    @property
    def sharded(self) -> bool:
        return self.shard != (0, self.numel)

    def shard_pieces(self) -> list[tuple[int, int]]:
        """[start, end) within this rank's shard of each parameter's part in it, in the group's order."""
        start, end = self.shard
        pieces = [(max(p.offset, start) - start, min(p.offset + p.numel, end) - start) for p in self.slices]
        return [(a, b) for a, b in pieces if a < b]

    @staticmethod
    def host_bytes(numel: int, compute_dtype: torch.dtype, kind: str, device: torch.device, ranks: int = 1) -> int:
        """Host bytes a group of `numel` elements allocates on each of `ranks` data-parallel ranks (a shard each,
        but a resident group whole), a disk group's staging aside: what the preflight check adds up."""
        if kind == RESIDENT and device.type != "cpu":
            return 0
        numel = -(-numel // ranks) if kind != RESIDENT else numel
        low = compute_dtype != torch.float32
        stream = numel * compute_dtype.itemsize if low else 0
        grad = 0 if kind in (STREAMED, DISK) and low else numel * (compute_dtype.itemsize if kind == RESIDENT else 4)
        return numel * 12 + stream + grad - Group.disk_bytes(numel, compute_dtype, kind)

    @staticmethod
    def disk_bytes(numel: int, compute_dtype: torch.dtype, kind: str, ranks: int = 1) -> int:
        """Bytes of a group's state in its file (0 unless a disk group)."""
        return 4 * -(-numel // ranks) * len(Group.on_disk(compute_dtype)) if kind == DISK else 0

    def load(self, values: dict[str, torch.Tensor] | None, parallel=None) -> None:
        """The master weights (and the stream copy) from `values`, by parameter name. Under data parallel only rank
        0 gives values: it sends each rank its shard (a resident group whole)."""
        full = self.master if not self.sharded and self.master.device.type == "cpu" else \
            torch.zeros(self.numel, dtype=torch.float32) if values is not None else None
        if values is not None:
            for piece in self.slices:
                master, value = self.view(full, piece), values[piece.name].detach()
                if value.data_ptr() != master.data_ptr():  # else initialised in place (see materialised)
                    master.copy_(value)
        if parallel is not None and self.sharded:
            parallel.scatter(self.master, full)
        elif parallel is not None:
            full = full if full is not None else torch.empty(self.numel, dtype=torch.float32)
            parallel.broadcast(full)
        if full is not self.master and not self.sharded:
            self.master.copy_(full)
        if self.stream is not self.master:
            self.stream.copy_(self.master)

    @staticmethod
    def view(flat: torch.Tensor, piece: Slice) -> torch.Tensor:
        return flat[piece.offset:piece.offset + piece.numel].view(piece.shape)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {piece.name: self.view(flat, piece) for piece in self.slices}


@contextlib.contextmanager
def materialised(model: torch.nn.Module | None, names: list[str], init, into: dict[str, torch.Tensor] | None = None):
    """The parameters and buffers `names` as CPU tensors.

    Meta ones are created on the CPU and initialised by `init(module)` for each module that owns one,
    then put back on the meta device, so a model built on the meta device is never whole in memory. Those
    named in `into` (of its shape and dtype) are made there instead: a host group's master weights, which
    init then writes directly, with no module-sized tensor beside them.
    """
    def lookup(name):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        return module, getattr(module, attr)

    into = into or {}
    owners = {}
    for name in names:
        module, tensor = lookup(name)
        if tensor.is_meta:
            owners[id(module)] = (module, name.rpartition(".")[0])
    for module, prefix in owners.values():
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for attr, tensor in list(tensors.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                target = into.get(f"{prefix}.{attr}" if prefix else attr)
                if target is None or target.shape != tensor.shape or target.dtype != tensor.dtype:
                    target = torch.empty_like(tensor, device="cpu")
                tensors[attr] = torch.nn.Parameter(target, tensor.requires_grad) if kind == "_parameters" else target
        init(module)
    try:
        yield {name: lookup(name)[1] for name in names}
    finally:
        for module, _ in owners.values():
            module.to_empty(device="meta", recurse=False)


def reset_parameters(module: torch.nn.Module) -> None:
    """The default `init`: the module's own reset_parameters()."""
    if not hasattr(module, "reset_parameters"):
        names = [n for n, _ in module.named_parameters(recurse=False)] + \
                [n for n, _ in module.named_buffers(recurse=False)]
        raise ValueError(f"{type(module).__name__} holds meta tensors {names} but has no reset_parameters(); "
                         f"pass init=fn to mtc.compile, where fn(module) initialises one module's own tensors")
    module.reset_parameters()


FIXED_HOST_BYTES = 5 << 30
"""Host memory besides the store: CUDA and torch libraries, the optimizer's chunk, the process. Measured
4.6 GiB on the H100 box for an 8B run (BENCHMARKS.md, issue 3, including 1 GiB of benchmark buffers)."""


def stage_kind(index: int, resident, disk) -> str:
    """The kind of group a plan whose `resident` and `disk` stages are these makes of stage `index`."""
    return RESIDENT if index in resident else DISK if index in disk else STREAMED


def planned_host_bytes(schedule, compute_dtype: torch.dtype, device: torch.device) -> int:
    """The store's host bytes for a schedule on each of its data-parallel ranks, before anything is allocated
    (alignment padding aside): disk groups' staging slabs included."""
    ranks, resident, disk = schedule.ranks, set(schedule.resident), set(schedule.disk)
    total = sum(Group.host_bytes(stage.params, compute_dtype, stage_kind(index, resident, disk), device, ranks)
                for index, stage in enumerate(schedule.stages))
    total += SLABS * max((Group.disk_bytes(schedule.stages[i].params, compute_dtype, DISK, ranks) for i in schedule.disk),
                         default=0)
    if schedule.shared:
        total += Group.host_bytes(schedule.shared.params, compute_dtype, SHARED, device, ranks)
    return total + sum(schedule.stages[i].offload_bytes for i in schedule.offload)  # offloaded inputs


class StateStore:
    """Every stage's group, the shared group, and the model's buffers (kept on the compute device)."""

    def __init__(self, stage_params: list[list[str]], shared: list[str], params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], compute_dtype: torch.dtype, device: torch.device,
                 model: torch.nn.Module | None = None, init=None, progress: bool = True,
                 resident: list[int] = (), parallel=None, disk: list[int] = (), nvme: str | None = None):
        """parallel: the data-parallel ranks (runtime/distributed.DataParallel), or None. Then this rank keeps its
        shard of each streamed and the shared group, and rank 0 initialises the weights and sends them out.
        disk: stages whose optimizer state is kept in files under the directory `nvme` (runtime/disk)."""
        init = init or reset_parameters
        self.compute_dtype, self.device, self.parallel = compute_dtype, device, parallel
        ranks = parallel.ranks if parallel else 1
        first = parallel is None or parallel.rank == 0
        shared_set = set(shared)
        specs = [(f"stage{i}", [n for n in names if n not in shared_set], stage_kind(i, resident, disk))
                 for i, names in enumerate(stage_params)]
        if shared:
            specs.append(("shared", list(shared), SHARED))
        sizes = [layout([(n, params[n].shape) for n in names])[1] for _, names, _ in specs]
        needed = sum(Group.host_bytes(numel, compute_dtype, kind, device, ranks)
                     for numel, (_, _, kind) in zip(sizes, specs))
        needed += SLABS * max((Group.disk_bytes(numel, compute_dtype, kind, ranks)
                               for numel, (_, _, kind) in zip(sizes, specs)), default=0)
        self.host_bytes = needed
        self.host_params = sum(-(-numel // ranks) for numel, (_, _, kind) in zip(sizes, specs)
                               if Group.host_bytes(numel, compute_dtype, kind, device))
        """Elements whose state is on this rank's host (host_bytes / host_params: bytes per parameter)."""
        available = available_host_bytes()
        if parallel is not None:  # the ranks on this host share its RAM; all of them refuse, or none
            available = parallel.smallest(available if available is not None else -1)
            available = available // parallel.local_ranks if available >= 0 else None
        if available is not None and needed > available:
            already = sum(p.numel() * p.element_size() for p in params.values() if not p.is_meta)
            raise HostMemoryError(
                f"the training state needs {format_bytes(needed)} of host RAM ({needed / max(1, self.host_params):.1f} "
                f"bytes per parameter: fp32 master and two Adam moments, plus the bf16 copy that streams) but only "
                f"{format_bytes(available)} is available ({describe_host_memory()}"
                + (f", shared by this host's {parallel.local_ranks} ranks" if parallel else "") + ")" + (
                    f"; the model's own materialised parameters hold {format_bytes(already)}: build it on the "
                    f"meta device (with torch.device('meta')) and mtc initialises it block by block" if already else ""))
        if device.type == "cuda":  # the copies' buffers (stream copies, gradient slabs), not the fp32 state
            check_locked_memory(sum(Group.host_bytes(numel, compute_dtype, kind, device, ranks) - 12 * -(-numel // ranks)
                                    + Group.disk_bytes(numel, compute_dtype, kind, ranks)
                                    for numel, (_, _, kind) in zip(sizes, specs) if kind != RESIDENT))
        self.disk = None
        if disk:
            if nvme is None:
                raise ValueError(f"stages {list(disk)} are to keep their state on disk but no nvme directory was given")
            self.disk = DiskTier(nvme)

        start = time.perf_counter()
        groups = []
        total = sum(numel for numel in sizes)
        with _progress(total, progress and first, "mtc: building the state store") as bar:
            for (name, names, kind), numel in zip(specs, sizes):
                group = Group(name, [(n, params[n].shape) for n in names], compute_dtype, kind, device, parallel)
                if self.disk is not None and kind == DISK:
                    self.disk.add(group)
                with self.state_of(group, write=True):
                    # Initialised straight into the host's master weights where they are whole there.
                    whole = group.master.device.type == "cpu" and not group.sharded
                    if first:
                        with _values(model, params, names, init, group.views(group.master) if whole else None) as values:
                            group.load(values, parallel)
                    else:
                        group.load(None, parallel)
                groups.append(group)
                bar.update(numel)
        self.build_seconds = time.perf_counter() - start
        self.groups = groups[:len(stage_params)]
        self.shared = groups[len(stage_params)] if shared else None

        used = {n for names in stage_params for n in names}
        # Parameters the loss never reads get no gradient; torch.optim leaves them alone and so do we.
        unused = [n for n in params if n not in used]
        with _values(model, params, unused, init) as values:
            self.unused = {n: v.detach().float().clone() for n, v in values.items()}
        with _values(model, buffers, list(buffers), init) as values:
            self.buffers = {name: b.to(device) for name, b in values.items()}
        self.order = [name for name in params if name in used]
        """Trained parameters in the model's own order (clipping sums their norms in this order)."""

    def place(self, resident: list[int], disk: list[int] = (), nvme: str | None = None) -> None:
        """Move stage groups between device, host and disk so that exactly `resident` are on the device and
        `disk` keep their state in files under `nvme`; the state (master, moments, step count, weights) goes with
        them. Under data parallel every rank calls it: a group leaving the device keeps this rank's shard, one
        coming to it gathers every rank's."""
        if disk and self.disk is None:
            self.disk = DiskTier(nvme)
        for index, group in enumerate(self.groups):
            kind = stage_kind(index, resident, disk)
            if group.kind != kind:
                moved = Group(group.name, [(s.name, s.shape) for s in group.slices], self.compute_dtype, kind,
                              self.device, self.parallel)
                if kind == DISK:
                    self.disk.add(moved)
                with self.state_of(group), self.state_of(moved, write=True):
                    for name in ("master", "exp_avg", "exp_avg_sq", "step", "stream"):
                        source, target = getattr(group, name), getattr(moved, name)
                        if source.numel() > target.numel():  # whole -> this rank's shard
                            source = source[slice(*moved.shard)]
                        elif source.numel() < target.numel():  # a shard -> whole
                            source = self.parallel.host_all_gather(source.cpu())
                        target.copy_(source)
                if group.kind == DISK:
                    self.disk.remove(group)
                self.groups[index] = moved

    @contextlib.contextmanager
    def state_of(self, group: Group, write: bool = False):
        """The group with all its state in RAM meanwhile: a disk group's read from its file (and written back on
        exit if `write`); any other as it is. The optimizer thread must be idle."""
        if group.kind != DISK:
            yield group
            return
        with self.disk.state(group, write) as state:
            group.bind(state)
            try:
                yield group
            finally:
                group.bind(None)

    def all_groups(self) -> list[Group]:
        return self.groups + ([self.shared] if self.shared else [])

    def whole(self, group: Group, buffer: torch.Tensor) -> torch.Tensor:
        """One of `group`'s state buffers (master, exp_avg, exp_avg_sq) whole: under data parallel every rank
        calls this and gets every rank's shards gathered."""
        return self.parallel.host_all_gather(buffer) if group.sharded else buffer

    def whole_on_first(self, group: Group, buffer: torch.Tensor) -> torch.Tensor | None:
        """As whole(), gathered on rank 0 only (None on the others): what a checkpoint writes."""
        if not group.sharded:
            return buffer
        return self.parallel.gather_to_first(buffer)

    def named_parameters(self):
        """(name, fp32 master weight) of every parameter; under data parallel a collective: every rank must
        iterate, each gets the whole weights (a group at a time)."""
        for group in self.all_groups():
            with self.state_of(group):
                master = self.whole(group, group.master)
                master = master.clone() if "master" in group.disk_names and master is group.master else master
            for piece in group.slices:
                yield piece.name, group.view(master, piece)
        yield from self.unused.items()


@contextlib.contextmanager
def _values(model, source: dict[str, torch.Tensor], names: list[str], init, into=None):
    """source[name] for each name, with meta tensors materialised (and released afterwards) by the model,
    where `into` names (see materialised)."""
    meta = [n for n in names if isinstance(source[n], torch.Tensor) and source[n].is_meta]
    if meta and model is None:
        raise ValueError(f"{meta[:3]}{'...' if len(meta) > 3 else ''} are on the meta device and there is no "
                         f"model to initialise them from")
    with materialised(model, meta, init, into) if meta else contextlib.nullcontext({}) as created:
        yield {n: created.get(n, source[n]) for n in names}


def _progress(total: int, enabled: bool, description: str):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency; this keeps a broken environment usable
        return contextlib.nullcontext(type("NoBar", (), {"update": lambda self, n: None})())
    return tqdm(total=total, unit=" params", unit_scale=True, desc=description, disable=not enabled or None,
                leave=False)
