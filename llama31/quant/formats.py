"""INT4 checkpoint formats, one linear layer at a time: GPTQ and compressed-tensors <-> Int4Linear tensors.

Every function maps a dict of ONE layer's tensors (keys without the layer prefix) to another such dict.
The canonical side is ``Int4Linear``'s state dict (packing.py): weight_packed, weight_scale and optional
weight_zero_point, input_perm.

GPTQ (quant_method "gptq", AutoGPTQ / GPTQModel files), W [N, K], g = group size:
    qweight  int32 [K/8, N]     packed along K: nibble i of word [j, n] is u[8j + i, n], unsigned 0..15
    qzeros   int32 [K/g, N/8]   packed along N: nibble i of word [group, j] is z[group, 8j + i]
    scales   fp16  [K/g, N]
    g_idx    int32 [K]          the group of each input column (k // g unless act-order)
    v1 ("gptq"):     W[n, k] = (u - (z + 1)) * scales[g_idx[k], n]     symmetric files store z = 7
    v2 ("gptq_v2"):  W[n, k] = (u - z) * scales[g_idx[k], n]           symmetric files store z = 8
  so q = u - 8 and zp = z + 1 - 8 (v1) or z - 8 (v2); zp = 0 everywhere means symmetric (no zero point).

compressed-tensors "pack-quantized" (the canonical layout itself): weight_packed, weight_scale,
weight_shape [N, K], optional weight_zero_point [ceil(N/8), K/g] and weight_g_idx [K] (actorder "group").

Act-order (GPTQ desc_act, compressed-tensors actorder "group"): g_idx is not monotonic, but each group
still holds exactly g columns. Sorting the columns by g_idx (stable) makes the groups contiguous again:
    perm = argsort(g_idx);  W_sorted = W[:, perm];  x @ W.T == x[:, perm] @ W_sorted.T
Int4Linear stores W_sorted and ``input_perm`` = perm, so every kernel sees plain contiguous groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from llama31.errors import InputError, check_bool, check_int, check_object
from llama31.quant.packing import pack_int4, unpack_int4
from llama31.quant.rtn import check_group_size

GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")
COMPRESSED_TENSORS_KEYS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
Tensors = Mapping[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------- config.json
@dataclass(frozen=True)
class Int4Settings:
    """What a model-level loader needs from config.json's quantization_config to build Int4Layers."""

    format: str  # "gptq", "gptq_v2" or "compressed-tensors"
    group_size: int
    symmetric: bool  # False: the layers carry weight_zero_point (Int4Layers(zero_point=True))
    act_order: bool  # True: g_idx may be non-monotonic, the layers carry input_perm (Int4Layers(act_order=True))
    ignore: tuple[str, ...] = ()  # module names left unquantized (compressed-tensors "ignore")


