"""The shipped demo model (llama31/demo): it computes what its export run recorded, it expands into a standard
full-vocabulary Llama 3.1 HF folder that HF transformers loads with the same logits, and that folder is written
atomically."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import llama31.demo as demo
from llama31.checkpoints.hf import is_hf_folder
from llama31.config import ModelArgs
from llama31.demo.compact import file_sha256, read_compact

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "tests" / "data" / "kjv_heldout_sample.json").read_text())
RECORD = json.loads(demo.RECORD_FILE.read_text())


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache directory ($LLAMA31_CACHE) for the module: the demo folder is expanded once, here."""
    root = tmp_path_factory.mktemp("llama31_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLAMA31_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def folder(cache):
    return demo.demo_checkpoint()


@pytest.fixture(scope="module")
def model(folder):
    return demo.build_demo_model(dtype=torch.float32)


def test_the_record_and_the_sample_describe_the_shipped_file():
    digest = file_sha256(demo.DEMO_FILE)
    assert RECORD["model"]["file_sha256"] == digest, "record.json is stale: re-run examples/export_demo.py"
    assert SAMPLE["demo_file_sha256"] == digest, "the held-out sample is stale: re-run examples/export_demo.py"


def test_heldout_sample_loss_is_the_one_the_export_run_recorded(model):
    ids = torch.tensor(SAMPLE["ids"])
    seq_len = SAMPLE["seq_len"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, seq_len):  # every token after the first, in windows of seq_len
            inputs, targets = ids[start:start + seq_len][None], ids[start + 1:start + seq_len + 1][None]
            inputs = inputs[:, :targets.shape[1]]
            total += F.cross_entropy(model(inputs)[0], targets[0], reduction="sum").item()
            count += targets.numel()
    # The same bfloat16 weights, upcast to float32 exactly, on the same tokens: only the order of float32
    # additions can differ from the export run (another machine, thread count or kernel), ~1e-6 on a mean loss.
    # 1e-4 is 100 times that; any real change (a weight, the RoPE, the norm, the tokenizer's ids) moves it by more.
    assert count == len(ids) - 1
    assert abs(total / count - SAMPLE["loss"]) < 1e-4
    # a trained model: on these tokens the training split's unigram scores 6.05 nats/token and its interpolated
    # bigram 4.15 (the baselines of examples/evaluate_demo.py)
    assert SAMPLE["loss"] < 4.0


def test_greedy_continuation_of_the_recorded_prompt_is_the_recorded_one(folder):
    from llama31.generation import Llama

    greedy = RECORD["greedy"]
    llama = Llama.build()  # no checkpoint: the demo model, as examples/generate.py builds it
    assert llama.model.checkpoint_info["format"] == "demo" and llama.model.checkpoint_info["path"] == str(folder)
    completion = llama.text_completion([greedy["prompt"]], max_gen_len=greedy["max_gen_len"], temperature=0)[0]
    assert completion.prompt_tokens == greedy["prompt_ids"]
    assert completion.tokens == greedy["ids"]
    assert completion.text == greedy["text"]


def test_transformers_computes_the_same_float32_logits(folder, model):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokens = torch.tensor(SAMPLE["ids"][:512]).view(2, 256)  # two windows of the training context, 512 tokens
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits  # (2, 256, 128256) each
    # Identical float32 weights (the file's bfloat16 values); the two differ in float32 rounding only. The largest
    # part: HF computes the RoPE angles position x frequency in float32 (an error of ~6e-8 x position radians),
    # llama31 in float64, so the difference grows with position; within 256 positions it stays well under 1e-4 on
    # logits of magnitude up to ~20-30. A layout error (q/k rows not permuted, a swapped norm or projection, a
    # misplaced vocabulary row) changes logits by more than 1e-1.
    assert (ours - theirs).abs().max().item() < 1e-4


def test_the_expanded_folder_is_a_full_vocabulary_llama31(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["vocab_size"] == 128256
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # grouped-query attention
    assert config["hidden_act"] == "silu" and config["max_position_embeddings"] == 8192
    assert ModelArgs.from_hf_config(config) == demo.DEMO_ARGS

    # every id's row is in the file; the ids the corpus never used have zero rows (their logit is exactly 0)
    _, vocab_ids, _ = read_compact(demo.DEMO_FILE)
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            matrix = f.get_tensor(name)
            assert matrix.shape == (128256, demo.DEMO_ARGS.dim)
            nonzero = matrix.abs().sum(dim=1) > 0
            assert nonzero.sum() == len(vocab_ids) and nonzero[vocab_ids].all()


def test_a_partial_folder_is_never_taken_for_the_model(tmp_path, monkeypatch):
    name = f"demo-kjv-{file_sha256(demo.DEMO_FILE)[:16]}"
    # A run that died while writing leaves its temporary folder, with a config.json but no weights.
    stale = tmp_path / f".{name}.partial-dead"
    stale.mkdir()
    (stale / "config.json").write_text("{}")

    # A write that fails half way (disk full): an error, and no folder that looks complete.
    from llama31.checkpoints import save_hf

    def fail_after_config(path, *args, **kwargs):
        (Path(path) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(demo, "save_hf", fail_after_config)
    with pytest.raises(OSError, match="No space"):
        demo.demo_checkpoint(tmp_path)
    assert not (tmp_path / name).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [stale.name]  # its own temporary folder removed

    monkeypatch.setattr(demo, "save_hf", save_hf)
    folder = demo.demo_checkpoint(tmp_path)
    assert folder == tmp_path / name and is_hf_folder(folder)
    assert demo.demo_checkpoint(tmp_path) == folder  # found, not rebuilt
    assert math.isclose(json.loads((folder / "config.json").read_text())["rms_norm_eps"], 1e-5)
