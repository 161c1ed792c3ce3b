"""Golden and candidate files: one JSON file, plus an optional safetensors file for its large arrays.

Every array in the JSON is either inline (nested lists of numbers) or a reference {"tensor": "KEY"} to the
tensor KEY in the safetensors file that the top-level "tensors" field names (a path relative to the JSON).
A golden puts its float arrays in safetensors (exact float32 bits, compact); a candidate may do either.
reference/README.md describes every field; this module reads, validates and writes them.

validate() turns a loaded file into a Doc: per prompt a Result with numpy arrays whose shapes have been
checked against the golden, top-k rows sorted by descending logprob. Anything malformed raises FormatError
with the field, the expected and actual shape, and what to do.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llama31.checkpoints.atomic import atomic_file

FORMAT = "llama31-reference"
FORMAT_VERSION = 1
MIN_TOP_K = 5  # vLLM's rule looks at the top 5


class FormatError(ValueError):
    """A golden or candidate file that does not follow the format."""


@dataclass
class Result:
    """One prompt's outputs, as validated numpy arrays. n: prompt length, k: top-k, g: generated tokens."""

    name: str
    ids: list[int]                     # the prompt ids the engine fed
    topk_ids: np.ndarray               # (n, k) int64: row i is the distribution after prompt token i
    topk_logprobs: np.ndarray          # (n, k) float64, each row descending
    gen_ids: list[int]                 # greedy continuation, stop token included
    gen_topk_ids: np.ndarray           # (g, k): step j is the distribution that chose gen_ids[j]
    gen_topk_logprobs: np.ndarray      # (g, k)
    stop_reason: str | None = None
    lse: np.ndarray | None = None      # (n,) optional
    last_logits: np.ndarray | None = None  # (vocab,) optional: the full logits of the last prompt position
    text: str | None = None


@dataclass
class Doc:
    path: Path
    kind: str
    producer: dict
    settings: dict
    prompts: list[dict]
    results: dict[str, Result]
    debug: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- reading
