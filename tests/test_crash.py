"""Crash-safe training: a stopped `mtc train` saves and resumes bit for bit, a SIGKILL at any moment of a save
leaves a whole checkpoint, and a disk without room is refused before anything is written."""
import collections
import glob
import json
import multiprocessing
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file
from tqdm import tqdm

import mtc
from mtc import checkpoint
from mtc.config import format_bytes
from mtc.examples import models

from models import VOCAB, tokens

TRAIN = ["train", "--preset", "tiny", "--batch", "2x32", "--device", "cpu"]


def _saved_tensors(directory) -> dict[tuple[str, str], torch.Tensor]:
    """(file, tensor name) -> tensor, for every safetensors file of a checkpoint: weights, AdamW moments and step
    counts, buffers, RNG states."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    return {(os.path.basename(file), name): tensor for file in files for name, tensor in load_file(file).items()}


def _assert_same_tensors(mine: dict, expected: dict) -> None:
    assert mine.keys() == expected.keys()
    differ = [key for key, value in expected.items() if not torch.equal(mine[key], value)]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, as {differ[:3]}"


def _meta(directory) -> dict:
    with open(os.path.join(directory, checkpoint.META)) as f:
        return json.load(f)


def _mtc(argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "mtc.cli", *argv], text=True, **popen)


def _observed_mtc(argv, hold_after: int, slow_saves_after: int | None = None, **popen):
    """`mtc train` in a child that prints `step N` after each step and, after step `hold_after`, waits until its
    stdin is closed, so that a test's signal lands at a step of its choosing. slow_saves_after: the saves after
    that many print `writing` once their weights are written and then hang (60 s) until a signal ends them."""
    script = textwrap.dedent(f"""
        import sys, time
        from mtc import checkpoint, cli
        from mtc.compile import Step

        call = Step.__call__
        def observed(self, *args, **kwargs):
            loss = call(self, *args, **kwargs)
            print(f"step {{self.steps}}", flush=True)
            if self.steps == {hold_after}:
                sys.stdin.read()
            return loss
        Step.__call__ = observed

        write, saves = checkpoint._write_sharded, []
        def slow(directory, kind, *args):
            write(directory, kind, *args)
            if kind == "model":
                saves.append(directory)
                if {slow_saves_after!r} is not None and len(saves) > {slow_saves_after!r}:
                    print("writing", flush=True)
                    time.sleep(60)
        checkpoint._write_sharded = slow
        sys.exit(cli.main({list(argv)!r}))
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            **popen)


def _read_until(child, wanted: str) -> None:
    while (line := child.stdout.readline()) != f"{wanted}\n":
        assert line, f"the child's output ended before {wanted!r} (exit status {child.wait()})"


