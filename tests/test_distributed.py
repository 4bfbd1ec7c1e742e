"""Data parallel (runtime/distributed) on the CPU: two gloo processes train as one process on their combined
batch, each host holding half the state, and checkpoints move between two ranks and one."""
import copy
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mtc
from mtc.codegen.stream_plan import busy_seconds
from mtc.runtime.store import FIXED_HOST_BYTES

from models import gpt2, llama, tokens

BUDGET = "5MB"  # some stages resident (all-reduced), the rest streamed (sharded over the hosts)
STEPS, ROWS = 5, 4
# Adam's eps: at 1e-8 AdamW turns the rounding of a near-zero gradient, which any split of the batch changes
# (the rows are summed in another order), into an lr-sized step. Eager PyTorch itself, averaging the gradients
# of two half batches instead of taking the whole batch's, ends 9.6e-5 away from the whole-batch run after 5 steps
# of this llama at eps=1e-8, 5.9e-7 at eps=1e-4 (measured 2026-12-03). test_..._eager_data_parallel checks eps=1e-8
# against that averaged-halves arithmetic instead.
HP = mtc.AdamW(lr=1e-3, eps=1e-4, weight_decay=0.1)


def _batches(count=STEPS):
    return [tokens(batch=ROWS, seq=8, seed=i) for i in range(count)]


def _rows(batch, rank, ranks=2):
    """This rank's rows of a combined batch."""
    share = batch[0].shape[0] // ranks
    return tuple(t[rank * share:(rank + 1) * share] for t in batch)


def _compile(model, example, hp=HP, **options):
    options = {"device": "cpu", **options}
    return mtc.compile(model, BUDGET, example, optimizer=hp, clip_grad_norm=1.0, progress=False, **options)


def _model(build):
    torch.manual_seed(0)
    return build()


def _spawn(tmp_path, function, *args, ranks=2):
    """function(rank, *args) on `ranks` gloo processes; what each returns, by rank."""
    rendezvous = tempfile.mktemp(dir=tmp_path, prefix="rendezvous-")  # a file store is good for one group only
    mp.spawn(_run, args=(function, str(tmp_path), rendezvous, ranks, args), nprocs=ranks)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(ranks)]


def _run(rank, function, directory, rendezvous, ranks, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=ranks)
    try:
        result = function(rank, *args)
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(directory, f"rank{rank}.pt"))


def _train_ranks(rank, build, hp=HP, options=None):
    batches = [_rows(b, rank) for b in _batches()]
    step = _compile(_model(build), batches[0], hp, **(options or {}))
    losses = [step(*b).item() for b in batches]
    shards = {group.name: (group.shard, group.length, group.numel) for group in step._store.all_groups()}
    return {"losses": losses, "parameters": dict(step.named_parameters()), "shards": shards,
            "resident": step.plan.schedule.resident, "ranks": step.plan.schedule.ranks, "norm": step.last_grad_norm,
            "disk": step.plan.schedule.disk}


def _assert_close(mine: dict, expected: dict, rtol=1e-5):
    assert set(mine) == set(expected)
    for name, value in expected.items():
        error = float((mine[name] - value).abs().max() / value.abs().max())
        assert error <= rtol, f"{name}: max |2 ranks - 1 process| / max |1 process| = {error:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2_tied"])