def load_json(path) -> dict:
    """The JSON of a golden or candidate with every {"tensor": KEY} replaced by the array from its safetensors."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, or an integer too long to convert
        raise FormatError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise FormatError(f"{path}: not valid JSON (nested too deeply to read)") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(f"{path}: not a {FORMAT} file (its top-level \"format\" field must be {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION or isinstance(data.get("format_version"), bool):
        raise FormatError(f"{path}: format_version {data.get('format_version')!r}; this checker reads version "
                          f"{FORMAT_VERSION}")
    tensors = {}
    if data.get("tensors") is not None:
        if not isinstance(data["tensors"], str) or not data["tensors"]:
            raise FormatError(f"{path}: \"tensors\" must be the name of a safetensors file beside it (a string), "
                              f"got {data['tensors']!r}")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        file = path.parent / data["tensors"]
        if not file.is_file():
            raise FormatError(f"{path}: its \"tensors\" field names {file}, which does not exist")
        try:
            tensors = load_file(file)
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise FormatError(f"{file} (the \"tensors\" file of {path}): cannot be read as safetensors "
                              f"({type(e).__name__}: {e}); write it with safetensors' save_file") from None
    return resolve_tensors(data, tensors, str(path))


def resolve_tensors(data: dict, tensors: dict[str, np.ndarray], where: str) -> dict:
    """data with every {"tensor": KEY} replaced by tensors[KEY]."""

    def resolve(node, at):
        if isinstance(node, dict):
            if set(node) == {"tensor"}:
                if not isinstance(node["tensor"], str):
                    raise FormatError(f"{where}: {at} is a tensor reference whose key is {node['tensor']!r}; "
                                      "write {\"tensor\": \"KEY\"} with the key of a tensor in the safetensors file")
                if node["tensor"] not in tensors:
                    file = data.get("tensors") or "any file (the JSON has no \"tensors\" field)"
                    raise FormatError(f"{where}: {at} refers to tensor {node['tensor']!r}, which is not in {file}")
                return tensors[node["tensor"]]
            return {k: resolve(v, f"{at}.{k}" if at else k) for k, v in node.items()}
        if isinstance(node, list) and any(isinstance(v, dict) for v in node):
            return [resolve(v, f"{at}[{i}]") for i, v in enumerate(node)]
        return node

    return resolve(data, "")


def load(path, golden: Doc | None = None) -> Doc:
    """Read and validate a file. Without `golden` the file must be a complete golden; with it, a candidate
    (or another golden) whose prompts and shapes are checked against that golden."""
    return validate(load_json(path), Path(path), golden)


def validate(data: dict, path: Path, golden: Doc | None) -> Doc:
    where = str(path)
    kind = data.get("kind")
    if kind not in ("golden", "candidate"):
        raise FormatError(f"{where}: \"kind\" must be \"golden\" or \"candidate\", got {kind!r}")
    if golden is None and kind != "golden":
        raise FormatError(f"{where}: expected a golden (kind \"golden\"), got a {kind}; "
                          "usage: python -m reference.check GOLDEN CANDIDATE")
    prompts = _require(data, "prompts", list, where)
    results = _require(data, "results", dict, where)
    for key in ("producer", "provenance", "model", "settings", "debug"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            raise FormatError(f"{where}: \"{key}\" must be an object {{...}}, got {type(data[key]).__name__}")
    names = []
    for i, p in enumerate(prompts):
        if not isinstance(p, dict) or "name" not in p or "ids" not in p:
            raise FormatError(f"{where}: prompts[{i}] must be an object with \"name\" and \"ids\" (copy them "
                              "from the golden)")
        if not isinstance(p["name"], str) or p["name"] in names:
            raise FormatError(f"{where}: prompts[{i}].name must be a string that no other prompt has, got "
                              f"{p['name']!r}")
        names.append(p["name"])
    settings = data.get("settings") or {}
    if golden is None:
        _require(settings, "top_k", int, f"{where}: settings")
        max_new = _require(settings, "max_new_tokens", int, f"{where}: settings")
        stop_ids = _require(settings, "stop_ids", list, f"{where}: settings")
        vocab_size = _require(_require(data, "model", dict, where), "vocab_size", int, f"{where}: model")
        model_args = data["model"].get("args")
        if model_args is not None and (not isinstance(model_args, dict) or any(
                isinstance(model_args.get(k), bool) or not isinstance(model_args.get(k, 1), (int, float))
                for k in ("rope_theta", "head_dim"))):
            raise FormatError(f"{where}: model.args must be an object whose rope_theta and head_dim are numbers")
        if vocab_size < 1 or max_new < 1 or settings["top_k"] < MIN_TOP_K:
            raise FormatError(f"{where}: model.vocab_size and settings.max_new_tokens must be >= 1 and settings.top_k "
                              f">= {MIN_TOP_K}; got {vocab_size}, {max_new}, {settings['top_k']}")
        _in_vocab(_array(stop_ids, f"{where}: settings.stop_ids", np.int64, ndim=1), vocab_size,
                  f"{where}: settings.stop_ids")
        checked = []
        for i, p in enumerate(prompts):
            ids = _array(p["ids"], f"{where}: prompts[{i}].ids", np.int64, ndim=1)
            if not ids.size:
                raise FormatError(f"{where}: prompts[{i}].ids is empty; a prompt has at least one token")
            _in_vocab(ids, vocab_size, f"{where}: prompts[{i}].ids")
            checked.append({**p, "ids": ids.tolist()})
        prompts = checked
    else:
        vocab_size = golden.model["vocab_size"]
        max_new = golden.settings["max_new_tokens"]
        expected = [p["name"] for p in golden.prompts]
        missing = [n for n in expected if n not in names]
        if missing:
            raise FormatError(f"{where}: no prompt {missing[0]!r} in \"prompts\" ({len(missing)} of the golden's "
                              f"{len(expected)} prompts missing: {missing[:5]}); a candidate answers every prompt")
        by_name = {p["name"]: p for p in prompts}
        for g in golden.prompts:
            _check_same_ids(g["ids"], by_name[g["name"]]["ids"], g["name"], where)
    parsed = {}
    for p in prompts:
        name = p["name"]
        if name not in results:
            raise FormatError(f"{where}: \"results\" has no entry for prompt {name!r}")
        ids = _array(p["ids"], f"{where}: prompt {name!r} ids", np.int64, ndim=1).tolist()
        parsed[name] = _result(name, ids, results[name], vocab_size, max_new, where)
    return Doc(path=path, kind=kind, producer=data.get("producer") or {}, settings=settings, prompts=prompts,
               results=parsed, debug=_debug(data.get("debug") or {}, prompts, where),
               provenance=data.get("provenance") or {}, model=data.get("model") or {})


def _check_same_ids(golden_ids, ids, name, where) -> None:
    ids = _array(ids, f"{where}: prompt {name!r} ids", np.int64, ndim=1).tolist()
    if ids == list(golden_ids):
        return
    if len(ids) != len(golden_ids):
        raise FormatError(f"{where}: prompt {name!r} has {len(ids)} ids, the golden's has {len(golden_ids)}; feed "
                          "the golden's ids unchanged (no re-tokenizing, no extra <|begin_of_text|>)")
    i = next(i for i, (a, b) in enumerate(zip(golden_ids, ids)) if a != b)
    raise FormatError(f"{where}: prompt {name!r} differs from the golden's ids at index {i} (golden {golden_ids[i]}, "
                      f"candidate {ids[i]}); feed the golden's ids unchanged")


def _result(name, ids, r, vocab_size, max_new, where) -> Result:
    at = f"{where}: results[{name!r}]"
    if not isinstance(r, dict):
        raise FormatError(f"{at} must be an object")
    n = len(ids)
    topk_ids, topk_lp = _topk(r, "prompt_", n, f"{at}", "one row per prompt position", vocab_size)
    cont = _require(r, "continuation", dict, at)
    gen_ids = [int(t) for t in _array(_require(cont, "ids", (list, np.ndarray), f"{at}.continuation"),
                                      f"{at}.continuation.ids", np.int64, ndim=1)]
    if not 1 <= len(gen_ids) <= max_new:
        raise FormatError(f"{at}.continuation.ids has {len(gen_ids)} tokens; expected 1 to max_new_tokens = "
                          f"{max_new} (greedy, stopping after a stop token)")
    _in_vocab(np.asarray(gen_ids), vocab_size, f"{at}.continuation.ids")
    gen_topk_ids, gen_topk_lp = _topk(cont, "", len(gen_ids), f"{at}.continuation",
                                      "one row per generated token", vocab_size)
    lse = _optional(r, "prompt_lse", at, (n,))
    last = _optional(r, "last_logits", at, (vocab_size,))
    for key in ("stop_reason", "text"):
        if cont.get(key) is not None and not isinstance(cont[key], str):
            raise FormatError(f"{at}.continuation.{key} must be a string, got {type(cont[key]).__name__}")
    return Result(name, ids, topk_ids, topk_lp, gen_ids, gen_topk_ids, gen_topk_lp,
                  stop_reason=cont.get("stop_reason"), lse=lse, last_logits=last, text=cont.get("text"))


def _topk(node, prefix, rows, at, what, vocab_size):
    """(ids, logprobs) of a top-k pair of fields, rows sorted by descending logprob.

    logprobs may instead be given as {prefix}topk_logits with {prefix}lse (log-sum-exp): logprob = logit - lse.
    """
    ids = _array(_require(node, f"{prefix}topk_ids", (list, np.ndarray), at), f"{at}.{prefix}topk_ids",
                 np.int64, ndim=2)
    if f"{prefix}topk_logprobs" in node:
        lp = _array(node[f"{prefix}topk_logprobs"], f"{at}.{prefix}topk_logprobs", np.float64, ndim=2)
    elif f"{prefix}topk_logits" in node and f"{prefix}lse" in node:
        lse = _array(node[f"{prefix}lse"], f"{at}.{prefix}lse", np.float64, ndim=1)
        lp = _array(node[f"{prefix}topk_logits"], f"{at}.{prefix}topk_logits", np.float64, ndim=2)
        if lse.shape != (lp.shape[0],):
            raise FormatError(f"{at}.{prefix}lse has shape {lse.shape}, expected ({lp.shape[0]},)")
        lp = lp - lse[:, None]
    else:
        raise FormatError(f"{at} has no \"{prefix}topk_logprobs\" (or \"{prefix}topk_logits\" with "
                          f"\"{prefix}lse\")")
    if ids.shape[0] != rows or ids.shape != lp.shape:
        raise FormatError(f"{at}.{prefix}topk_ids / {prefix}topk_logprobs have shapes {ids.shape} / {lp.shape}; "
                          f"expected ({rows}, k): {what}, the same k in both")
    if ids.shape[1] < MIN_TOP_K:
        raise FormatError(f"{at}.{prefix}topk_ids has k = {ids.shape[1]}; give at least the top {MIN_TOP_K} "
                          "(20 recommended)")
    _in_vocab(ids, vocab_size, f"{at}.{prefix}topk_ids")
    order = np.argsort(-np.nan_to_num(lp, nan=-np.inf), axis=1, kind="stable")
    return np.take_along_axis(ids, order, 1), np.take_along_axis(lp, order, 1)


def _optional(node, key, at, shape):
    if node.get(key) is None:
        return None
    a = _array(node[key], f"{at}.{key}", np.float64, ndim=len(shape))
    if a.shape != shape:
        raise FormatError(f"{at}.{key} has shape {a.shape}, expected {shape}")
    return a


def _array(value, at, dtype, ndim):
    """value as a numpy array of dtype (np.int64 for ids, np.float64 for numbers) with ndim dimensions.

    Only numbers pass: strings, booleans and complex values are refused (numpy would convert "5" and True),
    ids must be integers (5.0 passes, 5.5 would be truncated and is refused), and every number must be finite:
    a NaN compares false with every bound, so a file holding one could pass any check.
    """
    try:
        if isinstance(value, list) and _holds_bool(value):
            raise ValueError("it holds true or false")
        a = np.asarray(value)
        if a.size and a.dtype.kind not in "iuf":
            raise ValueError(f"it holds {a.dtype.name if a.dtype != object else 'ragged rows or non-numbers'}")
    except (ValueError, TypeError) as e:
        raise FormatError(f"{at}: not a numeric array ({e})") from None
    if a.ndim != ndim:
        raise FormatError(f"{at} has {a.ndim} dimension(s) (shape {a.shape}); expected {ndim}")
    if a.size and a.dtype.kind == "f" and not np.isfinite(a).all():
        index = tuple(int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise FormatError(f"{at} holds {a[index]} at {list(index)}; every number must be finite")
    if np.issubdtype(dtype, np.integer) and a.size:
        if a.dtype.kind == "f":  # bounds as floats: 2**63 - 1 is not a float64, 2**63 is
            bad = (a != np.round(a)) | (a < -2.0**63) | (a >= 2.0**63)
        else:
            bad = a > np.iinfo(np.int64).max if a.dtype.kind == "u" else np.zeros(a.shape, dtype=bool)
        if bad.any():
            raise FormatError(f"{at} holds values that are not token ids (integers): {a[bad].ravel()[:5].tolist()}")
    return a.astype(dtype)


def _holds_bool(node: list) -> bool:
    """Whether nested lists hold a boolean (numpy would read [1, true] as [1, 1])."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, bool):
            return True
        if isinstance(item, list):
            stack.extend(item)
    return False


