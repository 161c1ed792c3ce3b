"""Draw the figures of docs/architecture.md from the project's own code.

    python docs/make_figures.py [--out DIR]        # default: docs/figures/

Every curve and diagram is computed by llama31 itself (the RoPE frequencies by llama3_inv_freq, the head
grouping by decode_attention, the cache traffic by KVCache, the INT4 words by rtn_quantize and pack_int4,
the bytes a decode step reads by examples/bench/benchmark.py's weight_bytes_read) or by the formula the doc
gives. The only data are the measured decode speeds in MEASURED below.

matplotlib is an optional dependency: pip install -e '.[docs]'.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

try:
    import matplotlib
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend or state
    from matplotlib.patches import Rectangle
except ImportError:
    sys.exit("docs/make_figures.py needs matplotlib: pip install -e '.[docs]'")

import torch

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Transformer
from llama31.model.attention import decode_attention
from llama31.model.kv_cache import KVCache
from llama31.model.rope import llama3_inv_freq
from llama31.quant import Int4Layers, pack_int4, rtn_quantize, unpack_int4

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------
# MEASURED DATA (the only numbers in this file not computed from the code).
# Batch-1 decode speeds of a random model of the Llama 3.2 1B shape on a shared 2-core VM, from
# docs/benchmarks.md, which quotes the commands that measured them (python examples/bench/benchmark.py
# --threads 2 --reps 3 ..., runs of 2026-11-29, medians of 3). Each figure was set against its own roofline:
# the memory bandwidth read in the worker that decoded, just before and after its decode, over the bytes a step
# reads. So the bandwidth at the time is tok/s x bytes per token / fraction (bytes per token computed below,
# as the benchmark counts them).
#
#   label                       line    tok/s   fraction of roofline   where in docs/benchmarks.md
MEASURED = (
    ("llama31 fp32, packed",    "fp32",  6.04,  0.83),  # "Side by side with HF transformers", decode b1
    ("HF fp32",                 "fp32",  3.88,  0.55),  # "Side by side with HF transformers"
    ("llama31 bf16",            "bf16", 10.4,   0.46),  # "Side by side with HF transformers"
    ("HF bf16",                 "bf16",  5.26,  0.22),  # "Side by side with HF transformers"
    ("llama31 INT4 g128",       "int4", 17.8,   0.53),  # "Side by side with HF transformers"
    # run of 2026-12-02, median of 5: "The fastest path of each precision against llama.cpp", run C
    ("llama31 INT4, INT4 output",        "int4o", 42.86, 0.60),
    ("llama31 INT4, INT4 output, W4A8",  "int4o", 43.88, 0.61),
    # runs I2, I3 and I5 of 2026-12-03, median of 4: "Our kernel without its prefetch, and as the float32
    # default (runs I and J)"
    ("llama31 fp32, our kernel (the default)", "fp32", 15.43, 0.94),
    ("llama31 fp32 compiled, our kernels", "fp32", 16.06, 0.96),
    ("llama31 bf16 compiled, our kernels", "bf16", 30.26, 0.91),
    ("llama31 INT4, INT4 output, compiled", "int4o", 69.32, 0.57),
)
# ---------------------------------------------------------------------------------------------------------

DPI = 100
BLUE, ORANGE, GREEN, RED, GREY = "#3b75af", "#ef8636", "#519e3e", "#c53a32", "#d9d9d9"
LINE_COLORS = {"fp32": BLUE, "bf16": ORANGE, "int4": GREEN, "int4o": RED}


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, facecolor="white", pil_kwargs={"optimize": True})
    return path


# ========================================================================================= RoPE scaling
def rope_scaling(out: Path) -> Path:
    """Wavelength of each of the 64 rotary frequencies of a 128-dim head, before and after "llama3" scaling."""
    d, theta = 128, 500000.0
    scalings = {"3.1 (s = 8)": RopeScaling(factor=8.0), "3.2 (s = 32)": RopeScaling(factor=32.0)}
    L = RopeScaling().original_max_position_embeddings  # 8192 for both
    a, b = RopeScaling().low_freq_factor, RopeScaling().high_freq_factor  # 1, 4 for both
    w = llama3_inv_freq(d, theta, None)  # (64,) w_i = theta^(-2i/d)
    scaled = {name: llama3_inv_freq(d, theta, s) for name, s in scalings.items()}
    i = torch.arange(d // 2)
    wavelength = 2 * math.pi / w
    # the three bands, by the rule (not by the indices it gives for d = 128)
    kept = wavelength < L / b
    divided = wavelength > L / a
    first_blend, first_divided = int((~kept).nonzero()[0]), int(divided.nonzero()[0])

    fig = _figure(9.6, 3.8)
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        ax.axvspan(-0.5, first_blend - 0.5, color="#eef3f8", lw=0)
        ax.axvspan(first_blend - 0.5, first_divided - 0.5, color="#fdf1e6", lw=0)
        ax.axvspan(first_divided - 0.5, d // 2 - 0.5, color="#f3f3f3", lw=0)
        ax.set_xlim(-0.5, d // 2 - 0.5)
        ax.set_xlabel("frequency index i (pair of channels 2i, 2i+1)")
        ax.grid(True, which="major", alpha=0.3)

    left.semilogy(i, wavelength, color="black", lw=2, label=r"$w_i = \theta^{-2i/d}$, unscaled")
    for (name, w2), color in zip(scaled.items(), (BLUE, RED)):
        left.semilogy(i, 2 * math.pi / w2, color=color, lw=1.6, ls="--", label=f"scaled, Llama {name}")
    for y, text in ((L / b, f"L/b = {L / b:.0f}"), (L / a, f"L/a = {L / a:.0f}")):
        left.axhline(y, color="grey", lw=0.8, ls=":")
        left.text(1, y * 1.25, text, fontsize=8, color="dimgrey")
    left.set_ylabel(r"wavelength $\lambda = 2\pi / w$ (tokens)")
    left.set_title("Wavelength of each rotary frequency", fontsize=10)
    left.legend(fontsize=8, loc="upper left")

    for (name, w2), color in zip(scaled.items(), (BLUE, RED)):
        right.semilogy(i, w2 / w, color=color, lw=1.8, marker=".", ms=4, label=f"Llama {name}")
    right.set_ylabel(r"$w'_i \,/\, w_i$")
    right.set_title(r"Scaling applied: 1, blended, then $1/s$", fontsize=10)
    right.legend(fontsize=8, loc="lower left")
    for x0, x1, text in ((0, first_blend, "unchanged\n$\\lambda < L/b$"),
                         (first_blend, first_divided, "blended"),
                         (first_divided, d // 2, "divided by $s$\n$\\lambda > L/a$")):
        right.text((x0 + x1 - 1) / 2, 1.25, text, ha="center", va="bottom", fontsize=8)
    right.set_ylim(1 / 60, 3)
    fig.suptitle(f"llama3 RoPE scaling: d = {d}, theta = {theta:.0f}, L = {L}, a = {a:g}, b = {b:g}  "
                 f"(i = 0..{first_blend - 1} unchanged, {first_blend}..{first_divided - 1} blended, "
                 f"{first_divided}..{d // 2 - 1} divided)", fontsize=10)
    return _save(fig, out / "rope_scaling.png")


# ========================================================================================= GQA
def kv_head_of_query_heads(n_heads: int, n_kv_heads: int) -> list[int]:
    """Which kv head each query head reads, found by running decode_attention: with one cached position whose
    value in kv head j is the number j, query head h's output is the number of the kv head it read."""
    q = torch.zeros(1, n_heads, 1, 1)  # (bs, n_heads, 1, head_dim = 1)
    k = torch.zeros(1, n_kv_heads, 1, 1)  # (bs, n_kv_heads, T = 1, head_dim)
    v = torch.arange(n_kv_heads, dtype=torch.float32).view(1, n_kv_heads, 1, 1)
    return decode_attention(q, k, v).view(n_heads).round().long().tolist()


