"""The `mtc` command: train, plan and show, for people who would rather not write code."""
from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import time

import torch

import mtc
from mtc.codegen.patterns import KERNELS
from mtc.codegen.stream_plan import chrome_trace
from mtc.codegen.tiles import TILE_TOKENS
from mtc.config import format_bytes, parse_bytes
from mtc.passes.schedule import ALLOCATOR_HEADROOM, MemoryBudgetError, smallest_plan
from mtc.plan import stage_table
from mtc.runtime.store import HostMemoryError
from mtc.examples import data, models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mtc", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="train a preset or a Hugging Face model (default: tiny, on the "
                                              "built-in corpus)")
    _model_arguments(train, batch="8x128", gpu_mem="80GB")
    _model_directory_argument(train)
    train.add_argument("--data", default=None, metavar="PATH",
                       help="token ids (.bin: uint16, uint32 past 65536 words), text (a file or a directory of "
                            ".txt; through the model directory's tokenizer, else bytes) or a saved Hugging Face "
                            "dataset (input_ids or text) (default: the Python standard library's source)")
    train.add_argument("--log-dir", default=None, metavar="DIR", help="also log loss and tokens/s for TensorBoard")
    train.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    train.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    train.add_argument("--weight-decay", type=float, default=0.1)
    train.add_argument("--seed", type=int, default=0, help="model init and data order (default 0)")
    train.add_argument("--save-plan", metavar="PATH", help="also write the plan as JSON")
    train.add_argument("--checkpoint", metavar="DIR", default=None,
                       help="where --save-every and --resume keep the checkpoint (default runs/<preset>)")
    train.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                       help="save a checkpoint every STEPS steps and at the end (default 0: never)")
    train.add_argument("--resume", action="store_true",
                       help="go on from the checkpoint (weights, AdamW state, RNG, data position) up to --steps "
                            "steps in all, with its hyperparameters")

    plan = commands.add_parser("plan", help="plan a preset on the meta device (no memory, no GPU needed)")
    _model_arguments(plan, batch="4x4096", gpu_mem="80GB")
    _model_directory_argument(plan)
    plan.add_argument("--save", metavar="PATH", help="write the plan as JSON (read it with `mtc show`)")
    plan.add_argument("--instructions", action="store_true", help="print every stream instruction too")
    plan.add_argument("--trace", metavar="PATH", help="write the predicted timeline as a Chrome/Perfetto trace")
    plan.add_argument("--max-seq", type=int, metavar="LIMIT", default=None,
                      help="find the longest sequence (up to LIMIT tokens) that fits, for --batch's sequence count")
    plan.add_argument("--batches", metavar="BxS,...", default=None,
                      help="also a line per batch shape (e.g. 1x4096,2x4096,4x4096): the plan solved for it from "
                           "the costs' polynomials, without tracing again")

    plan.add_argument("--host-mem", default=None,
                      help="host RAM to plan for, e.g. 1.5TB (default: the profile's); refused if the state won't fit")
    plan.add_argument("--profile", default=None,
                      help="hardware to plan for: h100, h200, a100, rtx4090, cpu or a saved profile's path "
                           "(default: what `mtc probe` saved for this machine's GPU, else h100)")

    probe = commands.add_parser("probe", help="measure this machine's copy, GEMM and AdamW rates and save "
                                              "them as the profile plans use")
    probe.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    probe.add_argument("--save", metavar="PATH", default=None,
                       help="where to write it (default: ~/.cache/mtc/profile-<device>.json, or $MTC_PROFILE)")
    probe.add_argument("--quick", action="store_true", help="small sizes: seconds instead of a minute, rougher")
    probe.add_argument("--cpu-threads", type=int, default=None,
                       help="threads for the CPU optimizer (default: all cores but four)")
    probe.add_argument("--calibrate", metavar="PRESET", default=None,
                       help="then train PRESET's spine plan a few steps (GPU) and save the rates its step showed")
    probe.add_argument("--batch", default="2x4096", help="batch for --calibrate (default 2x4096)")
    probe.add_argument("--gpu-mem", default="80GB", help="gpu_mem for --calibrate (default 80GB)")

    show = commands.add_parser("show", help="print a saved plan")
    show.add_argument("path")

    bench = commands.add_parser("bench", help="time a preset on the GPU; --vs compares with the peers on the "
                                              "same model and batch")
    _model_arguments(bench, batch="4x4096", gpu_mem="80GB", preset="3b")
    bench.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    bench.add_argument("--vs", default="", metavar="eager,deepspeed,fsdp,megatrain",
                       help="then train the same model and batch with each of these, each in a process of its own "
                            "(a missing package is reported as not installed); see examples/baselines/README.md")
    bench.add_argument("--peer-timeout", type=float, default=3600, metavar="SECONDS",
                       help="stop a --vs peer that runs longer, and report it failed (default 3600)")
    bench.add_argument("--trace", metavar="PATH", help="write two measured steps as a Chrome/Perfetto trace")
    bench.add_argument("--no-trace", action="store_true",
                       help="leave out the two steps timed per instruction (lanes, bounds), minutes at long sequences")
    bench.add_argument("--json", metavar="PATH", help="write every figure as JSON (rewritten as each system finishes)")
    bench.add_argument("--cpu-threads", type=int, default=None,
                       help="threads for the CPU optimizer (default: all cores but four)")
    bench.add_argument("--no-calibrate", action="store_true",
                       help="a sweep (as --schedule) planned on the saved profile, without first timing the spine plan")
    bench.add_argument("--schedule", default=None, metavar="solve,spine",
                       help="measured against predicted: --batch and --gpu-mem may then list several values "
                            "(comma-separated), and every combination runs on one state store")

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"] + list(argv if argv is not None else sys.argv[1:]))
    try:
        return {"train": _train, "plan": _plan, "show": _show, "bench": _bench, "probe": _probe}[args.command](args)
    except (ValueError, TypeError, RuntimeError, OSError, MemoryError) as error:
        print(f"mtc {args.command}: error: {error}", file=sys.stderr)
        return 2


