"""Every malformed input to a public entry point ends in the project's own error, or is correctly accepted.

Seeded generators (random.Random with a fixed seed per kind: every run tries the same inputs) produce over a
thousand malformed inputs of every kind a user hands llama31: HF config.json and Meta params.json (values of
the wrong type, non-finite, out of range, missing, files that are not JSON objects), INT4 quantization
configs, safetensors bytes, safetensors indexes, consolidated.NN.pth pickles, tokenizer.model files, token
ids, chat dialogs, model inputs, sampling arguments, golden and candidate files for the checker, and command
lines. Each case is judged (judge):

  * an exception must be one of ours: a ValueError, KeyError, OSError or TypeError raised in llama31/,
    reference/ or examples/ (not deep inside torch, safetensors or numpy), whose message names the file, the
    key or the argument (each case lists the names that may appear);
  * a case marked must_fail (its input is invalid for a reason the generator knows) must not be accepted;
  * a command line must exit non-zero with an error line naming the problem, and never print a traceback;
  * nothing may hang: each case runs under a time limit (CASE_SECONDS; SUBPROCESS_SECONDS for the four
    subprocesses).

Inputs that may still be valid (a flipped byte in a tensor's data, a rope_theta of 2) are allowed to load.
The models are tiny (a few hundred parameters) so that a thousand loads take seconds; the one that
examples/generate.py runs needs the tokenizer's 128256-token vocabulary, at dim 2.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from llama31 import ModelArgs, RopeScaling, Transformer
from llama31.checkpoints import save_hf, save_meta
from llama31.errors import message
from llama31.generation import Llama
from llama31.sampling import sample
from llama31.text import ChatFormat, StreamDecoder, Tokenizer
from llama31.text.tokenizer import packaged_tokenizer_path

REPO = Path(__file__).resolve().parent.parent
OURS = tuple(str(REPO / part) + os.sep for part in ("llama31", "reference", "examples"))
GOLDEN = REPO / "reference" / "goldens" / "tiny-llama3.1.json"
# Generous for a slow CI machine: every case here takes milliseconds (the tokenizer files ~0.3 s, the command
# lines run as subprocesses a few seconds); a case that runs away (a model of 10**9 layers) takes forever.
CASE_SECONDS = 20
SUBPROCESS_SECONDS = 120

# A few hundred parameters: 1 layer, dim 4, 2 query heads of head_dim 2 sharing 1 kv head, vocabulary 16.
ARGS = ModelArgs(dim=4, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=8, max_seq_len=32,
                 rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=8))
# The smallest shapes INT4 takes: group size 8 needs inputs of 8.
INT4_ARGS = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=8, max_seq_len=32)

# ---------------------------------------------------------------------------------------------- value pools
NAN, INF = math.nan, math.inf
NOT_NUMBERS = ["abc", "", "64", {}, [], [1], {"a": 1}, True, False]
NOT_INTEGERS = NOT_NUMBERS + [NAN, INF, -INF, 2.5, 1e-3, 1e400]
NOT_SIZES = NOT_INTEGERS + [0, -1, -64, 2**31, 2**63, 10**30, -2**63, 10**400]
NOT_POSITIVE = NOT_NUMBERS + [NAN, INF, -INF, 0, 0.0, -1e-5, -1, 1e400]
NOT_BOOLS = ["false", "true", 0, 1, 1.0, [], {}, "no"]
DELETE = object()  # a value pool entry: remove the key


@dataclass
class Case:
    label: str                        # what was done, for the report of a failure
    run: Callable[[], object]         # the call; raises, or returns what it made (a model, a status)
    must_fail: bool                   # the input is invalid: accepting it is a failure
    names: tuple[str, ...]            # an error's message must contain one of these (file, key or argument)
    cli: bool = False                 # run returns (status, stdout, stderr) of a command line
    seconds: float = CASE_SECONDS     # the time limit


class CaseTimeout(BaseException):
    """Raised in the case's own thread when its time is up (BaseException: nothing in the library catches it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    def expire(signum, frame):
        raise CaseTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def judge(case: Case) -> str | None:
    """None if the case ended as it must, else what went wrong (one line)."""
    try:
        # a RuntimeWarning (an invalid cast, an overflow) is numpy or torch making up a number: a failure
        with time_limit(case.seconds), warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            result = case.run()
    except CaseTimeout:
        return f"no answer within {case.seconds} s (a hang)"
    except (ValueError, KeyError, OSError, TypeError) as error:
        if case.cli:
            return f"a command line raised {type(error).__name__}: {message(error)}"
        frame = traceback.extract_tb(error.__traceback__)[-1]
        if not frame.filename.startswith(OURS):
            return f"{type(error).__name__} raised in {frame.filename}:{frame.lineno}: {message(error)}"
        if not any(name in message(error) for name in case.names):
            return f"{type(error).__name__} names none of {case.names}: {message(error)}"
        return None
    except Exception as error:  # noqa: BLE001 - anything else is a raw library error or a bug
        frame = traceback.extract_tb(error.__traceback__)[-1]
        return f"raw {type(error).__name__} at {frame.filename}:{frame.lineno}: {error}"
    if case.cli:
        status, out, err = result
        if "Traceback" in err:
            return f"a traceback (status {status}): {err.strip().splitlines()[-1]}"
        if status == 0:
            return "accepted (status 0)" if case.must_fail else None
        if not any(name in out + err for name in case.names):
            return f"status {status}, but the output names none of {case.names}: {(out + err).strip()[-300:]}"
        return None
    return "accepted" if case.must_fail else None


def in_process(main, argv) -> tuple[int, str, str]:
    """A command's main(argv) with its output captured; an argparse error's SystemExit becomes its status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    return status, out.getvalue(), err.getvalue()


def as_subprocess(argv, cwd=REPO) -> tuple[int, str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, env=env)
    return run.returncode, run.stdout, run.stderr


# ---------------------------------------------------------------------------------------------- base folders
@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Valid tiny checkpoints to mutate: HF (one file and sharded with an index), Meta, INT4, and the golden's
    minimal inline candidate."""
    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    state = Transformer(ARGS).state_dict()
    save_hf(root / "hf", ARGS, state)
    save_hf(root / "sharded", ARGS, state, max_shard_bytes=200)
    save_meta(root / "meta", ARGS, state)
    from llama31.quant.checkpoint import quantize_checkpoint

    save_hf(root / "int4-src", INT4_ARGS, Transformer(INT4_ARGS).state_dict())
    quantize_checkpoint(root / "int4-src", root / "int4", group_size=8, dtype=torch.float32, symmetric=False)
    return {"root": root, "hf": root / "hf", "sharded": root / "sharded", "meta": root / "meta",
            "int4": root / "int4", "candidate": minimal_candidate(), "counter": iter(range(10**6))}