def parse_quantization_config(config: Mapping[str, Any], source: str = "config.json") -> Int4Settings:
    """quantization_config (GPTQ or compressed-tensors pack-quantized, 4-bit, group-wise) -> Int4Settings.

    InputError (a ValueError) names the file and the key of anything unsupported or malformed.
    """
    where = f"{source}: quantization_config"
    check_object(config, "quantization_config", source)
    method = config.get("quant_method")
    if method == "gptq":
        if config.get("bits") != 4 or isinstance(config.get("bits"), bool):
            raise ValueError(f"{where}: bits is {config.get('bits')!r}; llama31 loads 4-bit GPTQ only")
        group_size = _setting(config, "group_size", 128, source, check_int)
        if group_size <= 0:
            raise ValueError(f"{where}: group_size {group_size} (per-channel GPTQ) is not supported; llama31 "
                             "loads group-wise INT4 (32, 64, 128)")
        fmt = config.get("checkpoint_format") or config.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"{where}: checkpoint_format {fmt!r} is not supported; expected 'gptq' or 'gptq_v2'")
        return Int4Settings(fmt, group_size, _setting(config, "sym", True, source, check_bool),
                            _setting(config, "desc_act", False, source, check_bool))

    if method == "compressed-tensors":
        if config.get("format") != "pack-quantized":
            raise ValueError(f"{where}: format {config.get('format')!r} is not supported; llama31 loads "
                             "'pack-quantized' (INT4 weights, 16-bit activations)")
        groups = check_object(config.get("config_groups") or {}, "quantization_config.config_groups", source)
        if not groups:
            raise ValueError(f"{where}: no config_groups")
        settings = set()
        for name, group in groups.items():
            key = f"quantization_config.config_groups.{name}"
            check_object(group, key, source)
            weights = check_object(group.get("weights") or {}, f"{key}.weights", source)
            if group.get("input_activations") or group.get("output_activations"):
                raise ValueError(f"{where}: config_groups.{name} quantizes activations; llama31 supports "
                                 "weight-only INT4 (w4a16)")
            if weights.get("num_bits") != 4 or isinstance(weights.get("num_bits"), bool) \
                    or weights.get("type", "int") != "int":
                raise ValueError(f"{where}: config_groups.{name}.weights is {weights.get('num_bits')}-bit "
                                 f"{weights.get('type')!r}; llama31 loads 4-bit int weights")
            if weights.get("strategy") != "group":
                raise ValueError(f"{where}: config_groups.{name}.weights.strategy is {weights.get('strategy')!r}; "
                                 "llama31 loads strategy 'group'")
            # actorder "group" stores weight_g_idx; "weight" only changed the quantization order (no g_idx).
            actorder = weights.get("actorder")
            if actorder not in (None, "group", "weight", True, False):
                raise InputError(source, f"{key}.weights.actorder", f"must be null, 'group', 'weight', true or "
                                 f"false, got {actorder!r}")
            if "group_size" not in weights:
                raise KeyError(f"{source}: {key}.weights has no group_size; llama31 loads group-wise INT4")
            settings.add((check_int(weights["group_size"], f"{key}.weights.group_size", source, minimum=1),
                          _setting(weights, "symmetric", True, source, check_bool, f"{key}.weights."),
                          actorder in ("group", True)))
        if len(settings) != 1:
            raise ValueError(f"{where}: config_groups use different settings {sorted(settings)}; llama31 builds "
                             "every quantized layer alike")
        group_size, symmetric, act_order = settings.pop()
        ignore = config.get("ignore") or []
        if not isinstance(ignore, list) or not all(isinstance(module, str) for module in ignore):
            raise InputError(source, "quantization_config.ignore", f"must be a list of module names, got {ignore!r}")
        return Int4Settings("compressed-tensors", group_size, symmetric, act_order, tuple(ignore))

    raise ValueError(f"{where}: quant_method {method!r} is not supported; llama31 loads 'gptq' and "
                     "'compressed-tensors' (pack-quantized)")


def _setting(config: Mapping[str, Any], key: str, default, source: str, check, prefix: str = "quantization_config."):
    """config[key] (default when absent or null), checked by check(value, key, source)."""
    value = config.get(key)
    return default if value is None else check(value, prefix + key, source)