def _preset(name: str) -> str:
    try:
        models.preset_config(name)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return name


def _tile_tokens(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not valid; expected a number of tokens >= 1")
    return int(text)


def _model_arguments(parser, batch: str, gpu_mem: str, preset: str = "tiny"):
    parser.add_argument("--preset", default=preset, type=_preset,
                        help=f"model shape: {', '.join(sorted(models.PRESETS))}, or one of them with another "
                             f"number of blocks, as 8b:40 (default {preset})")
    parser.add_argument("--batch", default=batch, help=f"sequences x tokens per step (default {batch})")
    parser.add_argument("--gpu-mem", default=gpu_mem,
                        help=f"device memory budget, e.g. 24GB, 80GiB (default {gpu_mem})")
    parser.add_argument("--clip", type=float, default=1.0,
                        help="clip gradients to this global norm (default 1.0; 0: off)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--kernels", default="auto", type=_kernels,
                        help="Triton kernels in place of the patterns they replace: auto (all on a GPU, none "
                             f"on the CPU), all, none, some of {','.join(KERNELS)}, or some as -name (switched "
                             "off, as --kernels=-rope) (default: auto)")
    parser.add_argument("--tile-tokens", type=_tile_tokens, default=TILE_TOKENS, metavar="TOKENS",
                        help="tokens per tile when a recomputed block runs what follows its attention in token "
                             f"tiles (default {TILE_TOKENS})")


def _model_directory_argument(parser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR|PRESET",
                        help="a Hugging Face model directory (its config.json; the weights too, to train) or a "
                             "preset, as --preset")


def _kernels(text: str) -> str | tuple[str, ...]:
    from mtc.codegen.patterns import kernel_names

    try:
        kernel_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--kernels={text!r}: {str(error).split(': ', 1)[1]}") from None
    return text


def _batch(text: str) -> tuple[int, int]:
    try:
        sequences, tokens = (int(part) for part in text.lower().split("x"))
        if sequences > 0 and tokens > 0:
            return sequences, tokens
    except ValueError:
        pass
    raise ValueError(f"--batch={text!r} is not valid; expected SEQUENCESxTOKENS with both > 0, e.g. 4x4096")


def _train(args) -> int:
    from tqdm import tqdm

    batch, seq = _batch(args.batch)
    if args.steps < 1:
        raise ValueError(f"--steps={args.steps} is not valid; expected an integer >= 1")
    if args.save_every < 0:
        raise ValueError(f"--save-every={args.save_every} is not valid; expected an integer >= 0 (0: never)")
    source = _TrainedModel(args.model or args.preset)
    writer = _tensorboard(args.log_dir) if args.log_dir else None
    checkpoint = args.checkpoint or os.path.join("runs", source.name)
    torch.manual_seed(args.seed)
    tokens, described = source.tokens(args.data)
    stream = (source.call(pair) for pair in data.batches(tokens, batch, seq, seed=args.seed))
    # What fixes the order of the batches: a resumed run must read them as the saved one did.
    data_order = {"data": os.path.abspath(args.data) if args.data else None, "batch": f"{batch}x{seq}",
                  "seed": args.seed}
    started = time.perf_counter()
    if args.resume:
        # The first batch only shows the shapes; the checkpoint says how many the run had read.
        step = mtc.load(checkpoint, source.meta_model(), gpu_mem=args.gpu_mem, example=next(stream),
                        device=args.device, kernels=args.kernels, tile_tokens=args.tile_tokens)
        saved = {k: v for k, v in step.data_position.items() if k != "batches"}
        if saved != data_order:
            raise ValueError(f"--resume: the checkpoint in {checkpoint} read its data as {saved}, not as "
                             f"{data_order}; resume with the same --data, --batch and --seed")
        stream = (source.call(pair) for pair in data.batches(tokens, batch, seq, seed=args.seed))
        for _ in range(step.data_position["batches"]):
            next(stream)
        print(f"resumed from {checkpoint} after {step.steps} steps")
    else:
        example = next(stream)
        stream = itertools.chain([example], stream)
        step = source.compile(gpu_mem=args.gpu_mem, example=example, device=args.device, kernels=args.kernels,
                              tile_tokens=args.tile_tokens,
                              optimizer=mtc.AdamW(lr=args.lr, weight_decay=args.weight_decay),
                              clip_grad_norm=args.clip or None)
    print(step.plan.summary())
    params = sum(p.numel() for _, p in step.named_parameters())
    print(f"compiled in {time.perf_counter() - started:.1f} s; training {params:,} parameters on {batch}x{seq} "
          f"tokens of {described}")
    if args.save_plan:
        step.plan.save(args.save_plan)
    first = last = None
    seen, training, done = 0, 0.0, step.steps  # training: seconds in steps, checkpoint saves not counted
    with tqdm(range(done, args.steps), unit="step", dynamic_ncols=True, initial=done, total=args.steps) as bar:
        for _ in bar:
            inputs = next(stream)
            began = time.perf_counter()
            last = float(step(**inputs))
            training += time.perf_counter() - began
            first = last if first is None else first
            seen += inputs["input_ids"].numel()
            bar.set_postfix(loss=f"{last:.3f}", tok_s=f"{seen / training:,.0f}")
            if writer:
                writer.add_scalar("loss", last, step.steps)
                writer.add_scalar("tokens_per_s", seen / training, step.steps)
            if args.save_every and (step.steps % args.save_every == 0 or step.steps == args.steps):
                mtc.save(step, checkpoint, data_position={"batches": step.steps, **data_order})
    began = time.perf_counter()
    step.synchronize()  # the last step's optimizer update, which runs on after its loss is known
    training += time.perf_counter() - began
    if writer:
        writer.close()
    if first is None:
        print(f"the checkpoint is already at step {done}; nothing to do for --steps={args.steps}")
        return 0
    print(f"loss {first:.3f} -> {last:.6f} in steps {done + 1}-{args.steps}, {seen / training:,.0f} tokens/s"
          + (f" (saves not counted); checkpoint in {checkpoint}" if args.save_every else ""))
    return 0


class _TrainedModel:
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


def _plan(args) -> int:
    batch, seq = _batch(args.batch)
    device = args.device or "cuda"  # planning needs no GPU: plan for the one the user will train on
    started = time.perf_counter()
    model = _TrainedModel(args.model or args.preset).meta_model()
    gpu_mem = parse_bytes(args.gpu_mem, "--gpu-mem")
    host_mem = parse_bytes(args.host_mem, "--host-mem") if args.host_mem else None

    def plan_for(tokens: int):
        ids = torch.empty(batch, tokens, dtype=torch.long, device="meta")
        return mtc.plan(model, gpu_mem, {"input_ids": ids, "labels": ids}, clip=bool(args.clip), device=device,
                        profile=args.profile, host_mem=host_mem, kernels=args.kernels, tile_tokens=args.tile_tokens)

    if args.max_seq:
        seq, base, why = _longest_sequence(plan_for, batch, gpu_mem, bool(args.clip), args.max_seq)
        print(_polynomials(base))
        print(f"longest sequence that fits: {seq} tokens ({batch}x{seq}, multiples of {SEQ_STEP}); {why}")
    try:
        planned = plan_for(seq)
    except MemoryBudgetError as error:
        # Show where the bytes go, so the user sees which stage to shrink.
        print(stage_table(error.schedule.stages), file=sys.stderr)
        raise
    print(f"planned in {time.perf_counter() - started:.1f} s", flush=True)
    if args.save:
        planned.plan.save(args.save)
        print(f"saved {args.save}")
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump(chrome_trace(planned.plan.stream_plan, planned.plan.profile), f)
        print(f"wrote the predicted timeline to {args.trace} (chrome://tracing or ui.perfetto.dev)")
    print(planned.plan if args.instructions else planned.plan.summary())
    if args.batches:
        print(_batch_table(planned, [_batch(b) for b in args.batches.split(",")], gpu_mem, bool(args.clip)))
    return 0


def _batch_table(planned, batches: list[tuple[int, int]], gpu_mem: int, clip: bool) -> str:
    """One line per batch shape: the solver's plan for it, on costs evaluated from the polynomials of b and s."""
    from mtc.codegen.stream_plan import lower, predicted_step_seconds
    from mtc.passes.schedule import schedule_pass

    symbolic, profile = planned.symbolic_costs(), planned.plan.profile
    params = sum(s.params for s in planned.costs.stages) + (planned.costs.shared.params if planned.costs.shared else 0)
    lines = [f"batch shapes on '{profile.name}' (costs from the polynomials of b and s):",
             f"{'batch':<12}{'slots/res/keep/offload':>30}{'peak':>12}{'step (s)':>10}{'tokens/s':>12}{'TFLOP/s (6PT)':>15}"]
    for sequences, seq in batches:
        try:
            schedule = schedule_pass(symbolic.at(sequences, seq), gpu_mem, clip, profile=profile)
        except MemoryBudgetError as error:
            lines.append(f"{sequences}x{seq:<10}  does not fit: needs {format_bytes(error.schedule.peak_bytes)} at "
                         f"its smallest plan")
            continue
        seconds = predicted_step_seconds(lower(schedule), profile)
        shape = f"{schedule.slots}/{len(schedule.resident)}/{len(schedule.keep)}/{len(schedule.offload)}"
        shape += f" x{schedule.chunks} chunks" if schedule.chunks > 1 else ""
        tokens = sequences * seq
        lines.append(f"{f'{sequences}x{seq}':<12}{shape:>30}{format_bytes(schedule.peak_bytes):>12}{seconds:>10.4g}"
                     f"{tokens / seconds:>12,.0f}{6 * params * tokens / seconds / 1e12:>15.0f}")
    return "\n".join(lines)


SEQ_STEP = 128
"""--max-seq searches sequence lengths in steps of this many tokens."""


def _longest_sequence(plan_for, batch: int, gpu_mem: int, clip: bool, limit: int):
    """(The longest multiple of SEQ_STEP up to `limit` whose plan fits, the plan at SEQ_STEP tokens, what stops
    the next length). Device memory grows with the sequence, so what fits is a prefix of the lengths: a
    binary search over the smallest plan (one slot, nothing resident, inputs offloaded: a plan fits the
    device if and only if that one does), its costs evaluated from the polynomials of b and s fitted once
    (passes.costs.symbolic_costs). The answer is then planned for real, host RAM included (offloaded inputs
    grow with the sequence too); should that disagree, the search runs again planning every probe."""
    if limit < SEQ_STEP:
        raise ValueError(f"--max-seq={limit} is not valid; expected a number of tokens >= {SEQ_STEP}")
    try:
        base = plan_for(SEQ_STEP)
    except MemoryBudgetError:
        raise ValueError(f"not even {SEQ_STEP} tokens a sequence fit; give a larger --gpu-mem or a smaller batch")
    symbolic = base.symbolic_costs()
    budget = int(gpu_mem * (1 - ALLOCATOR_HEADROOM))

    def fits_on_paper(tokens):
        return smallest_plan(symbolic.at(batch, tokens), gpu_mem, clip).peak_bytes <= budget

    refusals = {}

    def fits(tokens):
        try:
            plan_for(tokens)
            return True
        except (MemoryBudgetError, HostMemoryError) as error:
            refusals[tokens] = error
            return False

    seq = _search(fits_on_paper, limit)
    if not (fits(seq) and (seq + SEQ_STEP > limit or not fits(seq + SEQ_STEP))):
        seq = _search(fits, limit)
    if seq + SEQ_STEP > limit:
        return seq, base, f"--max-seq={limit} stops the search"
    if seq + SEQ_STEP not in refusals:
        fits(seq + SEQ_STEP)
    error = refusals[seq + SEQ_STEP]
    what = "the GPU's working set" if isinstance(error, MemoryBudgetError) else "host RAM"
    return seq, base, f"at {seq + SEQ_STEP} tokens {what} stops it: {error}"


def _polynomials(planned) -> str:
    """Each template's costs as polynomials of b and s, for its first stage."""
    symbolic, seen = planned.symbolic_costs(), set()
    lines = ["costs as polynomials of batch b and sequence length s (one stage per template):"]
    for index, stage in enumerate(planned.partition.stages):
        if stage.template.name not in seen:
            seen.add(stage.template.name)
            lines.append(f"  {stage.name}: " + "; ".join(f"{field} = {text}"
                                                         for field, text in symbolic.describe(index).items()))
    return "\n".join(lines)


def _search(fits, limit: int) -> int:
    low, high = 1, limit // SEQ_STEP  # in steps: low fits, high is the upper end
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle * SEQ_STEP):
            low = middle
        else:
            high = middle - 1
    return low * SEQ_STEP


