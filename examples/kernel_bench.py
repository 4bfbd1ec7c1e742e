"""Each Triton kernel against its eager spelling (and torch.compile of it) at Llama-3-8B shapes, on a GPU.

    python -m mtc.examples.kernel_bench [--tokens 16384] [--loss-tokens 32768] [--compile] [--json out.json]
    python -m mtc.examples.kernel_bench --sweep [--json out.json]

Times forward + backward (CUDA events, median of --repeat after --warmup) in bf16, and the peak memory the
fused loss adds over its inputs against eager's full logits. --sweep, instead, times each kernel's launch
rule (`launch` in its module) against other block sizes and warp counts at the shapes of Llama 1B to 70B.
"""
import argparse
import contextlib
import itertools
import json
import statistics

import torch

from mtc.codegen.kernels import linear_cross_entropy, rmsnorm, rope, swiglu

HIDDEN, INTERMEDIATE, VOCAB, HEADS, HEAD_DIM = 4096, 14336, 128256, 32, 128  # Llama-3-8B


def _leaves(args, differentiable: int) -> list:
    """The first `differentiable` args as fresh leaves that take gradients, the rest (tables, targets) as given."""
    return [a.detach().requires_grad_() for a in args[:differentiable]] + list(args[differentiable:])


def _time(fn, args, differentiable: int, grad, warmup: int, repeat: int) -> float:
    """Median seconds of fn(*args).backward(grad)."""
    leaves = _leaves(args, differentiable)
    times = []
    for index in range(warmup + repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*leaves).backward(grad)
        end.record()
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
        for leaf in leaves[:differentiable]:
            leaf.grad = None
    return statistics.median(times)


def _peak_bytes_above_inputs(fn, args, differentiable: int, grad) -> int | None:
    leaves = _leaves(args, differentiable)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn(*leaves).backward(grad)
    except torch.OutOfMemoryError:
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


SWEEP = {  # kernel: what its launch rule's result is swept over
    "rmsnorm": {"num_warps": (1, 2, 4, 8, 16, 32)},
    "swiglu": {"BLOCK": (256, 512, 1024, 2048, 4096, 8192), "num_warps": (2, 4, 8, 16)},
    "rope": {"HEADS_BLOCK": (1, 2, 4, 8, 16, 32), "num_warps": (1, 2, 4, 8)},
    "linear_cross_entropy": {"BLOCK": (1024, 2048, 4096, 8192, 16384), "num_warps": (4, 8, 16, 32)},
}


ROUNDS = 3


@contextlib.contextmanager
def _launching_with(module, override: dict, launched: dict | None = None):
    """The module's kernels launched with `override` in place of those fields of its rule's result; what
    they were launched with is recorded in `launched`."""
    rule = module.launch

    def overridden(*args):
        config = {**rule(*args), **override}
        if launched is not None:
            launched.update(config)
        return config

    module.launch = overridden
    try:
        yield
    finally:
        module.launch = rule


