"""Hugging Face transformers causal LMs compile through mtc (torch.export) and train as eager transformers
with torch.optim.AdamW does, called as their users call them."""
import shutil
import sys

import pytest
import torch

import mtc

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 128, 16
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SMALL),
    "qwen2": lambda: transformers.Qwen2Config(**SMALL),
    "qwen3": lambda: transformers.Qwen3Config(**SMALL, head_dim=16),
    "mistral": lambda: transformers.MistralConfig(**SMALL),
    "gemma": lambda: transformers.GemmaConfig(**SMALL, head_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=64,
                                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
}
HP = mtc.AdamW(lr=1e-3, weight_decay=0.1)


def _model(name):
    torch.manual_seed(0)
    config = CONFIGS[name]()
    config.pad_token_id = config.bos_token_id = config.eos_token_id = 0
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _batches(padded: bool):
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3):
        ids = torch.randint(1, VOCAB, (2, SEQ), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if padded:  # the second sequence ends in 5 padding positions, left out of the loss
            mask = torch.ones_like(ids)
            mask[1, -5:] = 0
            batch["labels"][1, -5:] = -100
            batch["attention_mask"] = mask
        batches.append(batch)
    return batches


def _eager_losses(model, batches, clip: float | None) -> list[float]:
    """Eager transformers with torch.optim.AdamW(fused=True) at HP, one step per batch (updating `model`)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=HP.lr, betas=HP.betas, eps=HP.eps,
                                  weight_decay=HP.weight_decay, fused=True)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_three_steps_equal_eager_transformers(name, padded):
    batches = _batches(padded)
    reference = _model(name)
    expected = _eager_losses(reference, batches, clip=1.0)

    model = _model(name)
    step = mtc.compile(model, "2MB", batches[0], optimizer=HP, clip_grad_norm=1.0, device="cpu", progress=False)
    blocks = [s for s in step.plan.schedule.stages if s.name not in ("prologue", "epilogue")]
    assert len(blocks) == 4, [s.name for s in step.plan.schedule.stages]  # one stage per decoder layer
    assert len(step.plan.schedule.resident) < len(step.plan.schedule.stages)  # some stages stream
    losses = [step(**batch).item() for batch in batches]
    assert losses == pytest.approx(expected, rel=1e-5)
    mine = dict(step.named_parameters())
    for name_, value in reference.named_parameters():
        torch.testing.assert_close(mine[name_], value.detach(), rtol=1e-5, atol=1e-6, msg=name_)


def test_the_kv_cache_is_left_out_of_the_trace_and_the_config_left_as_it_was():
    model = _model("llama")
    assert model.config.use_cache
    planned = mtc.plan(model, "2MB", _batches(False)[0], device="cpu")
    assert planned.traced.tracer == "export" and model.config.use_cache is True


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_checkpoint_loads_with_from_pretrained_and_gives_the_same_logits(tmp_path, name):
    batches = _batches(False)
    step = mtc.compile(_model(name), "2MB", batches[0], optimizer=HP, device="cpu", progress=False)
    for batch in batches[:2]:
        step(**batch)
    mtc.save(step, tmp_path / "ckpt")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    mine = dict(step.named_parameters())
    expected = _model(name)
    expected.load_state_dict(mine, strict=False)  # a tied head is the embedding: saved once
    for name_, value in loaded.named_parameters():
        assert torch.equal(value, mine[name_]), name_
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batches[2]["input_ids"]).logits,
                           expected(input_ids=batches[2]["input_ids"]).logits)
    assert loaded.config.use_cache is True  # the saved config is the model's, not the training trace's


@pytest.mark.parametrize("name", ["llama", "gemma", "gpt2"])
def test_in_bf16_the_first_loss_is_eager_transformers_with_bf16_weights(name):
    # Export bakes the dtypes it sees: traced in fp32, a norm's cast back to its input's dtype would keep
    # bf16 activations in fp32 and the next matmul would fail or run in fp32.
    batch = _batches(True)[0]
    reference = _model(name)
    for parameter in reference.parameters():  # buffers (rotary tables) stay fp32, as mtc keeps them
        parameter.data = parameter.data.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(**batch).loss.item()
    step = mtc.compile(_model(name), "2MB", batch, optimizer=HP, device="cpu", compute_dtype=torch.bfloat16,
                       progress=False)
    assert step(**batch).item() == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2"])
def test_from_pretrained_trains_as_the_model_transformers_loads(tmp_path, name, stored):
    # Published checkpoints store bf16; mtc's masters are fp32 whatever the checkpoint's dtype (its config
    # says bf16: a model built so traced bf16 casts into an fp32 run, 7e-6 off the first loss).
    _model(name).to(stored).save_pretrained(tmp_path / "model", max_shard_size="100KB")  # sharded, with an index
    assert (tmp_path / "model" / "model.safetensors.index.json").exists()
    batches = _batches(True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32)
    expected = _eager_losses(reference, batches, clip=None)
    step = mtc.from_pretrained(tmp_path / "model", "2MB", batches[0], optimizer=HP, device="cpu", progress=False)
    assert all(p.is_meta for p in step._settings["model"].parameters())  # never whole on the host
    losses = [step(**batch).item() for batch in batches]
    assert losses[0] == pytest.approx(expected[0], rel=1e-6)  # the same weights, the same fp32 forward
    assert losses == pytest.approx(expected, rel=1e-5)


def test_from_pretrained_refuses_what_is_not_that_model(tmp_path):
    with pytest.raises(mtc.CheckpointError, match="is not a Hugging Face model directory: it has no config.json"):
        mtc.from_pretrained(tmp_path, "2MB", _batches(False)[0], device="cpu")
    _model("llama").save_pretrained(tmp_path / "m")
    config = (tmp_path / "m" / "config.json")
    config.write_text(config.read_text().replace('"intermediate_size": 128', '"intermediate_size": 96'))
    with pytest.raises(mtc.CheckpointError, match="saved from another model or config: shapes differ: .*mlp.* is "
                                                  "\\[128, 64\\] in the checkpoint, \\[96, 64\\] in the model"):
        mtc.from_pretrained(tmp_path / "m", "2MB", _batches(False)[0], device="cpu")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(mtc.CheckpointError, match="is not a whole safetensors file"):
        mtc.from_pretrained(tmp_path / "m", "2MB", _batches(False)[0], device="cpu")
    config.write_text(config.read_text().replace('"model_type": "llama"', '"model_type": "no-such-model"'))
    with pytest.raises(mtc.CheckpointError, match="mtc is tested on LlamaForCausalLM"):
        mtc.from_pretrained(tmp_path / "m", "2MB", _batches(False)[0], device="cpu")


def test_a_hugging_face_checkpoint_resumes_without_the_model_object(tmp_path):
    batches = _batches(True) * 2
    whole = mtc.compile(_model("qwen2"), "2MB", batches[0], optimizer=HP, clip_grad_norm=1.0, device="cpu",
                        progress=False)
    expected = [whole(**batch).item() for batch in batches]
    first = mtc.compile(_model("qwen2"), "2MB", batches[0], optimizer=HP, clip_grad_norm=1.0, device="cpu",
                        progress=False)
    losses = [first(**batch).item() for batch in batches[:3]]
    mtc.save(first, tmp_path / "ckpt")
    resumed = mtc.load(tmp_path / "ckpt", gpu_mem="2MB", example=batches[0], device="cpu", progress=False)
    assert losses + [resumed(**batch).item() for batch in batches[3:]] == expected
    shutil.copytree(tmp_path / "ckpt", tmp_path / "other")
    (tmp_path / "other" / "config.json").unlink()
    with pytest.raises(mtc.CheckpointError, match="holds no config.json .*pass the model it was saved from"):
        mtc.load(tmp_path / "other", gpu_mem="2MB", example=batches[0], device="cpu")


def _hf_dir_and_tokens(tmp_path):
    _model("llama").save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    torch.randint(1, VOCAB, (4000,), generator=generator).to(torch.int16).numpy().tofile(tmp_path / "tokens.bin")
    return str(tmp_path / "model"), str(tmp_path / "tokens.bin")


def test_mtc_train_a_hugging_face_directory_on_token_ids_and_resume_it(tmp_path, capsys):
    from mtc.cli import main

    model, tokens = _hf_dir_and_tokens(tmp_path)
    common = ["train", "--model", model, "--data", tokens, "--batch", "2x16", "--gpu-mem", "2MB", "--device", "cpu"]
    assert main(common + ["--steps", "5"]) == 0
    unbroken = capsys.readouterr().out.splitlines()
    assert f"training {sum(p.numel() for p in _model('llama').parameters()):,} parameters on 2x16 tokens of {tokens}" \
        in "\n".join(unbroken)
    checkpoint = str(tmp_path / "ckpt")
    assert main(common + ["--steps", "3", "--save-every", "3", "--checkpoint", checkpoint]) == 0
    assert main(common + ["--steps", "5", "--resume", "--checkpoint", checkpoint]) == 0
    resumed = capsys.readouterr().out.splitlines()
    assert resumed[-1].split(" in steps")[0].split("-> ")[1] == unbroken[-1].split(" in steps")[0].split("-> ")[1]
    assert (tmp_path / "ckpt" / "config.json").exists()


def test_mtc_train_refuses_data_and_models_it_cannot_use(tmp_path, capsys, monkeypatch):
    from mtc.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if TensorBoard were not installed

    model, tokens = _hf_dir_and_tokens(tmp_path)
    common = ["train", "--batch", "2x16", "--gpu-mem", "2MB", "--device", "cpu", "--steps", "1"]
    torch.full((100,), VOCAB, dtype=torch.int16).numpy().tofile(tmp_path / "big.bin")
    cases = [(["--model", model, "--data", str(tmp_path / "big.bin")], f"holds token id {VOCAB}, past the model's "
                                                                        f"vocabulary of {VOCAB}"),
             (["--model", model, "--data", str(tmp_path / "none.bin")], "does not exist; expected a .bin"),
             (["--model", str(tmp_path)], "is a directory without config.json"),
             (["--model", "no-such-preset"], "no-such-preset"),
             (["--log-dir", str(tmp_path / "logs")], "needs TensorBoard: pip install tensorboard")]
    for argv, message in cases:
        assert main(common + argv) == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.gpu
def test_on_the_gpu_a_hugging_face_model_trains_in_bf16_from_its_checkpoint(tmp_path):
    _model("llama").save_pretrained(tmp_path / "model")
    batch = {k: v.cuda() for k, v in _batches(True)[0].items()}
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).cuda()
    for parameter in reference.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(**batch).loss.item()
    step = mtc.from_pretrained(tmp_path / "model", "80GB", batch, optimizer=HP, progress=False)
    losses = [step(**batch).item() for _ in range(3)]
    assert losses[0] == pytest.approx(expected, rel=1e-2)
    assert losses[2] < losses[0]


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [(), "all"], ids=["eager", "kernels"])
def test_on_the_gpu_a_hugging_face_model_trains_on_a_device_of_gpu_mem(kernels):
    # Its logits (an output beside the loss) were held past the loss's backward and between steps, and the
    # streamed stages' gradient buffers between steps: a 1B model planned for 16GB reached 16.3 GiB. At
    # 1.2GB this plan streams stages; the device is held to 1.2GB, as a GPU of that size would be (the
    # allocator gives back its cache before it fails). With kernels, the fused loss's own allocations are
    # counted by the plan too.
    import gc

    config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                      num_attention_heads=8, num_key_value_heads=4, vocab_size=32000)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 32000, (2, 1024), device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.set_per_process_memory_fraction(1.2e9 / torch.cuda.get_device_properties(0).total_memory)
    try:
        step = mtc.compile(model, "1.2GB", {"input_ids": ids, "labels": ids}, optimizer=HP, clip_grad_norm=1.0,
                           progress=False, kernels=kernels)
        schedule = step.plan.schedule
        assert schedule.slots > 0
        losses = [step(input_ids=ids, labels=ids).item() for _ in range(3)]
        step.synchronize()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert losses[2] < losses[0]
    allocated = torch.cuda.max_memory_allocated()
    assert allocated <= schedule.peak_bytes * 1.05, (allocated, schedule.peak_bytes)  # as measured on presets


def test_mtc_plan_plans_a_hugging_face_model_from_its_config_alone(tmp_path, capsys):
    from mtc.cli import main

    CONFIGS["qwen2"]().save_pretrained(tmp_path / "qwen")  # config.json only: no weights
    assert main(["plan", "--model", str(tmp_path / "qwen"), "--batch", "2x64", "--gpu-mem", "2MB"]) == 0
    out = capsys.readouterr().out
    assert "model.layers.3    Qwen2DecoderLayer" in out and "predicted step:" in out


def test_a_model_already_in_bf16_traces_for_bf16_compute():
    # Its parameters are real tensors of the compute dtype: they go to the meta device for the trace too.
    batch = _batches(False)[0]
    model = _model("llama").to(torch.bfloat16)
    step = mtc.compile(model, "2MB", batch, optimizer=HP, device="cpu", compute_dtype=torch.bfloat16,
                       progress=False)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    losses = [step(**batch).item() for _ in range(3)]
    assert losses[2] < losses[0]


def test_the_load_benchmark_loads_trains_and_matches_transformers(tmp_path, capsys):
    import json

    from mtc.examples import hf_load

    assert hf_load.main(["--shape", "tiny", "--gpu-mem", "2MB", "--steps", "3", "--seq", "32",
                         "--json", str(tmp_path / "out.json")]) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["parameters"] == 164_416 and len(result["losses"]) == 3
    assert result["losses"][0] == pytest.approx(result["transformers_first_loss"], rel=1e-6)
    assert result["rss_peak_during_load"]["RssAnon"] >= result["rss_after_load"]["RssAnon"] > 0
    assert "tiny: 164,416 parameters" in capsys.readouterr().out


def test_causal_attention_traces_without_a_dense_mask():
    # Given no attention_mask, Hugging Face builds a (batch, 1, T, T) mask under export (16 GiB at 128k tokens,
    # and no flash kernel); full-attention models trace instead with SDPA's is_causal and no mask. A padding
    # mask the user passes is kept.
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen2"]())
    ids = torch.randint(0, 256, (2, 16))

    def attention_and_block_inputs(example):
        planned = mtc.plan(model, "2MB", example, device="cpu")
        block = planned.partition.stages[1]
        sdpa = next(n for n in block.template.graph.nodes if "scaled_dot_product_attention" in str(n.target))
        mask = sdpa.args[3] if len(sdpa.args) > 3 else sdpa.kwargs.get("attn_mask")
        causal = sdpa.args[5] if len(sdpa.args) > 5 else sdpa.kwargs.get("is_causal", False)
        return mask, causal, len(block.inputs)

    mask, causal, inputs = attention_and_block_inputs({"input_ids": ids, "labels": ids})
    assert mask is None and causal is True and inputs == 3  # hidden states, cos, sin
    assert model.config._attn_implementation == "sdpa"  # as it was
    mask, causal, inputs = attention_and_block_inputs({"input_ids": ids, "labels": ids,
                                                       "attention_mask": torch.ones_like(ids)})
    assert mask is not None and causal is False and inputs == 4  # and the mask