def _bench(args) -> int:
    from mtc import bench

    for name in ("steps", "warmup"):
        if getattr(args, name) < (1 if name == "steps" else 0):
            raise ValueError(f"--{name}={getattr(args, name)} is not valid; expected an integer >= "
                             f"{1 if name == 'steps' else 0}")
    if args.schedule or args.no_calibrate or "," in args.batch or "," in args.gpu_mem:
        return _bench_sweep(args, bench)
    parse_bytes(args.gpu_mem, "--gpu-mem")
    if args.peer_timeout <= 0:
        raise ValueError(f"--peer-timeout={args.peer_timeout} is not valid; expected seconds > 0")
    if args.trace and args.no_trace:
        raise ValueError("--trace writes the traced steps that --no-trace leaves out; give one of them")

    def progress(result: dict, name: str) -> None:  # what ran so far is kept should a later system hang
        print(bench.summary(name, result["mtc"] if name == "mtc" else result["vs"][name]), file=sys.stderr,
              flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    # A stop (timeout, kill) unwinds, so that a running peer's processes are stopped with us.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        result = bench.run(args.preset, _batch(args.batch), gpu_mem=args.gpu_mem, steps=args.steps,
                           warmup=args.warmup, clip=args.clip or None, vs=_baselines(args.vs),
                           trace_path=args.trace, cpu_threads=args.cpu_threads, peer_timeout_s=args.peer_timeout,
                           progress=progress, kernels=args.kernels, tile_tokens=args.tile_tokens,
                           traced=not args.no_trace)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(bench.table(result))
    return 0


