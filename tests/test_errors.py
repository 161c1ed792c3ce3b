"""Errors a user can act on: the cases of the fuzz run that started this (each once, by name), the shared error
type, and how the command-line tools report errors (one line; --debug and bugs of ours keep the traceback).

tests/test_fuzz.py tries a thousand generated inputs; these pin the worst of the original findings: silent
acceptances (the checker passing a broken candidate, a config value silently changed) and a runaway load.
"""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.numpy import load_file

from llama31 import ModelArgs, RopeScaling, Transformer
from llama31.checkpoints import save_hf, save_meta
from llama31.config import HF_KEYS
from llama31.errors import InputError, InputTypeError, message, run_command
from reference.check import TIERS, Tier, check
from reference.check import main as check_main
from reference.fileformat import FormatError, Tensors, from_memory, load

ARGS = ModelArgs(dim=4, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=8, max_seq_len=32)
GOLDEN = str(Path(__file__).resolve().parent.parent / "reference" / "goldens" / "tiny-llama3.1.json")


@pytest.fixture
def hf_folder(tmp_path):
    torch.manual_seed(0)
    save_hf(tmp_path / "hf", ARGS, Transformer(ARGS).state_dict())
    return tmp_path / "hf"


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("key, value, expected", [
    ("hidden_size", "abc", "hidden_size must be an integer"),
    ("hidden_size", {}, "hidden_size must be an integer"),
    ("num_hidden_layers", 2.5, "num_hidden_layers must be an integer"),  # was truncated to 2
    ("max_position_embeddings", True, "max_position_embeddings must be an integer"),  # was 1
    ("rms_norm_eps", math.nan, "rms_norm_eps must be a finite number > 0"),
    ("rms_norm_eps", -1e-5, "rms_norm_eps must be a finite number > 0"),
    ("rope_theta", 1e400, "rope_theta must be a finite number > 1"),
    ("num_key_value_heads", 0, "num_key_value_heads must be an integer >= 1"),  # was read as "absent"
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false"),
    ("rope_scaling", [8.0], "rope_scaling must be a JSON object"),
])
def test_a_config_value_of_the_wrong_type_or_range_names_the_file_and_key(hf_folder, key, value, expected):
    edit_config(hf_folder, **{key: value})
    with pytest.raises(InputError, match=expected) as error:
        Transformer.from_pretrained(hf_folder)
    assert str(hf_folder / "config.json") in str(error.value)


@pytest.mark.parametrize("change, expected", [
    ({"factor": math.nan}, "rope_scaling.factor must be a finite number >= 1"),
    ({"factor": 0.5}, "rope_scaling.factor must be a finite number >= 1"),
    ({"low_freq_factor": 4.0}, "high_freq_factor must be greater than low_freq_factor"),
    ({"original_max_position_embeddings": 0}, "original_max_position_embeddings must be an integer >= 1"),
    ({"rope_type": None, "type": None}, "but no rope_type"),  # the scaling was silently dropped
])
def test_llama3_rope_scaling_is_checked_not_silently_accepted(change, expected):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    scaling = {k: v for k, v in {**scaling, **change}.items() if v is not None}
    config = {**ARGS.to_hf_config(), "rope_scaling": scaling}
    with pytest.raises(InputError, match=expected):
        ModelArgs.from_hf_config(config, source="ckpt/config.json")


@pytest.mark.parametrize("change, expected", [
    ({"multiple_of": 0}, "multiple_of must be an integer >= 1"),  # was a ZeroDivisionError
    ({"use_scaled_rope": "false"}, "use_scaled_rope must be true or false"),  # the string turned scaling on
    ({"use_scaled_rope": True, "rope_scaling_factor": 0}, "rope_scaling_factor must be a finite number >= 1"),
    ({"n_layers": 2.5}, "n_layers must be an integer"),
])
def test_params_json_values_are_checked(change, expected):
    params = {**ARGS.to_meta_params(), **change}
    with pytest.raises(InputError, match=expected):
        ModelArgs.from_meta_params(params, source="ckpt/params.json")
    # a zero factor used to become the default 8; a missing one still is
    params = {**ARGS.to_meta_params(), "use_scaled_rope": True}
    assert ModelArgs.from_meta_params(params).rope_scaling == RopeScaling(factor=8.0)


