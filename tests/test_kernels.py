"""Each Triton kernel against the eager spelling it replaces: forward and gradients, at awkward shapes, in
fp32 and fp16 on the CPU (Triton's interpreter) and in bf16 on a GPU."""
import pytest
import torch

pytest.importorskip("triton")
# After the skip: triton may be missing.
from mtc.codegen.kernels import linear_cross_entropy, rmsnorm, rope, swiglu  # noqa: E402

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
    """Elementwise within rtol, or within atol of the largest magnitude (a gradient of a mean over hundreds of
    tokens is all small numbers: an absolute tolerance alone would pass anything)."""
    atol, rtol = TOLERANCES[dtype]
    for name, mine, theirs in zip(names, kernel, eager):
        assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, name
        magnitude = theirs.float().abs().max().item() * (scales or {}).get(name, 1)
        torch.testing.assert_close(mine.float(), theirs.float(), atol=atol * magnitude, rtol=rtol,
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


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_loss_and_gradients_are_eagers(dtype, reduction):
    generator = torch.Generator().manual_seed(0)
    tokens, width, vocab = (6, 42), 123, 431
    inputs = [_random((*tokens, width), dtype, generator), _random((vocab, width), dtype, generator, std=0.1)]
    targets = torch.randint(0, vocab, tokens, generator=generator)
    targets[0, :5] = targets[3, 7] = -100  # ignored
    targets = targets.to(DEVICE)
    grad = torch.tensor(0.7, device=DEVICE)  # a scaled loss: the saved gradients are multiplied by it
    chunk = 40  # 7 chunks, the last partial: the chunking is what is under test
    kernel = _run(linear_cross_entropy.linear_cross_entropy, inputs, grad, (targets, -100, reduction, chunk))
    eager = _run(linear_cross_entropy.linear_cross_entropy_reference, inputs, grad, (targets, -100, reduction))
    # The weight's gradient sums over the tokens; in sum reduction every gradient carries the token count.
    count = targets.numel()
    scales = {"loss": count if reduction == "sum" else 1, "grad weight": count ** 0.5}
    _assert_same(["loss", "grad hidden", "grad weight"], kernel, eager, dtype, scales)


def test_linear_cross_entropy_never_holds_the_whole_logits():
    generator = torch.Generator().manual_seed(0)
    hidden, weight = _random((256, 16), torch.float32, generator), _random((1000, 16), torch.float32, generator)
    targets = torch.randint(0, 1000, (256,), generator=generator).to(DEVICE)
    shapes, matmul = [], torch.Tensor.__matmul__

    def recorded(a, b):
        result = matmul(a, b)
        shapes.append(tuple(result.shape))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "__matmul__", recorded)
        linear_cross_entropy.linear_cross_entropy(hidden, weight, targets, chunk=48)
    logits = [rows for rows, columns in shapes if columns == 1000]  # the others: the weight's gradient, (1000, 16)
    assert logits == [48] * 5 + [16]
    # The rule: logits up to 4x hidden's size, at least 4096 tokens (fewer, and the weight's fp32 gradient
    # is added up too often), a power of two.
    assert [linear_cross_entropy.chunk_rows(rows, 4096, 128256) for rows in (1024, 4096, 32768, 65536)] == \
        [1024, 4096, 4096, 8192]
    # All ignored: the mean is NaN, as eager's.
    assert torch.isnan(linear_cross_entropy.linear_cross_entropy(hidden, weight, torch.full_like(targets, -100)))
    with pytest.raises(ValueError, match="reduction='none' is not supported"):
        linear_cross_entropy.linear_cross_entropy(hidden, weight, targets, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_cross_entropy_in_one_chunk_is_eagers(dtype):
    generator = torch.Generator().manual_seed(1)
    inputs = [_random((37, 123), dtype, generator), _random((431, 123), dtype, generator, std=0.1)]
    targets = torch.randint(0, 431, (37,), generator=generator).to(DEVICE)
    grad = torch.tensor(1.0, device=DEVICE)
    kernel = _run(linear_cross_entropy.linear_cross_entropy, inputs, grad, (targets, -100, "mean", 64))
    eager = _run(linear_cross_entropy.linear_cross_entropy_reference, inputs, grad, (targets,))
    _assert_same(["loss", "grad hidden", "grad weight"], kernel, eager, dtype, {"grad weight": 37 ** 0.5})


@pytest.mark.parametrize("tables", ["shared", "per_sequence"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_forward_and_gradient_are_eagers(dtype, tables):
    generator = torch.Generator().manual_seed(0)
    batch, tokens, heads, head_dim = 2, 7, 3, 10  # half a head: 5 of a block of 8
    # As attention makes it: the projection (B, T, H*D) split into heads and transposed, not contiguous.
    x = _random((batch, tokens, heads * head_dim), dtype, generator).unflatten(-1, (heads, head_dim)).transpose(1, 2)
    # Halves unlike (models repeat them): each half of each table is read where it should be.
    angles = torch.rand((batch if tables == "per_sequence" else 1, tokens, head_dim), generator=generator) * 6
    cos, sin = (f(angles).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    if tables == "shared":
        cos, sin = cos[0], sin[0]
    grad = _random((batch, heads, tokens, head_dim), dtype, generator)
    kernel = _run(lambda t: rope.rope(t, cos, sin), [x], grad)
    eager = _run(lambda t: rope.rope_reference(t, cos, sin), [x], grad)
    _assert_same(["y", "grad x"], kernel, eager, dtype)


def test_rope_saves_only_the_tables_and_refuses_what_does_not_fit():
    generator = torch.Generator().manual_seed(0)
    x = _random((1, 2, 5, 8), torch.float32, generator).requires_grad_()
    cos, sin = _random((5, 8), torch.float32, generator), _random((5, 8), torch.float32, generator)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rope.rope(x, cos, sin)
    assert len(saved) == 2 and saved[0] is cos and saved[1] is sin
    with pytest.raises(ValueError, match=r"tables of \(\.\.\., tokens, head_dim\) = \(\.\.\., 5, 8\)"):
        rope.rope(x, cos[:4], sin[:4])
    with pytest.raises(ValueError, match="tables without gradients"):
        rope.rope(x, cos.requires_grad_(), sin)


def test_rope_keeps_the_layout_it_is_given():
    generator = torch.Generator().manual_seed(0)
    projection = _random((2, 5, 3 * 8), torch.float32, generator).requires_grad_()
    x = projection.unflatten(-1, (3, 8)).transpose(1, 2)  # (B, H, T, D) over (B, T, H, D) memory
    cos, sin = _random((5, 8), torch.float32, generator), _random((5, 8), torch.float32, generator)
    y = rope.rope(x, cos, sin)
    assert y.stride() == x.stride()  # the next op reads it as eager's output, no copy in between
    y.backward(torch.ones_like(y))
    assert projection.grad.shape == projection.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_in_place_overwrites_the_projection_with_the_same_result(dtype):
    generator = torch.Generator().manual_seed(0)
    weights = _random((2, 5, 3 * 8), dtype, generator)
    cos, sin = _random((5, 8), dtype, generator), _random((5, 8), dtype, generator)
    grad = _random((2, 3, 5, 8), dtype, generator)
    results = []
    for in_place in (False, True):
        leaf = weights.clone().requires_grad_()
        projection = leaf * 1  # a product of the stage, as a linear's output is
        x = projection.unflatten(-1, (3, 8)).transpose(1, 2)
        y = rope.rope(x, cos, sin, in_place=in_place)
        assert (y.data_ptr() == projection.data_ptr()) == in_place and y.stride() == x.stride()
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # A result x cannot hold (fp32 tables promote an fp16 x): a new tensor, as without in_place.
    x = _random((1, 2, 5, 8), torch.float16, generator)
    assert rope.rope(x, cos.float(), sin.float(), in_place=True).dtype == torch.float32
    with pytest.raises(ValueError, match="cannot hold its rotation"):
        rope.rope_apply(x, cos.float(), sin.float(), in_place=True)


def test_on_the_meta_device_each_kernel_gives_eagers_shapes_and_dtypes():
    # The planner runs blocks on the meta device: a kernel there launches nothing and returns what eager would.
    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)

    cases = [(rmsnorm.rmsnorm, rmsnorm.rmsnorm_reference, (meta(6, 42, 123), meta(123)), (1e-6,)),
             (swiglu.swiglu, swiglu.swiglu_reference, (meta(6, 431), meta(6, 431)), ()),
             (lambda x: rope.rope(x, cos, sin), lambda x: rope.rope_reference(x, cos, sin), (meta(2, 3, 5, 8),), ()),
             (linear_cross_entropy.linear_cross_entropy, None, (meta(6, 42, 123), meta(431, 123)),
              (torch.zeros(6, 42, dtype=torch.long, device="meta"),))]
    cos, sin = (torch.empty(5, 8, dtype=torch.bfloat16, device="meta") for _ in range(2))
    for kernel, eager, inputs, extra in cases:
        out = kernel(*inputs, *extra)
        if eager is not None:
            expected = eager(*inputs, *extra)
            assert (out.shape, out.dtype) == (expected.shape, expected.dtype), kernel
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
        assert [(g.shape, g.dtype) for g in grads] == [(i.shape, i.dtype) for i in inputs], kernel
