"""ModelArgs: every number that defines a Llama 3.1 model, and where those numbers come from.

Three sources, one dataclass:
  * presets for the published models (``ModelArgs.preset("llama3.1-8b")``),
  * Meta's ``params.json`` (``ModelArgs.from_meta_params``),
  * Hugging Face's ``config.json`` (``ModelArgs.from_hf_config``).

The FFN hidden size is derived from ``ffn_dim_multiplier`` / ``multiple_of`` the way Meta's code does it:
    h = int(2 * 4 * dim / 3);  h = int(ffn_dim_multiplier * h);  round h up to a multiple of multiple_of
(8B: 4096 -> 10922 -> 14198 -> 14336).

Every value is checked where it is read (types, finite and positive sizes, heads that divide, rope scaling
that makes sense): InputError names the file and its key, or ModelArgs' field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from llama31.errors import InputError, InputTypeError, check_bool, check_int, check_number, check_object

# Upper bounds that keep a mistyped size from making construction run away (every size here is far above any
# Llama 3.x model's). MAX_SEQ_LEN: the RoPE tables hold max_seq_len x head_dim/2 angles, built at construction;
# Llama 3.1's context is 131072 = 2**17 and community long-context variants reach 2**20.
MAX_SIZE = 2**31 - 1
MAX_SEQ_LEN = 2**20


@dataclass(frozen=True)
class RopeScaling:
    """The "llama3" RoPE frequency rescaling that stretches the context from 8K to 128K tokens.

    factor (s): long wavelengths are divided by s.  low_freq_factor (a), high_freq_factor (b): wavelengths
    shorter than L/b are kept, longer than L/a are divided by s, in between blended.
    original_max_position_embeddings (L): the context the model was pre-trained with (8192 for 3.1).
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name, value in _checked_rope(dataclasses.asdict(self), "RopeScaling").items():
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ModelArgs:
    """The architecture hyper-parameters of a Llama 3.x decoder (Meta's names)."""

    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8
    vocab_size: int = 128256
    hidden_dim: int = 14336  # FFN inner size (HF: intermediate_size)
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = field(default_factory=RopeScaling)
    max_seq_len: int = 131072  # the longest context the model supports (HF: max_position_embeddings)
    tie_word_embeddings: bool = False  # True for 3.2 1B/3B: the output layer reuses tok_embeddings
    head_dim: int | None = None  # None: dim // n_heads

    def __post_init__(self):
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, value in _checked_fields(fields, "ModelArgs").items():
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ derived numbers
    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelArgs":
        """The published shapes: llama3.1-8b, llama3.1-70b, llama3.1-405b, llama3.2-1b, llama3.2-3b."""
        try:
            return PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta_params(cls, params: dict[str, Any], source: str = "params.json") -> "ModelArgs":
        """From the dict in Meta's params.json. Unknown keys are ignored (Meta adds keys between releases).

        InputError (a ValueError) names `source` and the key for a value of the wrong type or out of range.
        """
        check_object(params, None, source)
        _require(params, ("dim", "n_layers", "n_heads"), source)
        dim = check_int(params["dim"], "dim", source, minimum=1, maximum=MAX_SIZE, integral_floats=True)
        multiple_of = check_int(_get(params, "multiple_of", 256), "multiple_of", source, minimum=1,
                                maximum=MAX_SIZE, integral_floats=True)
        multiplier = params.get("ffn_dim_multiplier")
        if multiplier is not None:
            multiplier = check_number(multiplier, "ffn_dim_multiplier", source, above=0,
                                      maximum=MAX_SIZE / max(1, int(2 * (4 * dim) / 3)))
        hidden_dim = ffn_hidden_dim(dim, multiplier, multiple_of)
        if not 1 <= hidden_dim <= MAX_SIZE:
            raise InputError(source, "ffn_dim_multiplier", f"({multiplier}) and multiple_of ({multiple_of}) give an "
                             f"FFN hidden size of {hidden_dim}; it must be between 1 and {MAX_SIZE}")
        use_scaled_rope = check_bool(_get(params, "use_scaled_rope", False), "use_scaled_rope", source)
        if params.get("rope_scaling") is not None:  # written by llama31's to_meta_params
            scaling = check_object(params["rope_scaling"], "rope_scaling", source)
            if "use_scaled_rope" in params and not use_scaled_rope:
                raise InputError(source, "use_scaled_rope", "is false but rope_scaling is given; set it to true, "
                                 "or remove rope_scaling for a model without RoPE scaling")
            unknown = sorted(set(scaling) - {f.name for f in dataclasses.fields(RopeScaling)})
            if unknown:
                raise InputError(source, "rope_scaling", f"has unknown key(s) {unknown}; allowed: factor, "
                                 "low_freq_factor, high_freq_factor, original_max_position_embeddings")
            rope_scaling = RopeScaling(**_checked_rope({**dataclasses.asdict(RopeScaling()), **scaling}, source,
                                                       "rope_scaling."))
        elif use_scaled_rope:
            # Meta's params.json carries at most the factor: 8 for 3.1, 32 for 3.2 1B/3B (rope_scaling_factor).
            factor = _get(params, "rope_scaling_factor", 8.0)
            rope_scaling = RopeScaling(**_checked_rope({**dataclasses.asdict(RopeScaling()), "factor": factor},
                                                       source, "", {"factor": "rope_scaling_factor"}))
        else:
            rope_scaling = None
        fields = dict(
            dim=dim,
            n_layers=params["n_layers"],
            n_heads=params["n_heads"],
            n_kv_heads=_get(params, "n_kv_heads", params["n_heads"]),
            vocab_size=_get(params, "vocab_size", 128256),
            hidden_dim=hidden_dim,
            norm_eps=_get(params, "norm_eps", 1e-5),
            rope_theta=_get(params, "rope_theta", 500000.0),
            rope_scaling=rope_scaling,
            max_seq_len=_get(params, "max_seq_len", 131072),
            tie_word_embeddings=_get(params, "tie_word_embeddings", False),
            head_dim=params.get("head_dim"),
        )
        return cls(**_checked_fields(fields, source, META_KEYS))

    def to_meta_params(self) -> dict[str, Any]:
        """A params.json dict that ``from_meta_params`` reads back to an equal ModelArgs.

        Meta's files describe the FFN size only through ffn_dim_multiplier / multiple_of; we write the
        multiplier that reproduces ``hidden_dim`` exactly (with multiple_of = 1 if no round number fits).
        """
        multiplier, multiple_of = _ffn_params_for(self.dim, self.hidden_dim)
        params: dict[str, Any] = {
            "dim": self.dim,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "n_kv_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "ffn_dim_multiplier": multiplier,
            "multiple_of": multiple_of,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None,
        }
        if self.rope_scaling is not None and self.rope_scaling != RopeScaling():
            # Not in Meta's own files; written (and read) by llama31 so that no scaling number is lost.
            params["rope_scaling"] = dataclasses.asdict(self.rope_scaling)
        if self.head_dim != self.dim // self.n_heads:
            params["head_dim"] = self.head_dim
        if self.tie_word_embeddings:
            params["tie_word_embeddings"] = True
        if self.max_seq_len != 131072:
            params["max_seq_len"] = self.max_seq_len
        return params

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """From the dict in an HF LlamaForCausalLM config.json (transformers v4 or v5 spelling).

        InputError (a ValueError) names `source` and the key for a value of the wrong type or out of range.
        """
        check_object(config, None, source)
        _require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        if config.get("hidden_act", "silu") != "silu":
            raise InputError(source, "hidden_act", f"is {config['hidden_act']!r}; Llama uses 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if check_bool(_get(config, key, False), key, source):
                raise InputError(source, key, "is true; Llama 3.x has no biases and llama31 does not support them")

        # v4: rope_theta at top level + rope_scaling; v5: rope_parameters holds rope_theta and the scaling.
        parameters = check_object(_get(config, "rope_parameters", {}), "rope_parameters", source)
        scaling = check_object(_get(config, "rope_scaling", {}), "rope_scaling", source)
        rope = {**scaling, **parameters}
        where = {key: "rope_parameters" if key in parameters else "rope_scaling" for key in rope}
        rope_theta, theta_key = (rope["rope_theta"], f"{where['rope_theta']}.rope_theta") if "rope_theta" in rope \
            else (_get(config, "rope_theta", 500000.0), "rope_theta")
        type_key = "rope_type" if "rope_type" in rope else "type"
        rope_type = rope.get(type_key)
        if rope_type is None:
            scaling_keys = sorted(set(rope) - {"rope_theta", "rope_type", "type"})
            if scaling_keys:  # a scaling without a type must not be dropped silently
                raise InputError(source, where[scaling_keys[0]], f"has {scaling_keys} but no rope_type; set "
                                 "rope_type to 'llama3' (Llama 3.1 scaling) or 'default' (none)")
            rope_type = "default"
        if rope_type == "llama3":
            _require(rope, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     f"{source} {where[type_key]}")
            names = {name: f"{where[name]}.{name}" for name in dataclasses.asdict(RopeScaling())}
            fields = {name: rope[name] for name in names}
            rope_scaling = RopeScaling(**_checked_rope(fields, source, "", names))
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise InputError(source, f"{where[type_key]}.{type_key}", f"is {rope_type!r}: rope type "
                             f"{rope_type!r} is not supported; llama31 implements 'default' (no scaling) and "
                             "'llama3'")
        fields = dict(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            n_heads=config["num_attention_heads"],
            n_kv_heads=_get(config, "num_key_value_heads", config["num_attention_heads"]),
            vocab_size=_get(config, "vocab_size", 128256),
            hidden_dim=config["intermediate_size"],
            norm_eps=_get(config, "rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=_get(config, "max_position_embeddings", 131072),
            tie_word_embeddings=_get(config, "tie_word_embeddings", False),
            head_dim=config.get("head_dim"),
        )
        return cls(**_checked_fields(fields, source, {**HF_KEYS, "rope_theta": theta_key}))

    def to_hf_config(self, dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict for transformers' LlamaForCausalLM (v4 spelling, which v5 still reads)."""
        config: dict[str, Any] = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "torch_dtype": dtype,
        }
        if self.rope_scaling is not None:
            config["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return config


def read_json(file: Path) -> dict[str, Any]:
    """A checkpoint's JSON file (params.json, config.json, a safetensors index) as a dict; InputError (a
    ValueError) naming the file if it is not UTF-8, not valid JSON, or not a JSON object."""
    try:
        data = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(file, None, f"is not UTF-8 text ({e}); is it a JSON file?") from None
    except RecursionError:
        raise InputError(file, None, "not valid JSON: nested too deeply to read") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise InputError(file, None, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InputError(file, None, f"must hold a JSON object {{...}}, found a {type(data).__name__}")
    return data


def ffn_hidden_dim(dim: int, ffn_dim_multiplier: float | None, multiple_of: int) -> int:
    """Meta's FFN size rule: h = int(2*4*dim/3); h = int(multiplier*h); round h up to a multiple of multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params_for(dim: int, hidden_dim: int) -> tuple[float, int]:
    """(ffn_dim_multiplier, multiple_of) such that ffn_hidden_dim(dim, ...) == hidden_dim."""
    for multiple_of in (4096, 1024, 256, 1):
        base = int(2 * (4 * dim) / 3)
        # the smallest multiplier that lands in the right rounding bucket, as a short decimal when possible
        for digits in range(1, 12):
            multiplier = math.ceil(hidden_dim / base * 10**digits) / 10**digits if base else 1.0
            for candidate in (round(hidden_dim / base, digits), multiplier):
                if ffn_hidden_dim(dim, candidate, multiple_of) == hidden_dim:
                    return candidate, multiple_of
    raise ValueError(f"cannot express FFN hidden size {hidden_dim} for dim {dim} in Meta's params.json terms")


def _require(d: dict, keys, source: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise KeyError(f"{source}: missing required key(s) {missing}; found keys {sorted(map(str, d))}")


def _get(d: dict, key: str, default: Any) -> Any:
    """d[key], or default when it is absent or null (config writers emit null for "the default")."""
    value = d.get(key)
    return default if value is None else value


# A file's key for each ModelArgs field, so that an error names the key the user sees in the file.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "hidden_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings", "rope_scaling": "rope_scaling"}
META_KEYS = {"hidden_dim": "ffn_dim_multiplier"}  # otherwise Meta's names are ModelArgs' own


def _checked_fields(fields: dict[str, Any], source: Any, names: Mapping[str, str] = {}) -> dict[str, Any]:
    """ModelArgs' fields checked and normalised (sizes to int, eps and theta to float).

    InputError names `source` and the key as the source spells it (names: field -> key; default the field).
    """
    def key(name: str) -> str:
        return names.get(name, name)

    out = dict(fields)
    for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim"):
        out[name] = check_int(fields[name], key(name), source, minimum=1, maximum=MAX_SIZE, integral_floats=True)
    out["max_seq_len"] = check_int(fields["max_seq_len"], key("max_seq_len"), source, minimum=1,
                                   maximum=MAX_SEQ_LEN, integral_floats=True)
    out["norm_eps"] = check_number(fields["norm_eps"], key("norm_eps"), source, above=0)
    # theta^(-2i/d) must fall with i: a base <= 1 gives no rotation, or frequencies that overflow
    out["rope_theta"] = check_number(fields["rope_theta"], key("rope_theta"), source, above=1)
    out["tie_word_embeddings"] = check_bool(fields["tie_word_embeddings"], key("tie_word_embeddings"), source)
    if fields["rope_scaling"] is not None and not isinstance(fields["rope_scaling"], RopeScaling):
        raise InputTypeError(source, key("rope_scaling"), f"must be a RopeScaling or None, got "
                             f"{type(fields['rope_scaling']).__name__}")
    dim, n_heads, n_kv_heads = out["dim"], out["n_heads"], out["n_kv_heads"]
    if fields["head_dim"] is None:
        if dim % n_heads:
            raise InputError(source, key("n_heads"), f"is {n_heads}: dim {dim} is not divisible by n_heads "
                             f"{n_heads}; give head_dim explicitly")
        out["head_dim"] = dim // n_heads
    else:
        out["head_dim"] = check_int(fields["head_dim"], key("head_dim"), source, minimum=2, maximum=MAX_SIZE,
                                    integral_floats=True)
    if out["head_dim"] % 2:
        raise InputError(source, key("head_dim"), f"must be even for RoPE (it rotates pairs of channels), got "
                         f"{out['head_dim']}")
    if n_heads % n_kv_heads:
        raise InputError(source, key("n_kv_heads"), f"is {n_kv_heads}: n_heads {n_heads} must be a multiple of "
                         f"n_kv_heads {n_kv_heads} (grouped-query attention: each key/value head serves a whole "
                         "number of query heads)")
    return out


def _checked_rope(fields: dict[str, Any], source: Any, prefix: str = "",
                  names: Mapping[str, str] = {}) -> dict[str, Any]:
    """RopeScaling's fields checked: finite, factor >= 1, 0 < low_freq_factor < high_freq_factor, a positive
    original context. The blend between the two band edges divides by (high - low), so they must differ."""
    def key(name: str) -> str:
        return names.get(name, prefix + name)

    factor = check_number(fields["factor"], key("factor"), source, minimum=1)
    low = check_number(fields["low_freq_factor"], key("low_freq_factor"), source, above=0)
    high = check_number(fields["high_freq_factor"], key("high_freq_factor"), source, above=0)
    if high <= low:
        raise InputError(source, key("high_freq_factor"), f"must be greater than low_freq_factor ({low}), got "
                         f"{high}: the wavelengths between the two are blended by (L / wavelength - low) / "
                         "(high - low)")
    original = check_int(fields["original_max_position_embeddings"], key("original_max_position_embeddings"), source,
                         minimum=1, maximum=MAX_SEQ_LEN, integral_floats=True)
    return {"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": original}


PRESETS: dict[str, ModelArgs] = {
    "llama3.1-8b": ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                             hidden_dim=ffn_hidden_dim(4096, 1.3, 1024)),
    "llama3.1-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                              hidden_dim=ffn_hidden_dim(8192, 1.3, 4096)),
    "llama3.1-405b": ModelArgs(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                               hidden_dim=ffn_hidden_dim(16384, 1.2, 4096)),
    "llama3.2-1b": ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True),
    "llama3.2-3b": ModelArgs(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, hidden_dim=8192,
                             rope_scaling=RopeScaling(factor=32.0), tie_word_embeddings=True),
}