def fresh_copy(bases, name: str) -> Path:
    folder = bases["root"] / f"{name}-{next(bases['counter'])}"
    shutil.copytree(bases[name], folder)
    return folder


def minimal_candidate() -> dict:
    """The smallest valid candidate for the tiny-llama3.1 golden: its own top-5 and continuations, inline."""
    from reference.fileformat import load

    golden = load(GOLDEN)
    results = {}
    for p in golden.prompts:
        r = golden.results[p["name"]]
        results[p["name"]] = {
            "prompt_topk_ids": r.topk_ids[:, :5].tolist(), "prompt_topk_logprobs": r.topk_logprobs[:, :5].tolist(),
            "prompt_lse": [0.0] * len(r.ids) if r.lse is None else r.lse.tolist(),
            "continuation": {"ids": r.gen_ids, "topk_ids": r.gen_topk_ids[:, :5].tolist(),
                             "topk_logprobs": r.gen_topk_logprobs[:, :5].tolist()}}
    return {"format": "llama31-reference", "format_version": 1, "kind": "candidate",
            "producer": {"engine": "fuzz"}, "prompts": [{"name": p["name"], "ids": p["ids"]} for p in golden.prompts],
            "results": results}


def load_any(folder: Path):
    return Transformer.from_pretrained(folder, pack=False)


# ---------------------------------------------------------------------------------------------- configs
def config_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """HF config.json: one key set to a value of the wrong type or range, a key removed, or the whole file
    replaced (v4 and v5 spellings of the RoPE settings)."""
    sizes = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    rope_keys = {"factor": ([0.5, 0, -1.0, NAN, INF, "8", True, [], None], [1, 2.0, 32]),
                 "low_freq_factor": ([0, -1.0, NAN, INF, 4.0, 5, "1", None], [0.5, 2]),
                 "high_freq_factor": ([1.0, 0.5, NAN, INF, -4, "4", None], [2, 100]),
                 "original_max_position_embeddings": ([0, -1, 2.5, NAN, "8", True, 10**30, None], [1, 16, 8192]),
                 "rope_type": (["yarn", "linear", 5, "LLAMA3", [], DELETE], ["default"])}
    plain = {"num_key_value_heads": (NOT_SIZES + [2, 3], [None]),
             "head_dim": (NOT_SIZES + [3, 4, 2**20], [None, 2]),
             "max_position_embeddings": (NOT_SIZES + [2**21], [1, 7, 1000, 2**20]),
             "rms_norm_eps": (NOT_POSITIVE, [None, 1e-6, 1e-3, 1, 5]),
             "rope_theta": (NOT_POSITIVE + [1, 0.5], [None, 2, 10000.0, 1e9]),
             "tie_word_embeddings": (NOT_BOOLS, [False, None]),
             "hidden_act": ([None, "gelu", 5, [], "SILU"], ["silu"]),
             "attention_bias": ([True, "false", 1, []], [False, None]),
             "mlp_bias": ([True, "true", 1.0], [False, None]),
             "rope_scaling": ([5, "llama3", [], True], [None]),
             "rope_parameters": ([5, "llama3", [1]], [])}
    files = [b"", b"{", b"[]", b'"config"', b"null", b"\xff\xfe{}", b"[" * 10_000 + b"]" * 10_000,
             b'{"hidden_size": 1' + b"0" * 5000 + b"}", b"NaN", b"{\"hidden_size\": 4} trailing"]
    cases = []
    for i in range(n):
        v5 = rng.random() < 0.5

        def base(config, v5=v5):
            if v5:  # transformers v5 spelling: rope_theta and the scaling inside rope_parameters
                config["rope_parameters"] = {**config.pop("rope_scaling"), "rope_theta": config.pop("rope_theta")}
            return config

        what = rng.random()
        if what < 0.45:
            key = rng.choice(sizes)
            value = rng.choice(NOT_SIZES + [3, 5, 64, 2**31 - 1])
            edit, label, must_fail = (lambda c, k=key, v=value: c.__setitem__(k, v)), f"{key} = {value!r}", True
        elif what < 0.7:
            key = rng.choice(sorted(plain))
            bad, good = plain[key]
            fail = rng.random() < 0.8 or not good
            value = rng.choice(bad if fail else good)

            def edit(c, k=key, v=value):
                # v5 keeps rope_theta inside rope_parameters: that is the value read
                (c["rope_parameters"] if k == "rope_theta" and "rope_parameters" in c else c)[k] = v
            label, must_fail = f"{key} = {value!r}", fail
        elif what < 0.85:
            key = rng.choice(sorted(rope_keys))
            bad, good = rope_keys[key]
            fail = rng.random() < 0.8
            value = rng.choice(bad if fail else good)

            def edit(c, k=key, v=value):
                rope = c["rope_parameters" if "rope_parameters" in c else "rope_scaling"]
                if v is DELETE:
                    rope.pop("rope_type")
                else:
                    rope[k] = v
            label, must_fail = f"rope {key} = {value!r}", fail
        elif what < 0.93:
            key = rng.choice(sizes + ["rope_scaling", "vocab_size", "num_key_value_heads", "head_dim"])
            edit, label = (lambda c, k=key: c.pop(k, None)), f"without {key}"
            must_fail = key in sizes[:4]
        else:
            raw = rng.choice(files)
            cases.append(_file_case(bases, "hf", "config.json", raw, f"config.json = {raw[:20]!r}..."))
            continue
        cases.append(_config_case(bases, "hf", "config.json", lambda c, e=edit, b=base: e(b(c)), label, must_fail))
    return cases


