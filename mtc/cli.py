"""The `mtc` command: train, plan and show, for people who would rather not write code."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time

import torch

import mtc
from mtc.codegen.patterns import KERNELS
from mtc.codegen.stream_plan import chrome_trace
from mtc.codegen.tiles import TILE_TOKENS
from mtc.compile import _device
from mtc.config import format_bytes, parse_batch, parse_bytes
from mtc.passes.schedule import ALLOCATOR_HEADROOM, MemoryBudgetError, smallest_plan
from mtc.plan import stage_table
from mtc.probe import resolve_profile
from mtc.runtime.store import HostMemoryError
from mtc.examples import models
from mtc import train as train_command
from mtc.train import TrainedModel


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mtc", description=__doc__)
    commands = parser.add_subparsers(dest="command")

    train = commands.add_parser("train", help="train a preset or a Hugging Face model (default: tiny, on the "
                                              "built-in corpus)")
    _model_arguments(train, batch="8x128", gpu_mem="80GB", device_must_exist=True)
    _model_directory_argument(train)
    train.add_argument("--data", default=None, metavar="PATH",
                       help="token ids (.bin: uint16, uint32 past 65536 words), text (a file or a directory of "
                            ".txt; through the model directory's tokenizer, else bytes) or a saved Hugging Face "
                            "dataset (input_ids or text) (default: the Python standard library's source)")
    train.add_argument("--log-dir", default=None, metavar="DIR", help="also log loss and tokens/s for TensorBoard")
    train.add_argument("--host-mem", default=None, type=_checked("--host-mem", parse_bytes),
                       help="host RAM mtc may plan for, the process included (default: what the host can give now)")
    train.add_argument("--nvme", default=None, metavar="DIR", type=_nonempty("--nvme"),
                       help="a directory on a fast disk where blocks may keep their optimizer state when host RAM "
                            "cannot hold it all (the plan's disk: line says which and what it costs)")
    train.add_argument("--steps", type=int, default=150, help="optimizer steps (default 150)")
    train.add_argument("--lr", type=_number("--lr", "a finite number >= 0"), default=3e-3,
                       help="AdamW learning rate (default 3e-3)")
    train.add_argument("--weight-decay", type=_number("--weight-decay", "a finite number >= 0"), default=0.1)
    train.add_argument("--seed", type=_integer("--seed", -2**63, 2**64 - 1), default=0,
                       help="model init and data order (default 0)")
    train.add_argument("--save-plan", metavar="PATH", help="also write the plan as JSON")
    train.add_argument("--checkpoint", metavar="DIR", default=None,
                       help="where --save-every, a stop by SIGINT/SIGTERM and --resume keep the checkpoint "
                            "(default runs/<preset>)")
    train.add_argument("--save-every", type=int, default=0, metavar="STEPS",
                       help="save a checkpoint every STEPS steps and at the end (default 0: only when stopped by "
                            "SIGINT or SIGTERM)")
    train.add_argument("--resume", action="store_true",
                       help="go on from the checkpoint (weights, AdamW state, RNG, data position) up to --steps "
                            "steps in all, with its hyperparameters")

    plan = commands.add_parser("plan", help="plan a preset on the meta device (no memory, no GPU needed)")
    _model_arguments(plan, batch="4x4096", gpu_mem="80GB")
    _model_directory_argument(plan)
    plan.add_argument("--save", metavar="PATH", help="write the plan as JSON (read it with `mtc show`)")
    plan.add_argument("--instructions", action="store_true", help="print every stream instruction too")
    plan.add_argument("--trace", metavar="PATH", help="write the predicted timeline as a Chrome/Perfetto trace")
    plan.add_argument("--max-seq", type=_integer("--max-seq", SEQ_STEP), metavar="LIMIT", default=None,
                      help="find the longest sequence (up to LIMIT tokens) that fits, for --batch's sequence count")
    plan.add_argument("--batches", metavar="BxS,...", default=None, type=_checked("--batches", parse_batch, lists=True),
                      help="also a line per batch shape (e.g. 1x4096,2x4096,4x4096): the plan solved for it from "
                           "the costs' polynomials, without tracing again")

    plan.add_argument("--host-mem", default=None, type=_checked("--host-mem", parse_bytes),
                      help="host RAM to plan for, e.g. 1.5TB (default: the profile's); refused if the state won't fit")
    plan.add_argument("--nvme", action="store_true",
                      help="plan as `mtc train --nvme DIR` would: blocks may keep their optimizer state on disk where "
                           "--host-mem cannot hold it")
    plan.add_argument("--ranks", type=_integer("--ranks", 1), default=1,
                      help="data-parallel ranks (GPUs, as torchrun --nproc_per_node gives) to plan one of: --batch "
                           "is the whole step's rows, split evenly; --host-mem is each rank's")
    plan.add_argument("--profile", default=None, type=_checked("--profile", lambda text, _: resolve_profile(text)),
                      help="hardware to plan for: h100, h200, a100, rtx4090, cpu or a saved profile's path "
                           "(default: what `mtc probe` saved for this machine's GPU, else h100)")

    probe = commands.add_parser("probe", help="measure this machine's copy, GEMM and AdamW rates and save "
                                              "them as the profile plans use")
    probe.add_argument("--device", default=None, type=_checked("--device", lambda text, _: _device(text)),
                       help="cpu or cuda (default: cuda when present)")
    probe.add_argument("--save", metavar="PATH", default=None,
                       help="where to write it (default: ~/.cache/mtc/profile-<device>.json, or $MTC_PROFILE)")
    probe.add_argument("--quick", action="store_true", help="small sizes: seconds instead of a minute, rougher")
    probe.add_argument("--nvme", default=None, metavar="DIR", type=_nonempty("--nvme"),
                       help="also measure the read and write rates of this directory's disk (for `--nvme DIR`)")
    probe.add_argument("--cpu-threads", type=_integer("--cpu-threads", 1, os.cpu_count() or 1), default=None,
                       help="threads for the CPU optimizer (default: all cores but four)")
    probe.add_argument("--calibrate", metavar="PRESET", default=None, type=_nonempty("--calibrate"),
                       help="then train PRESET's spine plan a few steps (GPU) and save the rates its step showed")
    probe.add_argument("--batch", default="2x4096", type=_checked("--batch", parse_batch),
                       help="batch for --calibrate (default 2x4096)")
    probe.add_argument("--gpu-mem", default="80GB", type=_checked("--gpu-mem", parse_bytes),
                       help="gpu_mem for --calibrate (default 80GB)")

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
    bench.add_argument("--peer-timeout", type=_number("--peer-timeout", "a finite number of seconds > 0",
                                                      lambda seconds: seconds > 0), default=3600, metavar="SECONDS",
                       help="stop a --vs peer that runs longer, and report it failed (default 3600)")
    bench.add_argument("--trace", metavar="PATH", help="write two measured steps as a Chrome/Perfetto trace")
    bench.add_argument("--no-trace", action="store_true",
                       help="leave out the two steps timed per instruction (lanes, bounds), minutes at long sequences")
    bench.add_argument("--json", metavar="PATH", help="write every figure as JSON (rewritten as each system finishes)")
    bench.add_argument("--cpu-threads", type=_integer("--cpu-threads", 1, os.cpu_count() or 1), default=None,
                       help="threads for the CPU optimizer (default: all cores but four)")
    bench.add_argument("--no-calibrate", action="store_true",
                       help="a sweep (as --schedule) planned on the saved profile, without first timing the spine plan")
    bench.add_argument("--schedule", default=None, metavar="solve,spine", type=_nonempty("--schedule"),
                       help="measured against predicted: --batch and --gpu-mem may then list several values "
                            "(comma-separated), and every combination runs on one state store")

    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["train"] + list(argv if argv is not None else sys.argv[1:]))
    try:
        if args.command in ("train", "plan"):  # before any work: train would read it only when it compiles
            parse_bytes(args.gpu_mem, "--gpu-mem")
        return {"train": train_command.train, "plan": _plan, "show": _show, "bench": _bench, "probe": _probe}[args.command](args)
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


def _checked(flag: str, read, lists: bool = False):
    """An argparse type= refusing what read(text, flag) refuses with a ValueError naming the flag, as argparse
    refuses a bad value: "argument --flag: <why>", status 2, before any work. The text is kept as given; with
    lists, each comma-separated part is read."""
    def check(text: str) -> str:
        try:
            for part in text.split(",") if lists else [text]:
                read(part, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text
    return check


def _number(flag: str, accepted: str, ok=lambda value: value >= 0):
    """An argparse type= for a finite number (as float() reads it) that ok(value) accepts."""
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is not valid; expected {accepted}")
        return value
    return number


def _integer(flag: str, low: int, high: int | None = None):
    """An argparse type= for an integer from low to high (no limit: None)."""
    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            accepted = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is not valid; expected an integer {accepted}")
        return value
    return integer


def _model_arguments(parser, batch: str, gpu_mem: str, preset: str = "tiny", device_must_exist: bool = False):
    """device_must_exist: --device names a device of this machine (to train on), not one to plan for."""
    parser.add_argument("--preset", default=preset, type=_preset,
                        help=f"model shape: {', '.join(sorted(models.PRESETS))}, or one of them with another "
                             f"number of blocks, as 8b:40 (default {preset})")
    parser.add_argument("--batch", default=batch, help=f"sequences x tokens per step (default {batch})")
    parser.add_argument("--gpu-mem", default=gpu_mem,
                        help=f"device memory budget, e.g. 24GB, 80GiB (default {gpu_mem})")
    parser.add_argument("--clip", type=_number("--clip", "a finite number >= 0 (0: off)"), default=1.0,
                        help="clip gradients to this global norm (default 1.0; 0: off)")
    parser.add_argument("--device", default=None,
                        type=_checked("--device", lambda text, _: _device(text, must_exist=device_must_exist)),
                        help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--kernels", default="auto", type=_kernels,
                        help="Triton kernels in place of the patterns they replace: auto (all on a GPU, none "
                             f"on the CPU), all, none, some of {','.join(KERNELS)}, or some as -name (switched "
                             "off, as --kernels=-rope) (default: auto)")
    parser.add_argument("--tile-tokens", type=_tile_tokens, default=TILE_TOKENS, metavar="TOKENS",
                        help="tokens per tile when a recomputed block runs what follows its attention in token "
                             f"tiles (default {TILE_TOKENS})")


def _model_directory_argument(parser) -> None:
    parser.add_argument("--model", default=None, metavar="DIR|PRESET", type=_nonempty("--model"),
                        help="a Hugging Face model directory (its config.json; the weights too, to train) or a "
                             "preset, as --preset")


def _nonempty(flag: str):
    """An argparse type= refusing an empty value, which would otherwise read as the flag's default."""
    def nonempty(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag}={text!r} is empty; leave the flag out for its default")
        return text
    return nonempty


