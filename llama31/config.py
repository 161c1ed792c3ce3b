"""ModelArgs: every number that defines a Llama 3.1 model, and where those numbers come from.

Three sources, one dataclass:
  * presets for the published models (``ModelArgs.preset("llama3.1-8b")``),
  * Meta's ``params.json`` (``ModelArgs.from_meta_params``),
  * Hugging Face's ``config.json`` (``ModelArgs.from_hf_config``).

The FFN hidden size is derived from ``ffn_dim_multiplier`` / ``multiple_of`` the way Meta's code does it:
    h = int(2 * 4 * dim / 3);  h = int(ffn_dim_multiplier * h);  round h up to a multiple of multiple_of
(8B: 4096 -> 10922 -> 14198 -> 14336).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


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
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {value!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelArgs: dim {self.dim} is not divisible by n_heads {self.n_heads}; "
                                 "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim must be even for RoPE, got {self.head_dim}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} must be a multiple of n_kv_heads "
                             f"{self.n_kv_heads} (grouped-query attention)")

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
        """From the dict in Meta's params.json. Unknown keys are ignored (Meta adds keys between releases)."""
        _require(params, ("dim", "n_layers", "n_heads"), source)
        dim = int(params["dim"])
        multiple_of = int(params.get("multiple_of", 256))
        hidden_dim = ffn_hidden_dim(dim, params.get("ffn_dim_multiplier"), multiple_of)
        if isinstance(params.get("rope_scaling"), dict):  # written by llama31's to_meta_params
            rope_scaling = RopeScaling(**params["rope_scaling"])
        elif params.get("use_scaled_rope", False):
            # Meta's params.json carries at most the factor: 8 for 3.1, 32 for 3.2 1B/3B (rope_scaling_factor).
            rope_scaling = RopeScaling(factor=float(params.get("rope_scaling_factor") or 8.0))
        else:
            rope_scaling = None
        return cls(
            dim=dim,
            n_layers=int(params["n_layers"]),
            n_heads=int(params["n_heads"]),
            n_kv_heads=int(params.get("n_kv_heads") or params["n_heads"]),
            vocab_size=int(params.get("vocab_size", 128256)),
            hidden_dim=hidden_dim,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=rope_scaling,
            max_seq_len=int(params.get("max_seq_len", 131072)),
            tie_word_embeddings=bool(params.get("tie_word_embeddings", False)),
            head_dim=params.get("head_dim"),
        )

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
        """From the dict in an HF LlamaForCausalLM config.json (transformers v4 or v5 spelling)."""
        _require(config, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"), source)
        if config.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act is {config['hidden_act']!r}; Llama uses 'silu'")
        for key in ("attention_bias", "mlp_bias"):
            if config.get(key):
                raise ValueError(f"{source}: {key} is true; Llama 3.x has no biases and llama31 does not support them")

        # v4: rope_theta at top level + rope_scaling; v5: rope_parameters holds rope_theta and the scaling.
        rope = dict(config.get("rope_parameters") or {})
        if config.get("rope_scaling"):
            rope = {**config["rope_scaling"], **rope}
        rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 500000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            _require(rope, ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                     f"{source} rope_scaling")
            rope_scaling = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type == "default":
            rope_scaling = None
        else:
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported; llama31 implements "
                             "'default' (no scaling) and 'llama3'")
        return cls(
            dim=int(config["hidden_size"]),
            n_layers=int(config["num_hidden_layers"]),
            n_heads=int(config["num_attention_heads"]),
            n_kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
            vocab_size=int(config.get("vocab_size", 128256)),
            hidden_dim=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=int(config.get("max_position_embeddings", 131072)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim"),
        )

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
    """A checkpoint's JSON file (params.json, config.json, a safetensors index) as a dict; ValueError naming the
    file if it is not valid JSON."""
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


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
        raise KeyError(f"{source}: missing required key(s) {missing}; found keys {sorted(d)}")


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
