"""Nothing half-written: a conversion, a quantization or a golden that fails (or is interrupted) mid-write
leaves its destination absent, or as it was, and no temporary behind (llama31/checkpoints/atomic.py)."""

import json

import numpy as np
import pytest
import torch

from llama31 import ModelArgs, Transformer
from llama31.checkpoints import save_hf
from llama31.convert import convert
from llama31.convert import main as convert_main
from llama31.quant.checkpoint import quantize_checkpoint
from reference.fileformat import Tensors, save

# dim 8 and hidden 8: the smallest shapes INT4 (group size 8) takes; a few hundred parameters
ARGS = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=8, max_seq_len=32)


@pytest.fixture
def source(tmp_path):
    torch.manual_seed(0)
    save_hf(tmp_path / "src", ARGS, Transformer(ARGS).state_dict())
    return tmp_path / "src"


def failing_after(calls: int, error=OSError("disk full")):
    """A stand-in for a tensor writer that writes `calls` files (partly), then fails."""
    count = {"n": 0}

    def write(tensors, path, *args, **kwargs):
        count["n"] += 1
        with open(path, "wb") as f:
            f.write(b"\x00" * 64)  # a partial file, as a full disk leaves one
        if count["n"] > calls:
            raise error

    return write


def interrupted(*args, **kwargs):
    raise KeyboardInterrupt


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("to, error", [("hf", OSError("disk full")), ("meta", KeyboardInterrupt())])
def test_a_conversion_that_fails_mid_write_leaves_no_destination(source, tmp_path, monkeypatch, to, error):
    import llama31.checkpoints.hf as hf
    import llama31.checkpoints.meta as meta

    monkeypatch.setattr(hf, "save_file", failing_after(0, error))
    monkeypatch.setattr(meta.torch, "save", failing_after(0, error))
    with pytest.raises(type(error)):
        convert(source, tmp_path / "dst", to=to)
    assert not (tmp_path / "dst").exists() and leftovers(tmp_path) == []


def test_a_failed_conversion_into_an_empty_folder_leaves_it_empty(source, tmp_path, monkeypatch):
    import llama31.checkpoints.hf as hf

    (tmp_path / "dst").mkdir()
    monkeypatch.setattr(hf, "save_file", failing_after(0))
    assert convert_main([str(source), str(tmp_path / "dst"), "--to", "hf"]) == 1
    assert list((tmp_path / "dst").iterdir()) == [] and leftovers(tmp_path) == []


def test_a_complete_conversion_appears_whole(source, tmp_path):
    convert(source, tmp_path / "dst", to="meta")
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["consolidated.00.pth", "params.json"]
    assert leftovers(tmp_path) == []
    assert oct((tmp_path / "dst").stat().st_mode & 0o777) != oct(0o700)  # not the temporary's private mode
    Transformer.from_pretrained(tmp_path / "dst")


def test_a_quantization_that_fails_mid_write_leaves_no_destination(source, tmp_path, monkeypatch):
    import llama31.quant.checkpoint as checkpoint

    # small shards, so that several are written before the writer fails
    monkeypatch.setattr(checkpoint, "save_file", failing_after(2))
    with pytest.raises(OSError, match="disk full"):
        quantize_checkpoint(source, tmp_path / "int4", group_size=8, dtype=torch.float32, max_shard_bytes=64)
    assert not (tmp_path / "int4").exists() and leftovers(tmp_path) == []


def test_a_golden_that_fails_mid_write_leaves_the_previous_one_untouched(tmp_path, monkeypatch):
    import safetensors.numpy

    path = tmp_path / "golden.json"
    tensors = Tensors()
    save(path, {"format": "x", "a": tensors.put("a", np.zeros(3, dtype=np.float32))}, tensors)
    before = path.read_bytes(), path.with_suffix(".safetensors").read_bytes()

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_after(0))
    tensors = Tensors()
    with pytest.raises(OSError, match="disk full"):
        save(path, {"format": "y", "a": tensors.put("a", np.ones(5, dtype=np.float32))}, tensors)
    assert (path.read_bytes(), path.with_suffix(".safetensors").read_bytes()) == before
    assert leftovers(tmp_path) == []

    monkeypatch.undo()  # the real tensor writer again; now Ctrl-C arrives while the JSON is written
    monkeypatch.setattr("reference.fileformat.dumps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save(path, {"format": "z"}, None)
    assert (path.read_bytes(), path.with_suffix(".safetensors").read_bytes()) == before
    assert json.loads(path.read_text())["format"] == "x" and leftovers(tmp_path) == []
