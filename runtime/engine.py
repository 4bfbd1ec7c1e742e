"""engine: execute a StreamPlan against the state store.

The device holds `k` weight slots (flat buffers of the compute dtype), the resident stages (weights,
gradient, master and moments), the shared weights and buffers, the kept boundary activations, two
gradient buffers for streamed stages and one stage's working set: all allocated by the first step and
reused after it. A stage that offloads its input copies it to a pinned host buffer of its own (made
by the first step) on the copy-out stream and fetches it back on the copy-in stream before its backward.

On a GPU each instruction goes to its plan stream (copy-in and copy-out on streams of their own,
compute on the caller's current stream), ordered across streams only by CUDA events; the main thread
never waits for the GPU. The plan's cpu-stream instructions (host AdamW) run in order on one worker
thread, which waits for a gradient's copy-out event (and the clip's) before updating it. The only host-side
wait on the main thread is a copy-in waiting for the update of the weights it copies (the previous
step's optimizer). On the CPU the same code runs with the streams as plain calls.

When the plan gates the updates (clipping, or the non-finite check), the clip instruction also flags a step
whose loss or global norm is not finite: every update of that step then leaves its group as it was (on the
device without a host sync: the fused kernel's found_inf), and the optimizer thread counts the skip.

Under data parallel (runtime/distributed) the copies are collectives too: a copy-in brings this rank's shard of
the weights and all-gathers the rest on the device, a copy-out reduce-scatters the gradient and sends this rank's
shard of it to the host; a resident stage's gradient is all-reduced after its backward. The global norm is of
the averaged gradient: the squares of each rank's per-parameter norms of its shards, summed over the ranks.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from contextlib import nullcontext

import torch

from mtc.codegen.stream_plan import SHARED, StreamPlan
from mtc.config import AdamW
from mtc.passes.costs import find_loss
from mtc.passes.partition import Partition, resolve_output

from . import templates
from .optimizer import adamw_step, clip_coefficient, global_norm, parameter_norms, scratch_for
from .preflight import pin_in_place
from .store import DISK, Group, StateStore
from .watchdog import Watchdog


def default_cpu_threads() -> int:
    """Cores for the CPU optimizer: all but four, which the launch thread, the optimizer's own thread and
    the CUDA driver's threads need. On the 16-core H200 machine (2026-11-22, 3B spine plan, 8 traced steps
    each) 14 threads took 1.32-1.77 s of host AdamW a step, 12 threads 1.42-1.54 s at the same mean; alone
    beside copies the update ran at 2.43 G params/s on 14 threads, 2.68 on 12, 2.03 on 8."""
    return max(1, (os.cpu_count() or 1) - 4)


class NonFiniteError(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm (each was skipped)."""


SKIP_COUNT, STEP_DONE = -1, -2
"""The Worker's ids for a step's skip count and its end (the plan's instructions count from 0)."""