def _in_vocab(ids, vocab_size, at):
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)].ravel()[:5].tolist()
        raise FormatError(f"{at} holds token ids outside 0..{vocab_size - 1}: {bad}")


def _require(node, key, types, at):
    if not isinstance(node, dict) or key not in node:
        raise FormatError(f"{at} has no \"{key}\" field")
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(node[key], types) or (isinstance(node[key], bool) and bool not in types):
        raise FormatError(f"{at}: \"{key}\" has the wrong type ({type(node[key]).__name__}); expected "
                          f"{' or '.join(t.__name__ for t in types)}")
    return node[key]


def _debug(debug: dict, prompts: list[dict], where: str) -> dict:
    """debug's optional arrays checked (the report compares them): rope_inv_freq (head_dim/2,) and
    layer_summaries {"prompt": a prompt's name, "layers": [names], "mean" / "std" / "l2": (layers + 1, n)}."""
    debug = dict(debug)
    if debug.get("rope_inv_freq") is not None:
        debug["rope_inv_freq"] = _array(debug["rope_inv_freq"], f"{where}: debug.rope_inv_freq", np.float64, ndim=1)
    summaries = debug.get("layer_summaries")
    if summaries is not None:
        at = f"{where}: debug.layer_summaries"
        if not isinstance(summaries, dict) or summaries.get("prompt") not in [p["name"] for p in prompts]:
            raise FormatError(f"{at} must be an object whose \"prompt\" names a prompt of the file")
        arrays = {key: _array(_require(summaries, key, (list, np.ndarray), at), f"{at}.{key}", np.float64, ndim=2)
                  for key in ("mean", "std", "l2")}
        if len({a.shape for a in arrays.values()}) != 1:
            raise FormatError(f"{at}: mean, std and l2 must have one shape (layers + 1, n), got "
                              f"{[a.shape for a in arrays.values()]}")
        layers = summaries.get("layers")
        if layers is not None and (not isinstance(layers, list) or not all(isinstance(n, str) for n in layers)
                                   or len(layers) != arrays["mean"].shape[0]):
            raise FormatError(f"{at}.layers must list one name per row of mean ({arrays['mean'].shape[0]}), got "
                              f"{layers!r:.80}")
        debug["layer_summaries"] = {**summaries, **arrays}
    return debug


