"""A Hugging Face checkpoint into mtc and trained: the load's time and host memory against the model's size.

    python -m mtc.examples.hf_load --shape llama-3.2-1b --gpu-mem 16GB [--dir DIR] [--json out.json]
    python -m mtc.examples.hf_load --dir path/to/a/hugging-face/model --gpu-mem 16GB

Writes a randomly initialised checkpoint of a published shape with transformers (bf16 safetensors, as
published checkpoints are) unless --dir already holds a model; loads it with mtc.from_pretrained while a
thread samples the process's anonymous and file-backed RSS every 5 ms; trains --steps steps on two
alternating random batches of one --seq sequence; and compares the first loss with transformers' own
forward of the same checkpoint in mtc's compute dtype (bf16 on a GPU, fp32 on the CPU).
"""
import argparse
import gc
import json
import os
import statistics
import tempfile
import threading
import time

import torch

import mtc
from mtc.runtime.preflight import process_status_bytes

RSS = ("RssAnon", "RssFile")  # the model's tensors, and the pages of the shard the reader has mapped


def shapes():
    import transformers

    return {
        "llama-3.2-1b": transformers.LlamaConfig(
            hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=8192,
            rope_theta=500000.0, tie_word_embeddings=True),
        "qwen2.5-1.5b": transformers.Qwen2Config(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
            num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
            rms_norm_eps=1e-6, tie_word_embeddings=True),
        "tiny": transformers.LlamaConfig(  # for the tests
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, tie_word_embeddings=True),
    }


class PeakRss:
    """The highest RssAnon and RssFile seen while the block runs (peak), and at its end (end)."""

    def __enter__(self):
        self.peak, self.running = {k: 0 for k in RSS}, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self._record()
            time.sleep(0.005)

    def _record(self) -> dict:
        now = {key: process_status_bytes(key) or 0 for key in RSS}
        self.peak = {key: max(self.peak[key], now[key]) for key in RSS}
        return now

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.end = self._record()


def write_checkpoint(shape: str, directory: str) -> None:
    import transformers

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B init on the host takes minutes
        model = transformers.AutoModelForCausalLM.from_config(shapes()[shape], dtype=torch.bfloat16)
    model.save_pretrained(directory)


def measure(directory: str, gpu_mem: str, steps: int, seq: int) -> dict:
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = transformers.AutoConfig.from_pretrained(directory).vocab_size
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (1, seq), generator=generator).to(device) for _ in range(2)]
    before = {key: process_status_bytes(key) for key in RSS}
    started = time.perf_counter()
    with PeakRss() as rss:
        step = mtc.from_pretrained(directory, gpu_mem, {"input_ids": batches[0], "labels": batches[0]},
                                   optimizer=mtc.AdamW(lr=1e-4), clip_grad_norm=1.0, device=device, progress=False)
    load_s = time.perf_counter() - started
    print(step.plan.summary())
    losses, times = [], []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        began = time.perf_counter()
        losses.append(step(input_ids=batches[i % 2], labels=batches[i % 2]).item())
        times.append(time.perf_counter() - began)
    step.synchronize()
    schedule = step.plan.schedule
    result = {
        "parameters": sum(p.numel() for _, p in step.named_parameters()),
        "safetensors_bytes": sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
                                 if f.endswith(".safetensors")),
        "gpu_mem": gpu_mem, "stages": len(schedule.stages), "resident": len(schedule.resident),
        "load_s": load_s, "passes_s": step.plan.header["passes"], "store_fill_s": step._store.build_seconds,
        "rss_before": before, "rss_peak_during_load": rss.peak, "rss_after_load": rss.end,
        "host_state_bytes": step._store.host_bytes, "losses": losses, "step_s": times,
        "predicted_peak_gpu_bytes": schedule.peak_bytes,
        "peak_gpu_allocated_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
    }
    del step
    gc.collect()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device)
    with torch.no_grad():
        result["transformers_first_loss"] = reference(input_ids=batches[0], labels=batches[0]).loss.item()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(shapes()), default="llama-3.2-1b")
    parser.add_argument("--gpu-mem", default="80GB")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096, help="tokens per step (one sequence)")
    parser.add_argument("--dir", default=None,
                        help="a model directory to load, or where to write one (default: a temporary directory)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps={args.steps} is not valid; expected an integer >= 2 (the first step warms up)")
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.dir or scratch
        written = not os.path.isfile(os.path.join(directory, "config.json"))
        if written:
            write_checkpoint(args.shape, directory)
        name = args.shape if written else os.path.basename(os.path.normpath(directory))
        result = {"shape": name, **measure(directory, args.gpu_mem, args.steps, args.seq)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    gib = 2**30
    anon_peak, anon_after = result["rss_peak_during_load"]["RssAnon"], result["rss_after_load"]["RssAnon"]
    print(f"{result['shape']}: {result['parameters']:,} parameters, {result['safetensors_bytes'] / gib:.2f} GiB of "
          f"safetensors; loaded in {result['load_s']:.1f} s (trace {result['passes_s']['trace']:.1f} s, store "
          f"filled in {result['store_fill_s']:.1f} s); host state {result['host_state_bytes'] / gib:.2f} GiB; "
          f"anonymous RSS {anon_after / gib:.2f} GiB after the load, {(anon_peak - anon_after) / gib:.3f} GiB "
          f"more at its peak; file-backed RSS peak {result['rss_peak_during_load']['RssFile'] / gib:.2f} GiB; "
          f"step {statistics.median(result['step_s'][1:]):.3f} s (median after the first); first loss "
          f"{result['losses'][0]:.6f}, transformers {result['transformers_first_loss']:.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