def test_two_ranks_train_as_one_process_on_the_combined_batch(tmp_path, build):
    ranks = _spawn(tmp_path, _train_ranks, build)
    single = _compile(_model(build), _batches()[0])
    losses = [single(*b).item() for b in _batches()]

    first = ranks[0]
    assert first["ranks"] == 2 and first["resident"], "both kinds of group: resident (all-reduced) and streamed"
    mean = [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)]
    assert mean == pytest.approx(losses, rel=1e-5)
    assert first["norm"] == pytest.approx(single.last_grad_norm, rel=1e-5)
    _assert_close(first["parameters"], dict(single.named_parameters()))
    for name, value in ranks[1]["parameters"].items():  # one model: every rank ends with the same weights
        assert torch.equal(value, first["parameters"][name]), name
    # Each host keeps half of every streamed (and the shared) group; resident ones are whole on every device.
    for rank, result in enumerate(ranks):
        for name, ((start, end), held, numel) in result["shards"].items():
            resident = name.startswith("stage") and int(name[5:]) in result["resident"]
            assert (start, end, held) == ((0, numel, numel) if resident else
                                          (rank * numel // 2, (rank + 1) * numel // 2, numel // 2)), name


def test_two_ranks_match_eager_data_parallel_arithmetic(tmp_path):
    """At Adam's usual eps=1e-8 against eager PyTorch that averages the two half batches' gradients, as the ranks do."""
    hp = mtc.AdamW(lr=1e-3, weight_decay=0.1)
    ranks = _spawn(tmp_path, _train_ranks, llama, hp)
    reference = _model(llama)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps,
                                  weight_decay=hp.weight_decay, fused=True)
    for batch, mine in zip(_batches(), zip(*(r["losses"] for r in ranks))):
        halves = []
        for rank in range(2):
            optimizer.zero_grad()
            loss = reference(*_rows(batch, rank))
            loss.backward()
            assert loss.item() == pytest.approx(mine[rank], rel=1e-5)
            halves.append([p.grad.clone() for p in reference.parameters()])
        for parameter, *grads in zip(reference.parameters(), *halves):
            parameter.grad = (grads[0] + grads[1]) / 2
        torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
        optimizer.step()
    _assert_close(ranks[0]["parameters"], {n: p.detach() for n, p in reference.named_parameters()})


def _save_on_ranks(rank, directory):
    batches = [_rows(b, rank) for b in _batches()]
    step = _compile(_model(llama), batches[0])
    for b in batches[:3]:
        step(*b)
    mtc.save(step, os.path.join(directory, "two"), data_position={"batches": 3}, progress=False)
    losses = [step(*b).item() for b in batches[3:]]
    return {"losses": losses, "parameters": dict(step.named_parameters())}


def _resume_on_ranks(rank, directory):
    batches = [_rows(b, rank) for b in _batches()]
    with torch.device("meta"):
        model = llama()
    step = mtc.load(os.path.join(directory, "one"), model, BUDGET, batches[0], device="cpu", progress=False)
    losses = [step(*b).item() for b in batches[3:]]
    return {"losses": losses, "parameters": dict(step.named_parameters()), "steps": step.steps}


def _resume(path):
    with torch.device("meta"):
        model = llama()
    step = mtc.load(path, model, BUDGET, _batches()[0], device="cpu", progress=False)
    assert step.steps == 3 and step.data_position == {"batches": 3}
    return step, [step(*b).item() for b in _batches()[3:]]


def test_a_checkpoint_saved_on_two_ranks_resumes_on_one_and_one_saved_on_one_on_two(tmp_path):
    ranks = _spawn(tmp_path, _save_on_ranks, tmp_path)
    resumed, losses = _resume(tmp_path / "two")
    mean = [sum(r["losses"][i] for r in ranks) / 2 for i in range(2)]
    assert losses == pytest.approx(mean, rel=1e-5)
    _assert_close(dict(resumed.named_parameters()), ranks[0]["parameters"])

    # The other way: one process saves after 3 steps, two ranks go on from it as that process goes on.
    single = _compile(_model(llama), _batches()[0])
    for b in _batches()[:3]:
        single(*b)
    mtc.save(single, tmp_path / "one", data_position={"batches": 3}, progress=False)
    expected = [single(*b).item() for b in _batches()[3:]]
    (tmp_path / "rank0.pt").unlink()
    ranks = _spawn(tmp_path, _resume_on_ranks, tmp_path)
    assert ranks[0]["steps"] == 5
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(2)] == pytest.approx(expected, rel=1e-5)
    _assert_close(ranks[0]["parameters"], dict(single.named_parameters()))


