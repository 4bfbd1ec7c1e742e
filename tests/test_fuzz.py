"""Fuzzing the public entry points' arguments: mtc.compile, mtc.plan, parse_bytes, mtc.AdamW, step() calls and the
`mtc` command's flags. An invalid value is refused with a ValueError or TypeError whose message names the argument,
never with a traceback from inside (the command: status 2 and the flag on stderr, before any work starts); a valid
value works. No GPU; tiny models; well under a minute on 2 cores."""
import contextlib
import io
import math
import os
import re
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mtc
import mtc.cli as cli
from mtc.train import TrainedModel
from mtc.codegen.patterns import kernel_names
from mtc.config import MAX_BYTES, PROFILES, parse_bytes
from mtc.examples import models as presets
from mtc.passes.schedule import MemoryBudgetError
from mtc.runtime.store import HostMemoryError
from models import VOCAB, mlp_stack, tokens

CORES = os.cpu_count() or 1
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ALL_DTYPES = sorted({value for value in vars(torch).values() if isinstance(value, torch.dtype)}, key=str)

# Values that broke, or nearly broke, an entry point: huge and non-finite numbers, bools (ints to Python), empty
# and blank strings, Unicode digits, the Kelvin sign (a "K" to Unicode case folding), types of every kind.
SPECIAL = [None, True, False, 0, -1, 1, 10**30, 10**400, -(10**400), math.nan, math.inf, -math.inf, 1e-320, -0.0,
           "", " ", "\x00", "nan", "inf", "-1", "0", "1e400", "9" * 400, "9" * 400 + "GB", "١٢GB", "𝟗", "1\u212aB",
           "é", "80GB", b"80GB", [], (), {}, [1, 2], (0.9, "x"), object(), torch.float32, torch.int64,
           torch.tensor(1.0), torch.tensor([1.0, 2.0])]
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
BLANK = "[ \t\n\r\f\v]*"
DOCUMENTED_SIZE = re.compile(f"{BLANK}([0-9]+(?:[.][0-9]+)?){BLANK}([A-Za-z]*){BLANK}")


def anything():
    """Values of every kind: the ones above, and hypothesis's numbers, text and containers."""
    return st.one_of(st.sampled_from(SPECIAL), st.integers(), st.floats(), st.text(max_size=12), st.binary(max_size=4),
                     st.lists(st.integers(), max_size=3), st.tuples(st.floats(), st.floats()))


def size_texts():
    """Text near the documented sizes ('80GB', '24GiB', '512MB', '100'): signs, spaces, units and numbers off."""
    number = st.one_of(st.integers(0, 10**25).map(str), st.floats(0, 1e6).map(lambda f: f"{f:.3f}"),
                       st.floats(0, 1e30).map(str), st.sampled_from(["", ".5", "1.", "9" * 400, "١٢", "1_0"]))
    unit = st.sampled_from([*UNITS, "KB", "GiB", "gIb", "TIB", "K", "XB", "PB", "kibb", "\u212aB", "GıB"])
    space = st.sampled_from(["", "", " ", "\t", "\n", "\u00a0", "\u3000"])
    sign = st.sampled_from(["", "", "-", "+"])
    return st.builds(lambda *parts: "".join(parts), space, sign, number, space, unit, space)


