"""The LM head and its cross-entropy without the logits: loss = CE(hidden @ weight.T, targets), computed a
chunk of tokens at a time. Each chunk's logits are made by a matmul, turned in place into their gradient by
one Triton pass per row (online softmax, then softmax - one-hot), and multiplied out into the gradients of
hidden and weight at once; only one chunk's logits exist at any time. 128k vocabulary x 32k tokens would be
16 GiB of fp32 logits and as much again for their gradient; here it is one chunk's, about hidden's size.

The softmax is taken in fp32 from the logits in hidden's dtype (as Hugging Face's loss upcasts them);
ignore_index rows add nothing; reduction "mean" divides by the tokens not ignored (NaN if none, as eager)."""
import torch
import triton
import triton.language as tl

from . import launches

REDUCTIONS = ("mean", "sum")


@triton.jit
def _cross_entropy_grad_kernel(logits_ptr, targets_ptr, losses_ptr, scale_ptr, ignore_index, VOCAB: tl.constexpr,
                               BLOCK: tl.constexpr):
    """One row: its loss to losses_ptr, and its logits overwritten by d(scale * loss)/d(logits), the scale
    read from the device (a mean's 1 / tokens counted there: no wait for the host)."""
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * VOCAB
    target = tl.load(targets_ptr + row)
    valid = target != ignore_index
    running_max = tl.zeros([], dtype=tl.float32) - float("inf")
    running_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        logits = tl.load(logits_ptr + cols, mask=cols < VOCAB, other=-float("inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(logits, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max), axis=0)
        running_max = new_max
    log_sum_exp = running_max + tl.log(running_sum)
    target_logit = tl.load(logits_ptr + tl.where(valid, target, 0)).to(tl.float32)
    tl.store(losses_ptr + row, tl.where(valid, log_sum_exp - target_logit, 0.0))
    row_scale = tl.where(valid, tl.load(scale_ptr), 0.0)
    for start in range(0, VOCAB, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < VOCAB
        logits = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(logits - log_sum_exp) - tl.where(cols == target, 1.0, 0.0)
        tl.store(logits_ptr + cols, (grad * row_scale).to(logits_ptr.dtype.element_ty), mask=mask)


def launch(vocab: int) -> dict:
    """4096 vocabulary columns per inner step of a row's program, 4 warps. Measured (`python -m
    mtc.examples.kernel_bench --sweep`, H100, 2026-11-22; BENCHMARKS.md): the whole loss over 16384 tokens
    with 3B's and 8B's head within 1% of the best of 20 (1024 to 16384 columns x 4 to 32 warps); 1024
    columns with 32 warps was 21% slower. The chunk's matmuls, not this pass, take most of the time."""
    return {"BLOCK": min(4096, triton.next_power_of_2(vocab)), "num_warps": 4}


MIN_CHUNK_ROWS = 4096
"""Each chunk adds its weight gradient into an fp32 total the size of the head: a pass over V x H x 8 bytes
that small chunks repeat too often. Llama-3-8B head, 32k tokens, H100 (BENCHMARKS.md, 2026-11-22): 512 rows
a chunk 238.6 ms, 1024 183.8, 2048 167.4, 4096 162.6, 8192 159.8 (torch.compile of eager: 159.8 ms)."""


def chunk_rows(rows: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk: logits up to four times hidden's size (rows x hidden), at least MIN_CHUNK_ROWS of
    them, a power of two; at 4096 rows the 8B head's chunk is 1 GiB of bf16 logits where eager holds 47."""
    fitting = max(MIN_CHUNK_ROWS, 4 * rows // triton.cdiv(vocab, hidden))
    return min(rows, 1 << (fitting.bit_length() - 1))


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total (fp32) += a @ b. On a GPU, cuBLAS adds a bf16/fp16 product into the fp32 total in its epilogue;
    a bf16 product added separately cost a pass over the weight's size per chunk (226 ms for the 8B head at
    32k tokens against torch.compile's 159, on the H100)."""
    if a.is_cuda and a.dtype != torch.float32:
        torch.addmm(total, a, b, out_dtype=torch.float32, out=total)
    else:  # the CPU has no mixed-dtype matmul: each chunk's product is rounded to the inputs' dtype
        total += a @ b


def working_bytes(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[int, int]:
    """(held, transient): the bytes the forward leaves for the backward (the gradients of hidden and
    weight) and those it allocates and frees while it runs (a chunk's logits and the per-token losses, and
    the weight gradient's fp32 total when there are several chunks), for the planner, which sees neither."""
    rows, width = hidden.numel() // hidden.shape[-1], hidden.shape[-1]
    vocab = weight.shape[0]
    chunk = chunk_rows(rows, width, vocab)
    held = hidden.numel() * hidden.element_size() + weight.numel() * weight.element_size()
    total = weight.numel() * 4 if chunk < rows else 0
    return held, chunk * vocab * hidden.element_size() + rows * 4 + total


def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int = -100, reduction: str = "mean", chunk: int | None = None):
    """(loss in fp32, gradient of hidden, gradient of weight) of CE(hidden @ weight.T, targets): hidden
    (rows, H), weight (V, H), targets (rows,). Over several chunks the weight's gradient is summed in fp32;
    one chunk's is its product, in weight's dtype, as eager's (an fp32 total would cost 3 bytes a weight more)."""
    rows, width = hidden.shape
    vocab = weight.shape[0]
    if not launches(hidden):  # the planner's meta run: shapes, and the FLOPs of eager's forward (the logits;
        hidden @ weight.T     # the planner counts a backward as two more of them: the gradients made here)
        return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden), torch.empty_like(weight)
    chunk = chunk or chunk_rows(rows, width, vocab)
    valid = (targets != ignore_index).sum(dtype=torch.float32)
    scale = (1.0 / valid).nan_to_num(posinf=0.0) if reduction == "mean" else torch.ones_like(valid)
    losses = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden)
    chunked = chunk < rows
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if chunked else None
    for start in range(0, rows, chunk):
        piece = hidden[start:start + chunk]
        logits = piece @ weight.T  # becomes its own gradient in place
        _cross_entropy_grad_kernel[(piece.shape[0],)](logits, targets[start:start + chunk].contiguous(),
                                                      losses[start:start + chunk], scale, ignore_index,
                                                      VOCAB=vocab, **launch(vocab))
        torch.matmul(logits, weight, out=grad_hidden[start:start + chunk])
        if chunked:
            _accumulate(grad_weight, logits.T, piece)
        else:
            grad_weight = logits.T @ piece
    loss = losses.sum() / valid if reduction == "mean" else losses.sum()  # all ignored: 0 / 0, NaN as eager's
    return loss, grad_hidden, grad_weight.to(weight.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, reduction, chunk):
        loss, grad_hidden, grad_weight = linear_cross_entropy_forward(hidden, weight, targets, ignore_index,
                                                                      reduction, chunk)
        ctx.save_for_backward(grad_hidden, grad_weight)  # the gradients, made in the forward
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # Scaled in place: the saved gradients are used once, and a copy would hold the head's size again.
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden.mul_(grad_loss.to(grad_hidden.dtype)), grad_weight.mul_(grad_loss.to(grad_weight.dtype)), \
            None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk: int | None = None) -> torch.Tensor:
    """CE(hidden @ weight.T, targets) for hidden (..., H) and targets (...), as an fp32 scalar."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; expected one of {REDUCTIONS}")
    if hidden.shape[:-1] != targets.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and "
                         f"targets {tuple(targets.shape)} do not fit: expected (..., H), (V, H) and (...)")
    return LinearCrossEntropyFunction.apply(hidden.reshape(-1, hidden.shape[-1]).contiguous(), weight.contiguous(),
                                            targets.reshape(-1), ignore_index, reduction, chunk)


def linear_cross_entropy_reference(hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    """The eager spelling the kernel replaces: the whole logits, upcast, then cross-entropy."""
    logits = (hidden @ weight.T).float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             ignore_index=ignore_index, reduction=reduction)
