"""MegaTrain (github DLYuanGod/MegaTrain, Apache-2.0), the closest peer, run from the user's checkout on the
same Llama shape and batch. None of its code is here: this writes the inputs its `examples/sft/train.py`
reads into a scratch folder (a Hugging Face Llama directory with random bf16 weights; a word-level
tokenizer whose words w0, w1, ... are the token ids, with a chat template that only joins the messages;
an alpaca-style dataset of random words long enough to fill every sequence, so no position is padding;
a YAML config), runs it in a process of its own and reads the figures it logs per step.

Its defaults are kept: bf16 master weights and gradients (its choice, not ours: the other systems keep
fp32), DeepSpeedCPUAdam when deepspeed imports (torch AdamW otherwise), a checkpoint every 4 layers, 12
gradient slabs, flash_attention_2. Set to match the other systems: batch, sequence length, steps, lr 1e-4,
no weight decay, max_grad_norm = the clip (0: 1e9, i.e. off).

Needs MTC_MEGATRAIN=<checkout> and the packages its training path imports: transformers, accelerate,
datasets, tokenizers, safetensors, psutil, pyyaml, and flash_attn. Without flash_attn,
MTC_MEGATRAIN_ATTENTION=sdpa runs PyTorch's SDPA instead, and says so in the settings: its single-GPU path
hands every layer the raw 2-D padding mask, which SDPA refuses, so the run replaces that mask with none
(causal attention, exact here since nothing is padded).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

from mtc.examples import models
from mtc.examples.baselines import HYPERPARAMETERS, NotInstalled, cuda_device, main, say

NEEDED = ("transformers", "accelerate", "datasets", "tokenizers", "safetensors", "psutil", "yaml")
STEP = re.compile(r"Step (\d+)/\d+ \| Loss (\S+)")
TIME = re.compile(r"Time: (\S+)s \| Tokens/s")
GPU = re.compile(r"GPU: (\S+)GB peak \(alloc \S+GB / reserved (\S+)GB\)")

HIGH_WATER = re.compile(r"VmHWM:\s+(\d+) kB")
_LAUNCH = """
import atexit, runpy, sys
config, attention = sys.argv[1:3]
def peak_memory():  # this process's peak resident memory, for mtc bench
    with open("/proc/self/status") as f:
        print(next(line for line in f if line.startswith("VmHWM:")).strip(), flush=True)
atexit.register(peak_memory)
if attention == "sdpa":  # its single-GPU path hands SDPA a 2-D int mask, which SDPA refuses
    import infinity.model.cpu_master as cpu_master
    build = cpu_master.CPUMasterModel._build_layer_kwargs
    def without_mask(self, *args):
        kwargs = build(self, *args)
        kwargs["attention_mask"] = None
        return kwargs
    cpu_master.CPUMasterModel._build_layer_kwargs = without_mask
sys.argv = ["examples/sft/train.py", "--config", config]
runpy.run_path("examples/sft/train.py", run_name="__main__")
"""
"""Runs its train.py unchanged but for the sdpa case, and prints the process's peak resident memory."""


def train(preset: str, batch: tuple[int, int], steps: int, warmup: int, clip: float | None) -> dict:
    """MegaTrain from MTC_MEGATRAIN's checkout."""
    checkout = os.environ.get("MTC_MEGATRAIN")
    if not checkout or not os.path.isfile(os.path.join(checkout, "examples", "sft", "train.py")):
        raise NotInstalled(f"MTC_MEGATRAIN={checkout!r} is not a MegaTrain checkout (examples/sft/train.py); "
                           "set it to one: see examples/baselines/README.md")
    attention = os.environ.get("MTC_MEGATRAIN_ATTENTION", "flash_attention_2")
    missing = [name for name in NEEDED + (("flash_attn",) if attention == "flash_attention_2" else ())
               if importlib.util.find_spec(name) is None]
    if missing:
        raise NotInstalled(f"MegaTrain's training path imports {', '.join(missing)}, which is not installed"
                           + ("; without flash_attn, MTC_MEGATRAIN_ATTENTION=sdpa" if "flash_attn" in missing else ""))
    cuda_device()
    with tempfile.TemporaryDirectory(prefix="megatrain-") as folder:
        say("writing its inputs")
        # As mtc bench's own clock: `warmup` steps and one more (its first builds the optimizer's state)
        # before the timed ones.
        config = write_inputs(folder, preset, batch, warmup + 1 + steps, clip, attention)
        command = [sys.executable, "-c", _LAUNCH, config, attention]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [checkout, os.environ.get("PYTHONPATH")])),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        say("inputs written; MegaTrain starts")
        log = []
        with subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, errors="replace") as process:
            for line in process.stdout:  # shown as it comes: its set-up takes minutes
                print(line, end="", flush=True)
                log.append(line)
    log = "".join(log)
    if os.environ.get("MTC_MEGATRAIN_LOG"):  # a path to keep what it printed
        with open(os.environ["MTC_MEGATRAIN_LOG"], "w") as f:
            f.write(log)
    if process.returncode != 0:
        raise RuntimeError("MegaTrain exited with status %d: %s" % (process.returncode,
                                                                     " | ".join(log.strip().splitlines()[-3:])))
    figures = read_log(log, warmup + 1, batch, models.parameter_count(models.build(preset, "meta")))
    figures["settings"] = {"attention": attention, "master weights": "bf16 (MegaTrain's default)",
                           "checkpoint_interval": 4, "num_grad_slabs": 12, "lr": HYPERPARAMETERS.lr,
                           "weight_decay": HYPERPARAMETERS.weight_decay,
                           "max_grad_norm": clip or 1e9, "optimizer": "DeepSpeedCPUAdam if deepspeed imports, "
                           "else torch AdamW (its log says which)"}
    return figures