def gqa(out: Path) -> Path:
    args = ModelArgs.preset("llama3.1-8b")
    kv_of = kv_head_of_query_heads(args.n_heads, args.n_kv_heads)
    colors = [matplotlib.colormaps["tab10"](j % 10) for j in range(args.n_kv_heads)]

    fig = _figure(9.6, 3.0)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_xlim(-1.5, args.n_heads + 0.5)
    ax.set_ylim(-0.9, 3.3)
    kv_width = args.n_heads / args.n_kv_heads
    for h, j in enumerate(kv_of):
        ax.add_patch(Rectangle((h + 0.05, 2.2), 0.9, 0.7, color=colors[j], alpha=0.85, lw=0))
        ax.text(h + 0.5, 2.55, str(h), ha="center", va="center", fontsize=7, color="white")
        ax.plot([h + 0.5, (j + 0.5) * kv_width], [2.2, 0.75], color=colors[j], lw=0.9, alpha=0.8)
    for j in range(args.n_kv_heads):
        ax.add_patch(Rectangle((j * kv_width + 0.3, 0.05), kv_width - 0.6, 0.7, color=colors[j], lw=0))
        ax.text((j + 0.5) * kv_width, 0.4, f"kv head {j}", ha="center", va="center", fontsize=8, color="white")
    ax.text(-0.3, 2.55, "query\nheads", ha="right", va="center", fontsize=8)
    ax.text(-0.3, 0.4, "key/value\nheads", ha="right", va="center", fontsize=8)
    ax.text(0.5, 0.02,
            f"Llama 3.1 8B: {args.n_heads} query heads share {args.n_kv_heads} key/value heads; query head h reads "
            f"kv head h // {args.n_rep}. The KV cache holds {args.n_kv_heads} heads, not {args.n_heads}: "
            f"{args.n_rep}x less memory and traffic.", ha="center", va="bottom", fontsize=8.5, transform=ax.transAxes)
    ax.set_title("Grouped-query attention (as run by decode_attention)", fontsize=10)
    return _save(fig, out / "gqa.png")