def compressed_tensors_config(group_size: int, *, symmetric: bool = True, act_order: bool = False,
                              ignore: tuple[str, ...] = ("lm_head",)) -> dict[str, Any]:
    """The quantization_config for config.json of a folder written with ``to_compressed_tensors``."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 4,
                    "type": "int",
                    "symmetric": symmetric,
                    "strategy": "group",
                    "group_size": group_size,
                    "dynamic": False,
                    "actorder": "group" if act_order else None,
                    "observer": "minmax",
                    "observer_kwargs": {},
                    "block_structure": None,
                },
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


# ---------------------------------------------------------------------------------------------- layers
def convert_layer(tensors: Tensors, settings: Int4Settings, name: str = "") -> dict[str, torch.Tensor]:
    """One layer's checkpoint tensors -> Int4Linear state-dict tensors, by ``settings.format``.

    The result always matches an ``Int4Linear(group_size=settings.group_size, zero_point=not
    settings.symmetric, act_order=settings.act_order)``: a symmetric file yields no zero point, an
    act-order one always an input_perm (the identity where g_idx happens to be monotonic).
    """
    if settings.format in ("gptq", "gptq_v2"):
        out = from_gptq(tensors, checkpoint_format=settings.format, act_order=settings.act_order, name=name)
    elif settings.format == "compressed-tensors":
        out = from_compressed_tensors(tensors, act_order=settings.act_order, name=name)
    else:
        raise ValueError(f"{name}: unknown INT4 format {settings.format!r}")
    if settings.symmetric and "weight_zero_point" in out:
        raise ValueError(f"{name}: quantization_config says symmetric but the tensors carry non-zero zero points")
    if not settings.symmetric and settings.format == "compressed-tensors" and tensors.get("weight_zero_point") is None:
        # zero points of 0 would be a guess: a file that says asymmetric stores them, even where they are 0
        raise InputError(name or "INT4 layer", None, "quantization_config says symmetric: false, but the layer has "
                         "no weight_zero_point; the file is incomplete, or its config should say symmetric: true")
    if not settings.symmetric and "weight_zero_point" not in out:  # an asymmetric file that happens to be zp = 0
        n_groups = out["weight_scale"].shape[1]
        out["weight_zero_point"] = pack_int4(torch.zeros(out["weight_packed"].shape[0], n_groups,
                                                         dtype=torch.int8), dim=0)
    return out


def from_gptq(tensors: Tensors, *, checkpoint_format: str = "gptq", act_order: bool | None = None,
              name: str = "") -> dict[str, torch.Tensor]:
    """GPTQ qweight / qzeros / scales / g_idx of one layer -> Int4Linear tensors (see the module docstring).

    act_order: None emits input_perm only when g_idx is non-monotonic; True always; False refuses one.
    """
    _require(tensors, ("qweight", "qzeros", "scales"), name, "GPTQ")
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError(f"{name}: GPTQ qweight / qzeros must be int32, got {qweight.dtype} / {qzeros.dtype}")
    if qweight.dim() != 2 or scales.dim() != 2 or not scales.is_floating_point():
        raise ValueError(f"{name}: GPTQ qweight [K/8, N] and scales [K/g, N] must be 2-D, scales floating point; "
                         f"got {tuple(qweight.shape)} and {scales.dtype} {tuple(scales.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    n_groups = scales.shape[0]
    if scales.shape != (n_groups, n) or qzeros.shape != (n_groups, (n + 7) // 8) or k % n_groups:
        raise ValueError(f"{name}: GPTQ shapes do not fit: qweight {tuple(qweight.shape)} -> K={k}, N={n}; "
                         f"expected scales [K/g, {n}] and qzeros [K/g, {(n + 7) // 8}], got "
                         f"{tuple(scales.shape)} and {tuple(qzeros.shape)}")
    q = unpack_int4(qweight, k, dim=0).T  # (N, K): unpack returns u - 8 = q
    z = unpack_int4(qzeros, n, dim=1).to(torch.int16).T + 8  # (N, K/g), the stored unsigned z
    if checkpoint_format == "gptq":
        zp = z + 1 - 8
    elif checkpoint_format == "gptq_v2":
        zp = z - 8
    else:
        raise ValueError(f"{name}: unknown GPTQ checkpoint_format {checkpoint_format!r}; expected 'gptq' or 'gptq_v2'")
    if zp.max() > 7:
        raise ValueError(f"{name}: a GPTQ v1 zero point z = 15 means zp = 16, outside 4 bits (the v1 off-by-one "
                         "overflow); this layer cannot be represented exactly. Re-export it as gptq_v2.")
    return _canonical(q, scales.T.contiguous(), zp if zp.any() else None, tensors.get("g_idx"), act_order, name)


def from_compressed_tensors(tensors: Tensors, *, act_order: bool | None = None,
                            name: str = "") -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized tensors of one layer -> Int4Linear tensors.

    Without act-order, weight_packed / weight_scale pass through unchanged (no repacking).
    """
    _require(tensors, ("weight_packed", "weight_scale"), name, "compressed-tensors")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    if packed.dim() != 2:
        raise ValueError(f"{name}: weight_packed must be int32 [N, K/8], got shape {tuple(packed.shape)}")
    n = packed.shape[0]
    k = packed.shape[1] * 8
    if "weight_shape" in tensors:
        shape = tensors["weight_shape"]
        if shape.shape != (2,) or shape.is_floating_point() or shape.is_complex() or int(shape[0]) != n:
            raise ValueError(f"{name}: weight_shape {shape.tolist()} must be the two integers [N, K] of the "
                             f"unpacked weight, N = {n} as in weight_packed {tuple(packed.shape)}")
        k = int(shape[1])
    if not scale.is_floating_point():
        raise ValueError(f"{name}: weight_scale must be floating point, got {scale.dtype}")
    if packed.dtype != torch.int32 or k % 8 or packed.shape[1] != k // 8:
        raise ValueError(f"{name}: weight_packed must be int32 [N, K/8] with K % 8 == 0; got {packed.dtype} "
                         f"{tuple(packed.shape)} for K={k}")
    n_groups = scale.shape[1] if scale.dim() == 2 else 0
    if scale.shape != (n, n_groups) or n_groups == 0 or k % n_groups:
        raise ValueError(f"{name}: weight_scale must be [N, K/g] with N={n}, K={k}; got {tuple(scale.shape)}")

    zp = None
    if tensors.get("weight_zero_point") is not None:
        zp_tensor = tensors["weight_zero_point"]
        if zp_tensor.dtype == torch.int32 and zp_tensor.shape == ((n + 7) // 8, n_groups):
            zp = unpack_int4(zp_tensor, n, dim=0)  # (N, K/g), packed along N (current compressed-tensors)
        elif zp_tensor.shape == (n, n_groups):
            zp = zp_tensor.to(torch.int8)  # older files: one signed value per row and group
        else:
            raise ValueError(f"{name}: weight_zero_point must be int32 [{(n + 7) // 8}, {n_groups}] (packed "
                             f"along N) or [{n}, {n_groups}]; got {zp_tensor.dtype} {tuple(zp_tensor.shape)}")
        if not zp.any():
            zp = None
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and bool((g_idx < 0).all()):  # an unused, -1-filled placeholder
        g_idx = None

    if g_idx is None and act_order is not True:
        out = {"weight_packed": packed, "weight_scale": scale}  # already canonical: pass through
        if zp is not None:
            out["weight_zero_point"] = pack_int4(zp, dim=0)
        return out
    return _canonical(unpack_int4(packed, k), scale, zp, g_idx, act_order, name)


def to_compressed_tensors(tensors: Tensors, name: str = "") -> dict[str, torch.Tensor]:
    """Int4Linear tensors -> compressed-tensors pack-quantized tensors (undoing an act-order sort via g_idx)."""
    _require(tensors, ("weight_packed", "weight_scale"), name, "Int4Linear")
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    n, k = packed.shape[0], packed.shape[1] * 8
    out = {"weight_packed": packed, "weight_scale": scale, "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if tensors.get("weight_zero_point") is not None:
        out["weight_zero_point"] = tensors["weight_zero_point"]
    perm = tensors.get("input_perm")
    if perm is not None:
        group_size = k // scale.shape[1]
        q_sorted = unpack_int4(packed, k)
        q = torch.empty_like(q_sorted).index_copy_(1, perm, q_sorted)  # q[:, perm[j]] = q_sorted[:, j]
        g_idx = torch.empty(k, dtype=torch.int32, device=perm.device)
        g_idx[perm] = torch.arange(k, dtype=torch.int32, device=perm.device) // group_size
        out["weight_packed"] = pack_int4(q)
        out["weight_g_idx"] = g_idx
    return out


def permute_output_rows(tensors: Tensors, index: torch.Tensor) -> dict[str, torch.Tensor]:
    """Reorder the output rows n of one layer's Int4Linear tensors: row i of the result is row index[i].

    For the HF <-> Meta q/k permutation of wq / wk (llama31/checkpoints/names.py), applied to INT4 weights.
    """
    out = dict(tensors)
    n = tensors["weight_packed"].shape[0]
    out["weight_packed"] = tensors["weight_packed"][index].contiguous()
    out["weight_scale"] = tensors["weight_scale"][index].contiguous()
    if tensors.get("weight_zero_point") is not None:
        zp = unpack_int4(tensors["weight_zero_point"], n, dim=0)
        out["weight_zero_point"] = pack_int4(zp[index], dim=0)
    return out


# ---------------------------------------------------------------------------------------------- helpers
def _canonical(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, g_idx: torch.Tensor | None,
               act_order: bool | None, name: str) -> dict[str, torch.Tensor]:
    """Integers q [N, K] in [-8, 7] (input order), scale / zp [N, K/g], g_idx [K] -> Int4Linear tensors."""
    n, k = q.shape
    n_groups = scale.shape[1]
    group_size = k // n_groups
    check_group_size(k, group_size, name or "INT4 layer")
    perm = None
    if g_idx is not None:
        if g_idx.is_floating_point() or g_idx.is_complex():
            raise ValueError(f"{name}: g_idx must hold integer group indices, got {g_idx.dtype}")
        g_idx = g_idx.to(torch.int64)
        if g_idx.shape != (k,) or g_idx.min() < 0 or g_idx.max() >= n_groups:
            raise ValueError(f"{name}: g_idx must be [K={k}] with values in [0, {n_groups}); got shape "
                             f"{tuple(g_idx.shape)}, range [{int(g_idx.min())}, {int(g_idx.max())}]")
        if not torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group_size):
            counts = torch.bincount(g_idx, minlength=n_groups)
            if not bool((counts == group_size).all()):
                raise ValueError(f"{name}: g_idx puts {counts.min()}..{counts.max()} columns in a group instead of "
                                 f"exactly {group_size}; such a layer cannot be sorted into contiguous groups")
            if act_order is False:
                raise ValueError(f"{name}: g_idx is not monotonic (act-order); build the layer with act_order=True")
            perm = torch.argsort(g_idx, stable=True)  # sorted columns: group of column j is j // g
            q = q[:, perm]
    if perm is None and act_order:
        perm = torch.arange(k, device=q.device)
    out = {"weight_packed": pack_int4(q), "weight_scale": scale}
    if zp is not None:
        out["weight_zero_point"] = pack_int4(zp, dim=0)
    if perm is not None:
        out["input_perm"] = perm
    return out


def _require(tensors: Tensors, keys, name: str, fmt: str) -> None:
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise KeyError(f"{name}: {fmt} layer is missing {missing}; found {sorted(tensors)}")
