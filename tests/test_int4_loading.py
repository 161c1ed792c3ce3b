"""INT4 HF folders (GPTQ with act-order, compressed-tensors pack-quantized) load through Transformer.from_pretrained.

Each folder is packed here by the test's own numpy packer (int4_oracle) from known integer matrices and scales;
the loaded model's logits must equal HF's LlamaForCausalLM run on the dequantized weights, computed in float64
from the same integers by the format's formula.
"""

import json

import numpy as np
import pytest
import torch
from int4_oracle import act_order_g_idx, pack_signed, pack_words
from safetensors.torch import save_file
from torch.nn import Linear

from llama31 import ModelArgs, Transformer
from llama31.cpu.packed import PackedLinear
from llama31.quant import Int4Linear

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=192, max_seq_len=256)
G = 32
MODULES = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
           "self_attn.o_proj": (128, 128), "mlp.gate_proj": (192, 128), "mlp.up_proj": (192, 128),
           "mlp.down_proj": (128, 192)}  # HF module -> (N out, K in)


def _known_layers(seed, act_order):
    """Per HF module name: signed ints q [N, K] in [-8, 7], fp16 scales [N, K/G], g_idx [K]."""
    rng = np.random.default_rng(seed)
    layers = {}
    for i in range(ARGS.n_layers):
        for module, (n, k) in MODULES.items():
            q = rng.integers(-8, 8, (n, k))
            scale = rng.uniform(0.01, 0.04, (n, k // G)).astype(np.float16)
            g_idx = act_order_g_idx(k, G, rng) if act_order else np.arange(k) // G
            layers[f"model.layers.{i}.{module}"] = (q, scale, g_idx)
    return rng, layers


def _float_tensors(rng):
    def t(*shape, std=1.0):
        return torch.from_numpy(rng.normal(0, std, shape).astype(np.float32))

    out = {"model.embed_tokens.weight": t(512, 128), "lm_head.weight": t(512, 128, std=0.1),
           "model.norm.weight": torch.from_numpy(rng.uniform(0.5, 1.5, 128).astype(np.float32))}
    for i in range(ARGS.n_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[f"model.layers.{i}.{norm}.weight"] = torch.from_numpy(rng.uniform(0.5, 1.5, 128).astype(np.float32))
    return out


def _write(folder, tensors, quantization_config):
    folder.mkdir()
    config = ARGS.to_hf_config("float32")
    if quantization_config:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def _hf_reference(tmp_path, floats, layers):
    """HF LlamaForCausalLM with W = q * scale[g_idx] (float64 formula, exact in float32), eager, float32."""
    from transformers import LlamaForCausalLM

    dense = dict(floats)
    for module, (q, scale, g_idx) in layers.items():
        dense[f"{module}.weight"] = torch.from_numpy((q * scale.astype(np.float64)[:, g_idx]).astype(np.float32))
    _write(tmp_path / "dense", dense, None)
    return LlamaForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32,
                                            attn_implementation="eager").eval()


def _check_logits(model, hf):
    tokens = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        err = (model(tokens) - hf(tokens).logits).abs().max().item()
    # both are float32 forwards of identical weights (the dequantized values are exact in float32); a plain
    # decoder matches HF to ~1e-6 here, and a wrong nibble order, scale index or row permutation gives > 0.1
    assert err <= 1e-4, err


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    monkeypatch.setattr(Int4Linear, "backend", "reference")  # exact float32 arithmetic, any machine


def test_gptq_act_order_folder_loads_and_matches_hf_with_dequantized_weights(tmp_path):
    rng, layers = _known_layers(1, act_order=True)
    floats = _float_tensors(rng)
    tensors = dict(floats)
    for module, (q, scale, g_idx) in layers.items():
        n, k = q.shape
        tensors[f"{module}.qweight"] = torch.from_numpy(pack_words(q.T + 8, axis=0))        # [K/8, N] along K
        tensors[f"{module}.qzeros"] = torch.from_numpy(pack_words(np.full((k // G, n), 7), axis=1))  # v1: z=7
        tensors[f"{module}.scales"] = torch.from_numpy(scale.T.copy())                     # [K/G, N]
        tensors[f"{module}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))               # [K], not monotonic
    _write(tmp_path / "gptq", tensors, {"quant_method": "gptq", "bits": 4, "group_size": G, "desc_act": True,
                                       "sym": True, "checkpoint_format": "gptq"})
    model = Transformer.from_pretrained(tmp_path / "gptq")
    assert isinstance(model.layers[0].attention.wq, Int4Linear) and model.layers[0].attention.wq.input_perm is not None
    # the loaded integers and scales are exactly the known ones (q_proj rows back in Meta's order)
    from llama31.checkpoints.names import meta_rows_to_hf

    wq = meta_rows_to_hf(model.layers[1].attention.wq.dequantized_weight().double(), ARGS.n_heads)
    q, scale, g_idx = layers["model.layers.1.self_attn.q_proj"]
    np.testing.assert_array_equal(wq.numpy(), q * scale.astype(np.float64)[:, g_idx])
    _check_logits(model, _hf_reference(tmp_path, floats, layers))


@pytest.mark.parametrize("pack", [None, True], ids=["default", "output-layer-packed"])
def test_compressed_tensors_folder_loads_and_matches_hf_with_dequantized_weights(tmp_path, pack):
    rng, layers = _known_layers(2, act_order=False)
    floats = _float_tensors(rng)
    tensors = dict(floats)
    for module, (q, scale, _) in layers.items():
        tensors[f"{module}.weight_packed"] = torch.from_numpy(pack_signed(q, axis=1))  # [N, K/8], q + 8
        tensors[f"{module}.weight_scale"] = torch.from_numpy(scale)                   # [N, K/G]
        tensors[f"{module}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
              "ignore": ["lm_head"],
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None,
                                            "output_activations": None,
                                            "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": G, "dynamic": False,
                                                        "actorder": None, "observer": "minmax"}}}}
    _write(tmp_path / "ct", tensors, config)
    # pack=True packs the (tiny) float output layer; the INT4 tensors, views of the file, are then copied
    model = Transformer.from_pretrained(tmp_path / "ct", pack=pack)
    assert isinstance(model.layers[0].feed_forward.w2, Int4Linear) and type(model.output) in (Linear, PackedLinear)
    assert isinstance(model.output, PackedLinear) == bool(pack)
    _check_logits(model, _hf_reference(tmp_path, floats, layers))


def test_int4_folder_with_a_missing_scale_is_named(tmp_path):
    rng, layers = _known_layers(3, act_order=False)
    tensors = _float_tensors(rng)
    for module, (q, scale, _) in layers.items():
        tensors[f"{module}.weight_packed"] = torch.from_numpy(pack_signed(q, axis=1))
        if module != "model.layers.1.mlp.up_proj":
            tensors[f"{module}.weight_scale"] = torch.from_numpy(scale)
    config = {"quant_method": "compressed-tensors", "format": "pack-quantized",
              "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int",
                                                                          "symmetric": True, "strategy": "group",
                                                                          "group_size": G}}}}
    _write(tmp_path / "ct", tensors, config)
    with pytest.raises((KeyError, ValueError), match="up_proj"):
        Transformer.from_pretrained(tmp_path / "ct")
