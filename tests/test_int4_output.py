"""An INT4 output layer, for tied models too: quantize_model(quantize_output=True) on a tied model keeps the exact
embedding for the lookup and gives the output layer an INT4 copy of the same matrix; the result is the float model
with the dequantized weights, saves and loads back untied, and passes through Llama.build and CPU packing."""

import json

import pytest
import torch
from safetensors import safe_open
from torch.nn import Linear

from llama31 import Llama, ModelArgs, Transformer
from llama31.checkpoints import save_hf
from llama31.cpu.packed import PackedLinear, pack_weights, unpack_weights
from llama31.errors import InputError
from llama31.quant import Int4Layers, Int4Linear, dequantize, quantize_model, quantize_weight
from llama31.quant.checkpoint import BLOCK_LINEAR, quantize_checkpoint

TIED = ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=384, max_seq_len=256,
                 tie_word_embeddings=True)
TOKENS = torch.randint(0, TIED.vocab_size, (2, 48), generator=torch.Generator().manual_seed(7))


@pytest.fixture
def reference_backend(monkeypatch):
    monkeypatch.setattr(Int4Linear, "backend", "reference")


def _float_model(args=TIED, seed=0):
    torch.manual_seed(seed)
    model = Transformer(args, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied model yields its shared matrix once
            if p.dim() == 2:
                p.normal_(0.0, 0.5 if name.startswith(("tok_embeddings", "output")) else 0.08)
            else:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _dequantized_float_model(model, group_size, zero_point=False):
    """The formula: an untied float model whose block linears AND output matrix are dequantize(RTN(W)) of the
    original matrices (for a tied model the output's W is the embedding), and whose embedding is the original."""
    oracle = Transformer(model.args.replace(tie_word_embeddings=False), dtype=torch.float32)
    state = {}
    for name, tensor in model.state_dict().items():  # a tied model's state_dict names the shared matrix twice
        if BLOCK_LINEAR.match(name) or name == "output.weight":
            tensor = dequantize(**quantize_weight(tensor, group_size, symmetric=not zero_point))
        state[name] = tensor
    oracle.load_state_dict(state, strict=True)
    return oracle.eval()


@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "asymmetric"])
def test_tied_int4_output_logits_equal_the_float_model_with_dequantized_weights(zero_point, reference_backend):
    # quantize_weight / dequantize are checked against an independent numpy oracle in test_int4_quantize.py; this
    # checks the wiring: which matrix each layer quantizes, with the same group size and symmetry, and that the
    # lookup still reads the exact embedding.
    model = _float_model()
    quantized = quantize_model(model, 32, zero_point=zero_point, quantize_output=True)
    assert isinstance(quantized.output, Int4Linear) and quantized.output.group_size == 32
    assert (quantized.output.weight_zero_point is not None) == zero_point
    with torch.no_grad():
        ours, formula = quantized(TOKENS), _dequantized_float_model(model, 32, zero_point)(TOKENS)
    # The same fp32 weights through the same F.linear / attention code: equal up to at most float32 summation
    # order (~1e-7 relative). A quantized embedding, or an output layer quantized from another matrix or with other
    # settings, moves these logits (std ~5) by 1e-2 or more.
    scale = formula.abs().max()
    assert (ours - formula).abs().max() <= 1e-5 * scale
    # and the INT4 output is not the float output: the comparison above can see the difference
    with torch.no_grad():
        assert (model(TOKENS) - formula).abs().max() > 1e-3 * scale


def test_the_embedding_stays_exact_and_the_output_layer_is_a_copy_of_its_own():
    model = _float_model()
    quantized = quantize_model(model, 32, quantize_output=True)
    assert torch.equal(quantized.tok_embeddings.weight, model.tok_embeddings.weight)
    assert quantized.tok_embeddings.weight.dtype == model.tok_embeddings.weight.dtype
    expected = quantize_weight(model.tok_embeddings.weight, 32)  # the output layer quantizes the shared matrix
    assert torch.equal(quantized.output.weight_packed, expected["weight_packed"])
    assert torch.equal(quantized.output.weight_scale, expected["weight_scale"])
    # two tensors now, and the args say so: the model is untied (what a folder saved from it stores)
    assert quantized.args.tie_word_embeddings is False and quantized.args == TIED.replace(tie_word_embeddings=False)
    embedding = quantized.tok_embeddings.weight.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() != embedding for t in quantized.output.buffers())
    assert not hasattr(quantized.output, "weight")
    # the float model is left as it was: still tied
    assert model.args.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight


def test_quantize_output_false_on_a_tied_model_keeps_the_float_output_tied():
    model = _float_model()
    quantized = quantize_model(model, 32)
    assert type(quantized.output) is Linear and quantized.output.weight is quantized.tok_embeddings.weight
    assert quantized.args.tie_word_embeddings
    assert torch.equal(quantized.tok_embeddings.weight, model.tok_embeddings.weight)


