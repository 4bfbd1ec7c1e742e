"""Each Triton kernel against the eager spelling it replaces: forward and gradients, at awkward shapes, in
fp32 and fp16 on the CPU (Triton's interpreter) and in bf16 on a GPU."""
import pytest
import torch

pytest.importorskip("triton")
from mtc.codegen.kernels import rmsnorm, swiglu  # noqa: E402  (after the skip: triton may be missing)

pytestmark = pytest.mark.kernels

# (atol, rtol) per dtype: fp32 differs from eager only in summation order; fp16/bf16 outputs may land one
# rounding step (2^-10, 2^-7 relative) away where eager rounds an intermediate the kernel keeps in fp32.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter truncates bf16 casts: bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(6, 42, 123), (3, 431), (1, 1, 64)]


def _random(shape, dtype, generator, mean=0.0, std=1.0):
    return (mean + std * torch.randn(shape, generator=generator)).to(DEVICE, dtype)


def _run(fn, inputs, grad_out, extra=()):
    """fn's output and the gradients of its inputs, from grad_out."""
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves, *extra)
    out.backward(grad_out)
    return [out] + [leaf.grad for leaf in leaves]


def _assert_same(names, kernel, eager, dtype, scales=None):
    atol, rtol = TOLERANCES[dtype]
    for name, mine, theirs in zip(names, kernel, eager):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        scale = (scales or {}).get(name, 1)
        torch.testing.assert_close(mine.float(), theirs.float(), atol=atol * scale, rtol=rtol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_forward_and_gradients_are_eagers(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    inputs = [_random(shape, dtype, generator), _random(shape[-1], dtype, generator, mean=1.0, std=0.1)]
    grad = _random(shape, dtype, generator)
    kernel = _run(rmsnorm.rmsnorm, inputs, grad, (1e-6,))
    eager = _run(rmsnorm.rmsnorm_reference, inputs, grad, (1e-6,))
    # The weight's gradient sums over every row: its rounding error grows with their number.
    rows = inputs[0][..., 0].numel()
    _assert_same(["y", "grad x", "grad weight"], kernel, eager, dtype, {"grad weight": rows ** 0.5})


def test_rmsnorm_saves_only_the_input_and_one_float_per_row():
    generator = torch.Generator().manual_seed(0)
    x, weight = _random((6, 42, 123), torch.float32, generator), _random(123, torch.float32, generator)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rmsnorm.rmsnorm(x.requires_grad_(), weight.requires_grad_(), 1e-6)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(6, 42, 123), (123,), (252,)])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_forward_and_gradients_are_eagers(shape, dtype):
    generator = torch.Generator().manual_seed(0)
    inputs = [_random(shape, dtype, generator, std=3.0), _random(shape, dtype, generator)]
    grad = _random(shape, dtype, generator)
    _assert_same(["out", "grad gate", "grad up"], _run(swiglu.swiglu, inputs, grad),
                 _run(swiglu.swiglu_reference, inputs, grad), dtype)


def test_swiglu_saves_its_inputs_not_the_activation():
    generator = torch.Generator().manual_seed(0)
    gate, up = (_random((6, 42, 123), torch.float32, generator).requires_grad_() for _ in range(2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        swiglu.swiglu(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up
    with pytest.raises(ValueError, match=r"gate \(6, 42, 123\) torch.float32 and up \(6, 42\) torch.float32"):
        swiglu.swiglu(gate, up[..., 0])
