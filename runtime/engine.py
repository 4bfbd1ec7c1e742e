"""engine: execute a StreamPlan against the state store.

The device holds only `k` weight slots (flat buffers of the compute dtype), the resident shared
weights and buffers, the kept boundary activations and one stage's working set. This first engine
issues every instruction in plan order on the current stream; on the CPU that is the whole story,
on a GPU the plan's events become real once the instructions go to their own streams.
"""
from __future__ import annotations

import torch

from mtc.codegen.stream_plan import SHARED, StreamPlan
from mtc.config import AdamW
from mtc.passes.costs import find_loss
from mtc.passes.partition import Partition, resolve_output

from . import templates
from .optimizer import adamw_step, clip_by_global_norm
from .store import Group, StateStore


class Engine:
    def __init__(self, plan: StreamPlan, partition: Partition, store: StateStore, grad_inputs: dict[str, bool],
                 optimizer: AdamW, clip_grad_norm: float | None, device: torch.device, compute_dtype: torch.dtype,
                 unflatten_output):
        self.plan, self.partition, self.store = plan, partition, store
        self.grad_inputs, self.optimizer, self.clip_grad_norm = grad_inputs, optimizer, clip_grad_norm
        self.device, self.unflatten_output = device, unflatten_output
        slot_numel = max(g.numel for g in store.groups)
        # The slot arena: the only weight memory on the device besides the resident shared group.
        self.slots = [torch.empty(slot_numel, dtype=compute_dtype, device=device) for _ in range(plan.schedule.slots)]
        self.slot_holds = [None] * len(self.slots)
        self.shared_weights = self.shared_grad = None
        if store.shared:
            self.shared_weights = torch.empty(store.shared.numel, dtype=compute_dtype, device=device)
            self.shared_grad = torch.zeros(store.shared.numel, dtype=torch.float32, device=device)
        self.functions = [stage.template.function(device) for stage in partition.stages]
        self.last_grad_norm = None

    # -- one step ---------------------------------------------------------------------------------
    def step(self, flat_inputs: list):
        self.values = {name: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                       for name, v in zip(self.partition.graph_inputs, flat_inputs)}
        self.grads, self.kept, self.grad_buffers = {}, {}, {}
        self.loss = self.output = None
        if self.shared_grad is not None:
            self.shared_grad.zero_()
        for instr in self.plan.instrs:
            getattr(self, "_" + instr.op)(instr)
        loss, output = self.loss, self.output
        del self.values, self.grads, self.kept, self.grad_buffers, self.output
        return loss, output

    def _copy_in(self, instr):
        if instr.stage == SHARED:
            self.shared_weights.copy_(self.store.shared.stream, non_blocking=True)
            return
        group = self.store.groups[instr.stage]
        self.slots[instr.slot][:group.numel].copy_(group.stream, non_blocking=True)
        self.slot_holds[instr.slot] = instr.stage

    def _weights(self, instr) -> list[torch.Tensor]:
        assert self.slot_holds[instr.slot] == instr.stage, "slot holds another stage's weights"
        stage = self.partition.stages[instr.stage]
        views = self.store.groups[instr.stage].views(self.slots[instr.slot])
        if self.store.shared:
            views.update(self.store.shared.views(self.shared_weights))
        return [views[name] for name in stage.params]

    def _buffers(self, stage) -> list[torch.Tensor]:
        return [self.store.buffers[name] for name in stage.buffers]

    def _forward(self, instr):
        stage = self.partition.stages[instr.stage]
        inputs = [self.values[name] for name in stage.inputs]
        outputs, self.kept[instr.stage] = templates.forward(
            self.functions[instr.stage], self._weights(instr), self._buffers(stage), inputs, self.device)
        self.values.update(zip(stage.outputs, outputs))

    def _loss(self, instr):
        stage = self.partition.stages[instr.stage]
        inputs = [self.values[name] for name in stage.inputs]
        kept = templates.Kept(inputs, None, False)

        def loss_of(outputs):
            values = {**self.values, **dict(zip(stage.outputs, outputs))}
            self.output = self.unflatten_output(resolve_output(self.partition.output, values))
            return find_loss(self.output)[0]

        self._differentiate(instr, stage, kept, loss_of)

    def _backward(self, instr):
        stage = self.partition.stages[instr.stage]
        self._differentiate(instr, stage, self.kept.pop(instr.stage), None)

    def _differentiate(self, instr, stage, kept, loss_of):
        output_grads = [self.grads.pop(name, None) for name in stage.outputs]
        carries = [self.grad_inputs.get(name, False) for name in stage.inputs]
        input_grads, weight_grads, loss = templates.backward(
            self.functions[instr.stage], self._weights(instr), self._buffers(stage), kept, carries,
            output_grads, self.device, loss_of)
        if loss is not None:
            self.loss = loss
        for name, grad in zip(stage.inputs, input_grads):
            if grad is not None:
                self.grads[name] = grad if name not in self.grads else self.grads[name] + grad
        self.grad_buffers[instr.stage] = self._flatten_grads(instr.stage, stage, weight_grads)

    def _flatten_grads(self, index, stage, weight_grads) -> torch.Tensor:
        """Own gradients into one flat fp32 buffer (one copy-out); shared ones add up on the device."""
        group = self.store.groups[index]
        flat = torch.zeros(group.numel, dtype=torch.float32, device=self.device)
        own = {piece.name: piece for piece in group.slices}
        shared = {piece.name: piece for piece in self.store.shared.slices} if self.store.shared else {}
        for name, grad in zip(stage.params, weight_grads):
            if grad is None:
                continue
            if name in own:
                Group.view(flat, own[name]).copy_(grad)
            else:
                Group.view(self.shared_grad, shared[name]).add_(grad)
        return flat

    def _copy_out(self, instr):
        if instr.stage == SHARED:
            self.store.shared.grad.copy_(self.shared_grad)
        else:
            self.store.groups[instr.stage].grad.copy_(self.grad_buffers[instr.stage])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the CPU optimizer reads it next

    def _free_grad(self, instr):
        del self.grad_buffers[instr.stage]

    def _clip(self, instr):
        self.last_grad_norm = clip_by_global_norm(self.store.all_groups(), self.store.grads_in_model_order(),
                                                  self.clip_grad_norm)

    def _optimizer(self, instr):
        group = self.store.shared if instr.stage == SHARED else self.store.groups[instr.stage]
        adamw_step(group, self.optimizer)
