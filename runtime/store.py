"""store: the training state on the host, one set of flat buffers per weight group.

A group is one stage's own parameters (or the shared, tied ones). Each group holds flat fp32
`master`, `exp_avg`, `exp_avg_sq` and `grad` (where gradients land), and `stream`: the weights in
the compute dtype, the bytes that cross to the device. In fp32 `stream` is `master` itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_ALIGN = 16
"""Each parameter starts at a multiple of 16 elements (64 B in fp32) so its view is vector-aligned."""


@dataclass
class Slice:
    name: str
    shape: torch.Size
    offset: int

    @property
    def numel(self) -> int:
        return self.shape.numel()


class Group:
    def __init__(self, name: str, params: list[tuple[str, torch.Tensor]], compute_dtype: torch.dtype):
        self.name = name
        self.slices, offset = [], 0
        for param_name, tensor in params:
            self.slices.append(Slice(param_name, tensor.shape, offset))
            offset += -(-tensor.numel() // _ALIGN) * _ALIGN
        self.numel = offset
        self.master = torch.zeros(offset, dtype=torch.float32)
        for piece, (_, tensor) in zip(self.slices, params):
            self.view(self.master, piece).copy_(tensor.detach())
        self.exp_avg = torch.zeros_like(self.master)
        self.exp_avg_sq = torch.zeros_like(self.master)
        self.grad = torch.zeros_like(self.master)
        self.step = torch.zeros((), dtype=torch.float32)
        self.stream = self.master if compute_dtype == torch.float32 else self.master.to(compute_dtype)

    @staticmethod
    def view(flat: torch.Tensor, piece: Slice) -> torch.Tensor:
        return flat[piece.offset:piece.offset + piece.numel].view(piece.shape)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        return {piece.name: self.view(flat, piece) for piece in self.slices}


class StateStore:
    """Every stage's group, the shared group, and the model's buffers (kept on the compute device)."""

    def __init__(self, stage_params: list[list[str]], shared: list[str], params: dict[str, torch.Tensor],
                 buffers: dict[str, torch.Tensor], compute_dtype: torch.dtype, device: torch.device):
        meta = [name for name, p in params.items() if p.is_meta]
        if meta:
            raise ValueError(f"parameters {meta[:3]}{'...' if len(meta) > 3 else ''} are on the meta device; "
                             f"mtc.compile needs materialised parameters (call model.to_empty(device='cpu') and "
                             f"initialise them first)")
        shared_set = set(shared)
        self.groups = [Group(f"stage{i}", [(n, params[n]) for n in names if n not in shared_set], compute_dtype)
                       for i, names in enumerate(stage_params)]
        self.shared = Group("shared", [(n, params[n]) for n in shared], compute_dtype) if shared else None
        used = {n for names in stage_params for n in names}
        # Parameters the loss never reads get no gradient; torch.optim leaves them alone and so do we.
        self.unused = {n: p.detach().float().clone() for n, p in params.items() if n not in used}
        self.buffers = {name: b.to(device) for name, b in buffers.items()}
        self.order = [name for name in params if name in used]
        """Trained parameters in the model's own order (clipping sums their norms in this order)."""

    def all_groups(self) -> list[Group]:
        return self.groups + ([self.shared] if self.shared else [])

    def grads_in_model_order(self) -> list[torch.Tensor]:
        views = {name: view for group in self.all_groups() for name, view in group.views(group.grad).items()}
        return [views[name] for name in self.order]

    def named_parameters(self):
        for group in self.all_groups():
            for piece in group.slices:
                yield piece.name, group.view(group.master, piece)
        yield from self.unused.items()
