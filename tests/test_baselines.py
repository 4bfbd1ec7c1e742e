"""mtc bench --vs: the peers run in processes of their own; a missing one is reported, not a failure."""
import importlib.util
import signal
import sys
import time

import pytest
import torch

from mtc import bench
from mtc.cli import main
from mtc.examples.baselines import BASELINES


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_a_missing_peer_is_reported_as_not_installed():
    result = bench.baseline("deepspeed", "tiny", (1, 16), steps=1, warmup=0, clip=1.0)
    assert result["not_installed"].startswith("deepspeed is not importable")
    assert "examples/baselines/README.md" in result["not_installed"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this checks the report without a GPU")
def test_a_baseline_without_a_gpu_says_so():
    assert bench.baseline("eager", "tiny", (1, 16), steps=1, warmup=0, clip=1.0)["failed"] == \
        "the baselines train on a CUDA GPU and torch sees none"


def test_bench_refuses_trace_with_no_trace(capsys):
    assert main(["bench", "--preset", "tiny", "--batch", "1x16", "--trace", "t.json", "--no-trace"]) == 2
    assert "--trace writes the traced steps that --no-trace leaves out" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "2k"])
def test_tile_tokens_is_refused_by_name_on_the_command_line(value, capsys):
    with pytest.raises(SystemExit) as exit:  # argparse's own refusal, status 2
        main(["plan", "--tile-tokens", value])
    assert exit.value.code == 2
    assert f"argument --tile-tokens: {value!r} is not valid; expected a number of tokens >= 1" in \
        capsys.readouterr().err


def test_vs_names_are_checked_before_anything_runs(capsys):
    assert main(["bench", "--preset", "tiny", "--batch", "1x16", "--vs", "eager,zero"]) == 2
    error = capsys.readouterr().err
    assert "--vs='eager,zero' names zero, which is not a baseline" in error
    assert ", ".join(BASELINES) in error


def _figures(step_s, **extra):
    return {"step_s": step_s, "tokens_per_s": 4096 / step_s, "model_tflops": 1.0, "peak_gpu_allocated_bytes": 2 << 30,
            "peak_gpu_reserved_bytes": 3 << 30, "peak_host_rss_bytes": 5 << 30, "peak_host_rss_bytes_per_param": 14.0,
            "loss_finite": True, "loss_fell": True, **extra}


def test_the_table_puts_every_system_side_by_side_and_says_why_one_did_not_run():
    mine = _figures(0.5, bounds_s={"compute": 0.4}, lower_bound_s=0.4, bound_by="compute", achieved_over_bound=0.8,
                    within_gpu_mem=True, h2d_gb_per_s_average=1.0, h2d_gb_per_s_while_copying=2.0,
                    d2h_gb_per_s_average=1.0, d2h_gb_per_s_while_copying=2.0, optimizer_hidden_fraction=1.0,
                    device_mallocs_while_timed=0, pinned_allocs_while_timed=0, host_state_bytes_per_param=14.0,
                    host_rss_added_bytes_per_param=14.2, slots=2, cpu_threads=12)
    result = {"preset": "3b", "batch": "1x4096", "gpu_mem": "80GB", "clip": 1.0, "device": "GPU", "date": "today",
              "mtc": mine, "vs": {"fsdp": _figures(1.5, mtc_speedup=3.0, loss_fell=False),
                                  "deepspeed": {"not_installed": "deepspeed is not importable"},
                                  "eager": _figures(0.4, mtc_speedup=0.8, loss_fell=None)}}
    lines = bench.table(result).splitlines()
    assert lines[1].split() == ["mtc", "fsdp", "deepspeed", "eager"]
    speedup = next(line for line in lines if line.startswith("mtc speedup"))
    assert speedup.split()[-4:] == ["-", "3.00x", "-", "0.80x"]
    assert next(line for line in lines if line.startswith("loss finite")).split()[-10:] == \
        ["yes", "/", "yes", "yes", "/", "NO", "-", "yes", "/", "-"]  # eager ran one step: nothing to compare
    assert "deepspeed: not installed: deepspeed is not importable" in lines


