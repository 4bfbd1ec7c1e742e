"""optimizer: AdamW and gradient clipping on the store's flat host buffers.

One fused torch kernel per group (torch._fused_adamw_, the kernel behind
torch.optim.AdamW(fused=True)), so the update is the one eager PyTorch makes.
"""
from __future__ import annotations

import torch

from mtc.config import AdamW

from .store import Group


def adamw_step(group: Group, hp: AdamW) -> None:
    group.step += 1
    torch._fused_adamw_([group.master], [group.grad], [group.exp_avg], [group.exp_avg_sq], [], [group.step],
                        lr=hp.lr, beta1=hp.betas[0], beta2=hp.betas[1], weight_decay=hp.weight_decay,
                        eps=hp.eps, amsgrad=False, maximize=False)
    if group.stream is not group.master:
        group.stream.copy_(group.master)  # the next copy-in must see the updated weights


def clip_by_global_norm(groups: list[Group], grads_in_model_order: list[torch.Tensor], max_norm: float) -> float:
    """Scale every gradient so their global L2 norm is at most max_norm.

    The arithmetic of torch.nn.utils.clip_grad_norm_, step for step (per-parameter norms in the model's
    order, their norm, an fp32 coefficient): AdamW magnifies any rounding difference in the scale.
    """
    norms = torch._foreach_norm(grads_in_model_order, 2.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in groups:
        group.grad.mul_(coef)
    return float(total)
