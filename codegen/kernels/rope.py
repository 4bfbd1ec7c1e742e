"""Rotary position embedding: y = x·cos + rotate_half(x)·sin, rotate_half(x) = (-x₂, x₁) for the two halves
of the head dimension, as Llama and Hugging Face apply it to queries and keys. x is (batch, heads, tokens,
head_dim), read and written through its strides (the transposed view attention makes of the projection);
cos and sin are (tokens, head_dim) or (batch or 1, tokens, head_dim), tables without gradients. The
backward is the rotation by -angle, so nothing is saved but the tables. In place, the result overwrites x
(each program reads its elements before it writes them): for a caller that reads x no more."""
import torch
import triton
import triton.language as tl

from . import launches


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, y_ptr, heads, tokens, x_batch_stride, x_head_stride, x_token_stride,
                 y_batch_stride, y_head_stride, y_token_stride, table_batch_stride, HALF: tl.constexpr,
                 BLOCK: tl.constexpr, HEADS_BLOCK: tl.constexpr, INVERSE: tl.constexpr):
    """One token of one sequence, HEADS_BLOCK of its heads (adjacent in the projection's layout), the
    tables' row read once for all of them; INVERSE rotates by -angle (the backward)."""
    token = tl.program_id(0) % tokens
    batch = tl.program_id(0) // tokens
    head = tl.program_id(1) * HEADS_BLOCK + tl.arange(0, HEADS_BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (head < heads) & (cols < HALF)
    x_row = x_ptr + batch.to(tl.int64) * x_batch_stride + token.to(tl.int64) * x_token_stride + head * x_head_stride
    first = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(x_row + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    table_row = batch.to(tl.int64) * table_batch_stride + token.to(tl.int64) * (2 * HALF)
    table_mask = cols < HALF
    cos_first = tl.load(cos_ptr + table_row + cols, mask=table_mask, other=0.0).to(tl.float32)
    cos_second = tl.load(cos_ptr + table_row + HALF + cols, mask=table_mask, other=0.0).to(tl.float32)
    sin_first = tl.load(sin_ptr + table_row + cols, mask=table_mask, other=0.0).to(tl.float32)
    sin_second = tl.load(sin_ptr + table_row + HALF + cols, mask=table_mask, other=0.0).to(tl.float32)
    if INVERSE:  # the transpose of the rotation: (dy₁·cos₁ + dy₂·sin₂, dy₂·cos₂ - dy₁·sin₁)
        out_first = first * cos_first + second * sin_second
        out_second = second * cos_second - first * sin_first
    else:
        out_first = first * cos_first - second * sin_first
        out_second = second * cos_second + first * sin_second
    y_row = y_ptr + batch.to(tl.int64) * y_batch_stride + token.to(tl.int64) * y_token_stride + head * y_head_stride
    tl.store(y_row + cols, out_first.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_row + HALF + cols, out_second.to(y_ptr.dtype.element_ty), mask=mask)


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos and sin as contiguous (batch or 1, tokens, head_dim), and their batch stride (0: shared)."""
    cos, sin = (t.reshape(-1, *t.shape[-2:]).contiguous() for t in (cos, sin))
    return cos, sin, 0 if cos.shape[0] == 1 else cos.stride(0)


def launch(heads: int, half: int) -> dict:
    """A program's tile: one token's heads (adjacent in the projection's layout), up to 4096 elements of them, 4
    warps. Measured (`python -m mtc.examples.kernel_bench --sweep`, H100, 2026-11-22; BENCHMARKS.md): with 8 and
    32 heads of 128 over 16384 tokens within noise of the best of 24 (1 to 32 heads x 1 to 8 warps); one head a
    program with 8 warps ran 3.4x slower."""
    block = triton.next_power_of_2(half)
    return {"BLOCK": block, "HEADS_BLOCK": min(triton.next_power_of_2(heads), max(1, 4096 // (2 * block))),
            "num_warps": 4}


def rope_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False,
               dtype: torch.dtype | None = None, in_place: bool = False) -> torch.Tensor:
    """x rotated by the tables' angles (by minus them with inverse), laid out as x is (attention's transposed
    view stays one), of `dtype` (default: x's and the tables' promoted, as eager's product); in_place: into x
    itself (see can_rotate_in_place)."""
    batch, heads, tokens, head_dim = x.shape
    if head_dim % 2 or cos.shape[-2:] != (tokens, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"rope: x {tuple(x.shape)} with cos {tuple(cos.shape)} and sin {tuple(sin.shape)}: expected "
                         f"an even head_dim and tables of (..., tokens, head_dim) = (..., {tokens}, {head_dim})")
    if in_place and not can_rotate_in_place(x, cos):
        raise ValueError(f"rope: x ({x.dtype}, strides {x.stride()}) cannot hold its rotation by {cos.dtype} tables")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin, table_batch_stride = _tables(cos, sin)
    y = x if in_place else torch.empty_like(x, dtype=dtype or torch.promote_types(x.dtype, cos.dtype))
    if launches(y):
        config = launch(heads, head_dim // 2)
        _rope_kernel[(batch * tokens, triton.cdiv(heads, config["HEADS_BLOCK"]))](
            x, cos, sin, y, heads, tokens, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1),
            y.stride(2), table_batch_stride, HALF=head_dim // 2, INVERSE=inverse, **config)
    return y


def can_rotate_in_place(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether x can hold its own rotation: its head_dim contiguous, and of the result's dtype."""
    return x.stride(-1) == 1 and torch.promote_types(x.dtype, cos.dtype) == x.dtype


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, in_place):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        if in_place:
            ctx.mark_dirty(x)
        return rope_apply(x, cos, sin, in_place=in_place)

    @staticmethod
    def backward(ctx, grad_y):
        cos, sin = ctx.saved_tensors
        return rope_apply(grad_y, cos, sin, inverse=True, dtype=ctx.x_dtype), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """in_place: overwrite x with the result when it can hold it (can_rotate_in_place), else a new tensor."""
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rope: cos and sin are tables without gradients; these require one")
    return RoPEFunction.apply(x, cos, sin, in_place and can_rotate_in_place(x, cos))


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The eager spelling the kernel replaces (tables of (tokens, D) broadcast; (B, T, D) get a head axis)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin
