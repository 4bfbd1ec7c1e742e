"""Checkpoints: `mtc.save(step, path)` writes everything a step needs to go on exactly where it stopped;
`mtc.load(path, model, ...)` compiles the model again with that state; `mtc.from_pretrained(path, ...)`
compiles a Hugging Face checkpoint.

A checkpoint is a directory of safetensors files and one JSON file, nothing pickled, nothing run on load:
- model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json past SHARD_BYTES):
  the fp32 master weights under the model's own parameter names, the layout Hugging Face's
  from_pretrained reads;
- optimizer*.safetensors: each trained parameter's AdamW moments (`exp_avg.<name>`, `exp_avg_sq.<name>`)
  and step count (`step.<name>`), sharded the same way;
- buffers.safetensors: the model's buffers (rotary tables and the like), apart from the weights so that
  from_pretrained sees only parameters;
- rng.safetensors: the CPU generator's state and each CUDA device's;
- config.json, for a Hugging Face model: with the weights, what AutoModelForCausalLM.from_pretrained reads;
- mtc.json: the format, mtc and torch versions, the optimizer's hyperparameters, clipping, whether
  non-finite steps are skipped, the step count, every parameter's shape, the plan it ran under, and the
  caller's data position.

A save is written into a hidden sibling directory and renamed into place, so a save that is interrupted
(even by SIGKILL) never touches the last good checkpoint; should it stop between moving the old one aside
and renaming the new one in, load finds the old one and says so. Before writing, a save checks that the disk
has room for a whole new checkpoint (the old one stays until the new one is in place) and refuses if not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import json
import math
import os
import shutil
import tempfile
import warnings

import torch
from tqdm import tqdm

from mtc.config import AdamW, format_bytes
from mtc.runtime.preflight import free_disk_bytes

FORMAT = 1
SHARD_BYTES = 2 << 30
"""Largest shard: bounds the host memory a save borrows (one shard's tensors at a time)."""
METADATA_BYTES = 4 << 20
"""Room for what a checkpoint holds beside its tensors: mtc.json (with the plan: 94 KB of JSON for the 8b preset
at 4x4096), the RNG states (5 KB for the CPU's) and the safetensors headers (the tiny preset's 158 tensors: 31 KB
in all beside them)."""
META, RNG = "mtc.json", "rng.safetensors"


class CheckpointError(ValueError):
    """The directory is not a checkpoint this model and this mtc can resume from."""


class DiskSpaceError(OSError):
    """The disk has too little free space for a checkpoint; raised before anything is written."""


def save(step, path, data_position: dict | None = None, progress: bool = True) -> str:
    """Write `step`'s weights, optimizer state, RNG state and step count to the directory `path` (made or
    replaced whole); `data_position`: JSON-serialisable state of the caller's data (given back by load as
    step.data_position); progress: a bar over the bytes written (12 per parameter: master, two moments).
    Returns the path. A disk without room for the whole new checkpoint is refused (DiskSpaceError) before
    anything is written. Under data parallel every rank calls it: rank 0 writes every rank's shards, gathered
    a group at a time, in the format one process writes, and the others return once it is in place."""
    from safetensors.torch import save_file

    import mtc

    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(f"path={path!r} exists and is not an mtc checkpoint (no {META}); mtc.save replaces "
                              f"only its own checkpoints: choose a new path or remove it")
    try:
        json.dumps(data_position)
    except TypeError as error:
        raise TypeError(f"data_position={data_position!r} is not JSON-serialisable ({error})") from None
    store = step._store
    parallel = store.parallel
    first = parallel is None or parallel.rank == 0  # under data parallel rank 0 writes what every rank sends it
    step.synchronize()
    shapes = {piece.name: list(piece.shape) for group in store.all_groups() for piece in group.slices}
    shapes |= {name: list(value.shape) for name, value in store.unused.items()}
    counts = {name: 4 * math.prod(shape) for name, shape in shapes.items()}
    sizes = {"model": counts,
             "optimizer": {f"{kind}.{name}": 4 if kind == "step" else counts[name]
                           for group in store.all_groups() for piece in group.slices for name in [piece.name]
                           for kind in ("exp_avg", "exp_avg_sq", "step")},
             "buffers": {name: _nbytes(value) for name, value in store.buffers.items()}}
    tensors = {"model": lambda: _model_tensors(store), "optimizer": lambda: _optimizer_tensors(store),
               "buffers": lambda: iter(store.buffers.items())}
    total = sum(sum(kind.values()) for kind in sizes.values())
    parent, base = os.path.split(path)
    refused = None
    if first:
        _remove_leftovers(parent, base)
        try:
            check_free_space(path, total + METADATA_BYTES)
        except DiskSpaceError as error:
            refused = error
    if parallel is not None and parallel.largest(refused is not None):  # every rank refuses, or none
        raise refused or DiskSpaceError(errno.ENOSPC, f"rank 0 refused to save {path}: its disk has too little room")
    if refused:
        raise refused
    if not first:  # the others' shards, a group at a time, in the order rank 0 writes them
        for kind, make in tensors.items():
            for _ in make():
                pass
        parallel.barrier()  # returns once rank 0's checkpoint is in place
        return path
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{base}.saving-{os.getpid()}-", dir=parent)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"mtc: saving {base}", leave=False,
                  disable=not progress or None) as bar:
            for kind, make in tensors.items():
                produced = make()
                if sizes[kind]:
                    _write_sharded(staging, kind, sizes[kind], produced, save_file, bar.update)
                for name, _ in produced:  # nothing is left but the gathers the other ranks are in
                    raise AssertionError(f"{kind}: {name!r} was not planned")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        save_file(rng, os.path.join(staging, RNG))
        settings = step._settings
        meta = {"format": FORMAT, "mtc": mtc.__version__, "torch": torch.__version__, "steps": step.steps,
                "optimizer": dataclasses.asdict(settings["optimizer"]), "clip_grad_norm": settings["clip_grad_norm"],
                "skip_nonfinite": settings["skip_nonfinite"],
                "compute_dtype": str(store.compute_dtype).removeprefix("torch."),
                "parameters": shapes, "ranks": parallel.ranks if parallel else 1,
                "data_position": data_position, "plan": step.plan.to_json()}
        with open(os.path.join(staging, META), "w") as f:
            json.dump(meta, f, indent=1)
        config = getattr(settings["model"], "config", None)
        if hasattr(config, "to_json_file"):  # a Hugging Face model: from_pretrained(path) loads the weights
            config.to_json_file(os.path.join(staging, "config.json"))
        _sync_directory(staging)
        _move_into_place(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if parallel is not None:
        parallel.barrier()
    return path


def _model_tensors(store):
    """(name, fp32 master weight) of every parameter, the groups' whole on rank 0 (gathered from every rank's
    shard under data parallel; nothing on the others, which only send), then the untrained ones."""
    first = store.parallel is None or store.parallel.rank == 0
    for group in store.all_groups():
        with store.state_of(group):  # a disk group's read from its file meanwhile
            master = store.whole_on_first(group, group.master)
            for piece in group.slices if first else ():
                yield piece.name, group.view(master, piece)
    yield from store.unused.items() if first else ()


def _optimizer_tensors(store):
    """(name, tensor) of every trained parameter's AdamW moments and step count, as _model_tensors."""
    first = store.parallel is None or store.parallel.rank == 0
    for group in store.all_groups():
        with store.state_of(group):
            exp_avg = store.whole_on_first(group, group.exp_avg)
            exp_avg_sq = store.whole_on_first(group, group.exp_avg_sq)
            for piece in group.slices if first else ():
                yield f"exp_avg.{piece.name}", group.view(exp_avg, piece)
                yield f"exp_avg_sq.{piece.name}", group.view(exp_avg_sq, piece)
                yield f"step.{piece.name}", group.step


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """The disk a checkpoint of `model` takes at most, from the shapes of its parameters and buffers (meta tensors
    will do): per parameter an fp32 master weight, two fp32 AdamW moments and an fp32 step count (a frozen or
    unused parameter has no moments: counted all the same), the buffers, and METADATA_BYTES."""
    parameters = sum(12 * p.numel() + 4 for _, p in model.named_parameters())  # tied weights once, as saved
    return parameters + sum(_nbytes(b) for b in model.buffers()) + METADATA_BYTES


def check_free_space(path, needed: int, instead: str | None = None) -> None:
    """Raise DiskSpaceError unless the disk that is to hold the checkpoint directory `path` has `needed` bytes
    free, beside any checkpoint already there: that one is replaced only once the new one is whole. instead:
    what else the user can do (default: save to a path on a disk with that much free)."""
    path = os.path.abspath(os.fspath(path))
    directory, free = free_disk_bytes(os.path.dirname(path))
    if free < needed:
        instead = instead or f"save to a path on a disk with {format_bytes(needed)} free"
        raise DiskSpaceError(errno.ENOSPC, f"a checkpoint at {path} needs {format_bytes(needed)} ({needed:,} bytes: "
                             f"weights, AdamW moments and step counts, buffers; one already there stays until the "
                             f"new one is whole) but {directory} has {format_bytes(free)} ({free:,} bytes) free: "
                             f"free {format_bytes(needed - free)} or {instead}")


def load(path, model: torch.nn.Module | None = None, gpu_mem="80GB", example=None, optimizer: AdamW | None = None,
         clip_grad_norm="saved", **compile_options):
    """A Step for `model` (the same architecture, on the meta device or materialised; None for a Hugging
    Face model, rebuilt from the checkpoint's config.json) that goes on from the checkpoint at `path`:
    weights, AdamW moments and step counts, RNG state, step count and data position (step.data_position).
    The optimizer's hyperparameters, clipping and skip_nonfinite are the saved ones unless given; gpu_mem,
    example and the other options are as for mtc.compile (the plan may differ from the saved one: the state
    is per parameter)."""
    from mtc.compile import compile

    path = _readable(path)
    if model is None:
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"{path} holds no config.json (not a Hugging Face model's checkpoint): pass the "
                                  f"model it was saved from as model=")
        model = hugging_face_model(path)
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is checkpoint format {meta.get('format')!r}; this mtc reads format {FORMAT}")
    _check_same_model(path, meta["parameters"], model)
    weights = _Tensors(path, "model")
    state = _Tensors(path, "optimizer")
    optimizer = optimizer if optimizer is not None else AdamW(**{**meta["optimizer"],
                                                                 "betas": tuple(meta["optimizer"]["betas"])})
    clip = meta["clip_grad_norm"] if clip_grad_norm == "saved" else clip_grad_norm
    buffers = _Tensors(path, "buffers") if os.path.exists(os.path.join(path, "buffers.safetensors")) or \
        os.path.exists(os.path.join(path, "buffers.safetensors.index.json")) else None
    if buffers is None and any(True for _ in model.buffers()):
        raise CheckpointError(f"{path} holds no buffers but {type(model).__name__} has some: saved from another model")
    # Meta tensors are filled from the checkpoint as the store is built, not initialised and then read again.
    filled = set()
    if "init" not in compile_options:
        filled = {name for name, p in model.named_parameters() if p.is_meta}
        compile_options["init"] = _filler(model, weights, buffers)
    # Whether non-finite steps are skipped changes the trajectory: the saved run's choice unless given.
    compile_options.setdefault("skip_nonfinite", meta.get("skip_nonfinite", True))  # older checkpoints: default
    step = compile(model, gpu_mem, example, optimizer=optimizer, clip_grad_norm=clip, **compile_options)
    store = step._store
    for group in store.all_groups():  # under data parallel each rank reads its shard of each tensor
        with store.state_of(group, write=True):  # a disk group's state: read, filled, written back
            for piece in group.slices:
                if piece.name not in filled:
                    _into_shard(group, group.master, piece, weights[piece.name])
                _into_shard(group, group.exp_avg, piece, state[f"exp_avg.{piece.name}"])
                _into_shard(group, group.exp_avg_sq, piece, state[f"exp_avg_sq.{piece.name}"])
            if group.stream is not group.master:
                group.stream.copy_(group.master)
        counts = {state[f"step.{piece.name}"].item() for piece in group.slices}
        if len(counts) > 1:
            raise CheckpointError(f"{path}: the parameters of {group.name} have different step counts {sorted(counts)}")
        group.step.fill_(counts.pop() if counts else 0)
    for name, value in store.unused.items():
        value.copy_(weights[name])
    for name, value in store.buffers.items():
        value.copy_(buffers[name])
    rng = _Tensors(path, "rng")
    torch.set_rng_state(rng["cpu"])
    cuda_states = [rng[f"cuda.{i}"] for i in range(sum(name.startswith("cuda.") for name in rng.names))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    step.steps = meta["steps"]
    step.data_position = meta["data_position"]
    return step


def _into_shard(group, buffer: torch.Tensor, piece, value: torch.Tensor) -> None:
    """Copy what of the parameter `piece` lies in the group's shard (all of it, when the group is whole here)."""
    start, end = group.shard
    first, last = max(piece.offset, start), min(piece.offset + piece.numel, end)
    if first < last:
        buffer[first - start:last - start].copy_(value.reshape(-1)[first - piece.offset:last - piece.offset])


def from_pretrained(path, gpu_mem="80GB", example=None, **compile_options):
    """A Step for the Hugging Face causal LM saved at `path` (a directory with config.json and
    model.safetensors, or its shards and index), built on the meta device and filled from the safetensors
    files a tensor at a time, so the host never holds more of the model than the store plus one tensor.
    gpu_mem, example and the options are as for mtc.compile (the optimizer starts afresh)."""
    from mtc.compile import compile

    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"path={path!r} is not a Hugging Face model directory: it has no config.json")
    model = hugging_face_model(path)
    weights = _Tensors(path, "model")
    _check_same_model(path, {name: weights.shape(name) for name in weights.names}, model, strict=False)
    compile_options.setdefault("init", _filler(model, weights, None))
    return compile(model, gpu_mem, example, **compile_options)