def documented_size(value) -> int | None:
    """The bytes a size means by the documented forms (an int of bytes, or a decimal number and a unit); None
    where it names no size."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    if isinstance(value, str):
        match = DOCUMENTED_SIZE.fullmatch(value)
        if match is None or match.group(2).lower() not in UNITS:
            return None
        value = float(match.group(1)) * UNITS[match.group(2).lower()]
    return int(value) if 1 <= value <= MAX_BYTES else None


def finite_real(value) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past the largest float
        return False


def attempt(call):
    """None if call() works, else the ValueError, TypeError or HostMemoryError it raised. Anything else
    propagates and fails the test: a traceback from inside is what these tests look for."""
    try:
        call()
    except (ValueError, TypeError, HostMemoryError) as error:
        return error
    return None


def assert_refused_by_name(error, name: str, value, shown: bool = True) -> None:
    """A plain ValueError or TypeError (not a too-big error: the value is wrong, not too large for the machine)
    whose message names the argument and, where `shown`, the value."""
    assert error is not None, f"{name}={value!r} was accepted"
    assert type(error) in (ValueError, TypeError), f"{name}={value!r}: {type(error).__name__}: {error}"
    assert f"{name}=" in str(error), f"{name}={value!r}: the message does not name it: {error}"
    assert not shown or repr(value) in str(error), f"{name}={value!r}: the message does not show it: {error}"


# -- parse_bytes and AdamW ---------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(value=st.one_of(anything(), size_texts()))
def test_parse_bytes_reads_the_documented_forms_and_refuses_the_rest_by_name(value):
    expected = documented_size(value)
    error = attempt(lambda: parse_bytes(value, "host_mem"))
    if expected is not None:
        assert error is None and parse_bytes(value, "host_mem") == expected
    else:
        assert_refused_by_name(error, "host_mem", value)


@settings(max_examples=100, deadline=None)
@given(unit_and_size=st.sampled_from(sorted(UNITS)).flatmap(  # sizes a float holds exactly: up to 2**53 bytes
    lambda unit: st.tuples(st.just(unit), st.integers(1, 2**53 // UNITS[unit]))),
    upper=st.booleans(), space=st.booleans())
def test_every_documented_size_reads_as_its_bytes(unit_and_size, upper, space):
    unit, size = unit_and_size
    assert parse_bytes(f"{size}{' ' if space else ''}{unit.upper() if upper else unit}") == size * UNITS[unit]


@settings(max_examples=150, deadline=None)
@given(field=st.sampled_from(["lr", "eps", "weight_decay"]), value=anything())
def test_adamw_takes_finite_numbers_at_least_0_and_refuses_the_rest_by_name(field, value):
    error = attempt(lambda: mtc.AdamW(**{field: value}))
    if finite_real(value) and value >= 0:
        assert error is None and getattr(mtc.AdamW(**{field: value}), field) == value
    else:
        assert_refused_by_name(error, f"AdamW {field}", value)


@settings(max_examples=150, deadline=None)
@given(betas=st.one_of(anything(), st.tuples(anything(), anything()), st.lists(st.floats(-1, 2), max_size=3),
                       st.tuples(st.floats(0, 1, exclude_max=True), st.floats(0, 1, exclude_max=True))))
def test_adamw_betas_are_two_numbers_in_0_1_or_refused_by_name(betas):
    error = attempt(lambda: mtc.AdamW(betas=betas))
    if isinstance(betas, (tuple, list)) and len(betas) == 2 and all(finite_real(b) and 0 <= b < 1 for b in betas):
        assert error is None and mtc.AdamW(betas=betas).betas == tuple(float(b) for b in betas)
    else:
        assert_refused_by_name(error, "AdamW betas", betas)


# -- mtc.plan and mtc.compile ------------------------------------------------------------------------------

EXAMPLE = tokens(seed=0)


def _plans(**options):
    return attempt(lambda: mtc.plan(**{"model": mlp_stack(), "gpu_mem": "1GB", "example": EXAMPLE, "device": "cpu",
                                       **options}))


# name: (values to try besides anything(), the documented valid values; None: only how a refusal reads is checked)
PLAN_ARGUMENTS = {
    "gpu_mem": (size_texts(), lambda v: documented_size(v) is not None),
    "host_mem": (size_texts(), lambda v: v is None or documented_size(v) is not None),
    "clip": (st.booleans(), lambda v: isinstance(v, bool)),
    "compute_dtype": (st.sampled_from(ALL_DTYPES),
                      lambda v: v is None or isinstance(v, torch.dtype) and v in COMPUTE_DTYPES),
    "profile": (st.sampled_from([*PROFILES, "H100", "h100 "]),  # a path names itself: see the test of a broken file
                lambda v: v is None or isinstance(v, str) and v in PROFILES),
    "schedule": (st.sampled_from(["solve", "spine", "Solve", "solve,spine"]),
                 lambda v: isinstance(v, str) and v in ("solve", "spine")),
    "tile_tokens": (st.integers(-3, 2**70), lambda v: type(v) is int and v >= 1),
    "device": (st.sampled_from(["cpu", "cuda", "cuda:1", "cpu:0", "meta", "mps", "cuda:-1", "cuda:x", "gpu",
                                torch.device("cpu"), torch.device("meta"), 10**30]), None),
    "kernels": (st.one_of(st.sampled_from(["auto", "all", "none", "rope", "-rope", "rope,-swiglu", "rope,rope"]),
                          st.lists(st.sampled_from(["rmsnorm", "swiglu", "x", "-rope", ""]), max_size=3)), None),
}


@pytest.mark.parametrize("name", sorted(PLAN_ARGUMENTS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_plan_arguments_are_taken_or_refused_by_name(name, data):
    values, valid = PLAN_ARGUMENTS[name]
    value = data.draw(st.one_of(values, anything()).filter(lambda v: not (isinstance(v, str) and os.path.exists(v))),
                      label=name)
    error = _plans(**{name: value})
    if valid is not None and valid(value):  # too small a budget is a valid one, refused for being too small
        assert error is None or isinstance(error, (MemoryBudgetError, HostMemoryError)), f"{name}={value!r}: {error}"
    elif valid is not None or error is not None:  # invalid, or (where no rule is written here) refused
        assert_refused_by_name(error, name, value, shown=name != "device")  # device(type='meta') shows as 'meta'


@pytest.mark.parametrize("name, value", [
    ("gpu_mem", 10**309), ("gpu_mem", "9" * 400 + "GB"), ("gpu_mem", "1\u212aB"), ("host_mem", 2**63),
    ("compute_dtype", torch.int64), ("compute_dtype", "bfloat16"), ("compute_dtype", False), ("compute_dtype", 0),
    ("compute_dtype", torch.float8_e4m3fn), ("device", 10**30), ("clip", 1.0), ("clip", "yes"),
])
def test_plan_refuses_what_once_failed_inside_or_was_taken_silently(name, value):
    assert_refused_by_name(_plans(**{name: value}), name, value, shown=name != "device")


@pytest.mark.parametrize("name, value", [("gpu_mem", 10**18), ("gpu_mem", " 2.5 gib "), ("host_mem", "1.5TB"),
                                         ("compute_dtype", torch.float16), ("compute_dtype", torch.float64),
                                         ("device", "cuda"), ("device", torch.device("cpu")), ("kernels", []),
                                         ("tile_tokens", 2**40), ("profile", "rtx4090"), ("schedule", "spine")])
def test_plan_takes_the_documented_values(name, value):
    assert _plans(**{name: value}) is None


def test_a_profile_path_that_holds_no_profile_is_refused_by_its_path(tmp_path):
    broken = tmp_path / "profile.json"
    broken.write_text('{"name": "h100"}')
    error = _plans(profile=str(broken))
    assert type(error) is ValueError and f"{broken} is not a hardware profile" in str(error)


@settings(max_examples=40, deadline=None)
@given(model=anything())
def test_a_model_that_is_no_module_is_refused_by_name(model):
    assert_refused_by_name(_plans(model=model), "model", model, shown=False)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(0, 3), seq=st.integers(0, 9), keyword=st.booleans())
def test_example_shapes_plan_or_an_empty_one_is_refused_by_name(batch, seq, keyword):
    ids = torch.zeros(batch, seq, dtype=torch.long)
    example = {"input_ids": ids, "labels": ids} if keyword else (ids, ids)
    error = _plans(example=example)
    if batch and seq:
        assert error is None
    else:  # once a ZeroDivisionError from the costs pass
        assert_refused_by_name(error, "example['input_ids']" if keyword else "example[0]", ids, shown=False)
        assert f"tensor({batch}, {seq}) int64" in str(error)


@settings(max_examples=40, deadline=None)
@given(example=st.one_of(anything().filter(lambda v: not isinstance(v, (tuple, list, dict))),
                         st.lists(st.just(EXAMPLE[0]), max_size=4).filter(lambda v: len(v) != 2),
                         st.dictionaries(st.sampled_from(["input_ids", "labels", "mask", "x"]), st.just(EXAMPLE[0]))
                         .filter(lambda v: set(v) != {"input_ids", "labels"})))
def test_an_example_that_is_no_call_of_the_model_is_refused_by_name(example):
    # Positional (a tuple or a list) or keyword (a dict) arguments that bind to forward(input_ids, labels).
    error = _plans(example=example)
    assert error is not None and type(error) is TypeError and "example" in str(error), f"{example!r}: {error}"


def _compiles_and_steps(**options):
    """None if compile() takes the options and the step runs to a finite loss, else the refusal."""
    def call():
        step = mtc.compile(mlp_stack(), "1GB", EXAMPLE, **{"device": "cpu", "progress": False, **options})
        assert math.isfinite(float(step(*EXAMPLE)))
    return attempt(call)


COMPILE_ARGUMENTS = {
    "clip_grad_norm": (st.floats(-1, 1e300), lambda v: v is None or finite_real(v) and v > 0),
    "cpu_threads": (st.integers(-2, CORES + 2), lambda v: v is None or type(v) is int and 1 <= v <= CORES),
    "optimizer": (st.just(mtc.AdamW(lr=1e-3)), lambda v: v is None or isinstance(v, mtc.AdamW)),
    "init": (st.just(presets.init_weights), lambda v: v is None or callable(v)),
    "progress": (st.booleans(), lambda v: isinstance(v, bool)),
    "skip_nonfinite": (st.booleans(), lambda v: isinstance(v, bool)),
    "max_consecutive_skips": (st.integers(-2, 30), lambda v: type(v) is int and v >= 1),
    "watchdog": (st.one_of(st.none(), st.floats(-1, 1e300)), lambda v: v is None or finite_real(v) and v >= 1),
}


@pytest.mark.parametrize("name", sorted(COMPILE_ARGUMENTS))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_compile_arguments_are_taken_or_refused_by_name(name, data):
    values, valid = COMPILE_ARGUMENTS[name]
    value = data.draw(st.one_of(values, anything()), label=name)
    error = _compiles_and_steps(**{name: value})
    if valid(value):
        assert error is None, f"{name}={value!r}: {error}"
    else:
        assert_refused_by_name(error, name, value)


@pytest.mark.parametrize("name, value", [
    ("clip_grad_norm", math.inf), ("clip_grad_norm", True), ("clip_grad_norm", 10**400), ("cpu_threads", True),
    ("cpu_threads", 10**30), ("progress", None), ("progress", "no"), ("watchdog", 10**400), ("watchdog", math.nan),
    ("max_consecutive_skips", True), ("skip_nonfinite", 1),
])
def test_compile_refuses_what_once_failed_later_or_was_taken_silently(name, value):
    assert_refused_by_name(_compiles_and_steps(**{name: value}), name, value)


def test_an_int_clip_past_int64_clips_as_its_float():
    assert _compiles_and_steps(clip_grad_norm=10**30) is None  # once an OverflowError in the step


# -- step() calls ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def step():
    return mtc.compile(mlp_stack(), "1GB", EXAMPLE, device="cpu", progress=False)


DTYPES = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.float32, torch.bfloat16, torch.float64]
COMPILED_FOR = "tensor(2, 8) int64"


def call_values():
    """Token tensors of any small shape and dtype, or no tensor at all."""
    shapes = st.one_of(st.just((2, 8)), st.lists(st.integers(0, 9), max_size=3).map(tuple))
    tensors = st.builds(lambda shape, dtype: torch.randint(0, VOCAB, shape).to(dtype), shapes, st.sampled_from(DTYPES))
    return st.one_of(tensors, tensors, anything())


@settings(max_examples=60, deadline=None)
@given(input_ids=call_values(), labels=call_values(), keyword=st.booleans())
def test_a_step_runs_on_the_compiled_shapes_and_refuses_others_by_name(step, input_ids, labels, keyword):
    def compiled_for(value):
        return isinstance(value, torch.Tensor) and value.shape == (2, 8) and value.dtype == torch.int64

    steps = step.steps
    call = (lambda: step(input_ids=input_ids, labels=labels)) if keyword else (lambda: step(input_ids, labels))
    if compiled_for(input_ids) and compiled_for(labels):
        assert math.isfinite(float(call())) and step.steps == steps + 1
        return
    with pytest.raises(ValueError) as error:
        call()
    wrong = "input_ids" if not compiled_for(input_ids) else "labels"
    assert f"step() argument {wrong!r} is " in str(error.value) and COMPILED_FOR in str(error.value)
    assert step.steps == steps


@settings(max_examples=30, deadline=None)
@given(names=st.lists(st.sampled_from(["input_ids", "labels", "mask", "x"]), unique=True))
def test_a_step_called_with_other_keywords_names_the_missing_or_unexpected_one(step, names):
    if set(names) == {"input_ids", "labels"}:
        assert math.isfinite(float(step(**dict.fromkeys(names, EXAMPLE[0]))))
        return
    with pytest.raises(TypeError) as error:
        step(**dict.fromkeys(names, EXAMPLE[0]))
    wrong = {"input_ids", "labels"} ^ set(names)
    assert any(repr(name) in str(error.value) for name in wrong), str(error.value)


def test_a_step_called_with_a_tensor_on_another_device_is_refused_by_name():
    step = mtc.compile(mlp_stack(), "1GB", EXAMPLE, device="cpu", progress=False)
    with pytest.raises(ValueError, match="'input_ids' is on meta; expected a tensor on the CPU"):
        step(EXAMPLE[0].to("meta"), EXAMPLE[1])


# -- the command line --------------------------------------------------------------------------------------


class _WorkStarted(Exception):
    """Raised where a command starts its work (data, model, measurements): its arguments passed every check."""


def run_cli(argv: list[str]) -> tuple[int | str, str]:
    """(status, stderr) of `mtc *argv`, the status "started" where the command got as far as its work."""
    def started(*args, **kwargs):
        raise _WorkStarted

    stderr = io.StringIO()
    with mock.patch.object(TrainedModel, "tokens", started), \
            mock.patch.object(TrainedModel, "meta_model", started), \
            mock.patch("mtc.bench.run", started), mock.patch("mtc.bench.sweep", started), \
            mock.patch("mtc.probe.probe", started), torch.random.fork_rng(devices=[]), \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli.main(argv)
        except SystemExit as exit:  # argparse's refusals
            status = exit.code
        except _WorkStarted:
            status = "started"
    return status, stderr.getvalue()


def _number(text: str, positive: bool = False) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value) and (value > 0 if positive else value >= 0)


def _integer(text: str, low: int, high: float = math.inf) -> bool:
    try:
        return low <= int(text) <= high
    except ValueError:
        return False


def _batch(text: str) -> bool:
    parts = text.lower().split("x")
    return len(parts) == 2 and all(_integer(part, 1) for part in parts)


def _device(text: str, command: str) -> bool:
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        return False
    must_exist = command in ("train", "probe")  # where the work runs on it; plan plans for it
    return device.type == "cpu" or device.type == "cuda" and (torch.cuda.is_available() or not must_exist)


def _accepted_by(read, text: str) -> bool:
    try:
        read(text)
    except (ValueError, TypeError):
        return False
    return True


def _tile_tokens(text: str) -> bool:
    return text.isdigit() and _integer(text, 1)


def _each(valid, text: str, command: str) -> bool:
    """bench takes comma-separated lists for --batch and --gpu-mem."""
    return all(map(valid, text.split(",") if command == "bench" else [text]))


# flag: what the documentation says it takes, as text -> valid?
FLAGS = {
    "--gpu-mem": lambda text, command: _each(lambda part: documented_size(part) is not None, text, command),
    "--host-mem": lambda text, _: documented_size(text) is not None,
    "--batch": lambda text, command: _each(_batch, text, command),
    "--batches": lambda text, _: all(map(_batch, text.split(","))),
    "--steps": lambda text, _: _integer(text, 1),
    "--warmup": lambda text, _: _integer(text, 0),
    "--save-every": lambda text, _: _integer(text, 0),
    "--seed": lambda text, _: _integer(text, -2**63, 2**64 - 1),  # torch.manual_seed's range
    "--max-seq": lambda text, _: _integer(text, cli.SEQ_STEP),
    "--cpu-threads": lambda text, _: _integer(text, 1, CORES),
    "--tile-tokens": lambda text, _: _tile_tokens(text),
    "--lr": lambda text, _: _number(text),
    "--weight-decay": lambda text, _: _number(text),
    "--clip": lambda text, _: _number(text),
    "--peer-timeout": lambda text, _: _number(text, positive=True),
    "--kernels": lambda text, _: bool(text.strip()) and _accepted_by(kernel_names, text),  # "" is not "none"
    "--preset": lambda text, _: _accepted_by(presets.preset_config, text),
    "--device": _device,
    "--profile": lambda text, _: text in PROFILES,
}
COMMANDS = {
    "train": ["--gpu-mem", "--batch", "--steps", "--lr", "--weight-decay", "--clip", "--save-every", "--seed",
              "--tile-tokens", "--kernels", "--preset", "--device"],
    "plan": ["--gpu-mem", "--host-mem", "--batch", "--batches", "--clip", "--max-seq", "--tile-tokens", "--kernels",
             "--preset", "--device", "--profile"],
    "bench": ["--gpu-mem", "--batch", "--steps", "--warmup", "--clip", "--cpu-threads", "--peer-timeout",
              "--tile-tokens", "--kernels", "--preset", "--device"],
    "probe": ["--device", "--cpu-threads", "--batch", "--gpu-mem"],
}


def flag_texts():
    numbers = st.one_of(st.floats().map(repr), st.integers().map(str), st.integers(-3, 300).map(str),
                        st.sampled_from(["", " ", "nan", "NaN", "inf", "-inf", "infinity", "1e400", "-0", "1_0", "0x10",
                                         "１２", "²", "1,5", "\x00", "9" * 400, str(2**64), str(-(2**63) - 1)]))
    batches = st.lists(st.builds("{}x{}".format, st.integers(-1, 9), st.integers(-1, 9)), min_size=1, max_size=3)
    words = st.sampled_from(["cpu", "cuda", "cuda:0", "meta", "tiny", "8b:40", "8b:0", "h100", "cpu,h100", "auto",
                             "none", "rope,-swiglu", "2x64,1x64", "80GB,40GB", "80GB,", "."])
    return st.one_of(numbers, size_texts(), batches.map(",".join), words, st.text(max_size=10))


@pytest.mark.parametrize("command", sorted(COMMANDS))
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_cli_flags_are_refused_by_name_before_any_work_or_taken(command, data):
    flag = data.draw(st.sampled_from(COMMANDS[command]), label="flag")
    text = data.draw(flag_texts(), label="text")
    status, stderr = run_cli([command, f"{flag}={text}"])
    if FLAGS[flag](text, command):
        assert status == "started", f"mtc {command} {flag}={text!r}: {status} {stderr}"
    else:
        assert status == 2 and flag in stderr.splitlines()[-1], f"mtc {command} {flag}={text!r}: {status} {stderr}"
        assert "Traceback" not in stderr


@pytest.mark.parametrize("argv", [
    ["train", "--lr=nan"], ["train", "--lr=-1"], ["train", "--weight-decay=inf"], ["train", "--clip=nan"],
    ["train", "--clip=-1"], ["train", f"--seed={10**30}"], ["train", "--gpu-mem=80 parsecs"], ["train", "--device=tpu"],
    ["plan", "--clip=-1"], ["plan", "--host-mem="], ["plan", "--device="], ["plan", "--max-seq=0"],
    ["plan", "--max-seq=100"], ["plan", "--batches=1x0"], ["plan", "--profile=h1000"], ["plan", "--gpu-mem=1\u212aB"],
    ["bench", "--cpu-threads=0"], ["bench", f"--cpu-threads={10**9}"], ["bench", "--peer-timeout=nan"],
    ["bench", "--clip=inf"], ["bench", "--gpu-mem=80GB,"], ["probe", f"--cpu-threads={10**30}"],
    ["probe", "--device=x"], ["probe", "--batch=4by4096"], ["probe", "--gpu-mem=lots"],
    ["train", "--kernels="], ["train", "--model="], ["plan", "--model= "], ["bench", "--schedule="],
    ["probe", "--calibrate="],
])
def test_cli_refuses_what_once_failed_late_unnamed_or_was_taken_silently(argv):
    status, stderr = run_cli(argv)
    flag = argv[1].split("=")[0]
    assert status == 2 and flag in stderr.splitlines()[-1] and "Traceback" not in stderr, stderr


@pytest.mark.parametrize("argv", [
    ["train", "--lr=1e-3", "--weight-decay=0", "--clip=0", "--seed=7", "--gpu-mem=24GiB", "--batch=2x64",
     "--device=cpu", "--kernels=none", "--tile-tokens=256", "--steps=3", "--save-every=1"],
    ["plan", "--gpu-mem=24GB", "--host-mem=1.5TB", "--max-seq=4096", "--batches=1x128,2x128", "--profile=h100",
     "--clip=0", "--device=cuda", "--preset=8b:40"],
    ["bench", "--gpu-mem=80GB,40GB", "--batch=2x4096,1x4096", "--cpu-threads=1", "--peer-timeout=10",
     "--schedule=solve,spine", "--warmup=0"],
    ["probe", "--cpu-threads=1", "--device=cpu", "--batch=2x4096", "--gpu-mem=80GB", "--quick"],
])
def test_cli_takes_the_documented_values(argv):
    status, stderr = run_cli(argv)
    assert status == "started", stderr