def test_an_untraced_run_says_so_and_counts_attention_in_its_tflops():
    mine = _figures(2.0, within_gpu_mem=True, tflops_with_attention=123.4)
    result = {"preset": "8b", "batch": "1x131072", "gpu_mem": "80GB", "clip": 1.0, "device": "GPU", "date": "today",
              "mtc": mine}
    lines = bench.table(result).splitlines()
    assert "mtc: 123 model TFLOP/s counting attention's causal half too" in lines
    assert lines[-1] == "mtc: within gpu_mem: yes; not traced"


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(BASELINES))
def test_each_installed_baseline_trains_the_tiny_preset(name):
    result = bench.baseline(name, "tiny", (2, 64), steps=3, warmup=1, clip=1.0)
    if "not_installed" in result:
        pytest.skip(result["not_installed"])
    assert "failed" not in result, result.get("failed")
    assert result["loss_finite"] and result["step_s"] > 0 and result["params"] > 0
    assert result["peak_gpu_allocated_bytes"] > 0 and result["peak_host_rss_bytes_per_param"] > 0


def test_megatrain_without_its_checkout_is_reported_as_not_installed(monkeypatch):
    monkeypatch.delenv("MTC_MEGATRAIN", raising=False)
    result = bench.baseline("megatrain", "tiny", (1, 16), steps=1, warmup=0, clip=1.0)
    assert result["not_installed"].startswith("MTC_MEGATRAIN=None is not a MegaTrain checkout")


def test_megatrains_log_gives_the_figures_mtc_bench_reports():
    from mtc.examples.baselines.megatrain import read_log

    def step(n, loss, seconds, peak, reserved):
        return (f"INFO Step {n}/4 | Loss {loss} | Avg 1.0\n  Time: {seconds:.2f}s | Tokens/s 1.0 | TFLOPS 1.0\n"
                f"  FWD: 0.10s | BWD: 0.20s\n  GPU: {peak:.2f}GB peak (alloc 1.00GB / reserved {reserved:.2f}GB)\n"
                f"  CPU: 9.00GB\n")
    log = step(1, "11.5", 9.0, 2.0, 3.0) + step(2, "11.0", 4.0, 2.5, 3.5) + step(3, "10.0", 5.0, 2.5, 4.0) \
        + step(4, "nan", 3.0, 2.5, 4.0) + "VmHWM:\t  2048 kB\n"
    figures = read_log(log, untimed=1, batch=(2, 100), params=10**6)
    assert figures["step_s"] == 4.0 and figures["tokens_per_s"] == 50.0  # the median of 4, 5 and 3 s
    assert figures["model_tflops"] == 6 * 10**6 * 200 / 4.0 / 1e12
    assert figures["losses"][:2] == [11.0, 10.0] and not figures["loss_finite"]
    assert figures["peak_gpu_allocated_bytes"] == int(2.5 * 2**30) and figures["peak_gpu_reserved_bytes"] == 4 * 2**30
    assert figures["peak_host_rss_bytes"] == 2 << 20 and figures["peak_host_rss_bytes_per_param"] == (2 << 20) / 10**6
    assert read_log(step(1, "2.0", 1.0, 1.0, 1.0) + step(2, "1.0", 1.0, 1.0, 1.0), untimed=1, batch=(1, 1),
                    params=1)["loss_fell"] is None  # one timed step: nothing to compare
    with pytest.raises(RuntimeError, match="not more than the 1 untimed"):
        read_log(step(1, "1.0", 1.0, 1.0, 1.0), untimed=1, batch=(1, 1), params=1)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("yaml") is None,
                    reason="MegaTrain's inputs are written with transformers and pyyaml")