def test_the_state_dict_holds_what_the_loader_expects_for_an_untied_int4_output():
    quantized = quantize_model(_float_model(), 32, quantize_output=True)
    keys = set(quantized.state_dict())
    assert {"tok_embeddings.weight", "output.weight_packed", "output.weight_scale"} <= keys
    assert "output.weight" not in keys
    # exactly the tensors of a model built from its args with the INT4 factory (what load_pretrained builds for
    # a folder with a quantized lm_head)
    rebuilt = Transformer(quantized.args, layers=Int4Layers(32, quantize_output=True), device="meta")
    assert {k: (tuple(t.shape), t.dtype) for k, t in rebuilt.state_dict().items()} == \
           {k: (tuple(t.shape), t.dtype) for k, t in quantized.state_dict().items()}


def test_a_tied_model_cannot_be_built_with_an_int4_output_layer():
    with pytest.raises(ValueError, match=r"tie_word_embeddings is true, but the output layer \(Int4Linear\).*"
                                         r"tie_word_embeddings=False"):
        Transformer(TIED, layers=Int4Layers(32, quantize_output=True), device="meta")


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_quantize_checkpoint_with_quantize_output_loads_back_to_the_quantize_model_result(tied, tmp_path,
                                                                                          reference_backend):
    args = TIED.replace(tie_word_embeddings=tied)
    model = _float_model(args)
    save_hf(tmp_path / "src", args, model.state_dict())
    sizes = {s.part: s for s in quantize_checkpoint(tmp_path / "src", tmp_path / "int4", group_size=32,
                                                    quantize_output=True, dtype=torch.float32)}

    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []
    with safe_open(tmp_path / "int4" / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    assert {"model.embed_tokens.weight", "lm_head.weight_packed", "lm_head.weight_scale"} <= names
    assert "lm_head.weight" not in names
    output = sizes["output layer"]
    assert output.after > 0 and output.before == (0 if tied else args.vocab_size * args.dim * 4)

    loaded = Transformer.from_pretrained(tmp_path / "int4", dtype=torch.float32, pack=False)
    expected = quantize_model(model, 32, quantize_output=True)
    assert isinstance(loaded.output, Int4Linear) and not loaded.args.tie_word_embeddings
    assert set(loaded.state_dict()) == set(expected.state_dict())
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), expected(TOKENS))


def test_a_folder_that_ties_a_quantized_lm_head_is_refused(tmp_path):
    save_hf(tmp_path / "src", TIED, _float_model().state_dict())
    quantize_checkpoint(tmp_path / "src", tmp_path / "int4", group_size=32, quantize_output=True)
    config_file = tmp_path / "int4" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tie_word_embeddings": True}))
    with pytest.raises(InputError, match=r"config.json: tie_word_embeddings is true, but lm_head is stored "
                                         r"quantized.*set it to false"):
        Transformer.from_pretrained(tmp_path / "int4", pack=False)


def test_llama_build_int4_output_on_a_tied_folder_packs_nothing_and_keeps_one_embedding(tmp_path):
    from conftest import hf_model  # the real vocabulary, so that Llama.build's tokenizer fits

    hf_model(seed=3, vocab_size=128256, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True).save_pretrained(tmp_path)
    llama = Llama.build(tmp_path, dtype=torch.float32, max_batch_size=1, int4_group_size=32, int4_output=True)
    model = llama.model
    assert isinstance(model.output, Int4Linear) and "(output layer too)" in model.checkpoint_info["format"]
    # The 128256 x 32 output matrix is big enough to be packed (2^22 weights): as a float layer it would get a
    # packed copy of its own. INT4, nothing is packed, and the embedding is the only float copy of the matrix.
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    vocab_sized = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point() and t.shape[0] == 128256
                   and t.shape[-1] == 32]
    assert len(vocab_sized) == 1 and vocab_sized[0] is model.tok_embeddings.weight
    # what Llama.build built is quantize_model's result on the float folder
    expected = quantize_model(Transformer.from_pretrained(tmp_path, dtype=torch.float32, pack=False), 32,
                              quantize_output=True)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(model.state_dict()[key], tensor), key
    # packing again finds nothing to pack, and unpacking does not tie the INT4 copy back to the embedding
    assert pack_weights(model, min_weights=0) == 0
    unpack_weights(model)
    assert isinstance(model.output, Int4Linear) and not hasattr(model.output, "weight")
    generated, _ = llama.generate([[128000, 791, 6864]], 4, temperature=0.0, stop_tokens=[])
    assert len(generated[0]) == 4


def test_llama_build_int4_output_without_a_group_size_names_the_argument():
    with pytest.raises(InputError, match=r"Llama.build: int4_output .*pass int4_group_size too"):
        Llama.build(int4_output=True)
    with pytest.raises(InputError, match=r"Llama.build: int4_output must be true or false"):
        Llama.build(int4_group_size=32, int4_output="yes")
