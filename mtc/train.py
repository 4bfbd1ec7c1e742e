"""The `mtc train` command: a preset or a Hugging Face model on a corpus, with checkpoints, TensorBoard logs,
and a stop by SIGINT or SIGTERM that saves and says how to go on."""
from __future__ import annotations

import itertools
import os
import shlex
import signal
import sys
import threading
import time

import torch

import mtc
from mtc.codegen.tiles import TILE_TOKENS
from mtc.config import format_bytes, parse_batch
from mtc.examples import data, models


def train(args) -> int:
    """`mtc train` with the parsed arguments; the exit status. Started by torchrun, every process trains one
    model together with the others (data parallel): each takes its share of every batch's rows, and rank 0
    reports and writes the checkpoints."""
    from tqdm import tqdm

    batch, seq = parse_batch(args.batch)
    rank, ranks = _ranks(args.device)
    if batch % ranks:
        raise ValueError(f"--batch={args.batch} is not valid with {ranks} ranks: each rank takes an equal share of "
                         f"the {batch} rows; give a number of rows divisible by {ranks}")
    say = print if rank == 0 else _quiet
    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} is not valid; expected an integer >= 1")
    if args.save_every < 0:
        raise ValueError(f"--save-every={args.save_every} is not valid; expected an integer >= 0 (0: never)")
    source = TrainedModel(args.model or args.preset)
    writer = _tensorboard(args.log_dir) if args.log_dir and rank == 0 else None
    checkpoint = args.checkpoint or os.path.join("runs", source.name)
    torch.manual_seed(args.seed)
    tokens, described = source.tokens(args.data)
    stream = _rows_of(source, data.batches(tokens, batch, seq, seed=args.seed), rank, ranks)
    # What fixes the order of the batches: a resumed run must read them as the saved one did.
    data_order = {"data": os.path.abspath(args.data) if args.data else None, "batch": f"{batch}x{seq}",
                  "seed": args.seed}
    # Every run may write the checkpoint: --save-every does, and so does a stop by SIGINT or SIGTERM.
    model = source.meta_model()
    _check_checkpoint_space(checkpoint, model, required=bool(args.save_every))
    started = time.perf_counter()
    if args.resume:
        # The first batch only shows the shapes; the checkpoint says how many the run had read.
        step = mtc.load(checkpoint, model, gpu_mem=args.gpu_mem, example=next(stream),
                        device=args.device, kernels=args.kernels, tile_tokens=args.tile_tokens, nvme=args.nvme,
                        host_mem=args.host_mem)
        saved = {k: v for k, v in step.data_position.items() if k != "batches"}
        if saved != data_order:
            raise ValueError(f"--resume: the checkpoint in {checkpoint} read its data as {saved}, not as "
                             f"{data_order}; resume with the same --data, --batch and --seed")
        stream = _rows_of(source, data.batches(tokens, batch, seq, seed=args.seed), rank, ranks)
        for _ in range(step.data_position["batches"]):
            next(stream)
        say(f"resumed from {checkpoint} after {step.steps} steps")
    else:
        example = next(stream)
        stream = itertools.chain([example], stream)
        step = source.compile(gpu_mem=args.gpu_mem, example=example, device=args.device, kernels=args.kernels,
                              tile_tokens=args.tile_tokens, nvme=args.nvme, host_mem=args.host_mem,
                              optimizer=mtc.AdamW(lr=args.lr, weight_decay=args.weight_decay),
                              clip_grad_norm=args.clip or None)
    say(step.plan.summary())
    schedule = step.plan.schedule
    params = sum(s.params for s in schedule.stages) + (schedule.shared.params if schedule.shared else 0)
    say(f"compiled in {time.perf_counter() - started:.1f} s; training {params:,} parameters on {batch}x{seq} "
          f"tokens of {described}")
    if args.save_plan and rank == 0:
        step.plan.save(args.save_plan)

    def save() -> None:  # the data position a resumed run skips to: one batch read per step
        mtc.save(step, checkpoint, data_position={"batches": step.steps, **data_order})

    first = last = stopped = None
    seen, training, done = 0, 0.0, step.steps  # training: seconds in steps, checkpoint saves not counted
    saved_at = done if args.resume else None  # the step of the checkpoint in `checkpoint`, as far as this run knows
    with _StopSignals() as stop:
        try:
            with tqdm(range(done, args.steps), unit="step", dynamic_ncols=True, initial=done,
                      total=args.steps, disable=rank != 0 or None) as bar:
                for _ in bar:
                    inputs = next(stream)
                    began = time.perf_counter()
                    try:
                        last = float(step(**inputs))
                    except mtc.NonFiniteError as error:  # the state is the last good one: keep it
                        save()
                        raise mtc.NonFiniteError(f"{error}. That state is saved in {checkpoint}") from None
                    if step.parallel is not None:  # the loss of all the ranks' rows
                        last = step.parallel.mean(last)
                    training += time.perf_counter() - began
                    first = last if first is None else first
                    seen += inputs["input_ids"].numel() * ranks
                    skipped = step.skipped_steps
                    bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{seen / training:,.0f}",
                                    **({"skipped": len(skipped)} if skipped else {}))
                    if writer:
                        writer.add_scalar("loss", last, step.steps)
                        writer.add_scalar("tokens_per_s", seen / training, step.steps)
                    if args.save_every and (step.steps % args.save_every == 0 or step.steps == args.steps):
                        save()
                        saved_at = step.steps
                    received = stop.received  # a signal after this line waits for the next step's agreement
                    if step.parallel is not None:  # every rank stops after the same step, or none does
                        received = step.parallel.largest(received or 0) or None
                    if received:
                        stopped = received
                        break
            if stopped:
                if saved_at != step.steps:
                    save()  # waits for the step's CPU optimizer update first
                    saved_at = step.steps
                say(f"mtc train: stopped by {signal.Signals(stopped).name} after step {step.steps} of "
                    f"{args.steps}; the checkpoint in {checkpoint} holds it. Go on with:\n  "
                    f"{_resume_command(args, checkpoint, ranks)}", file=sys.stderr)
                return 128 + stopped
        except _Abandoned as abandoned:
            kept = f"the checkpoint of step {saved_at} in {checkpoint} stays" if saved_at is not None else \
                f"{checkpoint} is as it was before this run"
            print(f"mtc train: a second {signal.Signals(abandoned.signum).name}: stopped at once, the save "
                  f"abandoned; {kept}", file=sys.stderr)
            return 128 + abandoned.signum
        finally:
            if writer:
                writer.close()
    began = time.perf_counter()
    step.synchronize()  # the last step's optimizer update, which runs on after its loss is known
    training += time.perf_counter() - began
    if first is None:
        say(f"the checkpoint is already at step {done}; nothing to do for --steps={args.steps}")
        return 0
    say(f"loss {first:.3f} -> {last:.6f} in steps {done + 1}-{args.steps}, {seen / training:,.0f} tokens/s"
          + (f" (saves not counted); checkpoint in {checkpoint}" if args.save_every else ""))
    if step.skipped_steps:
        say(f"{len(step.skipped_steps)} steps had a non-finite loss or gradient norm and updated nothing: "
              f"{', '.join(map(str, step.skipped_steps))}")
    return 0