def params_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """Meta params.json: as config_cases, with Meta's keys (the FFN size rule, use_scaled_rope, the factor)."""
    keys = {"dim": NOT_SIZES + [8, 6], "n_layers": NOT_SIZES + [2, 10**9], "n_heads": NOT_SIZES + [4, 3],
            "n_kv_heads": NOT_SIZES + [2], "vocab_size": [v for v in NOT_SIZES if v != -1] + [17],
            "multiple_of": NOT_SIZES, "ffn_dim_multiplier": NOT_POSITIVE + [1e300, 1e-9],
            "norm_eps": NOT_POSITIVE, "rope_theta": NOT_POSITIVE + [1],
            "use_scaled_rope": NOT_BOOLS, "rope_scaling_factor": NOT_POSITIVE + [0.5],
            "max_seq_len": NOT_SIZES + [2**21], "head_dim": NOT_SIZES + [3, 8],
            "tie_word_embeddings": NOT_BOOLS, "rope_scaling": [5, "x", [], {"factor": 0.5}, {"bogus": 1},
                                                               {"low_freq_factor": 4.0}]}
    valid = {"rope_theta": [2, 1e6], "norm_eps": [1e-6], "max_seq_len": [1, 64], "use_scaled_rope": [False],
             "rope_scaling_factor": [1, 32]}
    cases = []
    for i in range(n):
        key = rng.choice(sorted(keys))
        if rng.random() < 0.1:
            edit, label, must_fail = (lambda p, k=key: p.pop(k, None)), f"without {key}", key in ("dim", "n_layers",
                                                                                                   "n_heads")
        else:
            fail = key not in valid or rng.random() < 0.8
            value = rng.choice(keys[key] if fail else valid[key])
            edit, label, must_fail = (lambda p, k=key, v=value: p.__setitem__(k, v)), f"{key} = {value!r}", fail
            if key == "rope_scaling_factor":
                def edit(p, v=value):  # read only where no rope_scaling object says more
                    p.pop("rope_scaling", None)
                    p.update(use_scaled_rope=True, rope_scaling_factor=v)
        cases.append(_config_case(bases, "meta", "params.json", edit, label, must_fail))
    return cases


def int4_config_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """quantization_config of an INT4 (compressed-tensors, asymmetric) folder, and its per-layer tensors."""
    def group(c):
        return c["quantization_config"]["config_groups"]["group_0"]

    edits = [
        ("quantization_config = 5", lambda c: c.__setitem__("quantization_config", 5)),
        ("quantization_config = []", lambda c: c.__setitem__("quantization_config", [])),
        ("quant_method = awq", lambda c: c["quantization_config"].__setitem__("quant_method", "awq")),
        ("format = int-quantized", lambda c: c["quantization_config"].__setitem__("format", "int-quantized")),
        ("config_groups = []", lambda c: c["quantization_config"].__setitem__("config_groups", [])),
        ("config_groups = {}", lambda c: c["quantization_config"].__setitem__("config_groups", {})),
        ("group = 5", lambda c: c["quantization_config"]["config_groups"].__setitem__("group_0", 5)),
        ("weights = []", lambda c: group(c).__setitem__("weights", [1])),
        ("ignore = 'lm_head'", lambda c: c["quantization_config"].__setitem__("ignore", "lm_head")),
        ("ignore = [5]", lambda c: c["quantization_config"].__setitem__("ignore", [5])),
        ("symmetric = true (zero points stored)", lambda c: group(c)["weights"].__setitem__("symmetric", True)),
    ]
    for key, values in {"group_size": ["8", 8.5, True, None, 0, -8, 16, 3, 2**40, NAN],
                        "num_bits": [8, "4", 4.5, True], "symmetric": ["false", 0, 1.0],
                        "strategy": ["channel", None, 5], "actorder": ["dynamic", 5, []],
                        "type": ["float", 4]}.items():
        edits += [(f"weights.{key} = {v!r}", lambda c, k=key, v=v: group(c)["weights"].__setitem__(k, v))
                  for v in values]
    tensor_edits = [
        ("weight_shape of 3 entries", "weight_shape", lambda t: torch.tensor([8, 8, 8])),
        ("weight_shape of 1 entry", "weight_shape", lambda t: torch.tensor([8])),
        ("weight_shape float", "weight_shape", lambda t: t.float()),
        ("weight_shape wrong N", "weight_shape", lambda t: t + 8),
        ("weight_scale int", "weight_scale", lambda t: t.to(torch.int32)),
        ("weight_packed 1-D", "weight_packed", lambda t: t.flatten()),
        ("weight_packed int64", "weight_packed", lambda t: t.long()),
        ("weight_zero_point removed", "weight_zero_point", None),
        ("weight_zero_point float", "weight_zero_point", lambda t: t.float()),
    ]
    cases = []
    for i in range(n):
        if rng.random() < 0.7:
            label, edit = rng.choice(edits)
            cases.append(_config_case(bases, "int4", "config.json", edit, label, True))
        else:
            label, leaf, change = rng.choice(tensor_edits)
            module = rng.choice(["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj", "mlp.up_proj"])
            cases.append(Case(label, lambda m=module, lf=leaf, ch=change: _load_int4_with(bases, m, lf, ch), True,
                              (str(bases["root"]), "model.layers.0", "weight_")))
    return cases


def _load_int4_with(bases, module, leaf, change):
    folder = fresh_copy(bases, "int4")
    tensors = load_file(folder / "model.safetensors")
    key = f"model.layers.0.{module}.{leaf}"
    if change is None:
        tensors.pop(key)
    else:
        tensors[key] = change(tensors[key])
    save_file(tensors, folder / "model.safetensors")
    return load_any(folder)


def _config_case(bases, base: str, file: str, edit, label: str, must_fail: bool) -> Case:
    def run():
        folder = fresh_copy(bases, base)
        config = json.loads((folder / file).read_text())
        edit(config)
        (folder / file).write_text(json.dumps(config))
        return load_any(folder)

    return Case(f"{base} {file}: {label}", run, must_fail, (str(bases["root"]),))


def _file_case(bases, base: str, file: str, raw: bytes, label: str, must_fail: bool = True) -> Case:
    def run():
        folder = fresh_copy(bases, base)
        (folder / file).write_bytes(raw)
        return load_any(folder)

    return Case(f"{base}: {label}", run, must_fail, (str(bases["root"]),))


