"""RMSNorm: y = round(x · rsqrt(mean(x²) + eps)) · weight, the normalisation in fp32 and rounded to x's
dtype before the weight multiplies it (as Llama's and Hugging Face's RMSNorm do). The forward saves only
each row's inverse RMS (fp32) beside the input; the backward recomputes the normalised row from them."""
import torch
import triton
import triton.language as tl

from . import launches


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, weight_ptr, y_ptr, rstd_ptr, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * width + cols, (normed * weight).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(grad_y_ptr, x_ptr, weight_ptr, rstd_ptr, grad_x_ptr, grad_weight_partial_ptr, rows, width,
                        ROWS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros([BLOCK], dtype=tl.float32)
    for step in range(ROWS_PER_PROGRAM):  # a compile-time count (the interpreter needs one); fixed per plan
        row = program * ROWS_PER_PROGRAM + step
        if row < rows:
            offsets = row.to(tl.int64) * width + cols
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            grad_y = tl.load(grad_y_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row)
            normed = x * rstd
            grad_weight += grad_y * normed.to(x_ptr.dtype.element_ty).to(tl.float32)
            grad_normed = grad_y * weight
            grad_x = rstd * (grad_normed - normed * (tl.sum(grad_normed * normed, axis=0) / width))
            tl.store(grad_x_ptr + offsets, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_weight_partial_ptr + program * width + cols, grad_weight, mask=mask)


def launch(width: int) -> dict:
    """One row per program, the whole row in registers; 8 warps up to 4096 wide, 16 beyond. Measured (`python -m
    mtc.examples.kernel_bench --sweep`, H100, 2026-11-22; BENCHMARKS.md): over 16384 rows of 2048 to 8192, every
    count from 2 warps (4 above 4096 wide) to 32 was within the sweep's noise (about 15%) of the best; 1 or 2
    warps on rows of 5120 or more spill registers and ran 7-9x slower."""
    block = triton.next_power_of_2(width)
    return {"BLOCK": block, "num_warps": 4 if block <= 1024 else 8 if block <= 4096 else 16}


def _backward_programs(rows: int, device: torch.device) -> int:
    """Programs of the backward: each sums its rows' weight gradient in registers, so few programs mean
    few partial sums to add up; enough to fill the GPU (4 per SM) and no more than the rows."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, inverse RMS per row as fp32) of x (..., width) and weight (width,)."""
    width = x.shape[-1]
    rows = x.reshape(-1, width).contiguous()
    y = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
    if launches(rows):
        _rmsnorm_fwd_kernel[(rows.shape[0],)](rows, weight.contiguous(), y, rstd, width, eps, **launch(width))
    return y.view(x.shape), rstd


def rmsnorm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of x, gradient of weight) from the gradient of y."""
    width = x.shape[-1]
    rows = x.reshape(-1, width).contiguous()
    grad_rows = grad_y.reshape(-1, width).contiguous()
    grad_x = torch.empty_like(rows)
    programs = _backward_programs(rows.shape[0], x.device)
    partial = torch.zeros(programs, width, dtype=torch.float32, device=x.device)
    if launches(rows):
        _rmsnorm_bwd_kernel[(programs,)](grad_rows, rows, weight.contiguous(), rstd, grad_x, partial, rows.shape[0],
                                         width, ROWS_PER_PROGRAM=triton.cdiv(rows.shape[0], programs),
                                         **launch(width))
    return grad_x.view(x.shape), partial.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = rmsnorm_backward(grad_y, x, weight, rstd)
        return grad_x, grad_weight, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return RMSNormFunction.apply(x, weight, eps)


def rmsnorm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The eager spelling the kernel replaces."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