def test_two_ranks_with_state_on_disk_train_as_one_process_in_ram(tmp_path):
    """The NVMe tier under data parallel: each rank keeps its shard of the disk stages' state in its own files."""
    host = FIXED_HOST_BYTES + (8 << 20)  # each rank's share of the state does not fit: some stages go to disk
    ranks = _spawn(tmp_path, _train_ranks, llama, HP, {"nvme": str(tmp_path / "nvme"), "host_mem": host})
    single = _compile(_model(llama), _batches()[0])
    losses = [single(*b).item() for b in _batches()]
    assert ranks[0]["disk"] and not single.plan.schedule.disk
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)] == pytest.approx(losses, rel=1e-5)
    _assert_close(ranks[0]["parameters"], dict(single.named_parameters()))
    for name, ((start, end), held, numel) in ranks[1]["shards"].items():  # the disk stages are sharded too
        if name.startswith("stage") and int(name[5:]) in ranks[1]["disk"]:
            assert (start, end, held) == (numel // 2, numel, numel // 2), name


def _train_replanned(rank):
    """Stages move between the devices (whole on each) and the hosts (a shard on each) and back."""
    batches = [_rows(b, rank) for b in _batches()] if rank is not None else _batches()
    step = _compile(_model(llama), batches[0])
    losses = [step(*b).item() for b in batches[:2]]
    resident = [step.plan.schedule.resident]
    step = step.replan(schedule="spine")  # nothing resident
    resident.append(step.plan.schedule.resident)
    losses += [step(*b).item() for b in batches[2:4]]
    step = step.replan(gpu_mem=BUDGET)
    losses += [step(*b).item() for b in batches[4:]]
    return {"losses": losses, "parameters": dict(step.named_parameters()), "resident": resident}


def test_replan_moves_the_sharded_state_between_host_and_device(tmp_path):
    ranks = _spawn(tmp_path, _train_replanned)
    single = _train_replanned(None)
    assert ranks[0]["resident"][0] and ranks[0]["resident"][1] == []  # each way: device -> host -> device
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)] == pytest.approx(single["losses"], rel=1e-5)
    _assert_close(ranks[0]["parameters"], single["parameters"])


def _different_plans(rank):
    batch = _rows(_batches()[0], rank)
    with pytest.raises(RuntimeError, match="ranks \\[1\\] have another plan than rank 0"):
        mtc.compile(_model(llama), BUDGET if rank == 0 else "50MB", batch, device="cpu", progress=False)
    return True


def test_ranks_that_plan_differently_are_refused_on_every_rank(tmp_path):
    assert _spawn(tmp_path, _different_plans) == [True, True]


def test_distributed_needs_a_launcher_or_a_process_group():
    with pytest.raises(ValueError, match="distributed=True but this process was not started by torchrun"):
        mtc.compile(llama(), BUDGET, tokens(), device="cpu", distributed=True)
    with pytest.raises(TypeError, match="distributed='yes' is not valid"):
        mtc.compile(llama(), BUDGET, tokens(), device="cpu", distributed="yes")


