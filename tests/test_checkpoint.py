"""mtc.save / mtc.load: a resumed run is the uninterrupted one, and a failed save loses nothing."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mtc
from mtc import checkpoint

from models import gpt2, llama, tokens

BUDGET = "5MB"  # some stages resident, the rest streamed: both kinds of state are saved


def _compile(model, example, **options):
    return mtc.compile(model, BUDGET, example, optimizer=mtc.AdamW(lr=1e-3, weight_decay=0.1), clip_grad_norm=1.0,
                       device="cpu", progress=False, **options)


def _batches(count=6):
    return [tokens(seed=i) for i in range(count)]


def _train(step, batches):
    return [step(*batch).item() for batch in batches]


def _fresh(build):
    torch.manual_seed(0)
    return build()


@pytest.mark.parametrize("build", [llama, lambda: gpt2(dropout=0.1)], ids=["llama", "gpt2_dropout"])
def test_save_load_and_three_more_steps_is_six_uninterrupted_steps(tmp_path, build):
    batches = _batches()
    torch.manual_seed(1)
    whole = _compile(_fresh(build), batches[0])
    assert whole.plan.schedule.resident and len(whole.plan.schedule.resident) < len(whole.plan.schedule.stages)
    expected = _train(whole, batches)
    expected_parameters = {n: p.clone() for n, p in whole.named_parameters()}

    torch.manual_seed(1)
    first = _compile(_fresh(build), batches[0])
    losses = _train(first, batches[:3])
    mtc.save(first, tmp_path / "ckpt", data_position={"batch": 3})
    torch.manual_seed(123)  # what load restores: a resumed run's dropout masks are the uninterrupted run's
    with torch.device("meta"):
        model = build()
    resumed = mtc.load(tmp_path / "ckpt", model, BUDGET, batches[0], device="cpu", progress=False)
    assert resumed.steps == 3 and resumed.data_position == {"batch": 3}
    losses += _train(resumed, batches[resumed.data_position["batch"]:])
    assert losses == expected
    resumed_parameters = dict(resumed.named_parameters())
    assert resumed_parameters.keys() == expected_parameters.keys()
    for name, value in expected_parameters.items():
        assert torch.equal(resumed_parameters[name], value), name


def test_the_weights_are_the_models_own_names_in_safetensors(tmp_path):
    step = _compile(_fresh(llama), tokens())
    step(*tokens())
    mtc.save(step, tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    mine = dict(step.named_parameters())
    assert saved.keys() == {name for name, _ in llama().named_parameters()}
    for name, value in saved.items():
        assert value.dtype == torch.float32 and torch.equal(value, mine[name])
    meta = json.loads((tmp_path / "ckpt" / "mtc.json").read_text())
    assert meta["steps"] == 1 and meta["format"] == checkpoint.FORMAT and meta["optimizer"]["lr"] == 1e-3


def test_a_checkpoint_past_the_shard_size_is_sharded_with_an_index_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "SHARD_BYTES", 200_000)
    step = _compile(_fresh(llama), tokens())
    step(*tokens())
    mtc.save(step, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((tmp_path / "ckpt" / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for _, p in step.named_parameters())
    resumed = mtc.load(tmp_path / "ckpt", _fresh(llama), BUDGET, tokens(), device="cpu", progress=False)
    for (name, a), (_, b) in zip(step.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_save_stopped_between_its_renames_is_found_by_load(tmp_path):
    step = _compile(_fresh(llama), tokens())
    step(*tokens())
    mtc.save(step, tmp_path / "ckpt")
    aside = tmp_path / ".ckpt.replaced-x"
    aside.mkdir()
    os.rename(tmp_path / "ckpt", aside / "ckpt")  # as _move_into_place leaves it if stopped there
    with pytest.warns(UserWarning, match="a save was interrupted"):
        resumed = mtc.load(tmp_path / "ckpt", _fresh(llama), BUDGET, tokens(), device="cpu", progress=False)
    assert resumed.steps == 1


def test_a_save_removes_what_killed_saves_left_and_nothing_a_live_one_holds(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    step = _compile(_fresh(llama), tokens())
    mtc.save(step, tmp_path / "ckpt")
    leftovers = {name: tmp_path / name for name in (f".ckpt.saving-{dead}-a1", f".ckpt.replaced-{dead}-b2",
                                                    f".ckpt.saving-{os.getpid()}-c3", ".other.saving-1-d4")}
    for directory in leftovers.values():
        directory.mkdir()
        (directory / "model.safetensors").write_bytes(b"half")
    mtc.save(step, tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ckpt", f".ckpt.saving-{os.getpid()}-c3",
                                                                 ".other.saving-1-d4"])


def test_loading_into_another_model_names_what_differs(tmp_path):
    step = _compile(_fresh(llama), tokens())
    mtc.save(step, tmp_path / "ckpt")
    with pytest.raises(mtc.CheckpointError, match="saved from another model or config: .*model parameters not saved"):
        mtc.load(tmp_path / "ckpt", gpt2(), BUDGET, tokens(), device="cpu", progress=False)


def test_a_cut_shard_is_reported_and_the_directory_left_alone(tmp_path):
    step = _compile(_fresh(llama), tokens())
    mtc.save(step, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # the data cut short, the header whole
    with pytest.raises(mtc.CheckpointError, match="model.safetensors is not a whole safetensors file"):
        mtc.load(tmp_path / "ckpt", _fresh(llama), BUDGET, tokens(), device="cpu", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_bad_paths_are_refused_with_what_is_expected(tmp_path):
    step = _compile(_fresh(llama), tokens())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(mtc.CheckpointError, match="exists and is not an mtc checkpoint"):
        mtc.save(step, tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(mtc.CheckpointError, match="is not an mtc checkpoint: it has no mtc.json"):
        mtc.load(tmp_path / "notes", llama(), BUDGET, tokens(), device="cpu")
    with pytest.raises(mtc.CheckpointError, match="is not a directory"):
        mtc.load(tmp_path / "missing", llama(), BUDGET, tokens(), device="cpu")
    with pytest.raises(TypeError, match="data_position=.* is not JSON-serialisable"):
        mtc.save(step, tmp_path / "ckpt", data_position={"at": object()})
    assert not (tmp_path / "ckpt").exists()


def test_mtc_train_resumed_from_its_checkpoint_ends_where_an_unbroken_run_ends(tmp_path, capsys):
    from mtc.cli import main

    common = ["train", "--preset", "tiny", "--batch", "2x32", "--device", "cpu"]
    assert main(common + ["--steps", "6"]) == 0
    unbroken = capsys.readouterr().out.splitlines()[-1]
    assert main(common + ["--steps", "4", "--save-every", "3", "--checkpoint", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "mtc.json").read_text())["data_position"] == {
        "batches": 4, "data": None, "batch": "2x32", "seed": 0}
    capsys.readouterr()
    assert main(common + ["--steps", "6", "--resume", "--checkpoint", str(tmp_path / "c")]) == 0
    resumed = capsys.readouterr().out.splitlines()
    assert resumed[0] == f"resumed from {tmp_path / 'c'} after 4 steps"
    assert resumed[-1].split(" in steps")[0].split("-> ")[1] == unbroken.split(" in steps")[0].split("-> ")[1]
    assert main(common + ["--steps", "4", "--resume", "--checkpoint", str(tmp_path / "c")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(common + ["--steps", "4", "--save-every", "-1"]) == 2
    assert "--save-every=-1 is not valid" in capsys.readouterr().err
    assert main(common + ["--steps", "6", "--resume", "--seed", "1", "--checkpoint", str(tmp_path / "c")]) == 2
    assert "read its data as {'data': None, 'batch': '2x32', 'seed': 0}, not as" in capsys.readouterr().err
    assert main(common + ["--steps", "4", "--resume", "--checkpoint", str(tmp_path / "none")]) == 2
    assert "is not a directory; expected a checkpoint mtc.save wrote" in capsys.readouterr().err


def test_mtc_train_reads_text_as_bytes_for_a_byte_level_preset(tmp_path, capsys):
    from mtc.cli import main

    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    (tmp_path / "texts" / "b.txt").write_text("pack my box with five dozen liquor jugs\n" * 50)
    argv = ["train", "--preset", "tiny", "--data", str(tmp_path / "texts"), "--batch", "2x32", "--steps", "20",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    first, last = (float(x) for x in out.splitlines()[-1].split(" in steps")[0].removeprefix("loss ").split(" -> "))
    assert last < first - 1.0  # two repeated sentences are learned fast


def test_a_checkpoint_resumes_under_another_plan(tmp_path):
    # The state is saved per parameter: a run saved streaming every stage goes on with most of them resident.
    batches = _batches()
    torch.manual_seed(1)
    whole = _compile(_fresh(llama), batches[0])
    expected = _train(whole, batches)
    torch.manual_seed(1)
    first = mtc.compile(_fresh(llama), "2.8MB", batches[0], optimizer=mtc.AdamW(lr=1e-3, weight_decay=0.1),
                        clip_grad_norm=1.0, device="cpu", progress=False)
    assert first.plan.schedule.resident == []
    losses = _train(first, batches[:3])
    mtc.save(first, tmp_path / "ckpt")
    resumed = mtc.load(tmp_path / "ckpt", _fresh(llama), "50MB", batches[0], device="cpu", progress=False)
    assert len(resumed.plan.schedule.resident) >= 5
    assert losses + _train(resumed, batches[3:]) == pytest.approx(expected, rel=1e-6)


def test_a_saved_dataset_gives_its_input_ids_or_its_text(tmp_path):
    import datasets

    from mtc.examples import data

    class Tokenizer:  # as a Hugging Face tokenizer is called on a batch of texts
        eos_token_id = 0

        def __call__(self, texts):
            return {"input_ids": [[ord(c) for c in text] for text in texts]}

    datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}).save_to_disk(tmp_path / "ids")
    assert data.load_tokens(str(tmp_path / "ids"), 256).tolist() == [1, 2, 3, 4, 5]
    datasets.Dataset.from_dict({"text": ["ab", "c"]}).save_to_disk(tmp_path / "text")
    assert data.load_tokens(str(tmp_path / "text"), 256, Tokenizer()).tolist() == [97, 98, 0, 99, 0]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": [[7, 8]]}),
                                   "test": datasets.Dataset.from_dict({"input_ids": [[9]]})})
    splits.save_to_disk(tmp_path / "splits")
    assert data.load_tokens(str(tmp_path / "splits"), 256).tolist() == [7, 8]
    datasets.DatasetDict({"test": splits["test"]}).save_to_disk(tmp_path / "test_only")
    with pytest.raises(ValueError, match="with the splits \\['test'\\] and no train split"):
        data.load_tokens(str(tmp_path / "test_only"), 256)
    datasets.Dataset.from_dict({"label": [0]}).save_to_disk(tmp_path / "other")
    with pytest.raises(ValueError, match="has columns \\['label'\\]; expected input_ids, or text"):
        data.load_tokens(str(tmp_path / "other"), 256)
    with pytest.raises(ValueError, match="past the model's vocabulary of 4"):
        data.load_tokens(str(tmp_path / "ids"), 4)


def test_mtc_train_logs_loss_and_speed_for_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mtc import cli

    assert cli.main(["train", "--batch", "2x32", "--steps", "3", "--device", "cpu", "--log-dir", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()[-1].split()  # loss 5.555 -> 4.491880 in steps 1-3, ...
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"loss", "tokens_per_s"}
    losses = events.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3] and [e.step for e in events.Scalars("tokens_per_s")] == [1, 2, 3]
    # The losses it printed (to 4 figures, then to 6 places); TensorBoard keeps float32.
    assert float(printed[1]) == pytest.approx(losses[0].value, abs=5e-4)
    assert float(printed[3]) == pytest.approx(losses[-1].value, abs=1e-6)
    assert all(e.value > 0 for e in events.Scalars("tokens_per_s"))