def hugging_face_model(path: str) -> torch.nn.Module:
    """The causal LM config.json at `path` describes, its parameters on the meta device."""
    try:
        import transformers
    except ImportError:
        raise ImportError("a Hugging Face model needs transformers (pip install 'transformers>=5')") from None
    try:
        config = transformers.AutoConfig.from_pretrained(path)
        with _parameters_on_meta():
            # fp32, the masters' dtype, whatever the checkpoint stores: a bf16 config would trace bf16 casts
            return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as error:  # transformers names the model type it does not know
        raise CheckpointError(f"{path}: {str(error).splitlines()[0]} mtc is tested on "
                              f"{', '.join(TESTED_ARCHITECTURES)}") from None


TESTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                        "GemmaForCausalLM", "GPT2LMHeadModel")


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built here put their parameters on the meta device (buffers, such as rotary tables, are
    made as usual): a model the size of the host is built without allocating it, and initialisers
    run on meta tensors do nothing."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, parameter):
        if parameter is not None and not parameter.is_meta:
            parameter = torch.nn.Parameter(parameter.to("meta"), parameter.requires_grad)
        register(module, name, parameter)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


class _Tensors:
    """Tensors by name across a checkpoint's shards of one kind, read one at a time (never all at once).
    One shard is open at a time: an open shard is mapped into memory, and its pages count in the process's
    RSS while it stays open."""

    def __init__(self, path: str, kind: str):
        single, index = os.path.join(path, f"{kind}.safetensors"), os.path.join(path, f"{kind}.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                where = json.load(f)["weight_map"]
        elif os.path.isfile(single):
            where = None
        else:
            raise CheckpointError(f"{path} has neither {kind}.safetensors nor {kind}.safetensors.index.json")
        self.path, self._open = path, (None, None)
        for name in sorted(set(where.values())) if where else [os.path.basename(single)]:
            keys = self._file(name).keys()  # checks every shard's header up front: a cut file fails here
        self.where = where or {n: os.path.basename(single) for n in keys}
        self.names = list(self.where)

    def _file(self, name: str):
        from safetensors import safe_open

        if self._open[0] != name:
            self._open = (None, None)  # the previous shard is unmapped before the next is opened
            try:
                self._open = (name, safe_open(os.path.join(self.path, name), framework="pt"))
            except Exception as error:  # safetensors raises its own error types for a cut or corrupt file
                raise CheckpointError(f"{os.path.join(self.path, name)} is not a whole safetensors file "
                                      f"({error})") from None
        return self._open[1]

    def shape(self, name: str) -> list[int]:
        return list(self._file(self.where[name]).get_slice(name).get_shape())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"the checkpoint holds no tensor {name!r}")
        return self._file(self.where[name]).get_tensor(name)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _write_sharded(directory: str, kind: str, sizes: dict[str, int], tensors, save_file, written=None) -> None:
    """Hugging Face's layout: one file, or numbered shards of at most SHARD_BYTES and an index. sizes: each
    tensor's bytes, in the order `tensors` (an iterator of (name, tensor)) gives them, one shard's at a time;
    written(bytes) after each shard."""
    shards, current, size = [], [], 0
    for name, nbytes in sizes.items():
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    files = [f"{kind}.safetensors"] if len(shards) == 1 else \
        [f"{kind}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, names in zip(files, shards):
        shard = {}
        for expected, (name, tensor) in zip(names, tensors):
            assert name == expected, f"{kind}: {name!r} came where {expected!r} was planned"
            # Copies: safetensors refuses views that share one buffer (the store keeps a stage's tensors in one).
            shard[name] = tensor.detach().to("cpu", copy=True).contiguous()
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        if written:
            written(sum(sizes[name] for name in names))
    if len(shards) > 1:
        with open(os.path.join(directory, f"{kind}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes.values())},
                       "weight_map": {name: file for file, names in zip(files, shards) for name in names}}, f, indent=1)


def _sync_directory(directory: str) -> None:
    """Flush every file in `directory` and the directory itself to disk before it is renamed into place."""
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb+") as f:
            os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _move_into_place(staging: str, path: str) -> None:
    parent, base = os.path.split(path)
    if os.path.exists(path):
        replaced = tempfile.mkdtemp(prefix=f".{base}.replaced-{os.getpid()}-", dir=parent)
        os.rename(path, os.path.join(replaced, base))  # aside, whole, until the new one is in place
        os.rename(staging, path)
        _fsync_dir(parent)
        shutil.rmtree(replaced)
    else:
        os.rename(staging, path)
        _fsync_dir(parent)


def _remove_leftovers(parent: str, base: str) -> None:
    """Remove what saves of `base` killed midway left in `parent`: a half-written staging directory, or an old
    checkpoint moved aside whose replacement is in place. Each is named after the process that made it; a
    live process's (a save running now) stays, and so does any aside copy while `base` itself is missing
    (load reads it then)."""
    whole = os.path.isfile(os.path.join(parent, base, META))
    for kind in ("saving", "replaced") if whole else ("saving",):
        for leftover in glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.{kind}-*-*")):
            pid = os.path.basename(leftover)[len(f".{base}.{kind}-"):].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _readable(path) -> str:
    """`path`, or the previous checkpoint a save interrupted between its two renames had moved aside."""
    path = os.path.abspath(os.fspath(path))
    if os.path.isfile(os.path.join(path, META)):
        return path
    parent, base = os.path.split(path)
    pattern = os.path.join(glob.escape(parent), f".{glob.escape(base)}.replaced-*", glob.escape(base), META)
    aside = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not os.path.exists(path) and aside:
        found = os.path.dirname(aside[-1])
        warnings.warn(f"{path} is missing: a save was interrupted while replacing it; loading the previous "
                      f"checkpoint from {found}")
        return found
    if not os.path.isdir(path):
        raise CheckpointError(f"path={path!r} is not a directory; expected a checkpoint mtc.save wrote")
    raise CheckpointError(f"path={path!r} is not an mtc checkpoint: it has no {META}")


def _check_same_model(path: str, saved: dict[str, list[int]], model: torch.nn.Module, strict: bool = True) -> None:
    """The model's parameters are those `saved` names, with the same shapes (strict=False: `saved` may hold
    more, as a Hugging Face checkpoint's tied head)."""
    mine = {name: list(p.shape) for name, p in model.named_parameters()}
    missing, extra = sorted(set(mine) - set(saved)), sorted(set(saved) - set(mine)) if strict else []
    differ = sorted(n for n in set(saved) & set(mine) if saved[n] != mine[n])
    if missing or extra or differ:
        details = [f"{len(extra)} saved parameters the model lacks ({', '.join(extra[:3])})" if extra else "",
                   f"{len(missing)} model parameters not saved ({', '.join(missing[:3])})" if missing else "",
                   "shapes differ: " + ", ".join(f"{n} is {saved[n]} in the checkpoint, {mine[n]} in the model"
                                                 for n in differ[:3]) if differ else ""]
        raise CheckpointError(f"{path} was saved from another model or config: " + "; ".join(d for d in details if d))


def _filler(model: torch.nn.Module, weights: _Tensors, buffers: _Tensors | None):
    """An `init(module)` for mtc.compile that fills one module's own parameters and buffers from the
    checkpoint (buffers=None: the parameters only; a Hugging Face checkpoint holds no rotary tables)."""
    prefixes = {id(module): name for name, module in model.named_modules()}

    def fill(module: torch.nn.Module) -> None:
        prefix = prefixes[id(module)]
        with torch.no_grad():
            for source, tensors in ((weights, module.named_parameters(recurse=False)),
                                    (buffers, module.named_buffers(recurse=False) if buffers else ())):
                for name, tensor in tensors:
                    tensor.copy_(source[f"{prefix}.{name}" if prefix else name])
    return fill