def test_megatrains_inputs_are_the_presets_shape_and_fill_every_position(tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtc.examples import models
    from mtc.examples.baselines.megatrain import write_inputs

    write_inputs(str(tmp_path), "tiny", (2, 64), steps=3, clip=1.0, attention="sdpa")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert sum(p.numel() for p in model.parameters()) == models.parameter_count(models.build("tiny", "meta"))
    assert model.config.num_hidden_layers == 4 and not model.config.tie_word_embeddings
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    row = json.loads((tmp_path / "data" / "synthetic.json").read_text())[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": row["instruction"]},
                                          {"role": "assistant", "content": row["output"]}], tokenize=False)
    ids = tokenizer(text, max_length=64, truncation=True, padding="max_length")["input_ids"]
    words = row["output"].split()
    assert ids[1:8] == [int(word[1:]) for word in words[:7]]  # word wN is token N, after the instruction's w1
    assert tokenizer.pad_token_id not in ids


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_a_peers_peak_host_memory_is_its_own_not_its_parents():
    """ru_maxrss carries over a subprocess's parent's peak; the figure the peers report must not."""
    import subprocess
    import sys

    held = torch.ones(768 << 20)  # 3 GiB touched here, in the parent
    child = subprocess.run([sys.executable, "-c", "from mtc.bench import peak_rss_bytes; print(peak_rss_bytes())"],
                           capture_output=True, text=True, check=True)
    assert int(child.stdout) < 1.5 * 2**30 < held.numel() * 4 <= bench.peak_rss_bytes()


def test_a_peer_past_its_time_is_stopped_with_the_processes_it_started(tmp_path):
    marker = tmp_path / "child.pid"
    # The peer starts a child of its own (as MegaTrain's runner does), then outlives the limit.
    script = ("import subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
              "print('set up', flush=True)\n"
              "time.sleep(60)\n")
    started = time.perf_counter()
    status, lines = bench.run_peer([sys.executable, "-c", script], timeout_s=3)
    assert time.perf_counter() - started < 20
    assert status == -signal.SIGKILL
    assert lines == ["stopped after 3 s", "set up"]
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def _running(pid: int) -> bool:
    """Neither gone nor a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_peer_that_finishes_in_time_gives_its_status_and_last_lines():
    status, lines = bench.run_peer([sys.executable, "-c", "print('a'); print(''); print('b'); print('c'); print('d')"],
                                   timeout_s=30)
    assert status == 0 and lines == ["b", "c", "d"]


def test_progress_lines_give_the_speed_or_why_there_is_none():
    assert bench.summary("fsdp", {"step_s": 4.026, "tokens_per_s": 4069.6, "loss_finite": True}) == \
        "fsdp: 4.026 s/step, 4,070 tokens/s, loss finite yes"
    assert bench.summary("megatrain", {"failed": "exit status -9: stopped after 140 s"}) == \
        "megatrain: failed: exit status -9: stopped after 140 s"
    assert bench.summary("deepspeed", {"not_installed": "deepspeed is not importable"}) == \
        "deepspeed: not installed: deepspeed is not importable"


def test_bench_keeps_the_figures_of_the_systems_that_finished_when_a_later_one_fails(tmp_path, monkeypatch, capsys):
    import json

    def run(*args, progress, **kwargs):
        result = {"mtc": {"step_s": 1.0, "tokens_per_s": 4096.0, "loss_finite": True}, "vs": {}}
        progress(result, "mtc")
        result["vs"]["deepspeed"] = {"failed": "exit status -9: stopped after 5 s"}
        progress(result, "deepspeed")
        raise KeyboardInterrupt  # as a stop mid-way through the next peer

    monkeypatch.setattr(bench, "run", run)
    path = tmp_path / "r.json"
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--vs", "deepspeed,fsdp", "--json", str(path)])
    assert json.loads(path.read_text())["vs"] == {"deepspeed": {"failed": "exit status -9: stopped after 5 s"}}
    assert capsys.readouterr().err.splitlines() == ["mtc: 1.000 s/step, 4,096 tokens/s, loss finite yes",
                                                    "deepspeed: failed: exit status -9: stopped after 5 s"]
