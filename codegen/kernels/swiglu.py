"""SwiGLU: out = silu(gate) · up, elementwise, silu rounded to the inputs' dtype before the product (as
eager `F.silu(gate) * up` rounds it). The forward saves the inputs only; the backward recomputes the
activation from gate instead of keeping an intermediate the size of the MLP's hidden layer."""
import torch
import triton
import triton.language as tl

from . import launches



@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    activation = (gate * tl.sigmoid(gate)).to(gate_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + offsets, (activation * up).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(grad_out_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, count, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < count
    grad_out = tl.load(grad_out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sigmoid = tl.sigmoid(gate)
    activation = (gate * sigmoid).to(gate_ptr.dtype.element_ty).to(tl.float32)
    grad_activation = grad_out * up
    grad_gate = grad_activation * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(grad_gate_ptr + offsets, grad_gate.to(grad_gate_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_up_ptr + offsets, (grad_out * activation).to(grad_up_ptr.dtype.element_ty), mask=mask)


def launch() -> dict:
    """1024 elements a program, 4 warps. Measured (`python -m mtc.examples.kernel_bench --sweep`, H100,
    2026-11-22; BENCHMARKS.md): at 16384 x 8192 and 16384 x 14336 within 6% of the best of 24 (256 to 8192
    elements x 2 to 16 warps); 256 elements with 16 warps (fewer elements than threads) ran 2.3x slower."""
    return {"BLOCK": 1024, "num_warps": 4}


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if launches(gate):
        config = launch()
        _swiglu_fwd_kernel[(triton.cdiv(gate.numel(), config["BLOCK"]),)](gate, up, out, gate.numel(), **config)
    return out


def swiglu_backward(grad_out: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad_out, gate, up = grad_out.contiguous(), gate.contiguous(), up.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    if launches(gate):
        config = launch()
        _swiglu_bwd_kernel[(triton.cdiv(gate.numel(), config["BLOCK"]),)](grad_out, gate, up, grad_gate, grad_up,
                                                                          gate.numel(), **config)
    return grad_gate, grad_up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                             f"must have one shape and dtype")
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, grad_out):
        return swiglu_backward(grad_out, *ctx.saved_tensors)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return SwiGLUFunction.apply(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The eager spelling the kernel replaces."""
    return torch.nn.functional.silu(gate) * up