def _baselines(names: str) -> tuple[str, ...]:
    from mtc.examples.baselines import BASELINES

    chosen = tuple(name for name in names.split(",") if name)
    unknown = [name for name in chosen if name not in BASELINES]
    if unknown:
        raise ValueError(f"--vs={names!r} names {', '.join(unknown)}, which is not a baseline; expected a "
                         f"comma-separated list of {', '.join(BASELINES)}")
    return chosen


def _bench_sweep(args, bench) -> int:
    from mtc.compile import SCHEDULES

    schedules = (args.schedule or "solve").split(",")
    for schedule in schedules:
        if schedule not in SCHEDULES:
            raise ValueError(f"--schedule={args.schedule!r} is not valid; expected a comma-separated list of "
                             f"{', '.join(SCHEDULES)}")
    budgets = args.gpu_mem.split(",")
    for budget in budgets:
        parse_bytes(budget, "--gpu-mem")
    if args.vs or args.trace:
        raise ValueError("--vs and --trace time one configuration; leave out --schedule and the lists")
    result = bench.sweep(args.preset, [_batch(b) for b in args.batch.split(",")], budgets, schedules,
                         steps=args.steps, warmup=args.warmup, clip=args.clip or None,
                         cpu_threads=args.cpu_threads, progress=lambda row: print(json.dumps(row), flush=True),
                         calibrate=not args.no_calibrate, kernels=args.kernels)
    print(bench.sweep_table(result["rows"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _probe(args) -> int:
    from mtc import probe
    from mtc.compile import _device

    if args.cpu_threads is not None and args.cpu_threads < 1:
        raise ValueError(f"--cpu-threads={args.cpu_threads} is not valid; expected an integer >= 1")
    device = _device(args.device)
    if args.calibrate:  # checked before the minute of probing, not after
        try:
            models.preset_config(args.calibrate)
        except ValueError as error:
            raise ValueError(f"--calibrate={args.calibrate!r} is not a preset: {error}") from None
        if device.type != "cuda":
            raise ValueError("--calibrate times a step on the GPU and the device is the CPU")
        batch, gpu_mem = _batch(args.batch), parse_bytes(args.gpu_mem, "--gpu-mem")
    print(f"mtc probe: measuring {probe.device_name(device)}{' (quick)' if args.quick else ''}...", flush=True)
    profile = probe.probe(device, cpu_threads=args.cpu_threads, quick=args.quick)
    if args.calibrate:
        print(f"mtc probe: calibrating on {args.calibrate} {args.batch}...", flush=True)
        profile, _ = probe.calibrated_on(args.calibrate, batch, gpu_mem, device, profile, args.cpu_threads)
    path = args.save or probe.profile_path(probe.device_name(device))
    probe.save(profile, path)
    print(f"copy in {profile.h2d_bytes_per_s / 1e9:.1f} GB/s, copy out {profile.d2h_bytes_per_s / 1e9:.1f} GB/s "
          f"(while the host optimizer runs); a decoder block {profile.flops_per_s / 1e12:.1f} TFLOP/s; AdamW "
          f"{profile.optimizer_params_per_s / 1e9:.2f} G params/s on the host, "
          f"{profile.gpu_optimizer_params_per_s / 1e9:.1f} on the device; host RAM "
          f"{profile.host_bytes / 2**30:.0f} GiB\n{profile.source}\nsaved {path}")
    return 0


def _show(args) -> int:
    print(mtc.Plan.load(args.path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