def read_log(log: str, untimed: int, batch: tuple[int, int], params: int) -> dict:
    """mtc bench's figures from MegaTrain's per-step log lines, the first `untimed` steps left out. Its
    step time is its host clock around one step, which ends with the weights back on the GPU, printed to
    10 ms; its peak GPU memory counts the untimed steps too (it resets the peak once, before them)."""
    losses = [float(loss) for _, loss in STEP.findall(log)]
    times = [float(seconds) for seconds in TIME.findall(log)]
    memory = GPU.findall(log)
    if len(times) <= untimed:
        raise RuntimeError(f"MegaTrain logged {len(times)} steps, not more than the {untimed} untimed ones")
    timed, tokens = times[untimed:], batch[0] * batch[1]
    seconds = statistics.median(timed)
    return {"step_s": seconds, "mean_step_s": statistics.mean(timed), "tokens_per_s": tokens / seconds,
            "model_tflops": 6 * params * tokens / seconds / 1e12, "losses": losses[untimed:],
            "loss_finite": all(math.isfinite(loss) for loss in losses[untimed:]),
            "loss_fell": losses[-1] < losses[untimed] if len(losses) > untimed + 1 else None, "params": params,
            "peak_gpu_allocated_bytes": int(max(float(a) for a, _ in memory) * 2**30) if memory else None,
            "peak_gpu_reserved_bytes": int(max(float(r) for _, r in memory) * 2**30) if memory else None,
            **_peak_host_memory(log, params)}


def _peak_host_memory(log: str, params: int) -> dict:
    peak = HIGH_WATER.search(log)
    if peak is None:
        return {}
    return {"peak_host_rss_bytes": int(peak[1]) * 1024, "peak_host_rss_bytes_per_param": int(peak[1]) * 1024 / params}


def write_inputs(folder: str, preset: str, batch: tuple[int, int], steps: int, clip: float | None,
                 attention: str) -> str:
    """The model directory, dataset and YAML config for `preset`; returns the config's path."""
    import torch
    import yaml
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    from transformers import LlamaConfig as HFLlamaConfig

    cfg = models.preset_config(preset)
    words = cfg.vocab_size - 3  # three ids for the special tokens
    special = {"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>"}
    vocab = {f"w{i}": i for i in range(words)} | {token: words + i for i, token in enumerate(special.values())}
    tokenizer = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<eos>", **special)
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    model_dir = os.path.join(folder, "model")
    fast.save_pretrained(model_dir)
    hf = HFLlamaConfig(hidden_size=cfg.hidden, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                       num_key_value_heads=cfg.kv_heads, intermediate_size=cfg.intermediate, vocab_size=cfg.vocab_size,
                       tie_word_embeddings=False, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps,
                       max_position_embeddings=max(8192, batch[1]), bos_token_id=words + 1, eos_token_id=words + 2)
    torch.manual_seed(0)
    # Random init takes minutes on the host for a 3B model and seconds on the GPU; the memory is given back
    # before MegaTrain starts (this process keeps only its CUDA context, well under 1 GiB).
    with torch.device(cuda_device() if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()
    data_dir = os.path.join(folder, "data")
    os.makedirs(data_dir)
    rng = random.Random(0)
    rows = [{"instruction": "w1", "input": "",
             "output": " ".join(f"w{rng.randrange(words)}" for _ in range(batch[1] + 64))} for _ in range(2 * batch[0])]
    with open(os.path.join(data_dir, "synthetic.json"), "w") as f:
        json.dump(rows, f)
    with open(os.path.join(data_dir, "dataset_info.json"), "w") as f:
        json.dump({"synthetic": {"file_name": "synthetic.json"}}, f)
    config = {"model": {"name": model_dir, "dtype": "bfloat16", "attn_implementation": attention,
                        "trust_remote_code": False},
              "dataset": {"name": "synthetic", "dataset_dir": data_dir, "max_seq_len": batch[1]},
              "training": {"batch_size": batch[0], "num_steps": steps, "learning_rate": HYPERPARAMETERS.lr,
                           "weight_decay": HYPERPARAMETERS.weight_decay,
                           "max_grad_norm": clip or 1e9, "seed": 0},
              "logging": {"log_interval": 1}}
    path = os.path.join(folder, "megatrain.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


if __name__ == "__main__":
    sys.exit(main(train))