class Worker:
    """One thread running the plan's cpu-stream instructions, in the order they are submitted."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.done: dict[int, int] = {}
        """instruction id -> the last step in which it completed."""
        self.condition = threading.Condition()
        self.error: BaseException | None = None
        self.pending = 0
        self.thread = threading.Thread(target=self._run, name="mtc-optimizer", daemon=True)
        self.thread.start()

    def submit(self, instr_id: int, step: int, work) -> None:
        with self.condition:
            self.pending += 1
        self.queue.put((instr_id, step, work))

    def stop(self) -> None:
        """End the thread once the work queued so far is done, and wait for it: at interpreter exit a daemon
        thread still inside an update would be killed mid-operation (SIGABRT from C++), the update half done."""
        self.queue.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join()

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            (instr_id, step, work), item = item, None
            try:
                if self.error is None:  # after a failure nothing more is updated: the error surfaces first
                    work()
            except BaseException as error:  # noqa: BLE001 - handed to the main thread
                self.error = error
            work = None  # hold no reference to the engine's buffers between tasks
            with self.condition:
                self.done[instr_id] = step
                self.pending -= 1
                self.condition.notify_all()

    def wait(self, instr_id: int, step: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.done.get(instr_id, -1) >= step or self.error is not None)
        self.raise_error()

    def drain(self) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.pending == 0)
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            raise RuntimeError("the CPU optimizer failed; the training state may be partly updated") from self.error


class Engine:
    def __init__(self, plan: StreamPlan, partition: Partition, store: StateStore, grad_inputs: dict[str, bool],
                 optimizer: AdamW, clip_grad_norm: float | None, device: torch.device, compute_dtype: torch.dtype,
                 unflatten_output, cpu_threads: int | None = None, row_axes: list | None = None,
                 skip_nonfinite: bool = True, watchdog: Watchdog | None = None, parallel=None):
        self.plan, self.partition, self.store, self.parallel = plan, partition, store, parallel
        self.grad_inputs, self.optimizer, self.clip_grad_norm = grad_inputs, optimizer, clip_grad_norm
        self.device, self.compute_dtype, self.unflatten_output = device, compute_dtype, unflatten_output
        self.cuda = device.type == "cuda"
        self.cpu_threads = cpu_threads or default_cpu_threads()
        if self.cuda:
            torch.set_num_threads(self.cpu_threads)
            self.side_streams = {"h2d": torch.cuda.Stream(device), "d2h": torch.cuda.Stream(device)}
            # Two sets of events, by step parity: a wait on the previous step's event stays valid while
            # this step records its own.
            self.events = [[torch.cuda.Event() for _ in plan.instrs] for _ in range(2)]
        self.resident = set(plan.schedule.resident)
        self.slot_numel = max((g.numel for i, g in enumerate(store.groups) if i not in self.resident), default=0)
        # The slot arena: the only memory for streamed weights on the device.
        self.slots = [torch.empty(self.slot_numel, dtype=compute_dtype, device=device)
                      for _ in range(plan.schedule.slots)]
        self.slot_holds = [None] * len(self.slots)
        self.shared_weights = self.shared_grad = None
        if store.shared:
            self.shared_weights = torch.empty(store.shared.numel, dtype=compute_dtype, device=device)
            self.shared_grad = torch.zeros(store.shared.numel, dtype=torch.float32, device=device)
        schedule = plan.schedule
        self.functions = [stage.template.function(device, schedule.tile_tokens if schedule.tiled(i) else None)
                          for i, stage in enumerate(partition.stages)]
        self.worker = Worker()
        # The thread holds no reference to the engine, so the engine can be collected; this also runs at exit.
        weakref.finalize(self, self.worker.stop)
        self.watchdog = watchdog
        """Told when each step after the first (which compiles kernels) is issued and when it has finished."""
        if watchdog is not None:
            weakref.finalize(self, watchdog.close)
        host_groups = [g for i, g in enumerate(store.all_groups()) if i not in self.resident]
        if store.disk is not None:  # the reads ahead follow the order of the plan's host updates
            updates = [i.stage for i in plan.instrs if i.op == "optimizer" and i.stream == "cpu"]
            store.disk.set_order([store.groups[s] for s in updates if s != SHARED and store.groups[s].kind == DISK])
        self.scratch = scratch_for(host_groups)
        self.device_scratch = scratch_for([store.groups[i] for i in self.resident], device)
        self.gated = plan.schedule.clip
        """The updates wait for the global gradient norm: to clip by it, or to skip a non-finite step."""
        self.skip_nonfinite = skip_nonfinite and self.gated
        self.clip_host = torch.zeros(3, dtype=torch.float32, pin_memory=self.cuda)
        """The last gate's (global norm, clip coefficient, 1 if the step is skipped), for the host optimizer,
        the skip count and last_grad_norm."""
        self.clip_coef = self.skip_flag = None
        """The last gate's clip coefficient and skip flag on the device, for the device updates."""
        self.skipped: list[int] = []
        """Steps (from 0) whose loss or gradient norm was not finite, so nothing was updated, as far as the
        optimizer thread has seen them."""
        self.counted_steps = self.consecutive_skips = 0
        """Steps the optimizer thread has checked; the skipped ones among the last of them."""
        self.row_axes = row_axes
        """Per stage: where its inputs and outputs hold the batch's rows (passes/rows), for token chunks."""
        self.offloaded = {i: partition.offloadable_inputs(i) for i in plan.schedule.offload}
        """Stage -> the inputs it sends to the host between its forward and its backward."""
        self.host_inputs: dict[tuple[int, str], torch.Tensor] = {}
        """(stage, input) -> its host buffer (pinned on a GPU), made by the first step."""
        self.step_index = 0
        self.host_wait_seconds = 0.0
        """Time the issuing thread has spent waiting for host updates before copy-ins."""
        self.marks = None
        """While tracing: (step, instruction id) -> (start, end) as CUDA events or perf_counter seconds."""

    # -- one step ---------------------------------------------------------------------------------
    def step(self, flat_inputs: list):
        """Issue one step; returns the loss as soon as the work is queued. The model's other outputs
        (a Hugging Face model's logits) are not kept: the plan does not count them past the loss stage."""
        self.worker.raise_error()
        self.parity = self.step_index % 2
        self.compute = torch.cuda.current_stream(self.device) if self.cuda else None
        self.values = {name: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                       for name, v in zip(self.partition.graph_inputs, flat_inputs)}
        self.grads, self.kept, self.grad_of, self.norms = {}, {}, {}, {}
        self.shard_norms, self.resident_norms = [], []  # data parallel: of the averaged gradients
        self.loss = None
        if self.shared_grad is not None:
            self._wait_previous_shared_copy_out()
            self.shared_grad.zero_()
        if self.watchdog is not None and self.step_index:
            self.watchdog.started(self.step_index)
        for instr in self.plan.instrs:
            self._issue(instr)
        if self.watchdog is not None and self.step_index:
            self._tell_watchdog_when_done()
        loss = self.loss
        del self.values, self.grads, self.kept, self.grad_of
        self.step_index += 1
        return loss

    def _tell_watchdog_when_done(self) -> None:
        """Queued behind the step's host updates; waits for the device's last instruction of the step too."""
        done, step, watchdog = None, self.step_index, self.watchdog
        if self.cuda:
            done = torch.cuda.Event()
            done.record(self.compute)

        def finished():
            if done is not None:
                done.synchronize()
            watchdog.finished(step)
        self.worker.submit(STEP_DONE, step, finished)

    def synchronize(self) -> None:
        """Wait until the device and the optimizer thread have finished everything issued."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.worker.drain()
        if self.store.disk is not None:
            self.store.disk.flush()

    def _stream(self, name: str):
        return self.compute if name == "compute" else self.side_streams[name]

    def _issue(self, instr) -> None:
        step, prev = self.step_index, self.step_index - 1
        if instr.stream == "cpu":
            waits = [self.events[self.parity][w] for w in instr.waits
                     if self.cuda and self.plan.instrs[w].stream != "cpu"]
            work = getattr(self, "_" + instr.op)(instr)  # GPU-side part now; returns the host part

            def run(work=work, waits=waits, instr=instr):
                for event in waits:
                    event.synchronize()
                start = time.perf_counter()
                work()
                if self.marks is not None:
                    self.marks[step, instr.id] = (start, time.perf_counter())
            self.worker.submit(instr.id, step, run)
            return
        for w in instr.waits_prev_step:
            if step == 0:
                continue
            if self.plan.instrs[w].stream == "cpu":
                waited = time.perf_counter()
                self.worker.wait(w, prev)  # the weights this copies must have been updated
                self.host_wait_seconds += time.perf_counter() - waited
            elif self.cuda:
                self._stream(instr.stream).wait_event(self.events[1 - self.parity][w])
        if not self.cuda:
            start = time.perf_counter()
            getattr(self, "_" + instr.op)(instr)
            if self.marks is not None:
                self.marks[step, instr.id] = (start, time.perf_counter())
            return
        stream = self._stream(instr.stream)
        for w in instr.waits:
            if self.plan.instrs[w].stream == "cpu":
                self.worker.wait(w, step)
            elif self.plan.instrs[w].stream != instr.stream:
                stream.wait_event(self.events[self.parity][w])
        with torch.cuda.stream(stream) if stream is not self.compute else nullcontext():
            start = self._timing_event(stream) if self.marks is not None else None
            getattr(self, "_" + instr.op)(instr)
            self.events[self.parity][instr.id].record(stream)
            if start is not None:
                self.marks[step, instr.id] = (start, self._timing_event(stream))

    def _wait_previous_shared_copy_out(self) -> None:
        if self.cuda and self.step_index > 0:
            copy_out = next(i for i in self.plan.instrs if i.op == "copy_out" and i.stage == SHARED)
            self.compute.wait_event(self.events[1 - self.parity][copy_out.id])

    # -- copies -------------------------------------------------------------------------------------
    def _copy_in(self, instr):
        if instr.stage == SHARED:
            self._gather_in(self.shared_weights, self.store.shared)
            return
        group = self.store.groups[instr.stage]
        self._gather_in(self.slots[instr.slot][:group.numel], group)
        self.slot_holds[instr.slot] = instr.stage

    def _gather_in(self, weights: torch.Tensor, group: Group) -> None:
        """The group's weights from the host into `weights`: under data parallel this rank's shard, then the
        other ranks' all-gathered into place."""
        weights[slice(*group.shard)].copy_(group.stream, non_blocking=True)
        if group.sharded:
            self.parallel.gather(weights)

    def _copy_out(self, instr):
        if instr.stage == SHARED:
            group, grad = self.store.shared, self.shared_grad
        else:
            group = self.store.groups[instr.stage]
            grad = self.grad_of[instr.stage][:group.numel]
        if group.sharded:  # this rank's shard of the ranks' mean gradient
            grad = self.parallel.reduce_scatter(grad)
            if self.gated:  # per parameter (part), with the kernel eager PyTorch's clipping uses
                norms = parameter_norms([grad[start:end] for start, end in group.shard_pieces()])
                for norm in norms if self.cuda else ():
                    norm.record_stream(self.compute)  # made on the copy-out stream, read by the clip
                self.shard_norms += norms
        group.grad.copy_(grad, non_blocking=True)

    def _free_grad(self, instr):
        # Back to the caching allocator, as the plan counts it: the compute stream has waited for the
        # copy-out, so the next backward's buffer may reuse the block.
        del self.grad_of[instr.stage]

    # -- offloaded inputs ---------------------------------------------------------------------------
    def _offload(self, instr):
        for name in self.offloaded[instr.stage]:
            value = self.values[name]
            host = self.host_inputs.get((instr.stage, name))
            if host is None:
                host = self.host_inputs[instr.stage, name] = torch.empty(value.shape, dtype=value.dtype)
                if self.cuda:
                    pin_in_place(host)
            host.copy_(value, non_blocking=True)
            if self.cuda:  # freed by the compute stream while this copy may still read it
                value.record_stream(self._stream(instr.stream))

    def _free_input(self, instr):
        """Drop the device copies of an offloaded input (the allocator reuses them after the copy)."""
        stage = self.partition.stages[instr.stage]
        kept = self.kept[instr.stage]
        for name in self.offloaded[instr.stage]:
            del self.values[name]
            kept.inputs[stage.inputs.index(name)] = None

    def _fetch(self, instr):
        stage = self.partition.stages[instr.stage]
        kept = self.kept[instr.stage]
        for name in self.offloaded[instr.stage]:
            host = self.host_inputs[instr.stage, name]
            value = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            value.copy_(host, non_blocking=True)
            if self.cuda:  # made on the copy-in stream, read and freed on the compute stream
                value.record_stream(self.compute)
            kept.inputs[stage.inputs.index(name)] = value

    # -- compute ------------------------------------------------------------------------------------
    def _weights(self, instr) -> list[torch.Tensor]:
        stage, group = self.partition.stages[instr.stage], self.store.groups[instr.stage]
        if instr.stage in self.resident:
            views = group.views(group.stream)
        else:
            assert self.slot_holds[instr.slot] == instr.stage, "slot holds another stage's weights"
            views = group.views(self.slots[instr.slot])
        if self.store.shared:
            views.update(self.store.shared.views(self.shared_weights))
        return [views[name] for name in stage.params]

    def _buffers(self, stage) -> list[torch.Tensor]:
        return [self.store.buffers[name] for name in stage.buffers]

    def _slot(self, instr) -> torch.Tensor | None:
        """The slot the instruction reads its stage's weights from (None: they stay where they are)."""
        return None if instr.stage in self.resident else self.slots[instr.slot]

    def _forward(self, instr):
        stage = self.partition.stages[instr.stage]
        inputs = [self.values[name] for name in stage.inputs]
        keep = None
        if instr.stage in self.plan.schedule.keep:
            keep = ([self.grad_inputs.get(name, False) for name in stage.inputs], self._slot(instr))
        chunks = self.plan.schedule.chunks_of(instr.stage)
        if chunks > 1:
            outputs, self.kept[instr.stage] = templates.forward_in_chunks(
                self.functions[instr.stage], self._weights(instr), self._buffers(stage), inputs, self.device,
                self.row_axes[instr.stage], self.plan.stages[instr.stage].rows, chunks)
        else:
            outputs, self.kept[instr.stage] = templates.forward(
                self.functions[instr.stage], self._weights(instr), self._buffers(stage), inputs, self.device, keep)
        self.values.update(zip(stage.outputs, outputs))

    def _loss(self, instr):
        stage = self.partition.stages[instr.stage]
        inputs = [self.values[name] for name in stage.inputs]
        kept = templates.Kept(inputs, None, False)

        def loss_of(outputs):
            values = {**self.values, **dict(zip(stage.outputs, outputs))}
            return find_loss(self.unflatten_output(resolve_output(self.partition.output, values)))[0]

        self._differentiate(instr, stage, kept, loss_of)

    def _backward(self, instr):
        stage = self.partition.stages[instr.stage]
        self._differentiate(instr, stage, self.kept.pop(instr.stage), None)

    def _differentiate(self, instr, stage, kept, loss_of):
        output_grads = [self.grads.pop(name, None) for name in stage.outputs]
        carries = [self.grad_inputs.get(name, False) for name in stage.inputs]
        chunks = self.plan.schedule.chunks_of(instr.stage) if loss_of is None else 1
        if chunks > 1:
            input_grads, weight_grads, loss = templates.backward_in_chunks(
                self.functions[instr.stage], self._weights(instr), self._buffers(stage), kept, carries,
                output_grads, self.device, self.row_axes[instr.stage], self.plan.stages[instr.stage].rows, chunks)
        else:
            input_grads, weight_grads, loss = templates.backward(
                self.functions[instr.stage], self._weights(instr), self._buffers(stage), kept, carries,
                output_grads, self.device, loss_of, self._slot(instr))
        if loss is not None:
            self.loss = loss
        for name, grad in zip(stage.inputs, input_grads):
            if grad is not None:
                self.grads[name] = grad if name not in self.grads else self.grads[name] + grad
        if instr.stage in self.resident:
            grad = self._flatten_grads(instr.stage, stage, weight_grads, self.store.groups[instr.stage].grad)
            if self.parallel is not None:  # every rank updates the whole group, with the ranks' mean gradient
                self.parallel.all_reduce(grad, average=True)
                if self.gated:
                    group = self.store.groups[instr.stage]
                    self.resident_norms += parameter_norms([grad[a:b] for a, b in group.shard_pieces()])
        else:
            flat = torch.zeros(self.slot_numel, dtype=self.compute_dtype, device=self.device)
            self.grad_of[instr.stage] = self._flatten_grads(instr.stage, stage, weight_grads, flat)

    def _flatten_grads(self, index, stage, weight_grads, flat: torch.Tensor) -> torch.Tensor:
        """Own gradients into one flat buffer (one copy-out, or the resident gradient); shared ones add up
        in fp32 on the device."""
        own = {piece.name: piece for piece in self.store.groups[index].slices}
        shared = {piece.name: piece for piece in self.store.shared.slices} if self.store.shared else {}
        for name, grad in zip(stage.params, weight_grads):
            if name in own and grad is None:
                Group.view(flat, own[name]).zero_()  # the buffer is reused: no stale gradient
            elif name in own:
                Group.view(flat, own[name]).copy_(grad)
            elif grad is None:
                continue
            else:
                Group.view(self.shared_grad, shared[name]).add_(grad)
        if self.gated and self.parallel is None:  # data parallel: the norms of the averaged gradients
            names = [name for name, grad in zip(stage.params, weight_grads) if grad is not None and name in own]
            self.norms.update(zip(names, parameter_norms([Group.view(flat, own[n]) for n in names])))
        return flat

    # -- the global norm and the updates --------------------------------------------------------------
    def _clip(self, instr):
        """The gate: the global gradient norm, the clip coefficient, and whether the step is skipped."""
        if self.parallel is not None:
            total, finite_loss = self._parallel_norm()
        else:
            if self.store.shared:
                views = self.store.shared.views(self.shared_grad)
                self.norms.update(zip(views, parameter_norms(list(views.values()))))
            total = global_norm([self.norms[name] for name in self.store.order if name in self.norms])
            finite_loss = torch.isfinite(self.loss)
        self.clip_coef = clip_coefficient(total, self.clip_grad_norm)
        finite = torch.isfinite(total) & finite_loss
        self.skip_flag = (~finite).float() if self.skip_nonfinite else None
        gate = torch.stack([total, self.clip_coef if self.clip_coef is not None else torch.ones_like(total),
                            self.skip_flag if self.skip_flag is not None else torch.zeros_like(total)])
        if self.step_index:  # the previous step's flag is read before this one overwrites it
            self.worker.wait(SKIP_COUNT, self.step_index - 1)
        self.clip_host.copy_(gate, non_blocking=True)
        landed = None
        if self.cuda:
            landed = torch.cuda.Event()
            landed.record(self.compute)
        step = self.step_index
        self.worker.submit(SKIP_COUNT, step, lambda: self._count_skip(step, landed))

    def _parallel_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the norm of the ranks' mean gradient, whether every rank's loss is finite): the shards' squared norms
        summed over the ranks, plus the resident groups' (whole on every rank)."""
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        shards = torch.stack(self.shard_norms).square().sum() if self.shard_norms else zero
        summed = self.parallel.all_reduce(torch.stack([shards, (~torch.isfinite(self.loss)).float()]))
        resident = torch.stack(self.resident_norms).square().sum() if self.resident_norms else zero
        return (summed[0] + resident).sqrt(), summed[1] == 0

    def _count_skip(self, step: int, landed) -> None:
        """On the optimizer thread (queued ahead of the step's host updates): note whether it was skipped."""
        if landed is not None:
            landed.synchronize()
        self.counted_steps += 1
        if self.clip_host[2] > 0:
            self.skipped.append(step)
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0

    @property
    def last_grad_norm(self) -> float | None:
        """The global gradient norm before clipping, of the last step issued (read after synchronize())."""
        return float(self.clip_host[0]) if self.gated and self.step_index else None

    def _optimizer(self, instr):
        """A resident stage is updated now, on the device; otherwise returns the update for the CPU thread,
        which runs it once the gradient has landed (and the clip coefficient with it)."""
        clip = self.clip_grad_norm is not None
        if instr.stream == "compute":
            adamw_step(self.store.groups[instr.stage], self.optimizer, self.device_scratch,
                       self.clip_coef if clip else None, self.skip_flag)
            return None
        group = self.store.shared if instr.stage == SHARED else self.store.groups[instr.stage]
        skip = self.clip_host[2] if self.skip_nonfinite else None

        def update():
            adamw_step(group, self.optimizer, self.scratch, self.clip_host[1] if clip else None, skip)
        if group.kind == DISK:  # its state read ahead into a slab, updated there, written back behind
            return lambda: self.store.disk.update(group, update)
        return update

    # -- measurement --------------------------------------------------------------------------------
    def start_trace(self) -> None:
        """Time every instruction of the steps issued from now until stop_trace()."""
        self.synchronize()
        stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.origin_event, self.origin = self._timing_event(stream), time.perf_counter()
        self.marks = {}

    def stop_trace(self) -> list[tuple[int, object, float, float]]:
        """Wait for the traced steps; (step, instruction, start s, end s) from the trace's start."""
        self.synchronize()

        def seconds(mark):
            if isinstance(mark, float):
                return mark - self.origin
            return self.origin_event.elapsed_time(mark) / 1e3
        marks, self.marks = self.marks, None
        return sorted(((step, self.plan.instrs[i], seconds(start), seconds(end))
                       for (step, i), (start, end) in marks.items()), key=lambda row: row[2])

    def _timing_event(self, stream):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event