# ========================================================================================= KV cache
def kv_cache_traffic(prompt_len: int, decode_steps: int, capacity: int):
    """Per step, (label, positions written, number of positions read), found by running KVCache.update."""
    cache = KVCache(1, capacity, 1, 1, dtype=torch.float32)  # one sequence, one kv head of one channel
    steps = [("prefill", 0, prompt_len)] + [("decode", prompt_len + t, 1) for t in range(decode_steps)]
    rows = []
    for n, (kind, start_pos, seqlen) in enumerate(steps):
        before = cache.k.clone()
        new = torch.full((1, 1, seqlen, 1), float(n + 1))  # each step writes its own marker value
        k, _ = cache.update(start_pos, new, new)
        written = (cache.k != before)[0, 0, :, 0].nonzero().flatten().tolist()
        rows.append((kind, start_pos, seqlen, written, k.shape[2]))
    return rows


def kv_cache(out: Path) -> Path:
    prompt_len, decode_steps, capacity = 6, 3, 11
    rows = kv_cache_traffic(prompt_len, decode_steps, capacity)
    fig = _figure(9.6, 3.3)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_xlim(-4.2, capacity + 0.2)
    ax.set_ylim(-1.4, len(rows) + 0.9)
    for r, (kind, start_pos, seqlen, written, n_read) in enumerate(rows):
        y = len(rows) - 1 - r
        for p in range(capacity):
            if p in written:
                color, text, fg = ORANGE, "write", "white"
            elif p < n_read:
                color, text, fg = BLUE, "read", "white"
            else:
                color, text, fg = GREY, "", "black"
            ax.add_patch(Rectangle((p + 0.04, y + 0.06), 0.92, 0.88, color=color, lw=0))
            ax.text(p + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7.5, color=fg)
        label = (f"prefill: {seqlen} tokens, start_pos {start_pos}" if kind == "prefill"
                 else f"decode: 1 token, start_pos {start_pos}")
        ax.text(-0.2, y + 0.5, label, ha="right", va="center", fontsize=8)
    for p in range(capacity):
        ax.text(p + 0.5, len(rows) + 0.25, str(p), ha="center", va="center", fontsize=8)
    ax.text(capacity / 2, len(rows) + 0.65, "position in the cache (allocated once, max_seq_len = "
            f"{capacity})", ha="center", va="center", fontsize=8.5)
    ax.text(0.5, 0.0,
            "write: k, v of this step's tokens stored at their positions (and read by them);  read: cached k, v "
            "attended to;\ngrey: allocated, not yet written. In the prefill each query reads only the positions up "
            "to its own (causal mask); a decode step's single query reads them all.",
            ha="center", va="bottom", fontsize=8, transform=ax.transAxes)
    ax.set_title("The KV cache during prefill and decode (KVCache.update)", fontsize=10)
    return _save(fig, out / "kv_cache.png")


