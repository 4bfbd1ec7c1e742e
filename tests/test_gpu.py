"""The same plan on a CUDA device (skipped without one)."""
import copy

import pytest
import torch

import mtc
from models import llama, tokens

pytestmark = pytest.mark.gpu


def test_fp32_on_the_gpu_matches_eager_on_the_gpu():
    torch.manual_seed(0)
    model = llama()
    reference = copy.deepcopy(model).cuda()
    hp = mtc.AdamW(lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    step = mtc.compile(model, gpu_mem="3.5MB", example=tokens(), optimizer=hp, clip_grad_norm=1.0,
                       device="cuda", compute_dtype=torch.float32)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, weight_decay=hp.weight_decay,
                                  fused=True)
    for seed in range(3):
        ids, labels = (t.cuda() for t in tokens(seed=seed))
        loss = float(step(ids, labels))
        expected = reference(ids, labels)
        optimizer.zero_grad()
        expected.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
        # GPU kernels (cuBLAS, SDPA) differ from the CPU's and the update runs on the host: not bitwise.
        assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
    torch.manual_seed(0)
    model = llama()
    step = mtc.compile(model, gpu_mem="3.5MB", example=tokens(), device="cuda")
    assert step.plan.header["compute_dtype"] == "bfloat16"
    before = {n: p.clone() for n, p in step.named_parameters()}
    losses = [float(step(*(t.cuda() for t in tokens(seed=s)))) for s in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    for name, master in step.named_parameters():
        assert master.dtype == torch.float32 and not torch.equal(master, before[name]), name