# ---------------------------------------------------------------------------------------------- weights
def safetensors_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """model.safetensors bytes: truncated, a wrong header length, a header that is not the tensors' (bad JSON,
    unknown or integer dtypes, offsets out of range, shapes that do not fit), flipped or appended bytes."""
    data = (bases["hf"] / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + length]), data[8 + length:]
    names = [k for k in header if k != "__metadata__"]

    def rebuilt(new_header) -> bytes:
        text = json.dumps(new_header).encode() if not isinstance(new_header, bytes) else new_header
        return struct.pack("<Q", len(text)) + text + body

    cases = []
    for i in range(n):
        what, name = rng.random(), rng.choice(names)
        entry = header[name]
        if what < 0.2:
            cut = rng.randrange(len(data))
            raw, label, fail = data[:cut], f"truncated to {cut} bytes", True
        elif what < 0.3:
            value = rng.choice([0, 1, 7, length - 1, length + 1, len(data), 2**40, 2**64 - 1])
            raw, label, fail = struct.pack("<Q", value) + data[8:], f"header length {value}", True
        elif what < 0.6:
            change = rng.choice([
                ("dtype", rng.choice(["Q9", "", "C64", "I32", "U32", "BOOL", "I8", 5, None])),
                ("shape", rng.choice([[], [1], [3, 3], [-1, 4], [2**40, 2**40], "4", [4.5, 4]])),
                ("data_offsets", rng.choice([[0, 10**12], [8, 4], [-1, 4], [0], "0", [0, 2**64]]))])
            bad = {**header, name: {**entry, change[0]: change[1]}}
            # a dtype of the same width keeps the offsets right and reaches llama31's own dtype check
            raw, label, fail = rebuilt(bad), f"{name}.{change[0]} = {change[1]!r}", True
        elif what < 0.7:
            choice = rng.choice([b"{", b"[]", b"null", b"\xff" * 16, json.dumps({**header, "x": 5}).encode(),
                                 json.dumps({k: v for k, v in header.items() if k != name}).encode()])
            raw, label, fail = rebuilt(choice), f"header {choice[:20]!r}", True
        elif what < 0.85:
            start = rng.randrange(8, 8 + length)
            flipped = bytearray(data)
            flipped[start] ^= 1 << rng.randrange(8)
            raw, label, fail = bytes(flipped), f"header byte {start} flipped", False
        elif what < 0.95:
            flipped = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                flipped[rng.randrange(8 + length, len(data))] = rng.randrange(256)
            raw, label, fail = bytes(flipped), "tensor bytes changed", False
        else:
            raw, label, fail = data + bytes(rng.randrange(1, 64)), "junk appended", False
        cases.append(_file_case(bases, "hf", "model.safetensors", raw, f"model.safetensors {label}", fail))
    return cases


def index_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """model.safetensors.index.json of a sharded folder: weight_map of the wrong type, file names that are
    not files of the folder, a tensor placed in the wrong shard, entries removed or added."""
    index = json.loads((bases["sharded"] / "model.safetensors.index.json").read_text())
    names = sorted(index["weight_map"])
    files = sorted(set(index["weight_map"].values()))
    cases = []
    for i in range(n):
        name = rng.choice(names)
        what = rng.random()
        if what < 0.15:
            value = rng.choice([[], "model.safetensors", 5, None, [["a", "b"]]])
            edit, label = (lambda x, v=value: x.__setitem__("weight_map", v)), f"weight_map = {value!r}"
        elif what < 0.45:
            value = rng.choice([5, None, "", "../model.safetensors", "/etc/passwd", "missing.safetensors",
                                "sub/dir.safetensors", ["x"], "."])
            edit, label = (lambda x, k=name, v=value: x["weight_map"].__setitem__(k, v)), f"{name} -> {value!r}"
        elif what < 0.7:
            other = rng.choice([f for f in files if f != index["weight_map"][name]])
            edit, label = (lambda x, k=name, v=other: x["weight_map"].__setitem__(k, v)), f"{name} in {other}"
        elif what < 0.85:
            edit, label = (lambda x, k=name: x["weight_map"].pop(k)), f"without {name}"
        else:
            extra = rng.choice(["model.vision.weight", "model.layers.9.mlp.up_proj.weight", "lm_head.bias"])
            edit, label = (lambda x, k=extra: x["weight_map"].__setitem__(k, files[0])), f"plus {extra}"
        cases.append(_config_case(bases, "sharded", "model.safetensors.index.json", edit, label, True))
    return cases


def pickle_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """consolidated.00.pth: not a dict, values that are not tensors (all allowed by weights_only), tensors of
    the wrong dtype or shape, names missing or added, damaged bytes."""
    state = torch.load(bases["meta"] / "consolidated.00.pth", weights_only=True)
    names = sorted(state)
    raw_state = (bases["meta"] / "consolidated.00.pth").read_bytes()
    not_tensors = ["str", 5, None, [1, 2], {"w": torch.zeros(2)}, 1.5, (1,)]
    cases = []
    for i in range(n):
        name = rng.choice(names)
        what = rng.random()
        if what < 0.15:
            obj = rng.choice([[torch.zeros(2)], (1, 2), 5, None, "weights", torch.zeros(3), {1: torch.zeros(2)},
                              {"model": dict(state)}])
            make, label = (lambda o=obj: o), f"the whole file = {type(obj).__name__}"
        elif what < 0.4:
            value = rng.choice(not_tensors)
            make, label = (lambda k=name, v=value: {**state, k: v}), f"{name} = {value!r:.30}"
        elif what < 0.65:
            dtype = rng.choice([torch.int32, torch.int64, torch.bool, torch.complex64, torch.uint8, torch.int8])
            make, label = (lambda k=name, d=dtype: {**state, k: state[k].to(d)}), f"{name} as {dtype}"
        elif what < 0.8:
            shape = rng.choice([(), (1,), (3, 3), (2, 2, 2), tuple(s + 1 for s in state[name].shape)])
            make, label = (lambda k=name, s=shape: {**state, k: torch.zeros(s)}), f"{name} of shape {shape}"
        elif what < 0.9:
            extra = rng.choice(["bogus.weight", "layers.5.attention.wq.weight", "rope.freqs"])
            make, label = ((lambda k=name: {n: t for n, t in state.items() if n != k}), f"without {name}") \
                if rng.random() < 0.5 else ((lambda e=extra: {**state, e: torch.zeros(2)}), f"plus {extra}")
        else:
            cut = rng.randrange(len(raw_state))
            garbage = rng.choice([raw_state[:cut], bytes(rng.randrange(256) for _ in range(64)), b""])
            make, label = (lambda g=garbage: g), f"{len(garbage)} damaged bytes"
        cases.append(Case(f"meta consolidated.00.pth: {label}", lambda m=make: _load_meta_with(bases, m()), True,
                          (str(bases["root"]),)))
    return cases


def _load_meta_with(bases, content):
    folder = fresh_copy(bases, "meta")
    if isinstance(content, bytes):
        (folder / "consolidated.00.pth").write_bytes(content)
    else:
        torch.save(content, folder / "consolidated.00.pth")
    return load_any(folder)


