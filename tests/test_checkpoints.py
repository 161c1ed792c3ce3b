"""Checkpoint formats: the q/k permutation, conversion both ways, sharding, and strict loading errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from llama31 import Transformer
from llama31.checkpoints import open_checkpoint, save_hf
from llama31.checkpoints.names import hf_rows_to_meta, hf_to_meta, meta_rows_to_hf, meta_to_hf
from llama31.convert import convert


def test_qk_permutation_round_trips_to_the_identity():
    w = torch.randn(8 * 16, 24)
    assert torch.equal(hf_rows_to_meta(meta_rows_to_hf(w, 8), 8), w)
    assert torch.equal(meta_rows_to_hf(hf_rows_to_meta(w, 8), 8), w)


def test_qk_permutation_moves_meta_row_2i_plus_c_to_hf_row_c_half_plus_i():
    n, d = 3, 8
    meta = torch.arange(n * d).float().unsqueeze(1)  # row r holds the value r
    hf = meta_rows_to_hf(meta, n)
    for h in range(n):
        for i in range(d // 2):
            for c in (0, 1):
                assert hf[h * d + c * d // 2 + i, 0] == h * d + 2 * i + c


def test_name_table_round_trips():
    names = ["tok_embeddings.weight", "norm.weight", "output.weight", "layers.7.attention.wq.weight",
             "layers.7.attention.wk.weight", "layers.7.attention.wv.weight", "layers.7.attention.wo.weight",
             "layers.7.feed_forward.w1.weight", "layers.7.feed_forward.w2.weight", "layers.7.feed_forward.w3.weight",
             "layers.7.attention_norm.weight", "layers.7.ffn_norm.weight", "layers.0.attention.wq.weight_packed"]
    assert meta_to_hf("layers.7.feed_forward.w1.weight") == "model.layers.7.mlp.gate_proj.weight"
    assert meta_to_hf("layers.7.ffn_norm.weight") == "model.layers.7.post_attention_layernorm.weight"
    assert meta_to_hf("output.weight") == "lm_head.weight"
    for name in names:
        assert hf_to_meta(meta_to_hf(name)) == name


def test_exported_hf_folder_loads_in_transformers_with_equal_logits(hf_folder, tmp_path):
    from transformers import LlamaForCausalLM

    folder, hf = hf_folder(seed=21, num_attention_heads=8, num_key_value_heads=2, hidden_size=128)
    convert(folder, tmp_path / "meta", to="meta", shards=2)
    convert(tmp_path / "meta", tmp_path / "back", to="hf")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32,
                                                attn_implementation="eager").eval()
    tokens = torch.randint(0, 320, (2, 100))
    with torch.no_grad():
        # the same float32 tensors travelled through two permutations and a split/merge: bit-exact
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
    original, back = load_file(folder / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(back)
    assert all(torch.equal(original[k], back[k]) for k in original)


def test_sharded_hf_folder_with_index_loads(hf_folder, tmp_path):
    folder, hf = hf_folder(seed=22)
    ckpt = open_checkpoint(folder)
    state = {n: ckpt.read(n) for n in ckpt.keys()}
    save_hf(tmp_path / "sharded", ckpt.args, state, max_shard_bytes=100_000)
    files = sorted(p.name for p in (tmp_path / "sharded").iterdir())
    assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    model = Transformer.from_pretrained(tmp_path / "sharded")
    tokens = torch.randint(0, 320, (1, 50))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() <= 1e-4


def test_meta_shards_split_the_way_fairscale_splits(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=23)
    convert(folder, tmp_path / "meta", to="meta", shards=2)
    full = open_checkpoint(folder)
    s0 = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    s1 = torch.load(tmp_path / "meta" / "consolidated.01.pth", weights_only=True)
    for name, dim in [("layers.0.attention.wq.weight", 0), ("layers.0.attention.wk.weight", 0),
                      ("layers.1.feed_forward.w3.weight", 0), ("output.weight", 0), ("tok_embeddings.weight", 0),
                      ("layers.0.attention.wo.weight", 1), ("layers.1.feed_forward.w2.weight", 1)]:
        assert torch.equal(torch.cat([s0[name], s1[name]], dim=dim), full.read(name)), name
        assert s0[name].shape[dim] * 2 == full.read(name).shape[dim]
    for name in ("norm.weight", "layers.0.attention_norm.weight"):
        assert torch.equal(s0[name], full.read(name)) and torch.equal(s1[name], full.read(name))
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["n_kv_heads"] == 2 and params["use_scaled_rope"] is True


def test_convert_command_line(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=24)
    run = subprocess.run([sys.executable, "-m", "llama31.convert", str(folder), str(tmp_path / "m"), "--to", "meta",
                          "--shards", "2"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "m" / "consolidated.01.pth").is_file()
    bad = subprocess.run([sys.executable, "-m", "llama31.convert", str(folder), str(tmp_path / "m"), "--to", "hf"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "exists and is not empty" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "llama31.convert", str(folder), str(tmp_path / "x"), "--to", "meta",
                          "--shards", "3"], capture_output=True, text=True)
    assert bad.returncode == 1 and "into 3 files" in bad.stderr


# ---------------------------------------------------------------- strict loading errors

def _rewrite(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_key_is_named(hf_folder):
    folder, _ = hf_folder(seed=25)
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"lacks 1 parameter.*layers\.1\.feed_forward\.w3\.weight.*\(176, 64\)"):
        Transformer.from_pretrained(folder)


def test_unexpected_key_is_named_with_its_file(hf_folder):
    folder, _ = hf_folder(seed=26)
    _rewrite(folder, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": torch.zeros(176, 64)}))
    with pytest.raises(KeyError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.2\.mlp\.up_proj"):
        Transformer.from_pretrained(folder)
    _rewrite(folder, lambda t: (t.pop("model.layers.2.mlp.up_proj.weight"),
                                t.update({"model.vision_tower.weight": torch.zeros(2)})))
    with pytest.raises(KeyError, match="unexpected tensor 'model.vision_tower.weight'"):
        Transformer.from_pretrained(folder)


def test_wrong_shape_is_named_with_both_shapes(hf_folder):
    folder, _ = hf_folder(seed=27)
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.v_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.v_proj\.weight' has shape \(64, 64\), "
                                         r"the model expects \(32, 64\)"):
        Transformer.from_pretrained(folder)


def test_folder_of_neither_format_says_what_it_expected(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"neither a Meta checkpoint \(params.json \+ consolidated.00.pth"):
        Transformer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nope")


def test_meta_folder_with_a_gap_in_the_shard_numbers(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=28)
    convert(folder, tmp_path / "m", to="meta", shards=2)
    (tmp_path / "m" / "consolidated.00.pth").unlink()
    with pytest.raises(FileNotFoundError, match="consolidated.00.pth is missing"):
        Transformer.from_pretrained(tmp_path / "m")


def test_pickles_are_loaded_with_weights_only(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=29)
    convert(folder, tmp_path / "m", to="meta")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"x": Evil()}, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(ValueError, match=r"consolidated.00.pth: cannot be loaded .* weights_only=True"):
        Transformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "consolidated.00.pth").write_bytes(b"truncated download")
    with pytest.raises(ValueError, match="Is the download complete"):
        Transformer.from_pretrained(tmp_path / "m")


def test_meta_shards_with_different_names(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=30)
    convert(folder, tmp_path / "m", to="meta", shards=2)
    shard = torch.load(tmp_path / "m" / "consolidated.01.pth", weights_only=True)
    shard.pop("norm.weight")
    torch.save(shard, tmp_path / "m" / "consolidated.01.pth")
    with pytest.raises(ValueError, match="hold different parameter names"):
        Transformer.from_pretrained(tmp_path / "m")


def test_hf_index_naming_a_missing_file(hf_folder, tmp_path):
    folder, _ = hf_folder(seed=31)
    ckpt = open_checkpoint(folder)
    save_hf(tmp_path / "s", ckpt.args, {n: ckpt.read(n) for n in ckpt.keys()}, max_shard_bytes=100_000)
    victim = sorted((tmp_path / "s").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"{victim.name} does not exist; download the missing shard"):
        Transformer.from_pretrained(tmp_path / "s")


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors.index.json", "params.json"])
def test_a_json_file_that_is_not_json_is_named(hf_folder, tmp_path, broken):
    folder, _ = hf_folder(seed=32)
    if broken == "params.json":
        convert(folder, tmp_path / "c", to="meta")
    else:
        ckpt = open_checkpoint(folder)
        save_hf(tmp_path / "c", ckpt.args, {n: ckpt.read(n) for n in ckpt.keys()}, max_shard_bytes=100_000)
    (tmp_path / "c" / broken).write_text('{"truncated": ')
    with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
        Transformer.from_pretrained(tmp_path / "c")
