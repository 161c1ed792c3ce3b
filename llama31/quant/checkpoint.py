"""INT4 checkpoint folders as a whole: what to build for one, and writing one from a float checkpoint.

    layers_for_checkpoint(ckpt)      the Int4Layers that match an opened INT4 folder's quantization_config
                                     (called by llama31.checkpoints.load_pretrained)
    hf_int4_layer(tensors, settings, heads)
                                     one HF module's raw INT4 tensors (GPTQ or compressed-tensors, HF row
                                     order) -> the Int4Linear tensors of the Meta-named module
    quantize_checkpoint(src, dst)    a float Meta or HF folder -> an HF folder in compressed-tensors
                                     pack-quantized format (the format of the published w4a16 checkpoints),
                                     one tensor at a time, so a model never sits in memory twice

The written folder: the seven linear layers of every block as ``<hf module>.weight_packed / .weight_scale /
.weight_shape`` (formats.to_compressed_tensors), everything else (embeddings, norms, lm_head) in ``dtype``,
and config.json with the ``quantization_config`` of formats.compressed_tensors_config. Rows of q_proj /
k_proj are put in HF's order BEFORE quantizing: quantization works row by row, so this commutes exactly.

With quantize_output, lm_head is written quantized too and left out of the config's "ignore" list. A tied
source (3.2 1B / 3B) is written untied, as quantize_model builds it: embed_tokens in ``dtype``, lm_head the
INT4 copy of that same matrix, and tie_word_embeddings false (a reader that tied them would quantize the
embedding or lose the copy).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llama31.checkpoints import open_checkpoint
from llama31.checkpoints.atomic import atomic_folder
from llama31.checkpoints.load import check_config_fits_tensors, check_dtype, check_floating, check_names
from llama31.checkpoints.names import hf_rows_to_meta, meta_rows_to_hf, meta_to_hf, permuted_heads
from llama31.errors import InputError, check_bool, check_int, message
from llama31.quant.formats import (
    Int4Settings,
    compressed_tensors_config,
    convert_layer,
    parse_quantization_config,
    permute_output_rows,
    to_compressed_tensors,
)
from llama31.quant.model import Int4Layers
from llama31.quant.rtn import check_group_size, quantize_weight

BLOCK_LINEAR = re.compile(r"^layers\.\d+\.(attention\.w[qkvo]|feed_forward\.w[123])\.weight$")
PARTS = {  # report rows: the part of the model each Meta name belongs to
    "tok_embeddings": "embedding (tok_embeddings)",
    "attention": "attention (wq wk wv wo)",
    "feed_forward": "feed-forward (w1 w2 w3)",
    "norm": "norms",
    "output": "output layer",
}


def layers_for_checkpoint(ckpt) -> Int4Layers:
    """The Int4Layers for an opened checkpoint whose config carries a quantization_config."""
    if ckpt.format != "hf":
        raise ValueError(f"{ckpt.path}/params.json: quantization_args {ckpt.quantization!r} (Meta's own quantized "
                         "formats) are not supported; load the float weights, or an HF w4a16 folder "
                         "(GPTQ or compressed-tensors)")
    config = Path(ckpt.path) / "config.json"
    settings = parse_quantization_config(ckpt.quantization, source=str(config))
    _check_group_size(ckpt.args, settings.group_size, f"{config}: quantization_config")
    # The output layer is quantized only in files that say so by carrying packed lm_head tensors.
    quantize_output = any(name.startswith("output.") and not name.endswith(".weight") for name in ckpt.keys())
    if quantize_output and ckpt.args.tie_word_embeddings:
        raise InputError(config, "tie_word_embeddings", "is true, but lm_head is stored quantized: an INT4 output "
                         "layer is a copy of its own, not the float embedding; set it to false (as "
                         "quantize_checkpoint(quantize_output=True) writes it)")
    return Int4Layers(settings.group_size, zero_point=not settings.symmetric, act_order=settings.act_order,
                      quantize_output=quantize_output)


def _check_group_size(args, group_size: int, where: str) -> None:
    """Every quantized layer's input size (dim for wq wk wv w1 w3, n_heads x head_dim for wo, hidden_dim for
    w2) must be a multiple of the group size: checked before any layer is built, naming where it came from."""
    for k in sorted({args.dim, args.n_heads * args.head_dim, args.hidden_dim}):
        check_group_size(k, group_size, where)


def read_int4_modules(ckpt, model) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Read every Int4Linear module of `model` from the INT4 HF folder `ckpt` (an HFCheckpoint).

    Returns the modules' state-dict tensors (Meta names, Meta row order) and the checkpoint names consumed
    (GPTQ's qweight/qzeros/scales/g_idx or compressed-tensors' weight_packed/weight_scale/weight_shape/...),
    which the strict loader then counts as used.
    """
    from llama31.quant.linear import Int4Linear

    settings = parse_quantization_config(ckpt.quantization, source=str(Path(ckpt.path) / "config.json"))
    by_module: dict[str, list[str]] = {}
    for key in ckpt.keys():
        module, _, leaf = key.rpartition(".")
        by_module.setdefault(module, []).append(key)
    state, consumed = {}, set()
    for name, module in model.named_modules():
        if not isinstance(module, Int4Linear):
            continue
        keys = by_module.get(name, [])
        if not keys:
            continue  # reported as missing by the strict loader
        raw = {key.rpartition(".")[2]: ckpt.read_raw(key) for key in keys}
        heads = permuted_heads(f"{name}.weight", model.args.n_heads, model.args.n_kv_heads)
        hf_module = meta_to_hf(f"{name}.weight")[: -len(".weight")]
        try:
            converted = hf_int4_layer(raw, settings, heads=heads, name=hf_module)
        except (ValueError, KeyError) as e:  # formats.py names the module; this names the file too
            raise InputError(ckpt.file_of(keys[0]), None, message(e)) from None
        for leaf, tensor in converted.items():
            state[f"{name}.{leaf}"] = tensor
        consumed.update(keys)
    return state, consumed