# ---------------------------------------------------------------------------------------------- writing
class Tensors:
    """Collects the arrays of a file being written: put() stores one and returns its {"tensor": KEY} reference."""

    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def put(self, key: str, array: np.ndarray) -> dict:
        if key in self.arrays:
            raise ValueError(f"tensor {key!r} written twice")
        self.arrays[key] = np.ascontiguousarray(array)
        return {"tensor": key}


def save(path, data: dict, tensors: Tensors | None = None) -> None:
    """Write `data` as JSON to path and, if there are tensors, path with suffix .safetensors beside it.

    The bytes depend only on the contents: keys keep their insertion order, floats are written with repr
    (which reads back to the same float), the safetensors header lists tensors in a fixed order.
    Both files are written under temporary names and renamed when complete, the safetensors file first: a
    failed or interrupted save leaves the previous files (or none) in place, never a half-written one.
    """
    path = Path(path)
    data = dict(data)
    arrays = tensors.arrays if tensors is not None else {}
    tensors_path = path.with_suffix(".safetensors")
    # the inner file is renamed first: the JSON, which names the tensors, appears last
    with atomic_file(path) as json_tmp, atomic_file(tensors_path) if arrays else nullcontext() as tensors_tmp:
        if arrays:
            from safetensors.numpy import save_file

            data["tensors"] = tensors_path.name
            save_file(arrays, tensors_tmp, metadata={"format": FORMAT})
        json_tmp.write_text(dumps(data) + "\n", encoding="utf-8")


def dumps(node, indent: int = 0) -> str:
    """JSON with objects one key per line and lists of numbers on one line (id lists stay readable)."""
    pad = " " * indent
    if isinstance(node, dict) and len(node) == 1 and not isinstance(next(iter(node.values())), (dict, list)):
        return json.dumps(node, ensure_ascii=False)  # {"tensor": "KEY"} on one line
    if isinstance(node, dict) and node:
        inner = ",\n".join(f"{pad} {json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in node.items())
        return "{\n" + inner + "\n" + pad + "}"
    if isinstance(node, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in node):
        inner = ",\n".join(f"{pad} {dumps(v, indent + 1)}" for v in node)
        return "[\n" + inner + "\n" + pad + "]"
    return json.dumps(node, ensure_ascii=False)


def from_memory(data: dict, tensors: Tensors | None, label: str, golden: Doc | None = None) -> Doc:
    """Validate a document that has not been written yet (as load() validates a file)."""
    arrays = tensors.arrays if tensors is not None else {}
    return validate(resolve_tensors(data, arrays, label), Path(label), golden)