def test_sigterm_saves_and_the_resumed_run_ends_bit_for_bit_where_an_unbroken_run_ends(tmp_path):
    unbroken = _mtc(TRAIN + ["--steps", "5", "--save-every", "5", "--checkpoint", str(tmp_path / "a")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(tmp_path / "stopped.err", "w") as err:  # no --save-every: only the stop saves
        stopped = _observed_mtc(TRAIN + ["--steps", "5", "--checkpoint", str(tmp_path / "b")], hold_after=2,
                                stderr=err)
        _read_until(stopped, "step 2")
        stopped.send_signal(signal.SIGTERM)
        stopped.stdin.close()  # lets step 2 return: the signal was handled while the child waited in read
        assert stopped.wait(timeout=60) == 128 + signal.SIGTERM
    assert unbroken.wait(timeout=60) == 0
    meta = _meta(tmp_path / "b")
    assert meta["steps"] == 2 and meta["data_position"] == {"batches": 2, "data": None, "batch": "2x32", "seed": 0}
    said = (tmp_path / "stopped.err").read_text().splitlines()
    stop = f"mtc train: stopped by SIGTERM after step 2 of 5; the checkpoint in {tmp_path / 'b'} holds it. Go on with:"
    assert stop in said
    # The command it prints goes on to step 5; saving there too, it can be compared.
    resume = shlex.split(said[said.index(stop) + 1])
    assert resume[:2] == ["mtc", "train"] and resume[-1] == "--resume"
    resumed = _mtc(resume[1:] + ["--save-every", "5"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert f"resumed from {tmp_path / 'b'} after 2 steps\n" in resumed.communicate(timeout=60)[0]
    assert resumed.returncode == 0
    # Weights, AdamW moments and step counts, buffers and RNG states, bit for bit; the same data position.
    _assert_same_tensors(_saved_tensors(tmp_path / "b"), _saved_tensors(tmp_path / "a"))
    assert {k: _meta(tmp_path / "b")[k] for k in ("steps", "data_position")} == \
        {k: _meta(tmp_path / "a")[k] for k in ("steps", "data_position")}


def test_a_second_signal_abandons_the_save_and_keeps_the_previous_checkpoint(tmp_path):
    with open(tmp_path / "err", "w") as err:
        child = _observed_mtc(TRAIN + ["--steps", "6", "--save-every", "2", "--checkpoint", str(tmp_path / "c")],
                              hold_after=3, slow_saves_after=1, stderr=err)
        _read_until(child, "step 3")  # step 2's checkpoint is saved
        child.send_signal(signal.SIGINT)
        child.stdin.close()
        _read_until(child, "writing")  # the stop's save, holding step 3, hangs after its weights
        child.send_signal(signal.SIGINT)
        began = time.perf_counter()
        assert child.wait(timeout=60) == 128 + signal.SIGINT
    assert time.perf_counter() - began < 20  # at once, not when the hanging save would have gone on
    assert _meta(tmp_path / "c")["steps"] == 2
    assert sorted(os.listdir(tmp_path)) == ["c", "err"]  # the abandoned save's directory is removed
    assert f"mtc train: a second SIGINT: stopped at once, the save abandoned; the checkpoint of step 2 in " \
           f"{tmp_path / 'c'} stays" in (tmp_path / "err").read_text()


# -- SIGKILL during saves ---------------------------------------------------------------------------------------

KILL_TRIALS = 20
SAVES = 4
"""Saves each kill trial's child makes (over the checkpoint of step 0) before it idles."""


def _small_model():
    torch.manual_seed(0)
    return models.Llama(models.LlamaConfig(vocab_size=VOCAB, hidden=16, layers=1, heads=2, kv_heads=1,
                                           intermediate=32))


def _save_repeatedly(path: str, phase, keep_each: bool = False, save_seconds=None) -> None:
    """A kill trial's child: saves the step-0 checkpoint at `path`, then SAVES times trains a step and saves
    over it, then idles. phase (shared memory, read by the parent once the child is killed): 0 once the first
    checkpoint is whole, 2k - 1 while the k-th save after it runs, 2k once it returned. keep_each: save step k
    to path/k instead (the reference run), and the mean seconds of a save into save_seconds."""
    checkpoint.SHARD_BYTES = 4_000  # several shards and an index a kind: more files for a kill to cut
    # tqdm's lock would be a multiprocessing semaphore, which a killed child leaves to the resource tracker.
    tqdm.set_lock(threading.RLock())
    step = mtc.compile(_small_model(), "80GB", tokens(), optimizer=mtc.AdamW(lr=1e-2), device="cpu",
                       progress=False)
    mtc.save(step, os.path.join(path, "0") if keep_each else path, progress=False)
    phase.value, spent = 0, 0.0
    for saved in range(1, SAVES + 1):
        step(*tokens(seed=saved))
        phase.value = 2 * saved - 1
        began = time.perf_counter()
        mtc.save(step, os.path.join(path, str(saved)) if keep_each else path, progress=False)
        spent += time.perf_counter() - began
        phase.value = 2 * saved
    if save_seconds is not None:
        save_seconds.value = spent / SAVES
    time.sleep(0 if keep_each else 60)


def test_sigkill_at_random_moments_of_saves_leaves_a_whole_checkpoint_it_wrote(tmp_path):
    # Children fork from a server that has imported torch and mtc once: a trial costs a compile, not a start
    # (torch._dynamo too: the first compile in a process imports it, 1.2 s).
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload([__name__, "torch._dynamo"])
    save_seconds = processes.Value("d", 0.0, lock=False)
    reference = processes.Process(target=_save_repeatedly,
                                  args=(str(tmp_path / "reference"), processes.Value("i", -1, lock=False), True,
                                        save_seconds))
    reference.start()
    reference.join(timeout=120)
    assert reference.exitcode == 0
    expected = [_saved_tensors(tmp_path / "reference" / str(k)) for k in range(SAVES + 1)]
    chance = random.Random(0)
    inside_save = mid_write = 0
    for trial in range(KILL_TRIALS):
        path = tmp_path / f"trial{trial}" / "ckpt"
        phase = processes.Value("i", -1, lock=False)
        child = processes.Process(target=_save_repeatedly, args=(str(path), phase))
        child.start()
        # Kill at a random moment of a randomly chosen save, or a little after it (the next step).
        target = chance.randint(1, SAVES - 1)
        while phase.value < 2 * target - 1 and child.is_alive():
            time.sleep(0.0002)
        time.sleep(chance.uniform(0, 1.2 * save_seconds.value))
        child.kill()
        child.join()
        killed_in = phase.value
        assert killed_in >= 2 * target - 1, f"trial {trial}: the child ended before its save {target}"
        inside_save += killed_in % 2
        mid_write += bool(glob.glob(str(path.parent / ".ckpt.saving-*")))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a kill between the renames: the old one, aside
            with torch.device("meta"):
                model = _small_model()
            loaded = mtc.load(path, model, "80GB", tokens(), device="cpu", progress=False)
            found = checkpoint._readable(path)
        # Killed inside save k, the checkpoint is step k - 1 or, if its rename came first, k; after it, k.
        last_whole = killed_in // 2
        assert loaded.steps in ({last_whole, last_whole + 1} if killed_in % 2 else {last_whole}), trial
        _assert_same_tensors(_saved_tensors(found), expected[loaded.steps])
        weights = dict(loaded.named_parameters())
        assert all(torch.equal(weights[name], value) for (file, name), value in expected[loaded.steps].items()
                   if file.startswith("model"))
    # The test aims its kills inside saves (most of them while shards are written); see that it does.
    assert inside_save >= KILL_TRIALS // 2 and mid_write >= KILL_TRIALS // 4, (inside_save, mid_write)


# -- disk space -------------------------------------------------------------------------------------------------

def _disk_with(monkeypatch, free: int) -> list:
    """shutil.disk_usage reporting `free` bytes free; returns the directories it was asked about."""
    asked = []
    usage = collections.namedtuple("usage", "total used free")

    def disk_usage(directory):
        asked.append(str(directory))
        return usage(1 << 40, (1 << 40) - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    return asked


def test_a_save_is_refused_before_writing_when_the_disk_lacks_room_for_a_whole_new_checkpoint(tmp_path, monkeypatch):
    step = mtc.compile(_small_model(), "80GB", tokens(), device="cpu", progress=False)
    step(*tokens())
    path = tmp_path / "runs" / "ckpt"
    mtc.save(step, path, progress=False)
    files = {name: (path / name).read_bytes() for name in os.listdir(path)}
    tensor_bytes = sum(t.numel() * t.element_size() for (file, _), t in _saved_tensors(path).items()
                       if not file.startswith("rng"))
    needed = tensor_bytes + checkpoint.METADATA_BYTES
    # What `mtc train` checks before compiling, from the model's shapes alone, is what a save needs.
    with torch.device("meta"):
        assert checkpoint.checkpoint_bytes(_small_model()) == needed
    step(*tokens())
    asked = _disk_with(monkeypatch, needed - 1)  # the old checkpoint's bytes do not count: it stays until the end
    with pytest.raises(checkpoint.DiskSpaceError) as refused:
        mtc.save(step, path, progress=False)
    assert refused.value.errno == 28 and isinstance(refused.value, OSError)
    assert f"a checkpoint at {path} needs {format_bytes(needed)} ({needed:,} bytes" in str(refused.value)
    assert f"but {tmp_path / 'runs'} has {format_bytes(needed - 1)} ({needed - 1:,} bytes) free: free 1 B or save " \
           f"to a path on a disk with {format_bytes(needed)} free" in str(refused.value)
    assert sorted(os.listdir(tmp_path / "runs")) == ["ckpt"]
    assert {name: (path / name).read_bytes() for name in os.listdir(path)} == files
    # A path not made yet: the nearest parent that exists is asked.
    with pytest.raises(checkpoint.DiskSpaceError):
        mtc.save(step, tmp_path / "new" / "deeper" / "ckpt", progress=False)
    assert asked == [str(tmp_path / "runs"), str(tmp_path)] and not (tmp_path / "new").exists()
    _disk_with(monkeypatch, needed)
    mtc.save(step, path, progress=False)
    assert _meta(path)["steps"] == 2


def test_mtc_train_refuses_a_checkpoint_disk_without_room_before_compiling(tmp_path, monkeypatch, capsys):
    from mtc.cli import main

    with torch.device("meta"):
        needed = checkpoint.checkpoint_bytes(models.build("tiny"))
    _disk_with(monkeypatch, 1 << 20)
    argv = TRAIN + ["--steps", "1", "--checkpoint", str(tmp_path / "c")]
    assert main(argv + ["--save-every", "1"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # refused before compiling
    assert f"mtc train: error: [Errno 28] a checkpoint at {tmp_path / 'c'} needs {format_bytes(needed)}" in err
    assert f"but {tmp_path} has 1.00 MiB (1,048,576 bytes) free: free {format_bytes(needed - (1 << 20))} or choose " \
           f"--checkpoint on a disk with {format_bytes(needed)} free" in err
    # Without --save-every only a stop by signal would save: a warning, and the run trains.
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "mtc train: warning: a stop by SIGINT or SIGTERM saves a checkpoint, and it would not fit: " in err
    assert "in steps 1-1" in out.splitlines()[-1]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # put back
    assert not (tmp_path / "c").exists()