def _ranks(device: str | None) -> tuple[int, int]:
    """(this rank, ranks): (0, 1) unless torchrun started this process among several."""
    from mtc.runtime.distributed import launched, process_group

    if not launched():
        return 0, 1
    import torch.distributed as dist

    process_group("cuda" if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
                  else "cpu")
    return dist.get_rank(), dist.get_world_size()


def _rows_of(source, batches, rank: int, ranks: int):
    """This rank's share of each batch's rows, as the model is called."""
    for input_ids, shifted in batches:
        rows = input_ids.shape[0] // ranks
        yield source.call((input_ids[rank * rows:(rank + 1) * rows], shifted[rank * rows:(rank + 1) * rows]))


def _quiet(*args, **kwargs) -> None:
    """print() for the ranks other than 0: the run reports once."""


def _check_checkpoint_space(checkpoint: str, model: torch.nn.Module, required: bool) -> None:
    """Refuse before compiling when the disk cannot take a checkpoint of `model` at `checkpoint` and the run is
    to save (required); otherwise only warn: a stop by signal would then fail to save."""
    from mtc.checkpoint import DiskSpaceError, check_free_space, checkpoint_bytes

    needed = checkpoint_bytes(model)
    try:
        check_free_space(checkpoint, needed, instead=f"choose --checkpoint on a disk with {format_bytes(needed)} free")
    except DiskSpaceError as error:
        if required:
            raise
        print(f"mtc train: warning: a stop by SIGINT or SIGTERM saves a checkpoint, and it would not fit: {error}",
              file=sys.stderr)


