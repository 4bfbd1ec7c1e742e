"""runtime/store and the optimizer thread: initialisation from the meta device, host memory, failures."""
import pytest
import torch

import mtc
from mtc.examples import models
from mtc.runtime import engine as engine_module
from mtc.runtime import store as store_module

from models import llama, tokens


def test_a_meta_model_is_initialised_block_by_block_to_the_values_eager_init_gives():
    example = tokens()
    eager = llama()
    torch.manual_seed(1)
    eager.apply(models.init_weights)
    with torch.device("meta"):
        meta = llama()
    torch.manual_seed(1)
    step = mtc.compile(meta, gpu_mem="3.5MB", example=example, device="cpu", init=models.init_weights)
    mine = dict(step.named_parameters())
    for name, expected in eager.named_parameters():
        assert torch.equal(mine[name], expected), name
    assert torch.equal(step._store.buffers["inv_freq"], eager.inv_freq)
    # The user's model is never materialised whole: it is still on the meta device.
    assert all(p.is_meta for p in meta.parameters()) and meta.inv_freq.is_meta
    materialised = mtc.compile(eager, gpu_mem="3.5MB", example=example, device="cpu")
    for seed in range(3):
        assert float(step(*tokens(seed=seed))) == float(materialised(*tokens(seed=seed)))


def test_a_meta_model_is_initialised_in_the_host_master_weights_not_beside_them():
    # A module-sized fp32 tensor beside the masters was the load's peak (a 1B model's embedding: 0.98 GiB).
    with torch.device("meta"):
        meta = llama()
    names = {id(module): name for name, module in meta.named_modules()}
    written = {}

    def init(module):
        models.init_weights(module)
        prefix = names[id(module)]
        for name, parameter in module.named_parameters(recurse=False):
            written[f"{prefix}.{name}" if prefix else name] = parameter.data_ptr()

    step = mtc.compile(meta, gpu_mem="3.5MB", example=tokens(), device="cpu", init=init)
    pieces = [(group, piece) for group in step._store.all_groups() for piece in group.slices]
    assert len(pieces) == len(list(meta.parameters()))
    for group, piece in pieces:
        assert written[piece.name] == group.view(group.master, piece).data_ptr(), piece.name


def test_a_meta_model_without_an_initialiser_is_refused_by_name():
    with torch.device("meta"):
        meta = llama()
    with pytest.raises(ValueError, match=r"RMSNorm holds meta tensors \['weight'\] but has no reset_parameters"):
        mtc.compile(meta, gpu_mem="3.5MB", example=tokens(), device="cpu")


def test_not_enough_host_memory_is_refused_with_the_numbers(monkeypatch):
    monkeypatch.setattr(store_module, "available_host_bytes", lambda: 100_000)
    with pytest.raises(store_module.HostMemoryError) as error:
        mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")
    message = str(error.value)
    assert "needs" in message and "97.66 KiB is available" in message and "build it on the meta device" in message


def test_bf16_streaming_holds_14_bytes_per_parameter_and_trains_like_fp32():
    torch.manual_seed(0)
    model = llama()
    step = mtc.compile(model, gpu_mem="3.5MB", example=tokens(), device="cpu", compute_dtype=torch.bfloat16,
                       clip_grad_norm=1.0)
    store = step._store
    streamed = [g for g in store.groups if g.kind == "streamed"]
    resident = [g for g in store.groups if g.kind == "resident"]
    assert streamed and resident  # this budget exercises both kinds
    # Streamed: master 4 + moments 8 + bf16 stream 2, the gradient lands in the stream buffer. Resident (on
    # the CPU "device" here, so in host memory): the same plus a bf16 gradient of its own.
    assert store.host_bytes == 14 * sum(g.numel for g in streamed) + 16 * sum(g.numel for g in resident)
    assert all(g.grad.data_ptr() == g.stream.data_ptr() and g.stream.dtype == torch.bfloat16 for g in streamed)

    torch.manual_seed(0)
    fp32_model = llama()
    fp32 = mtc.compile(fp32_model, gpu_mem="3.5MB", example=tokens(), device="cpu", clip_grad_norm=1.0)
    for seed in range(5):
        batch = tokens(seed=seed)
        bf16_loss, fp32_loss = float(step(*batch)), float(fp32(*batch))
        assert bf16_loss == pytest.approx(fp32_loss, rel=2e-2)
    assert step.last_grad_norm == pytest.approx(fp32.last_grad_norm, rel=5e-2)


def test_a_failing_update_is_raised_on_the_next_call(monkeypatch):
    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")

    def broken(*args, **kwargs):
        raise FloatingPointError("injected")
    monkeypatch.setattr(engine_module, "adamw_step", broken)
    step(*tokens())
    with pytest.raises(RuntimeError, match="CPU optimizer failed") as error:
        step.synchronize()
    assert isinstance(error.value.__cause__, FloatingPointError)
    with pytest.raises(RuntimeError, match="CPU optimizer failed"):
        step(*tokens())


def test_the_optimizer_thread_ends_with_its_step():
    import gc
    import threading

    step = mtc.compile(llama(), gpu_mem="3.5MB", example=tokens(), device="cpu")
    step(*tokens())
    thread = step._engine.worker.thread
    assert thread.is_alive()
    del step
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive() and thread not in threading.enumerate()