# ---------------------------------------------------------------------------------------------- text
def tokenizer_file_cases(bases, rng: random.Random) -> list[Case]:
    """tokenizer.model files: empty, garbage, malformed lines, ranks out of order, a single-byte token missing
    (byte-level BPE could not encode that byte), not a file at all. Each parse of a whole file takes ~0.2 s,
    so these are few and fixed."""
    lines = packaged_tokenizer_path().read_bytes().splitlines()
    byte_a = next(i for i, line in enumerate(lines) if line.split()[0] == b"QQ==")  # the token b"A"
    variants = {
        "empty": b"",
        "garbage": bytes(range(256)) * 4,
        "three fields": b"IQ== 0 extra\n",
        "not base64": b"IQ== 0\n!!! 1\n",
        "rank not a number": b"IQ== 0\nIg== one\n",
        "duplicate token": b"IQ== 0\nIQ== 1\n",
        "rank out of range": b"\n".join(lines[:-1] + [lines[-1].split()[0] + b" 200000"]),
        "single byte missing": b"\n".join(lines[:byte_a] + [b"QUFBQUFBQUFBQUFBQUFBQUFBQQ== " + lines[byte_a].split()[1]]
                                          + lines[byte_a + 1:]),
    }
    cases = []
    for label, raw in variants.items():
        def run(raw=raw, label=label):
            path = bases["root"] / f"tokenizer-{next(bases['counter'])}.model"
            path.write_bytes(raw)
            with _no_warnings():
                return Tokenizer(path)
        cases.append(Case(f"tokenizer.model: {label}", run, True, ("tokenizer-",)))
    for value in (5, 1.5, [], b"tokenizer.model", object()):
        cases.append(Case(f"Tokenizer(path={value!r})", lambda v=value: Tokenizer(v), True, ("Tokenizer", "path")))
    cases.append(Case("Tokenizer(a folder without the file)", lambda: Tokenizer(bases["root"]), True,
                      ("tokenizer.model",)))
    cases.append(Case("Tokenizer(checkpoint_dir=5)", lambda: Tokenizer(checkpoint_dir=5), True, ("checkpoint_dir",)))
    return cases


@contextlib.contextmanager
def _no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


BAD_IDS = [1.5, NAN, INF, "5", None, True, False, [1], b"5", torch.tensor([1, 2]), torch.tensor(1.5),
           torch.tensor(True), np.float64(2.0), np.array([1, 2]), -1, 128256, 10**30, -10**30, object(), 2**63]
GOOD_IDS = [0, 5, 128255, np.int64(7), torch.tensor(9), np.int32(3)]


def id_cases(tokenizer, rng: random.Random, n: int) -> list[Case]:
    """Token ids to decode (Tokenizer.decode, decode_bytes, StreamDecoder.push) and arguments to encode."""
    containers = ["abc", 5, None, torch.zeros(2, 2, dtype=torch.long), np.zeros((2, 2), dtype=np.int64),
                  {1: 2}, torch.tensor([1.0, 2.0]), torch.tensor(5), b"\x01\x02"]
    cases = []
    for i in range(n):
        what = rng.random()
        if what < 0.45:
            ids = [rng.choice(GOOD_IDS) for _ in range(rng.randrange(4))]
            ids.insert(rng.randrange(len(ids) + 1), rng.choice(BAD_IDS))
            call = rng.choice(["decode", "decode_bytes"])
            cases.append(Case(f"Tokenizer.{call}({ids!r:.60})", lambda c=call, x=ids: getattr(tokenizer, c)(x), True,
                              ("Tokenizer.decode", "ids")))
        elif what < 0.6:
            ids = rng.choice(containers)
            cases.append(Case(f"Tokenizer.decode({ids!r:.60})", lambda x=ids: tokenizer.decode(x), True,
                              ("Tokenizer.decode", "ids")))
        elif what < 0.75:
            value = rng.choice(BAD_IDS + GOOD_IDS)
            fail = not any(value is good for good in GOOD_IDS)
            cases.append(Case(f"StreamDecoder.push({value!r:.40})", lambda v=value: StreamDecoder(tokenizer).push(v),
                              fail, ("StreamDecoder.push", "token_id")))
        else:
            key = rng.choice(["text", "bos", "eos", "allowed_special"])
            value = rng.choice({"text": [5, None, b"x", ["a"]], "bos": ["yes", 1, None, []], "eos": ["no", 0, 1.0],
                                "allowed_special": [5, 1.5, "some", ["<|nope|>"], [5], {"<|eot_id|>": 1, 3: 4},
                                                    None, [[1]]]}[key])
            kwargs = {"text": "hello", "bos": True, "eos": False, "allowed_special": "none", key: value}
            cases.append(Case(f"Tokenizer.encode({key}={value!r})", lambda k=kwargs: tokenizer.encode(
                k["text"], bos=k["bos"], eos=k["eos"], allowed_special=k["allowed_special"]), True,
                ("Tokenizer.encode", key)))
    return cases


def chat_cases(tokenizer) -> list[Case]:
    """ChatFormat.encode_dialog_prompt, through the public API only (the chat format has its own tests)."""
    chat = ChatFormat(tokenizer)
    dialogs = ["hello", 5, None, {"role": "user", "content": "hi"}, [5], [None], [{"role": "user"}],
               [{"content": "hi"}], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": 5}],
               [{"role": "user", "content": ["hi"]}], [{"role": "user", "content": "hi", "extra": 1}],
               [{"role": "user", "content": "hi", "tool_call": "x()"}],
               [{"role": "assistant", "content": "", "tool_call": 5}], [["user", "hi"]],
               [{"role": None, "content": ""}]]
    return [Case(f"ChatFormat.encode_dialog_prompt({d!r:.50})", lambda d=d: chat.encode_dialog_prompt(d), True,
                 ("ChatFormat.encode_dialog_prompt",)) for d in dialogs]


# ---------------------------------------------------------------------------------------------- model, generation
def model_input_cases(model, rng: random.Random, n: int) -> list[Case]:
    """Transformer.forward tokens and start_pos, Transformer.setup_cache sizes."""
    tokens = [torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), torch.tensor([[16]]), torch.tensor([[-1]]),
              torch.tensor([1, 2]), torch.zeros(1, 1, 1, dtype=torch.long), [[1, 2]], torch.tensor([[2**40]]),
              torch.zeros(1, 2, dtype=torch.int8), "12", None]
    positions = [-1, 1.5, "0", None, True, 10**30, 31, 2**63]
    sizes = [0, -1, 1.5, "2", None, True, 10**30, 33, 2**31]
    cases = []
    for i in range(n):
        what = rng.random()
        if what < 0.4:
            t = rng.choice(tokens)
            cases.append(Case(f"forward(tokens={t!r:.40})", lambda t=t: model(t), True,
                              ("Transformer.forward", "tokens")))
        elif what < 0.7:
            p = rng.choice(positions)
            cases.append(Case(f"forward(start_pos={p!r})", lambda p=p: model(torch.tensor([[1, 2]]), p), True,
                              ("Transformer.forward", "start_pos", "positions")))
        else:
            key = rng.choice(["max_batch_size", "max_seq_len"])
            # None is the default context, and a batch of 33 is fine
            value = rng.choice([v for v in sizes if not (key == "max_seq_len" and v is None)
                                and not (key == "max_batch_size" and v == 33)])
            cases.append(Case(f"setup_cache({key}={value!r})", lambda k=key, v=value: model.setup_cache(
                **{"max_batch_size": 1, "max_seq_len": 8, k: v}), True, ("Transformer.setup_cache", key)))
    return cases