def hf_int4_layer(tensors, settings: Int4Settings, *, heads: int | None = None, name: str = "") -> dict:
    """One module's INT4 tensors as stored in an HF folder -> the Int4Linear state-dict tensors, Meta layout.

    tensors: the raw tensors of one module by their last name part (GPTQ: qweight, qzeros, scales, g_idx;
    compressed-tensors: weight_packed, weight_scale, weight_shape, ...), read WITHOUT any row reordering.
    heads: n_heads for wq (q_proj), n_kv_heads for wk (k_proj), None otherwise: their output rows are
    moved from HF's order back to Meta's (names.permuted_heads gives the number).
    """
    out = convert_layer(tensors, settings, name)
    if heads:
        index = hf_rows_to_meta(torch.arange(out["weight_packed"].shape[0]), heads)  # Meta row i = HF row index[i]
        out = permute_output_rows(out, index)
    return out


@dataclass
class PartSize:
    """Bytes of one part of the model: unquantized at the output dtype, and as written."""

    part: str
    before: int = 0
    after: int = 0


def quantize_checkpoint(src, dst, group_size: int = 128, *, symmetric: bool = True, quantize_output: bool = False,
                        dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int = 5 * 2**30) -> list[PartSize]:
    """Write the float checkpoint folder ``src`` as an INT4 compressed-tensors HF folder ``dst``.

    quantize_output: lm_head too (a tied source is written untied: see above).
    Returns the size of every part before (all weights in ``dtype``) and after (as written; a tied source's
    quantized output layer has no bytes before: it was the embedding). The source is
    checked as loading checks it (names, shapes, floating dtypes); dst must not exist or be empty, and appears
    only once complete (it is written under a temporary name beside it).
    """
    if check_int(group_size, "group_size", "quantize_checkpoint", minimum=8) % 8:
        raise InputError("quantize_checkpoint", "group_size", f"must be a multiple of 8 (a packed word must not "
                         f"straddle two groups), got {group_size}; use 32, 64 or 128")
    check_bool(symmetric, "symmetric", "quantize_checkpoint")
    check_bool(quantize_output, "quantize_output", "quantize_checkpoint")
    if check_dtype(dtype, "quantize_checkpoint") is None:
        raise InputError("quantize_checkpoint", "dtype", "must be a floating-point torch.dtype, got None")
    check_int(max_shard_bytes, "max_shard_bytes", "quantize_checkpoint", minimum=1)
    ckpt = open_checkpoint(src)
    if ckpt.quantization:
        method = ckpt.quantization.get("quant_method") if isinstance(ckpt.quantization, dict) else None
        raise ValueError(f"{src}: is already quantized ({method or ckpt.quantization!r}); quantize the float weights")
    with atomic_folder(dst) as tmp:
        sizes = _quantize_into(ckpt, tmp, group_size, symmetric, quantize_output, dtype, max_shard_bytes)
        tokenizer = Path(src) / "tokenizer.model"
        if tokenizer.is_file():
            shutil.copy(tokenizer, tmp / "tokenizer.model")
    return sizes


