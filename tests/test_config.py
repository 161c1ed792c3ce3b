"""ModelArgs: presets, Meta params.json and HF config.json parsing, the FFN size rule."""

import json

import pytest

from llama31 import ModelArgs, RopeScaling
from llama31.config import ffn_hidden_dim


def test_presets_have_the_published_shapes():
    # (dim, layers, heads, kv heads, head_dim, FFN hidden, tied) from the Llama 3.1 / 3.2 model cards
    expected = {
        "llama3.1-8b": (4096, 32, 32, 8, 128, 14336, False),
        "llama3.1-70b": (8192, 80, 64, 8, 128, 28672, False),
        "llama3.1-405b": (16384, 126, 128, 8, 128, 53248, False),
        "llama3.2-1b": (2048, 16, 32, 8, 64, 8192, True),
        "llama3.2-3b": (3072, 28, 24, 8, 128, 8192, True),
    }
    for name, shape in expected.items():
        a = ModelArgs.preset(name)
        assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.hidden_dim, a.tie_word_embeddings) == shape
        assert a.vocab_size == 128256 and a.rope_theta == 500000.0 and a.norm_eps == 1e-5
    assert ModelArgs.preset("llama3.1-8b").rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    assert ModelArgs.preset("llama3.2-1b").rope_scaling.factor == 32.0


def test_parameter_counts_match_the_published_sizes():
    # 8.030 B, 70.554 B, 405.853 B parameters (model cards), counted from the shapes alone
    def count(a):
        attn = a.dim * a.head_dim * (a.n_heads * 2 + a.n_kv_heads * 2)
        ffn = 3 * a.dim * a.hidden_dim
        embed = a.vocab_size * a.dim * (1 if a.tie_word_embeddings else 2)
        return a.n_layers * (attn + ffn + 2 * a.dim) + embed + a.dim

    for name, billions in [("llama3.1-8b", 8.030), ("llama3.1-70b", 70.554), ("llama3.1-405b", 405.853)]:
        assert count(ModelArgs.preset(name)) / 1e9 == pytest.approx(billions, abs=5e-4)


def test_ffn_rule_from_params_json():
    # h = int(2*4*dim/3); h = int(multiplier*h); round up to multiple_of -- worked out by hand for 8B:
    # 2*4*4096/3 = 10922.67 -> 10922; *1.3 = 14198.6 -> 14198; next multiple of 1024 -> 14336
    assert ffn_hidden_dim(4096, 1.3, 1024) == 14336
    assert ffn_hidden_dim(8192, 1.3, 4096) == 28672
    assert ffn_hidden_dim(16384, 1.2, 4096) == 53248
    assert ffn_hidden_dim(4096, None, 256) == 11008  # Llama 2 7B


def test_meta_params_json_of_8b_with_unknown_keys():
    params = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True, "some_future_key": [1, 2]}
    assert ModelArgs.from_meta_params(params) == ModelArgs.preset("llama3.1-8b")


def test_meta_params_round_trip_for_odd_sizes():
    a = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=173,
                  rope_scaling=RopeScaling(factor=32.0, original_max_position_embeddings=32), max_seq_len=512)
    assert ModelArgs.from_meta_params(json.loads(json.dumps(a.to_meta_params()))) == a


HF_8B_V4 = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
            "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False, "hidden_act": "silu"}


def test_hf_config_v4_v5_and_old_type_key_agree():
    v5 = {k: v for k, v in HF_8B_V4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**HF_8B_V4["rope_scaling"], "rope_theta": 500000.0}
    old = dict(HF_8B_V4, rope_scaling={k if k != "rope_type" else "type": v
                                       for k, v in HF_8B_V4["rope_scaling"].items()})
    expected = ModelArgs.preset("llama3.1-8b")
    for config in (HF_8B_V4, v5, old):
        assert ModelArgs.from_hf_config(config) == expected


def test_hf_config_round_trip():
    a = ModelArgs.preset("llama3.2-1b")
    assert ModelArgs.from_hf_config(a.to_hf_config()) == a


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing required key(s) ['low_freq_factor'"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"attention_bias": True}, "attention_bias is true"),
    ({"num_key_value_heads": 5}, "must be a multiple of n_kv_heads 5"),
])
def test_bad_hf_configs_are_rejected_with_the_reason(change, message):
    with pytest.raises((KeyError, ValueError)) as err:
        ModelArgs.from_hf_config({**HF_8B_V4, **change}, source="my/config.json")
    assert message in str(err.value)


def test_missing_keys_name_the_file():
    with pytest.raises(KeyError, match=r"my/params.json: missing required key\(s\) \['n_layers'\]"):
        ModelArgs.from_meta_params({"dim": 64, "n_heads": 4}, source="my/params.json")


def test_unknown_preset():
    with pytest.raises(KeyError, match="unknown preset 'llama3.1-9b'"):
        ModelArgs.preset("llama3.1-9b")