def sampling_cases(llama, rng: random.Random, n: int) -> list[Case]:
    """Llama.generate / stream / text_completion / chat_completion and sample() with one argument wrong."""
    bad = {"temperature": [NAN, INF, -INF, -0.1, "0.6", None, True, [0.6], 10**400],
           "top_p": [0, 0.0, -0.5, 1.5, NAN, INF, "0.9", None, False],
           "max_gen_len": [0, -1, 1.5, "4", None, True, NAN],
           "prompt_tokens": [[], "hello", [[]], [[1.5]], [["1"]], [[16]], [[-1]], [[True]], 5, [5], [None],
                             [[1]] * 9, torch.tensor([[1, 2]])],
           "stop_tokens": [[1.5], 5, "abc", [None], [True], [-1], [[1]]],
           "seed": [2**64, -2**63 - 1, 1.5, "1", True, [1]],
           "prefill_chunk": [0, -1, 1.5, "2", True],
           "logprobs": ["yes", 1, None], "echo": ["no", 0, None]}
    good = {"temperature": [0, 0.0, 1, 2.5, 1e-30, 1e-300, 100.0], "top_p": [1, 1.0, 0.5, 1e-9],
            "seed": [0, -1, 2**64 - 1, -2**63], "stop_tokens": [[], [1], (2, 3), {4}]}
    cases = []
    for i in range(n):
        key = rng.choice(sorted(bad))
        fail = key not in good or rng.random() < 0.7
        value = rng.choice(bad[key] if fail else good[key])
        call = dict(prompt_tokens=[[1, 2, 3]], max_gen_len=2, temperature=0.6, top_p=0.9, stop_tokens=[],
                    seed=1, prefill_chunk=None, logprobs=False, echo=False)
        call[key] = value
        names = ("Llama", key, "sample")
        entry = rng.random()
        if key == "temperature" and entry < 0.2:
            cases.append(Case(f"sample(temperature={value!r})", lambda v=value: sample(
                torch.zeros(1, 16), v, 0.9, torch.Generator().manual_seed(0)), fail, names))
        elif key in ("temperature", "top_p", "stop_tokens") and entry < 0.4:
            extra = {k: call[k] for k in ("temperature", "top_p", "stop_tokens")}
            what = rng.choice([["hi"], "hi", [5], None])
            cases.append(Case(f"text_completion({what!r}, {key}={value!r})", lambda w=what, x=extra: (
                llama.text_completion(w, max_gen_len=2, **x)), fail or what != ["hi"], names + ("prompts",)))
        elif key == "prompt_tokens" and entry < 0.3:
            cases.append(Case(f"chat_completion({value!r:.40})", lambda v=value: llama.chat_completion(v), True,
                              names + ("dialogs", "ChatFormat")))
        elif entry < 0.6 and key != "echo":
            cases.append(Case(f"stream({key}={value!r:.40})", lambda c=call: list(llama.stream(
                c["prompt_tokens"], c["max_gen_len"], temperature=c["temperature"], top_p=c["top_p"],
                logprobs=c["logprobs"], stop_tokens=c["stop_tokens"], seed=c["seed"],
                prefill_chunk=c["prefill_chunk"])), fail, names))
        else:
            cases.append(Case(f"generate({key}={value!r:.40})", lambda c=call: llama.generate(**c), fail, names))
    return cases