def _quantize_into(ckpt, dst: Path, group_size: int, symmetric: bool, quantize_output: bool, dtype: torch.dtype,
                   max_shard_bytes: int) -> list[PartSize]:
    from llama31.model.transformer import Transformer  # only to know every parameter's name and shape

    args = ckpt.args
    check_config_fits_tensors(ckpt)
    _check_group_size(args, group_size, f"{ckpt.path}: group_size")
    expected = {name: tuple(t.shape) for name, t in Transformer(args, device="meta").state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("output.weight")
    check_names(ckpt, expected, set(ckpt.keys()), args.tie_word_embeddings)
    sizes = {part: PartSize(part) for part in PARTS.values()}
    writer = _ShardWriter(dst, max_shard_bytes)

    def write_int4(hf_module: str, tensor: torch.Tensor, size: PartSize) -> None:
        quantized = quantize_weight(tensor, group_size, symmetric=symmetric, scale_dtype=dtype)
        for key, value in to_compressed_tensors(quantized, name=hf_module).items():
            size.after += writer.add(f"{hf_module}.{key}", value)

    for name in ckpt.keys():
        if args.tie_word_embeddings and name.startswith("output."):
            continue  # tied: HF writes no lm_head, the embedding serves
        if tuple(ckpt.shape(name)) != expected[name]:
            raise InputError(ckpt.file_of(name), repr(ckpt.source_name(name)), f"has shape {tuple(ckpt.shape(name))}"
                             f", the model expects {expected[name]}. Check that the config matches the weights.")
        tensor = check_floating(ckpt, name, ckpt.read(name), ckpt.file_of(name))  # Meta layout
        heads = permuted_heads(name, args.n_heads, args.n_kv_heads)
        if heads:
            tensor = meta_rows_to_hf(tensor, heads)
        hf_name = meta_to_hf(name)
        size = sizes[PARTS[_part_of(name)]]
        size.before += tensor.numel() * dtype.itemsize
        if BLOCK_LINEAR.match(name) or (quantize_output and name == "output.weight"):
            write_int4(hf_name[: -len(".weight")], tensor, size)
        else:
            size.after += writer.add(hf_name, tensor.to(dtype))
        if quantize_output and args.tie_word_embeddings and name == "tok_embeddings.weight":
            write_int4("lm_head", tensor, sizes[PARTS["output"]])  # the output layer's copy; the embedding stays
    writer.close()

    written = args.replace(tie_word_embeddings=False) if quantize_output else args
    config = written.to_hf_config(str(dtype).split(".")[-1])
    config["quantization_config"] = compressed_tensors_config(group_size, symmetric=symmetric,
                                                              ignore=() if quantize_output else ("lm_head",))
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [s for s in sizes.values() if s.before or s.after]


def _part_of(meta_name: str) -> str:
    parts = meta_name.split(".")
    if parts[0] == "layers":
        return "norm" if parts[2].endswith("norm") else parts[2]
    return parts[0]


class _ShardWriter:
    """Collects tensors into safetensors files of at most max_bytes, named as HF names them."""

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = folder, max_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.files: list[tuple[Path, list[str], int]] = []  # (temporary file, names in it, tensor bytes)

    def add(self, name: str, tensor: torch.Tensor) -> int:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.contiguous()
        self.current_bytes += nbytes
        return nbytes

    def _flush(self) -> None:
        file = self.folder / f"shard-{len(self.files) + 1}.tmp"
        save_file(self.current, file, metadata={"format": "pt"})
        self.files.append((file, list(self.current), self.current_bytes))
        self.current, self.current_bytes = {}, 0

    def close(self) -> None:
        if self.current or not self.files:
            self._flush()
        if len(self.files) == 1:
            os.replace(self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, (file, names, _) in enumerate(self.files, start=1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(file, self.folder / final)
            weight_map.update({name: final for name in names})
        total = sum(nbytes for _, _, nbytes in self.files)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
