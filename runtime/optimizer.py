"""optimizer: AdamW on the store's flat host buffers, and the global gradient norm for clipping.

The update is torch._fused_adamw_, the kernel behind torch.optim.AdamW(fused=True), so it is the one
eager PyTorch makes. It runs over a group in chunks: each chunk's bf16 gradient is widened to fp32 in
a small scratch buffer (the fused kernel wants one dtype), scaled by the clip coefficient, used, and
the chunk's new weights are narrowed into the stream buffer while they are still in the CPU's cache.
"""
from __future__ import annotations

import torch

from mtc.config import OPTIMIZER_CHUNK as CHUNK
from mtc.config import AdamW

from .store import Group


def scratch_for(groups: list[Group], device="cpu") -> torch.Tensor:
    """The fp32 scratch one optimizer lane needs: a chunk of the largest group."""
    largest = max((g.length for g in groups), default=0)  # this rank's shards under data parallel
    return torch.empty(min(CHUNK, largest), dtype=torch.float32, device=device)


def adamw_step(group: Group, hp: AdamW, scratch: torch.Tensor, clip_coef: torch.Tensor | None = None,
               skip: torch.Tensor | None = None) -> None:
    """One AdamW step of `group`, its gradient first scaled by clip_coef (a 0-dim fp32 tensor) if given.
    skip: a 0-dim fp32 flag on the group's device, 1 when the step's loss or gradient norm was not finite:
    the fused kernel then leaves weights, moments and step count as they were (torch's GradScaler path),
    and the stream copy, which a bf16 gradient borrowed, is rewritten from the unchanged master."""
    group.step += 1 if skip is None else 1 - skip
    numel = group.length  # this rank's shard under data parallel
    for start in range(0, numel, CHUNK):
        end = min(start + CHUNK, numel)
        grad = group.grad[start:end]
        if grad.dtype != torch.float32:
            grad = scratch[:end - start].copy_(grad)
        if clip_coef is not None:
            grad.mul_(clip_coef)  # what clip_grad_norm_ does to an fp32 .grad, in the same precision
        master = group.master[start:end]
        torch._fused_adamw_([master], [grad], [group.exp_avg[start:end]], [group.exp_avg_sq[start:end]], [],
                            [group.step], lr=hp.lr, beta1=hp.betas[0], beta2=hp.betas[1],
                            weight_decay=hp.weight_decay, eps=hp.eps, amsgrad=False, maximize=False,
                            found_inf=skip)
        if group.stream is not group.master:
            group.stream[start:end].copy_(master)  # the next copy-in must see the updated weights


def parameter_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-parameter L2 norms of the fp32 gradients eager PyTorch would hold (bf16 ones are widened)."""
    return list(torch._foreach_norm([g.float() for g in grads], 2.0)) if grads else []


def global_norm(norms_in_model_order: list[torch.Tensor]) -> torch.Tensor:
    """The total norm of per-parameter norms, as torch.nn.utils.clip_grad_norm_ takes it, step for step: AdamW
    magnifies any rounding difference in the scale."""
    return torch.linalg.vector_norm(torch.stack(norms_in_model_order), 2.0)


def clip_coefficient(total: torch.Tensor, max_norm: float | None) -> torch.Tensor | None:
    """clip_grad_norm_'s scale for a total norm; None without clipping."""
    return None if max_norm is None else torch.clamp(max_norm / (total + 1e-6), max=1.0)