# ---------------------------------------------------------------------------------------------- the checker
def candidate_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """python -m reference.check GOLDEN CANDIDATE (in process): candidates with NaN, inf, strings, booleans,
    fractional ids, wrong shapes, missing fields, broken tensor references or tensors files; damaged goldens;
    tier bounds that are not numbers in range. A malformed file must be named; a wrong one must FAIL."""
    from reference.check import main as check_main

    base = bases["candidate"]
    golden_data = json.loads(GOLDEN.read_text())
    prompt_names = [p["name"] for p in base["prompts"]]
    numbers = [NAN, INF, -INF, "x", True, None, [], {}, 1e400]

    def cand_edit(rng):
        name = rng.choice(prompt_names)
        r = f"results[{name!r}]"
        what = rng.random()
        if what < 0.4:  # a number somewhere in a float array
            field = rng.choice(["prompt_topk_logprobs", "prompt_lse", "continuation.topk_logprobs"])
            value = rng.choice(numbers + [0.5, -3.0])

            def edit(d, field=field, value=value, name=name):
                node = d["results"][name]
                *path, leaf = field.split(".")
                for part in path:
                    node = node[part]
                rows = node[leaf]
                if isinstance(rows[0], list):
                    rows[rng.randrange(len(rows))][rng.randrange(len(rows[0]))] = value
                else:
                    rows[rng.randrange(len(rows))] = value
            return edit, f"{r}.{field} holds {value!r}", True
        if what < 0.6:  # an id somewhere
            field = rng.choice(["prompt_topk_ids", "continuation.ids", "continuation.topk_ids", "prompt ids"])
            value = rng.choice([1.5, "5", True, None, -1, 512, 2**63, NAN, 3.0000001])

            def edit(d, field=field, value=value, name=name):
                if field == "prompt ids":
                    ids = next(p for p in d["prompts"] if p["name"] == name)["ids"]
                    ids[rng.randrange(len(ids))] = value
                    return
                node = d["results"][name]
                *path, leaf = field.split(".")
                for part in path:
                    node = node[part]
                rows = node[leaf]
                if isinstance(rows[0], list):
                    rows[rng.randrange(len(rows))][0] = value
                else:
                    rows[rng.randrange(len(rows))] = value
            return edit, f"{r}.{field} holds {value!r}", True
        if what < 0.75:  # a field of the wrong type or missing
            field = rng.choice(["prompt_topk_ids", "prompt_topk_logprobs", "continuation", "prompt_lse",
                                "last_logits"])
            value = rng.choice(["abc", 5, {}, [[1, 2], [3]], {"tensor": [1]}, {"tensor": 5}, {"tensor": "nope"},
                                [1, 2, 3], None if field != "continuation" else 5])
            optional = value is None and field in ("prompt_lse", "last_logits")
            return (lambda d, f=field, v=value, name=name: d["results"][name].__setitem__(f, v)), \
                f"{r}.{field} = {value!r:.30}", not optional
        if what < 0.85:  # the top level
            key, value = rng.choice([("prompts", "x"), ("prompts", [5]), ("results", []), ("tensors", 5),
                                     ("tensors", []), ("tensors", "missing.safetensors"), ("kind", "golden?"),
                                     ("format_version", True), ("debug", 5), ("debug", {"rope_inv_freq": "x"}),
                                     ("debug", {"layer_summaries": {"prompt": "nope"}}), ("producer", [1]),
                                     ("prompts", [{"name": ["x"], "ids": [1]}])])
            return (lambda d, k=key, v=value: d.__setitem__(k, v)), f"{key} = {value!r:.40}", True
        if what < 0.95:  # a number made wrong but plausible: the checker must FAIL, not pass
            value = rng.choice([-0.5, -50.0])

            def edit(d, value=value, name=name):
                rows = d["results"][name]["prompt_topk_logprobs"]
                rows[rng.randrange(len(rows))][0] += value
            return edit, f"{r} logprob moved by {value}", True
        return (lambda d: d["producer"].update(engine="renamed")), "producer renamed", False

    def golden_edit(rng):
        key, value = rng.choice([("settings.max_new_tokens", [16]), ("settings.max_new_tokens", "16"),
                                 ("settings.top_k", True), ("settings.stop_ids", 5), ("debug", 5), ("debug", []),
                                 ("model.vocab_size", "512"), ("model", 5), ("model.args", 5),
                                 ("prompts.0.ids", "abc"), ("prompts.0.ids", [1.5]), ("tensors", 5),
                                 ("settings.max_new_tokens", 0)])

        def edit(d, key=key, value=value):
            node, parts = d, key.split(".")
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
        return edit, f"golden {key} = {value!r}"

    def run_check(edit=None, golden=None, argv=(), tensors_bytes=None):
        folder = bases["root"] / f"check-{next(bases['counter'])}"
        folder.mkdir()
        cand, gold = json.loads(json.dumps(base)), json.loads(json.dumps(golden_data))
        if edit:
            edit(cand)
        if golden:
            golden(gold)
        golden_path = GOLDEN
        if golden:
            golden_path = folder / "golden.json"
            shutil.copy(GOLDEN.with_suffix(".safetensors"), folder / GOLDEN.with_suffix(".safetensors").name)
            golden_path.write_text(json.dumps(gold))
        if tensors_bytes is not None:
            (folder / "cand.safetensors").write_bytes(tensors_bytes)
            cand["tensors"] = "cand.safetensors"
        (folder / "cand.json").write_text(json.dumps(cand))
        return in_process(check_main, [str(golden_path), str(folder / "cand.json"), *argv])

    names = (str(bases["root"]), str(GOLDEN), "FAIL")
    cases = []
    for i in range(n):
        what = rng.random()
        if what < 0.7:
            edit, label, fail = cand_edit(rng)
            cases.append(Case(f"candidate: {label}", lambda e=edit: run_check(edit=e), fail, names, cli=True))
        elif what < 0.8:
            edit, label = golden_edit(rng)
            cases.append(Case(f"golden: {label}", lambda e=edit: run_check(golden=e), True, names, cli=True))
        elif what < 0.9:
            flag = rng.choice(["--fp32-tol", "--max-kl", "--min-top1"])
            value = rng.choice(["nan", "-1", "inf", "abc", "1e400", "-0.001", "", "2" if flag == "--min-top1" else
                                "-inf"])
            cases.append(Case(f"check {flag} {value!r}", lambda f=flag, v=value: run_check(argv=[f, v]), True,
                              (flag,), cli=True))
        else:
            raw = rng.choice([b"", b"garbage" * 10, struct.pack("<Q", 2**40) + b"{}",
                              struct.pack("<Q", 30) + b'{"a": {"dtype": "F32"}}'])
            cases.append(Case(f"candidate tensors file {raw[:16]!r}", lambda r=raw: run_check(tensors_bytes=r), True,
                              names + ("cand.safetensors",), cli=True))
    cases.append(Case("the unchanged candidate passes", lambda: run_check(), False, names, cli=True))
    return cases


