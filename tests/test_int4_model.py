"""INT4 models: quantize_model builds an Int4 Transformer whose logits are those of HF's Llama run with the
dequantized weights, and whose next-token distributions stay close to the float model's."""

import json

import pytest
import torch
from safetensors import safe_open
from torch.nn import Linear

from llama31 import ModelArgs, Transformer
from llama31.checkpoints import save_hf
from llama31.quant import (
    Int4Linear,
    cpu_fused,
    from_compressed_tensors,
    parse_quantization_config,
    quantize_model,
    quantize_weight,
)
from llama31.quant.checkpoint import quantize_checkpoint
from llama31.quant.packing import dequantize

ARGS = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=384, max_seq_len=256)


def _float_model(seed=0):
    """A tiny random Transformer whose next-token distributions are peaked (entropy ~2.5 nats of ln 512 = 6.2),
    so that top-1 agreement and KL mean something."""
    torch.manual_seed(seed)
    model = Transformer(ARGS, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 if "embed" in name else 0.3 if name.startswith("output") else 0.08)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


TOKENS = torch.randint(0, ARGS.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setattr(Int4Linear, "backend", "reference")


def test_quantize_model_quantizes_the_block_linears_only():
    model = _float_model()
    quantized = quantize_model(model, group_size=32)
    int4 = [name for name, m in quantized.named_modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 7 * ARGS.n_layers and all(".attention.w" in n or ".feed_forward.w" in n for n in int4)
    assert type(quantized.output) is Linear
    assert torch.equal(quantized.tok_embeddings.weight, model.tok_embeddings.weight)
    assert torch.equal(quantized.layers[1].ffn_norm.weight, model.layers[1].ffn_norm.weight)
    # each layer holds exactly the RTN quantization of the float weight
    expected = quantize_weight(model.layers[0].feed_forward.w2.weight, 32)
    assert torch.equal(quantized.layers[0].feed_forward.w2.weight_packed, expected["weight_packed"])
    assert isinstance(quantize_model(model, 32, quantize_output=True).output, Int4Linear)


def test_int4_model_logits_equal_hf_llama_with_the_dequantized_weights(tmp_path, reference_backend):
    from transformers import LlamaForCausalLM

    quantized = quantize_model(_float_model(), group_size=32)
    state = {}
    for name, tensor in quantized.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if isinstance(quantized.get_submodule(module), Int4Linear):
            state[f"{module}.weight"] = quantized.get_submodule(module).dequantized_weight()
        else:
            state[name] = tensor
    save_hf(tmp_path, ARGS, {k: v for k, v in state.items() if not k.endswith(("_packed", "_scale"))})
    hf = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ours, theirs = quantized(TOKENS), hf(TOKENS).logits
    # Both are fp32 forwards of the same weights (a plain decoder matches HF to ~3e-7 relative: test_hf_parity.py);
    # 1e-4 on logits of std ~3 leaves room for summation order and still fails on any weight mistake.
    assert (ours - theirs).abs().max() < 1e-4


def _kl_and_top1(float_model, quantized):
    with torch.no_grad():
        p_log = float_model(TOKENS).log_softmax(-1)
        q_log = quantized(TOKENS).log_softmax(-1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1)  # KL(float || int4) per position, nats
    top1 = (p_log.argmax(-1) == q_log.argmax(-1)).float().mean()
    return kl.mean().item(), kl.max().item(), top1.item()


def test_int4_model_stays_close_to_the_float_model(reference_backend, capsys):
    model = _float_model()
    kl32, kl32_max, top1_32 = _kl_and_top1(model, quantize_model(model, group_size=32))
    kl128, _, top1_128 = _kl_and_top1(model, quantize_model(model, group_size=128))
    kl_asym, _, top1_asym = _kl_and_top1(model, quantize_model(model, group_size=32, zero_point=True))
    with capsys.disabled():
        print(f"\nINT4 RTN vs fp32, tiny random model (entropy ~2.5 nats): g32 KL mean {kl32:.4f} max "
              f"{kl32_max:.3f} top-1 {top1_32:.3f} | g128 KL {kl128:.4f} top-1 {top1_128:.3f} | g32 asym "
              f"KL {kl_asym:.4f} top-1 {top1_asym:.3f}")
    # Why these bounds: absmax/7.5 RTN on Gaussian weights leaves a relative weight error of ~8% at g32
    # (scale ~ 2.1 sigma / 7.5, error ~ scale / sqrt(12)); carried through two blocks it perturbs these
    # logits (std ~3) by a few tenths, and KL ~ Var(logit error) / 2 ~ 0.05-0.15 nats. A wrong nibble
    # order, scale index or permutation destroys the weights instead: KL > 1 and top-1 near chance (1/512).
    assert kl32 < 0.25 and top1_32 > 0.7
    assert kl_asym < 0.25 and top1_asym > 0.7
    # Smaller groups adapt the scale to fewer weights, so they must not be worse than g128.
    assert kl32 <= kl128 * 1.05


@pytest.mark.skipif(not cpu_fused.is_available(32), reason=f"torch {torch.__version__} has no CPU int4 op")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_default_path_matches_the_reference_to_bf16_arithmetic(dtype, monkeypatch, capsys):
    # The CPU default computes every INT4 linear with bf16 activations, through torch's op for a decode step and
    # with W rebuilt in bf16 for a prompt (4 x 64 = 256 rows here). Both differ from the exact fp32 reference
    # only by bf16 roundings, so the whole model may differ from it by about as much as running the float
    # model in bf16 differs from running it in fp32 (the yardstick, measured here on the same tokens), and no
    # more: a wrong nibble, scale, block edge or route gives errors of the size of the logits themselves.
    model = _float_model()
    with torch.no_grad():
        fp32 = model(TOKENS).double()
        yardstick = _relative(_float_model().to(torch.bfloat16)(TOKENS).double(), fp32)
    quantized = quantize_model(model.to(dtype), group_size=32)

    def logits(backend, dequantize_min_rows=cpu_fused.DEQUANTIZE_MIN_ROWS):
        monkeypatch.setattr(Int4Linear, "backend", backend)
        monkeypatch.setattr(cpu_fused, "DEQUANTIZE_MIN_ROWS", dequantize_min_rows)
        with torch.no_grad():
            return quantized(TOKENS).double()

    reference = logits("reference")
    errors = {"default (W rebuilt in bf16)": _relative(logits("auto"), reference),
              "torch's op for every row count": _relative(logits("auto", 10**9), reference)}
    with capsys.disabled():
        print(f"\nINT4 CPU paths vs the reference, {dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
              + f"; float model bf16 vs fp32 {yardstick:.1e}")
    for route, error in errors.items():
        assert error <= 1.5 * yardstick, f"{route}: {error:.2e} against bf16 arithmetic's {yardstick:.2e}"


def _relative(a, b):
    """mean |a - b| / mean |b|"""
    return ((a - b).abs().mean() / b.abs().mean()).item()


def test_quantize_checkpoint_writes_a_compressed_tensors_folder(tmp_path):
    from conftest import hf_model  # a tiny HF Llama: the source checkpoint, HF layout and names

    hf = hf_model(hidden_size=64, intermediate_size=192)
    hf.save_pretrained(tmp_path / "src")
    sizes = quantize_checkpoint(tmp_path / "src", tmp_path / "int4", group_size=32)

    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    settings = parse_quantization_config(config["quantization_config"])
    assert (settings.format, settings.group_size, settings.symmetric, settings.act_order) == (
        "compressed-tensors", 32, True, False)
    with safe_open(tmp_path / "int4" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
        assert "model.layers.1.self_attn.q_proj.weight" not in names and "lm_head.weight" in names
        for hf_module, linear in [("model.layers.1.self_attn.q_proj", hf.model.layers[1].self_attn.q_proj),
                                  ("model.layers.0.mlp.down_proj", hf.model.layers[0].mlp.down_proj)]:
            tensors = {key: f.get_tensor(f"{hf_module}.{key}")
                       for key in ("weight_packed", "weight_scale", "weight_shape")}
            assert tensors["weight_shape"].tolist() == list(linear.weight.shape)
            layer = from_compressed_tensors(tensors)
            # HF layout and HF row order: exactly the RTN quantization of HF's own float weight (in bf16)
            expected = quantize_weight(linear.weight.detach(), 32, scale_dtype=torch.bfloat16)
            assert torch.equal(dequantize(**layer), dequantize(**expected)), hf_module
    parts = {s.part: s for s in sizes}
    ffn = parts["feed-forward (w1 w2 w3)"]
    # 4-bit values + one bf16 scale per 32: (0.5 + 2/32) / 2 of the bf16 bytes, plus weight_shape
    assert ffn.after == pytest.approx(ffn.before * (0.5 + 2 / 32) / 2, rel=0.01)
    assert parts["embedding (tok_embeddings)"].after == parts["embedding (tok_embeddings)"].before


def _load_int4_folder(folder):
    """What a model-level loader does with an INT4 HF folder, using only llama31.quant's functions."""
    from llama31.checkpoints import open_checkpoint
    from llama31.checkpoints.names import meta_to_hf, permuted_heads
    from llama31.quant.checkpoint import hf_int4_layer, layers_for_checkpoint

    ckpt = open_checkpoint(folder)
    settings = parse_quantization_config(ckpt.config["quantization_config"])
    model = Transformer(ckpt.args, dtype=torch.float32, layers=layers_for_checkpoint(ckpt))
    state = {}
    with safe_open(folder / "model.safetensors", framework="pt") as f:
        for name, module in model.named_modules():
            if not isinstance(module, Int4Linear):
                continue
            hf_module = meta_to_hf(f"{name}.weight")[: -len(".weight")]
            raw = {key.rsplit(".", 1)[1]: f.get_tensor(key) for key in f.keys() if key.startswith(hf_module + ".")}
            heads = permuted_heads(f"{name}.weight", ckpt.args.n_heads, ckpt.args.n_kv_heads)
            for key, tensor in hf_int4_layer(raw, settings, heads=heads, name=hf_module).items():
                state[f"{name}.{key}"] = tensor
    for name in model.state_dict():
        if name not in state:
            state[name] = ckpt.read(name)  # float tensors: the existing reader (Meta layout)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_a_written_int4_folder_loads_back_to_the_quantize_model_result(tmp_path, reference_backend):
    model = _float_model()
    save_hf(tmp_path / "src", ARGS, model.state_dict())
    quantize_checkpoint(tmp_path / "src", tmp_path / "int4", group_size=32, dtype=torch.float32)
    loaded = _load_int4_folder(tmp_path / "int4")
    # Quantizing HF-ordered rows and moving them back equals quantizing Meta's rows: RTN works row by row.
    expected = quantize_model(model, group_size=32)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), expected(TOKENS))