class _Abandoned(BaseException):
    """A second stop signal. A BaseException, so that no `except Exception` on its way keeps the run going."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While `mtc train` trains, the first SIGINT or SIGTERM only asks it to stop (`received`): the loop lets the
    step finish and saves. A second raises _Abandoned wherever the run is, a save included (saves are atomic:
    the previous checkpoint stays). The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "_StopSignals":
        # Only the main thread may install handlers; called from another thread, signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            # None: a handler installed from outside Python, which signal.signal cannot put back; the default
            # is the nearest.
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            raise _Abandoned(signum)
        self.received = signum  # no printing here: the handler may run inside tqdm's write to stderr


def _resume_command(args, checkpoint: str, ranks: int = 1) -> str:
    """The `mtc train` line that goes on from `checkpoint`: what fixes the model, its data order and the run's
    length and budget (the checkpoint keeps the hyperparameters)."""
    options = {"--model" if args.model else "--preset": args.model or args.preset, "--data": args.data,
               "--batch": args.batch, "--seed": args.seed, "--steps": args.steps,
               "--save-every": args.save_every or None, "--gpu-mem": args.gpu_mem, "--device": args.device,
               "--log-dir": args.log_dir, "--nvme": args.nvme, "--host-mem": args.host_mem,
               "--kernels": None if args.kernels == "auto" else args.kernels,
               "--tile-tokens": None if args.tile_tokens == TILE_TOKENS else args.tile_tokens,
               "--checkpoint": checkpoint}
    # --flag=value: a value may begin with "-" (--kernels=-rope, a negative --seed)
    local = os.environ.get("LOCAL_WORLD_SIZE", ranks)
    launcher = ["torchrun", f"--nproc_per_node={local}", "-m", "mtc"] if ranks > 1 else ["mtc"]
    return shlex.join(launcher + ["train"] + [f"{flag}={value}" for flag, value in options.items() if value is not None]
                      + ["--resume"])


class TrainedModel:
    """What `mtc train --model` names: a preset (mtc's example Llama, called with (input_ids, labels) already
    shifted) or a Hugging Face model directory (called with input_ids and labels, which it shifts itself)."""

    def __init__(self, value: str):
        self.directory = value if os.path.isdir(value) else None
        if self.directory is None:
            try:
                self.vocab_size = models.preset_config(value).vocab_size
            except ValueError as error:
                raise ValueError(f"--model={value!r} is neither a model directory nor a preset: {error}") from None
            self.preset = self.name = value
            return
        if not os.path.isfile(os.path.join(value, "config.json")):
            raise ValueError(f"--model={value!r} is a directory without config.json; expected a Hugging Face model "
                             f"directory or a preset ({', '.join(sorted(models.PRESETS))})")
        import transformers

        self.name = os.path.basename(os.path.normpath(value))
        self.vocab_size = transformers.AutoConfig.from_pretrained(value).vocab_size

    def _tokenizer(self):
        """The model directory's tokenizer, if it has one (read with the data: planning needs none)."""
        if not self.directory or not any(os.path.exists(os.path.join(self.directory, f))
                                         for f in ("tokenizer.json", "tokenizer_config.json")):
            return None
        import transformers

        return transformers.AutoTokenizer.from_pretrained(self.directory)

    def tokens(self, path: str | None) -> tuple[torch.Tensor, str]:
        tokenizer = self._tokenizer()
        if path:
            return data.load_tokens(path, self.vocab_size, tokenizer), path
        corpus = data.stdlib_corpus()
        if tokenizer is None and self.vocab_size >= 256:
            return corpus, "the Python standard library's source, byte by byte"
        text = corpus.to(torch.uint8).numpy().tobytes().decode(errors="replace")
        return data.load_tokens_of_text(text, self.vocab_size, tokenizer, "the built-in corpus"), \
            "the Python standard library's source"

    def call(self, pair) -> dict:
        input_ids, shifted = pair
        return {"input_ids": input_ids, "labels": input_ids if self.directory else shifted}

    def meta_model(self):
        if self.directory:
            from mtc.checkpoint import hugging_face_model

            return hugging_face_model(self.directory)
        return models.build(self.preset, device="meta")

    def compile(self, **options):
        if self.directory:
            return mtc.from_pretrained(self.directory, **options)
        return mtc.compile(models.build(self.preset), **options)


def _tensorboard(directory: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(f"--log-dir={directory!r} needs TensorBoard: pip install tensorboard") from None
    return SummaryWriter(directory)