# ---------------------------------------------------------------------------------------------- command lines
def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_cases(bases, rng: random.Random, n: int) -> list[Case]:
    """The command lines in process (python -m llama31.convert, reference.make, examples/quantize.py,
    examples/generate.py's argument checks) with broken folders and arguments; four of them as subprocesses,
    as a user runs them."""
    from llama31.convert import main as convert_main
    from reference.make import main as make_main

    quantize, generate = _example("quantize"), _example("generate")
    broken = {  # a source folder broken in one way each, made on first use
        "config not JSON": lambda f: (f / "config.json").write_text("{"),
        "config hidden_size 'abc'": lambda f: _edit_json(f / "config.json", hidden_size="abc"),
        "weights truncated": lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:100]),
        "a weight of int dtype": lambda f: _edit_tensor(f, "model.norm.weight", lambda t: t.to(torch.int32)),
        "q_proj of the wrong shape": lambda f: _edit_tensor(f, "model.layers.0.self_attn.q_proj.weight",
                                                           lambda t: torch.zeros(3, 4)),
        "n_layers 10**9": lambda f: _edit_json(f / "config.json", num_hidden_layers=10**9),
        "no such folder": lambda f: shutil.rmtree(f),
    }

    def source(kind):
        folder = fresh_copy(bases, "hf")
        broken[kind](folder)
        return str(folder)

    def out():
        return str(bases["root"] / f"out-{next(bases['counter'])}")

    def existing():
        folder = bases["root"] / f"full-{next(bases['counter'])}"
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
        return str(folder)

    commands = [
        ("convert", lambda k: in_process(convert_main, [source(k), out(), "--to", rng.choice(["hf", "meta"])])),
        ("quantize", lambda k: in_process(quantize.main, ["--ckpt-dir", source(k), "--out", out(),
                                                          "--group-size", "32"])),  # too large for dim 4
        ("make", lambda k: in_process(make_main, ["--ckpt-dir", source(k), "--out", out() + "/g.json",
                                                  "--cross-check", "off"])),
    ]
    bad_args = [
        (convert_main, lambda: [str(bases["hf"]), out(), "--to", "onnx"], ("--to",)),
        (convert_main, lambda: [str(bases["hf"]), out(), "--to", "meta", "--shards", "-1"], ("--shards",)),
        (convert_main, lambda: [str(bases["hf"]), out(), "--to", "meta", "--shards", "x"], ("--shards",)),
        (convert_main, lambda: [str(bases["hf"]), out(), "--to", "meta", "--shards", "3"], ("3",)),
        (convert_main, lambda: [str(bases["hf"]), out(), "--to", "hf", "--dtype", "int8"], ("--dtype",)),
        (convert_main, lambda: [str(bases["hf"]), existing(), "--to", "hf"], ("not empty",)),
        (make_main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--top-k", "0"], ("top_k",)),
        (make_main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--threads", "0"], ("threads",)),
        (make_main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--max-new-tokens", "-1"],
         ("max_new_tokens",)),
        (make_main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--device", "gpu9"], ("device",)),
        (make_main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--top-k", "x"], ("--top-k",)),
        (quantize.main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", out(), "--group-size", "7"],
         ("--group-size",)),
        (quantize.main, lambda: ["--ckpt-dir", str(bases["hf"]), "--out", existing()], ("not empty",)),
        (quantize.main, lambda: ["--ckpt-dir", str(bases["int4"]), "--out", out()], ("already quantized",)),
    ]
    generate_args = [["--temperature", "nan"], ["--temperature", "inf"], ["--temperature", "-1"],
                     ["--top-p", "nan"], ["--top-p", "0"], ["--seed", str(2**70)], ["--max-new-tokens", "0"],
                     ["--max-seq-len", "0"], ["--max-seq-len", "8", "--max-new-tokens", "8"],
                     ["--prefill-chunk", "0"], ["--temperature", "x"], ["--group-size", "7"]]
    cases = []
    for i in range(n):
        what = rng.random()
        if what < 0.45:
            name, command = rng.choice(commands)
            kind = rng.choice(sorted(broken))
            cases.append(Case(f"{name}: source with {kind}", lambda c=command, k=kind: c(k), True,
                              (str(bases["root"]),), cli=True))
        elif what < 0.75:
            main, argv, expect = rng.choice(bad_args)
            cases.append(Case(f"{main.__module__} {argv()[-2:]}", lambda m=main, a=argv: in_process(m, a()), True,
                              expect, cli=True))
        else:
            argv = rng.choice(generate_args)
            cases.append(Case(f"generate.py {argv}", lambda a=argv: in_process(generate.parse_args, a), True,
                              (argv[0],), cli=True))
    return cases


def subprocess_cases(bases, real_vocab_folder) -> list[Case]:
    """A handful as a user runs them: a non-zero exit, one line, no traceback."""
    def broken_source():
        folder = fresh_copy(bases, "hf")
        (folder / "model.safetensors").write_bytes(b"\x00" * 16)
        return str(folder)

    cand = bases["root"] / "nan-bounds.json"
    cand.write_text(json.dumps(bases["candidate"]))
    return [
        Case("python -m llama31.convert <damaged weights>", lambda: as_subprocess(
            ["-m", "llama31.convert", broken_source(), str(bases["root"] / "never"), "--to", "hf"]), True,
            ("model.safetensors",), cli=True, seconds=SUBPROCESS_SECONDS),
        Case("python -m reference.check --max-kl nan --min-top1 nan", lambda: as_subprocess(
            ["-m", "reference.check", str(GOLDEN), str(cand), "--tier", "int4", "--max-kl", "nan", "--min-top1",
             "nan"]), True, ("--max-kl", "--min-top1"), cli=True, seconds=SUBPROCESS_SECONDS),
        Case("examples/generate.py --temperature nan", lambda: as_subprocess(
            [str(REPO / "examples" / "generate.py"), "--temperature", "nan"]), True, ("--temperature",), cli=True,
            seconds=SUBPROCESS_SECONDS),
        Case("examples/generate.py: prompt + --max-new-tokens beyond the context", lambda: as_subprocess(
            [str(REPO / "examples" / "generate.py"), "--ckpt-dir", str(real_vocab_folder), "--prompt",
             "Once upon a time", "--max-new-tokens", "100", "--temperature", "0"]), True, ("context",), cli=True,
            seconds=SUBPROCESS_SECONDS),
    ]


def _edit_json(file: Path, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def _edit_tensor(folder: Path, name: str, change):
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = change(tensors[name])
    save_file(tensors, folder / "model.safetensors")


# ---------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer()


@pytest.fixture(scope="module")
def llama(bases, tokenizer):
    return Llama(load_any(bases["hf"]), tokenizer, max_batch_size=8)


@pytest.fixture(scope="module")
def real_vocab_folder(tmp_path_factory):
    """The real 128256-token vocabulary (examples/generate.py needs the tokenizer's) at dim 2, tied: 257K
    parameters, almost all of them the embedding; a context of 16 positions."""
    args = ModelArgs(dim=2, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=128256, hidden_dim=2, max_seq_len=16,
                     tie_word_embeddings=True, rope_scaling=None)
    folder = tmp_path_factory.mktemp("real-vocab")
    save_hf(folder, args, Transformer(args).state_dict())
    return folder


def all_cases(kind, bases, tokenizer, llama, real_vocab_folder) -> list[Case]:
    rng = random.Random(f"llama31-fuzz-{kind}")  # a fixed seed per kind: every run tries the same inputs
    make = {
        "configs": lambda: config_cases(bases, rng, 220),
        "params": lambda: params_cases(bases, rng, 120),
        "int4-configs": lambda: int4_config_cases(bases, rng, 60),
        "safetensors": lambda: safetensors_cases(bases, rng, 150),
        "indexes": lambda: index_cases(bases, rng, 50),
        "pickles": lambda: pickle_cases(bases, rng, 90),
        "tokenizer-files": lambda: tokenizer_file_cases(bases, rng),
        "ids": lambda: id_cases(tokenizer, rng, 150),
        "chat": lambda: chat_cases(tokenizer),
        "model-inputs": lambda: model_input_cases(llama.model, rng, 50),
        "sampling": lambda: sampling_cases(llama, rng, 150),
        "candidates": lambda: candidate_cases(bases, rng, 150),
        "command-lines": lambda: cli_cases(bases, rng, 60),
        "subprocesses": lambda: subprocess_cases(bases, real_vocab_folder),
    }
    return make[kind]()


KINDS = ["configs", "params", "int4-configs", "safetensors", "indexes", "pickles", "tokenizer-files", "ids",
         "chat", "model-inputs", "sampling", "candidates", "command-lines", "subprocesses"]


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_inputs_end_in_a_clear_error(kind, bases, tokenizer, llama, real_vocab_folder):
    cases = all_cases(kind, bases, tokenizer, llama, real_vocab_folder)
    failures = [f"{case.label}: {problem}" for case in cases if (problem := judge(case)) is not None]
    assert not failures, f"{len(failures)} of {len(cases)} {kind} cases:\n" + "\n".join(failures[:40])


def test_the_fuzz_tries_over_a_thousand_inputs(bases, tokenizer, llama, real_vocab_folder):
    counts = {kind: len(all_cases(kind, bases, tokenizer, llama, real_vocab_folder)) for kind in KINDS}
    assert sum(counts.values()) >= 1000, counts