def _kernels(text: str) -> str | tuple[str, ...]:
    from mtc.codegen.patterns import kernel_names

    _nonempty("--kernels")(text)  # "none" says no kernels; an empty value would say it by accident
    try:
        kernel_names(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--kernels={text!r}: {str(error).split(': ', 1)[1]}") from None
    return text


UPDATES_WAIT_FOR_THE_NORM = True
"""mtc train skips non-finite steps, so its updates wait for the global gradient norm even without --clip."""


def _plan(args) -> int:
    batch, seq = parse_batch(args.batch)
    if batch % args.ranks:
        raise ValueError(f"--batch={args.batch} is not valid with --ranks={args.ranks}: each rank takes an equal "
                         f"share of the {batch} rows; give a number of rows divisible by {args.ranks}")
    batch //= args.ranks
    device = args.device or "cuda"  # planning needs no GPU: plan for the one the user will train on
    started = time.perf_counter()
    model = TrainedModel(args.model or args.preset).meta_model()
    gpu_mem = parse_bytes(args.gpu_mem, "--gpu-mem")
    host_mem = parse_bytes(args.host_mem, "--host-mem") if args.host_mem else None

    def plan_for(tokens: int):
        ids = torch.empty(batch, tokens, dtype=torch.long, device="meta")
        return mtc.plan(model, gpu_mem, {"input_ids": ids, "labels": ids}, clip=bool(args.clip), device=device,
                        profile=args.profile, host_mem=host_mem, kernels=args.kernels, tile_tokens=args.tile_tokens,
                        ranks=args.ranks, nvme=args.nvme)

    if args.max_seq:
        seq, base, why = _longest_sequence(plan_for, batch, gpu_mem, UPDATES_WAIT_FOR_THE_NORM, args.max_seq)
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
        shapes = [parse_batch(b) for b in args.batches.split(",")]
        for rows, tokens in shapes:
            if rows % args.ranks:
                raise ValueError(f"--batches: {rows}x{tokens} is not valid with --ranks={args.ranks}: each rank takes "
                                 f"an equal share of the rows; give numbers of rows divisible by {args.ranks}")
        print(_batch_table(planned, [(rows // args.ranks, tokens) for rows, tokens in shapes], gpu_mem,
                           UPDATES_WAIT_FOR_THE_NORM, args.ranks))
    return 0


def _batch_table(planned, batches: list[tuple[int, int]], gpu_mem: int, clip: bool, ranks: int = 1) -> str:
    """One line per batch shape (each rank's, of `ranks`): the solver's plan for it, on costs evaluated from the
    polynomials of b and s."""
    from mtc.codegen.stream_plan import lower, predicted_step_seconds
    from mtc.passes.schedule import schedule_pass

    symbolic, profile = planned.symbolic_costs(), planned.plan.profile
    params = sum(s.params for s in planned.costs.stages) + (planned.costs.shared.params if planned.costs.shared else 0)
    lines = [f"batch shapes on '{profile.name}' (costs from the polynomials of b and s):",
             f"{'batch':<12}{'slots/res/keep/offload':>30}{'peak':>12}{'step (s)':>10}{'tokens/s':>12}{'TFLOP/s (6PT)':>15}"]
    for sequences, seq in batches:
        try:
            schedule = schedule_pass(dataclasses.replace(symbolic.at(sequences, seq), ranks=ranks), gpu_mem, clip,
                                     profile=profile)
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
        result = bench.run(args.preset, parse_batch(args.batch), gpu_mem=args.gpu_mem, steps=args.steps,
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
    result = bench.sweep(args.preset, [parse_batch(b) for b in args.batch.split(",")], budgets, schedules,
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
        batch, gpu_mem = parse_batch(args.batch), parse_bytes(args.gpu_mem, "--gpu-mem")
    print(f"mtc probe: measuring {probe.device_name(device)}{' (quick)' if args.quick else ''}...", flush=True)
    profile = probe.probe(device, cpu_threads=args.cpu_threads, quick=args.quick)
    if args.nvme:
        from mtc.runtime.disk import disk_rates

        read, write, direct = disk_rates(args.nvme, 1 << (26 if args.quick else 31))
        profile = dataclasses.replace(profile, disk_read_bytes_per_s=read, disk_write_bytes_per_s=write,
                                      source=f"{profile.source}; disk {args.nvme}: read {read / 1e9:.2f} GB/s, write "
                                             f"{write / 1e9:.2f} GB/s{' (O_DIRECT)' if direct else ' (page cache)'}")
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