# ========================================================================================= INT4 layout
def int4_layout(out: Path) -> Path:
    n, k, g = 2, 32, 16  # a toy weight: N = 2 output rows, K = 32 inputs, groups of g = 16
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(3))
    q, scale, _ = rtn_quantize(weight, g)  # q int8 [N, K] in [-8, 7], scale [N, K/g]
    packed = pack_int4(q)  # int32 [N, K/8]
    assert torch.equal(unpack_int4(packed, k), q)

    fig = _figure(10.0, 5.2)
    ax = fig.subplots()
    ax.set_axis_off()
    ax.set_xlim(-5.5, k + 0.3)
    ax.set_ylim(-7.6, 6.4)
    group_colors = ("#dbe7f3", "#fde5cf")

    def row_label(y, text):
        ax.text(-0.3, y, text, ha="right", va="center", fontsize=8)

    # q, one cell per weight, coloured by group
    y0 = 4.0
    for r in range(n):
        y = y0 - r
        for c in range(k):
            ax.add_patch(Rectangle((c + 0.03, y + 0.05), 0.94, 0.9, color=group_colors[c // g], lw=0))
            ax.text(c + 0.5, y + 0.5, str(int(q[r, c])), ha="center", va="center", fontsize=7)
        row_label(y + 0.5, f"q[{r}, :]")
    for j in range(k // 8):
        ax.annotate("", xy=(8 * j + 0.1, y0 + 1.15), xytext=(8 * j + 7.9, y0 + 1.15),
                    arrowprops={"arrowstyle": "|-|", "lw": 0.8, "mutation_scale": 3})
        ax.text(8 * j + 4, y0 + 1.45, f"elements {8 * j}..{8 * j + 7} -> word {j}", ha="center", fontsize=7.5)
    for grp in range(k // g):
        ax.text(grp * g + g / 2, y0 + 2.0, f"group {grp}: one scale per row", ha="center", fontsize=8.5,
                weight="bold")
    ax.text(-0.3, y0 + 1.9, f"W [N, K] = [{n}, {k}],\ng = {g}", ha="right", va="center", fontsize=8)

    # weight_packed [N, K/8]: one word under the 8 elements it holds
    y1 = 1.2
    for r in range(n):
        y = y1 - r
        for j in range(k // 8):
            word = int(packed[r, j]) & 0xFFFFFFFF
            ax.add_patch(Rectangle((8 * j + 0.05, y + 0.05), 7.9, 0.9, color="#e6e6e6", lw=0))
            ax.text(8 * j + 4, y + 0.5, f"0x{word:08X}", ha="center", va="center", fontsize=8, family="monospace")
        row_label(y + 0.5, f"weight_packed[{r}, :]")
    ax.text(k / 2, y1 + 1.15, f"weight_packed [N, K/8] = [{n}, {k // 8}] int32", ha="center", fontsize=8.5)

    # weight_scale [N, K/g]
    y2 = -1.9
    for r in range(n):
        y = y2 - r
        for grp in range(k // g):
            ax.add_patch(Rectangle((grp * g + 0.05, y + 0.05), g - 0.1, 0.9, color=group_colors[grp], lw=0))
            ax.text(grp * g + g / 2, y + 0.5, f"{float(scale[r, grp]):.4f}", ha="center", va="center", fontsize=8)
        row_label(y + 0.5, f"weight_scale[{r}, :]")
    ax.text(k / 2, y2 + 1.15, f"weight_scale [N, K/g] = [{n}, {k // g}], model dtype;  W[n, k] ~ q[n, k] * "
            "weight_scale[n, k // g]", ha="center", fontsize=8.5)

    # one word, nibble by nibble: nibble i (bits 4i..4i+3) holds element 8j + i, stored as q + 8
    y3 = -6.3
    word = int(packed[0, 0]) & 0xFFFFFFFF
    ax.text(k / 2, y3 + 2.05, f"word weight_packed[0, 0] = 0x{word:08X}, least significant nibble first: "
            "nibble i = bits 4i..4i+3 holds element 8j + i, stored as q + 8 (0..15)", ha="center", fontsize=8.5)
    for i in range(8):
        x = 4 * (7 - i)  # bit 31 on the left, as the hex digits read
        nibble = (word >> (4 * i)) & 0xF
        ax.add_patch(Rectangle((x + 0.1, y3), 3.8, 1.5, color="#f4f4f4", ec="grey", lw=0.6))
        ax.text(x + 2, y3 + 1.1, f"bits {4 * i + 3}..{4 * i}", ha="center", fontsize=7, color="dimgrey")
        ax.text(x + 2, y3 + 0.45, f"0x{nibble:X} = {int(q[0, i])} + 8", ha="center", fontsize=8,
                family="monospace")
        ax.text(x + 2, y3 - 0.35, f"element {i}", ha="center", fontsize=7.5)
    ax.text(-0.3, y3 + 0.75, "nibbles 7 .. 0", ha="right", va="center", fontsize=8)
    ax.text(k / 2, y3 - 1.2, "Llama 3.1 8B's wq at g = 128: W [4096, 4096] -> weight_packed [4096, 512] int32, "
            "weight_scale [4096, 32] bf16: 0.5 + 2/128 bytes per weight", ha="center", fontsize=8.5)
    ax.set_title("INT4 weights in compressed-tensors pack-quantized layout (symmetric, toy sizes)", fontsize=10)
    return _save(fig, out / "int4_layout.png")


# ========================================================================================= roofline
def _weight_bytes_read():
    """examples/bench/benchmark.py's weight_bytes_read: the one count of the bytes of weights a decode step reads."""
    spec = importlib.util.spec_from_file_location("llama31_benchmark", REPO / "examples" / "bench" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.weight_bytes_read


def bytes_per_token(args: ModelArgs) -> dict[str, int]:
    """Weight bytes one batch-1 decode step reads, per line of the roofline: the model built on the meta device
    (shapes only, no memory) in fp32, bf16, and INT4 g128 (block linears 0.5 + 2/128 bytes per weight, the
    embedding and tied output kept bf16, as llama31.quant does; then with the output layer INT4 too). The KV
    cache read is left out: at the benchmark's 32-64 positions it is under 0.2% of the weights."""
    count = _weight_bytes_read()
    models = {
        "fp32": Transformer(args, dtype=torch.float32, device="meta"),
        "bf16": Transformer(args, dtype=torch.bfloat16, device="meta"),
        "int4": Transformer(args, dtype=torch.bfloat16, device="meta", layers=Int4Layers(128)),
        # the output layer INT4 too: a tied model is untied (quantize_model), its embedding is only indexed
        "int4o": Transformer(args.replace(tie_word_embeddings=False), dtype=torch.bfloat16, device="meta",
                             layers=Int4Layers(128, quantize_output=True)),
    }
    return {name: count(model) for name, model in models.items()}


def decode_roofline(out: Path) -> Path:
    args = ModelArgs.preset("llama3.2-1b").replace(max_seq_len=4096)  # the context does not change the weights
    step_bytes = bytes_per_token(args)
    n_params = sum(p.numel() for p in Transformer(args, device="meta").parameters())
    bandwidth = torch.linspace(0, 90, 181)  # GB/s

    fig = _figure(7.6, 4.6)
    ax = fig.subplots()
    names = {"fp32": "fp32", "bf16": "bf16", "int4": "INT4 g128 (bf16 embedding)",
             "int4o": "INT4 g128, output layer INT4 too"}
    for line, b in step_bytes.items():
        ax.plot(bandwidth, bandwidth * 1e9 / b, color=LINE_COLORS[line], lw=1.8,
                label=f"{names[line]}: {b / 1e9:.2f} GB per token")
    markers = {"llama31": "o", "HF": "s", "compiled": "*"}
    # where each point's label goes (offset in points, alignment), so that points at one bandwidth stay legible
    label_place = {"llama31 bf16": ((-7, 4), "right", "bottom"),
                   "HF fp32": ((-7, 6), "right", "bottom"),
                   "llama31 INT4 g128": ((-7, 3), "right", "bottom"),
                   "llama31 INT4, INT4 output": ((-7, -3), "right", "top"),
                   "llama31 bf16 compiled, our kernels": ((-9, 6), "right", "bottom"),
                   "llama31 fp32 compiled, our kernels": ((-9, 8), "right", "bottom"),
                   "llama31 fp32, our kernel (the default)": ((-7, -6), "right", "top"),
                   "llama31 INT4, INT4 output, compiled": ((-9, -4), "right", "top")}
    for label, line, tok_s, fraction in MEASURED:
        gbps = tok_s * step_bytes[line] / fraction / 1e9
        roof = gbps * 1e9 / step_bytes[line]
        ax.plot([gbps, gbps], [tok_s, roof], color=LINE_COLORS[line], lw=0.8, ls=":")  # the gap to the roofline
        marker = markers["compiled"] if "compiled" in label else markers[label.split()[0]]
        ax.plot(gbps, tok_s, marker=marker, ms=12 if marker == "*" else 7, color=LINE_COLORS[line],
                mec="black", mew=0.6, ls="none")
        offset, ha, va = label_place.get(label, ((7, -3), "left", "top"))
        ax.annotate(f"{label}\n{tok_s:g} tok/s, {fraction:.0%} of roofline", (gbps, tok_s), xytext=offset,
                    textcoords="offset points", fontsize=7, ha=ha, va=va)
    ax.plot([], [], "o", color="white", mec="black", label="measured: llama31 eager")
    ax.plot([], [], "*", ms=11, color="white", mec="black", label="measured: llama31 compiled")
    ax.plot([], [], "s", color="white", mec="black", label="measured: HF transformers")
    ax.set_xlim(0, 90)
    ax.set_ylim(0, 75)
    ax.set_xlabel("memory bandwidth read at the time (GB/s)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"Decode roofline, Llama 3.2 1B shape ({n_params / 1e9:.2f} B parameters): "
                 "tok/s = bandwidth / bytes per token", fontsize=9.5)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper left")
    return _save(fig, out / "decode_roofline.png")


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "figures", help="folder for the PNGs")
    out = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    paths = [rope_scaling(out), gqa(out), kv_cache(out), int4_layout(out), decode_roofline(out)]
    for path in paths:
        print(f"{path}  {path.stat().st_size / 1024:.0f} KiB")
    return paths


if __name__ == "__main__":
    main()