def test_a_config_with_more_layers_than_the_weights_fails_before_building_anything(hf_folder):
    edit_config(hf_folder, num_hidden_layers=10**9)  # built block by block, this never returned
    with pytest.raises(InputError, match=r"num_hidden_layers is 1000000000, but the weights hold 1 layer"):
        Transformer.from_pretrained(hf_folder)


@pytest.mark.parametrize("content, expected", [
    (b"\xff\xfe{}", "is not UTF-8 text"),
    (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
    (b"[1, 2]", "must hold a JSON object"),
])
def test_a_config_file_that_is_not_a_json_object_is_named(hf_folder, content, expected):
    (hf_folder / "config.json").write_bytes(content)
    with pytest.raises(InputError, match=expected):
        Transformer.from_pretrained(hf_folder)


def test_model_args_themselves_refuse_what_no_llama_has():
    with pytest.raises(InputTypeError, match="ModelArgs: n_layers must be an integer"):
        ModelArgs(n_layers=True)
    with pytest.raises(InputError, match="ModelArgs: rope_theta must be a finite number > 1"):
        ModelArgs(rope_theta=math.inf)
    with pytest.raises(InputError, match="RopeScaling: factor must be a finite number >= 1"):
        RopeScaling(factor=-8.0)
    assert ModelArgs(dim=64.0, n_heads=4, n_kv_heads=2).dim == 64  # an integral float is read as its integer
    assert set(HF_KEYS) <= {f for f in ModelArgs.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- weights
def test_a_weight_of_an_integer_or_complex_dtype_is_refused(tmp_path):
    state = Transformer(ARGS).state_dict()
    for dtype in (torch.int32, torch.bool, torch.complex64):
        save_meta(tmp_path / str(dtype), ARGS, {**state, "norm.weight": state["norm.weight"].to(dtype)})
        with pytest.raises(InputError, match=f"'norm.weight' has dtype {dtype}; weights must be floating point"):
            Transformer.from_pretrained(tmp_path / str(dtype))


def test_a_damaged_safetensors_file_is_named(hf_folder):
    data = (hf_folder / "model.safetensors").read_bytes()
    (hf_folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(InputError, match=r"model\.safetensors: cannot be read as safetensors"):
        Transformer.from_pretrained(hf_folder)


def test_a_pickle_holding_something_else_than_tensors_is_named(tmp_path):
    save_meta(tmp_path / "m", ARGS, Transformer(ARGS).state_dict())
    torch.save({"norm.weight": "not a tensor"}, tmp_path / "m" / "consolidated.00.pth")
    with pytest.raises(InputError, match=r"consolidated\.00\.pth: 'norm\.weight' holds a str, not a tensor"):
        Transformer.from_pretrained(tmp_path / "m")


# ---------------------------------------------------------------------------------------------- generation
def test_sampling_arguments_are_checked(hf_folder):
    from llama31.generation import Llama
    from llama31.text import Tokenizer

    llama = Llama(Transformer.from_pretrained(hf_folder), Tokenizer())
    for kwargs, expected in [(dict(temperature=math.nan), "temperature must be >= 0 .* and finite"),
                             (dict(temperature=math.inf), "temperature must be >= 0 .* and finite"),
                             (dict(top_p="0.9"), "top_p must be a number"),
                             (dict(stop_tokens=[1.5]), "stop_tokens must hold token ids"),
                             (dict(seed=2**70), "seed must be an integer")]:
        with pytest.raises(InputError, match=expected):
            llama.generate([[1, 2]], 2, **kwargs)
    with pytest.raises(InputTypeError, match="prompts must be a list of strings"):
        llama.text_completion("Hi")  # was read as two one-character prompts
    # a temperature too small for float32 is its limit, greedy, not a NaN in torch.multinomial
    assert llama.generate([[1, 2]], 3, temperature=1e-300, stop_tokens=[])[0] == \
        llama.generate([[1, 2]], 3, temperature=0, stop_tokens=[])[0]


# ---------------------------------------------------------------------------------------------- the checker
@pytest.fixture(scope="module")
def golden():
    return load(GOLDEN)


def candidate_of_golden():
    """The golden's own JSON and tensors as a candidate's: valid, and passing every tier."""
    data = json.loads(Path(GOLDEN).read_text())
    data["kind"] = "candidate"
    tensors = Tensors()
    tensors.arrays.update(load_file(Path(GOLDEN).with_suffix(".safetensors")))
    return data, tensors


@pytest.mark.parametrize("field", ["prompt_lse", "last_logits"])
def test_nan_in_a_candidates_optional_arrays_is_malformed_not_a_pass(golden, field):
    data, tensors = candidate_of_golden()
    key = f"{golden.prompts[2]['name']}/{field}"  # not the first prompt: max() skipped a NaN anywhere else
    tensors.arrays[key] = tensors.arrays[key].copy()
    tensors.arrays[key][1] = math.nan
    with pytest.raises(FormatError, match=r"holds nan at \[1\]; every number must be finite"):
        from_memory(data, tensors, "cand", golden)


def test_nan_that_reaches_the_comparison_fails_the_tier(golden):
    cand = copy.deepcopy(golden)
    cand.results[golden.prompts[2]["name"]].lse[1] = math.nan  # past validation: the comparison's own guard
    report = check(golden, cand, "fp32")
    assert not report.passed and any("log-sum-exp" in f for f in report.failures)


def test_non_integer_ids_are_malformed_not_truncated(golden):
    data, tensors = candidate_of_golden()
    assert from_memory(data, tensors, "cand", golden)
    data["results"][golden.prompts[0]["name"]]["continuation"]["ids"][0] += 0.5
    with pytest.raises(FormatError, match="holds values that are not token ids"):
        from_memory(data, tensors, "cand", golden)


@pytest.mark.parametrize("bound", [dict(max_mean_kl=math.nan), dict(min_top1=math.nan), dict(logprob_tol=-1e-4),
                                   dict(min_top1=1.5)])
def test_tier_bounds_must_be_numbers_in_range(bound):
    with pytest.raises(InputError):
        Tier("custom", **bound)


def test_nan_bounds_on_the_command_line_exit_2_with_the_flag_named(capsys):
    with pytest.raises(SystemExit) as exit_:
        check_main([GOLDEN, GOLDEN, "--tier", "int4", "--max-kl", "nan"])
    assert exit_.value.code == 2 and "argument --max-kl: must be a finite number >= 0.0" in capsys.readouterr().err
    assert TIERS["int4"].max_mean_kl == 0.5


# ---------------------------------------------------------------------------------------------- commands
def test_a_user_error_is_one_line_and_exit_status_1(capsys):
    def body():
        raise KeyError("ckpt/config.json: missing required key(s) ['dim']")

    assert run_command(body) == 1
    assert capsys.readouterr().err == "error: ckpt/config.json: missing required key(s) ['dim']\n"  # unquoted


def test_debug_shows_the_traceback_and_a_bug_of_ours_always_does():
    def user_error():
        raise InputError("x.json", "dim", "must be an integer >= 1, got 0")

    with pytest.raises(InputError):
        run_command(user_error, debug=True)

    def bug():
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        run_command(bug)


def test_convert_reports_a_damaged_checkpoint_in_one_line(hf_folder, tmp_path, capsys):
    from llama31.convert import main

    (hf_folder / "model.safetensors").write_bytes(b"\x00" * 16)
    assert main([str(hf_folder), str(tmp_path / "out"), "--to", "meta"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "model.safetensors" in err
    with pytest.raises(InputError):
        main([str(hf_folder), str(tmp_path / "out"), "--to", "meta", "--debug"])


def test_messages_read_as_written():
    assert message(KeyError("a 'quoted' message")) == "a 'quoted' message"
    assert str(InputError("f.json", "k", "must be x")) == "f.json: k must be x"
    assert str(InputError("f.json", None, "not valid JSON")) == "f.json: not valid JSON"
    assert isinstance(InputTypeError("f", "k", "p"), TypeError) and isinstance(InputTypeError("f", "k", "p"),
                                                                               ValueError)