def _sweep(tokens: int, warmup: int, repeat: int) -> list[dict]:
    """Per kernel and shape: each swept launch's seconds (forward + backward) and how far its output is from
    the rule's (the elementwise kernels' must be identical; the loss's online softmax may reorder sums)."""

    dtype, device = torch.bfloat16, "cuda"
    angles = torch.rand(4096, 128, device=device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    shapes = [(rmsnorm, f"{tokens}x{width}", rmsnorm.rmsnorm, lambda w=width: (
        torch.randn(tokens, w, device=device, dtype=dtype), torch.ones(w, device=device, dtype=dtype)), 2, (1e-5,))
        for width in (2048, 3072, 4096, 5120, 8192)]
    shapes += [(swiglu, f"{tokens}x{width}", swiglu.swiglu, lambda w=width: tuple(
        torch.randn(tokens, w, device=device, dtype=dtype) for _ in range(2)), 2, ()) for width in (8192, 14336)]
    shapes += [(rope, f"{tokens // 4096}x{heads}x4096x128", lambda x: rope.rope(x, cos, sin), lambda h=heads: (
        torch.randn(tokens // 4096, 4096, h, 128, device=device, dtype=dtype).transpose(1, 2),), 1, ())
        for heads in (8, 32)]
    shapes += [(linear_cross_entropy, f"{tokens}x{width}x{VOCAB}", linear_cross_entropy.linear_cross_entropy,
                lambda w=width: (torch.randn(tokens, w, device=device, dtype=dtype),
                                 0.02 * torch.randn(VOCAB, w, device=device, dtype=dtype),
                                 torch.randint(0, VOCAB, (tokens,), device=device)), 2, ()) for width in (3072, 4096)]
    results = []
    for module, shape, fn, make, differentiable, extra in shapes:
        name = module.__name__.rsplit(".", 1)[-1]
        inputs = make()
        call = lambda *a, fn=fn, extra=extra: fn(*a, *extra)  # noqa: E731
        fields = SWEEP[name]
        rule = {}
        with _launching_with(module, {}, rule):
            reference = call(*inputs).float()
        grad = torch.ones_like(reference) if reference.dim() == 0 else torch.randn_like(reference).to(dtype)
        rows = [{"launch": "rule", **rule, "override": {}}]
        rows += [{"override": dict(zip(fields, values)), **dict(zip(fields, values))}
                 for values in itertools.product(*fields.values())]
        # Rounds over every launch, the best of each kept: the first launches timed ran up to 40% slower
        # than the same launch later in a one-pass sweep (H100, 2026-11-22).
        for _ in range(ROUNDS):
            for row in rows:
                if "error" in row:
                    continue
                with _launching_with(module, row["override"]):
                    try:
                        row.setdefault("max_diff", (call(*inputs).float() - reference).abs().max().item())
                        seconds = _time(call, inputs, differentiable, grad, warmup, repeat)
                    except Exception as error:  # a tile too large for the chip's registers or shared memory
                        row["error"] = f"{type(error).__name__}: {error}"[:200]
                        continue
                row["seconds"] = min(seconds, row.get("seconds", seconds))
        best = min((r for r in rows if "seconds" in r), key=lambda r: r["seconds"])
        results.append({"kernel": name, "shape": shape, "rule": rows[0], "best": best, "tried": rows})
        print(f"{name:22s} {shape:24s} rule {rows[0]['seconds'] * 1e3:8.3f} ms  best {best['seconds'] * 1e3:8.3f} ms "
              f"with {best['override']}", flush=True)
        del inputs
    return results


def _describe(result: dict) -> str:
    if result["seconds"] is None:
        return "out of memory"
    return f"{result['seconds'] * 1e3:.2f} ms, {result['peak_bytes_above_inputs'] / 2**30:.2f} GiB above its inputs"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384,
                        help="tokens for the norm, MLP and rotary kernels (rotary: sequences of 4096)")
    parser.add_argument("--loss-tokens", type=int, default=32768, help="tokens for the fused loss")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of each eager spelling")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--loss-chunks", default="", help="also time the fused loss at these tokens per chunk, "
                        "e.g. 1024,4096 (default: its own rule only)")
    parser.add_argument("--sweep", action="store_true", help="time each kernel's launch rule against other block "
                        "sizes and warps instead")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.sweep and (args.compile or args.loss_chunks):
        parser.error("--sweep times launch rules only; --compile and --loss-chunks go with the comparison run")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    if args.tokens < 4096 or args.tokens % 4096:
        parser.error(f"--tokens={args.tokens} is not valid; expected a multiple of 4096 (the rotary sequences)")
    torch.manual_seed(0)
    if args.sweep:
        sweep = _sweep(args.tokens, args.warmup, args.repeat)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens, "sweep": sweep}, f, indent=1)
        return 0
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(args.tokens, HIDDEN, device=device, dtype=dtype)
    gate, up = (torch.randn(args.tokens, INTERMEDIATE, device=device, dtype=dtype) for _ in range(2))
    # Queries as attention makes them: (sequences of 4096, tokens, heads, head_dim) viewed as (B, H, T, D).
    queries = torch.randn(args.tokens // 4096, 4096, HEADS, HEAD_DIM, device=device, dtype=dtype).transpose(1, 2)
    angles = torch.rand(4096, HEAD_DIM, device=device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    hidden = torch.randn(args.loss_tokens, HIDDEN, device=device, dtype=dtype)
    head = 0.02 * torch.randn(VOCAB, HIDDEN, device=device, dtype=dtype)
    targets = torch.randint(0, VOCAB, (args.loss_tokens,), device=device)
    cases = {  # name: (kernel, eager, inputs, how many of them take gradients, gradient of the output, extra args)
        "rmsnorm": (rmsnorm.rmsnorm, rmsnorm.rmsnorm_reference, (x, torch.ones(HIDDEN, device=device, dtype=dtype)),
                    2, torch.randn_like(x), (1e-5,)),
        "swiglu": (swiglu.swiglu, swiglu.swiglu_reference, (gate, up), 2, torch.randn_like(gate), ()),
        "rope": (rope.rope, rope.rope_reference, (queries, cos, sin), 1,
                 torch.randn(queries.shape, device=device, dtype=dtype), ()),
        "linear_cross_entropy": (linear_cross_entropy.linear_cross_entropy,
                                 linear_cross_entropy.linear_cross_entropy_reference, (hidden, head, targets), 2,
                                 torch.tensor(1.0, device=device), ()),
    }
    for chunk in (int(c) for c in args.loss_chunks.split(",") if c):
        cases[f"linear_cross_entropy@{chunk}"] = (linear_cross_entropy.linear_cross_entropy, None,
                                                  (hidden, head, targets), 2, torch.tensor(1.0, device=device),
                                                  (-100, "mean", chunk))
    results = {}
    for name, (kernel, eager, inputs, differentiable, grad, extra) in cases.items():
        systems = {"kernel": lambda *a, fn=kernel, extra=extra: fn(*a, *extra)}
        if eager is not None:
            systems["eager"] = lambda *a, fn=eager, extra=extra: fn(*a, *extra)
        if args.compile and eager is not None:
            systems["torch.compile"] = lambda *a, fn=torch.compile(eager), extra=extra: fn(*a, *extra)
        row = {}
        for system, fn in systems.items():
            peak = _peak_bytes_above_inputs(fn, inputs, differentiable, grad)
            seconds = None if peak is None else _time(fn, inputs, differentiable, grad, args.warmup, args.repeat)
            row[system] = {"peak_bytes_above_inputs": peak, "seconds": seconds}
        results[name] = row
        print(f"{name:22s}", "  ".join(f"{system}: {_describe(result)}" for system, result in row.items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "tokens": args.tokens,
                       "loss_tokens": args.loss_tokens, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