def test_the_plan_counts_the_collectives_and_each_host_holds_a_share():
    """Two ranks: a streamed stage's copy moves half its bytes over PCIe and half between the GPUs, each host
    updates half the state and holds half the bytes."""
    with torch.device("meta"):
        model = llama()
    example = tokens(batch=ROWS // 2, seq=8)
    one = mtc.plan(model, "20MB", example, profile="h100", schedule="spine")
    two = mtc.plan(copy.deepcopy(model), "20MB", example, profile="h100", schedule="spine", ranks=2)
    profile = mtc.plan.__globals__["resolve_profile"]("h100")
    lanes_one, lanes_two = busy_seconds(one.plan.stream_plan, profile), busy_seconds(two.plan.stream_plan, profile)
    copied = sum(i.bytes for i in one.plan.stream_plan.on("h2d"))
    assert lanes_two["h2d"] == pytest.approx(copied / 2 / profile.h2d_bytes_per_s
                                             + copied / 2 / profile.link_bytes_per_s)
    assert lanes_two["cpu"] == pytest.approx(lanes_one["cpu"] / 2)
    assert two.plan.header["host_bytes"] == pytest.approx(one.plan.header["host_bytes"] / 2, rel=0.01)
    assert "data parallel: 2 ranks" in two.plan.summary()
    with pytest.raises(ValueError, match="ranks=0 is not valid"):
        mtc.plan(model, "1MB", example, ranks=0)


TRAIN = ["train", "--preset", "tiny", "--batch", "4x32", "--device", "cpu", "--save-every", "2"]


def _train_command(argv, tmp_path, ranks=1):
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "-m", "mtc"] \
        if ranks > 1 else [sys.executable, "-m", "mtc"]
    done = subprocess.run(launcher + argv + ["--checkpoint", str(tmp_path / "run")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_torchrun_trains_as_one_process_and_one_process_resumes_it(tmp_path):
    """`torchrun --nproc_per_node 2 -m mtc train`: one report (rank 0's), the same losses as one process on the
    same batches, and a checkpoint that one process goes on from as if it had made it."""
    single = _train_command(TRAIN + ["--steps", "4"], tmp_path)
    shutil.rmtree(tmp_path / "run")
    two = _train_command(TRAIN + ["--steps", "2"], tmp_path, ranks=2)
    assert two.count("data parallel: 2 ranks") == 1 and len(re.findall("^loss .* in steps 1-2", two, re.M)) == 1
    resumed = _train_command(TRAIN + ["--steps", "4", "--resume"], tmp_path)
    final = lambda out: float(re.search(r"loss \S+ -> (\S+) in steps", out).group(1))  # noqa: E731
    assert final(resumed) == pytest.approx(final(single), rel=1e-5)
    with pytest.raises(AssertionError, match="--batch=3x32 is not valid with 2 ranks"):
        _train_command(["train", "--preset", "tiny", "--batch", "3x32", "--device", "cpu", "--steps", "1"], tmp_path,
                       ranks=2)


def _train_ranks_on_the_gpu(rank):
    torch.cuda.set_device(0)
    batches = [tuple(t.cuda() for t in _rows(b, rank)) for b in _batches()]
    step = _compile(_model(llama), batches[0], device="cuda:0", compute_dtype=torch.float32, kernels="none")
    losses = [step(*b).item() for b in batches]
    return {"losses": losses, "parameters": {n: p.cpu() for n, p in step.named_parameters()},
            "resident": step.plan.schedule.resident}


@pytest.mark.gpu
def test_two_ranks_on_one_gpu_train_as_one_process(tmp_path):
    """The CUDA engine's collectives, on its streams: two gloo ranks share one GPU (NCCL refuses two ranks on one
    device), in fp32, against one process on the combined batch."""
    ranks = _spawn(tmp_path, _train_ranks_on_the_gpu)
    single = _compile(_model(llama), _batches()[0], device="cuda", compute_dtype=torch.float32, kernels="none")
    losses = [single(*b).item() for b in _batches()]
    assert ranks[0]["resident"] and len(ranks[0]["resident"]) < 10
    assert [sum(r["losses"][i] for r in ranks) / 2 for i in range(STEPS)] == pytest.approx(losses, rel=1e-5)
    _assert_close(ranks[0]["parameters"], {n: p.cpu() for n, p in single.named_parameters()})


def test_mtc_plan_plans_one_of_several_ranks(capsys):
    from mtc.cli import main

    assert main(["plan", "--preset", "1b", "--batch", "4x2048", "--ranks", "2", "--batches", "4x2048"]) == 0
    out = capsys.readouterr().out
    assert "data parallel: 2 ranks" in out and "2x2048" in out  # each rank's rows of 4x2048
    assert main(["plan", "--preset", "1b", "--batch", "3x2048", "--ranks", "2"]) == 2
    assert "--batch=3x2048 is not valid with --ranks=2" in capsys.readouterr().err
