"""Each Triton kernel against the eager spelling it replaces: forward and gradients, at awkward shapes, in
fp32 and fp16 on the CPU (Triton's interpreter) and in bf16 on a GPU."""
import pytest
import torch

pytest.importorskip("triton")
from mtc.codegen.kernels import rmsnorm  # noqa: E402  (after the skip: triton may be missing)

pytestmark = pytest.mark.kernels

# (atol, rtol) per dtype: fp32 differs from eager only in summation order; fp16/bf16 outputs may land one
# rounding step (2^-10, 2^-7 relative) away where eager rounds an intermediate the kernel keeps in fp32.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
CPU_DTYPES = [torch.float32, torch.float16]  # the interpreter truncates bf16 casts: bf16 runs on the GPU
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = CPU_DTYPES + ([torch.bfloat16] if DEVICE == "cuda" else [])
SHAPES = [(6, 42, 123), (3, 431), (1, 1, 64)]


def _assert_close(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def _inputs(shape, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(DEVICE, dtype)
    grad_y = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    return x, weight, grad_y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rmsnorm_forward_and_gradients_are_eagers(shape, dtype):
    x, weight, grad_y = _inputs(shape, dtype)
    results = {}
    for name, fn in (("kernel", rmsnorm.rmsnorm), ("eager", rmsnorm.rmsnorm_reference)):
        leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()]
        y = fn(*leaves, 1e-6)
        y.backward(grad_y)
        results[name] = (y, leaves[0].grad, leaves[1].grad)
    for what, kernel, eager in zip(("y", "grad x", "grad weight"), results["kernel"], results["eager"]):
        assert kernel.dtype == eager.dtype and kernel.shape == eager.shape, what
        # The weight's gradient sums over every row: its error grows with their number.
        scale = x[..., 0].numel() ** 0.5 if what == "grad weight" else 1
        atol, rtol = TOLERANCES[dtype]
        torch.testing.assert_close(kernel.float(), eager.float(), atol=atol * scale, rtol=rtol,
                                   msg=lambda m, what=what: f"{what}: {m}")


def test_rmsnorm_saves_only_the_input_and_one_float_per_row():
    x, weight, _ = _inputs((6, 42, 123), torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rmsnorm.rmsnorm(x.requires_grad_(), weight.requires_grad_(), 1e-6)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(6, 42, 123), (123,), (252,)])
