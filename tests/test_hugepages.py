"""Specification of llama31/cpu/hugepages.py: large weights moved into memory that asks the kernel for 2 MiB
pages keep their values, their objects and their ties, and that memory is returned when the tensors are freed.

Whether the kernel asked for huge pages is read from /proc/self/smaps (the region's 'hg' flag), not from the
module; whether it then found free 2 MiB of physical memory is the kernel's business and is not asserted.
"""

import gc
from pathlib import Path

import pytest
import torch
from conftest import memory_flags
from torch import nn

from llama31 import Transformer
from llama31.cpu import hugepages

needs_huge_pages = pytest.mark.skipif(hugepages.unsupported() is not None,
                                      reason=f"no transparent huge pages here: {hugepages.unsupported()}")
BIG = hugepages.PAGE_BYTES // 4  # float32 elements in one huge page


def mapped(address: int) -> bool:
    with open("/proc/self/maps") as f:
        return any(int(a, 16) <= address < int(b, 16) for a, b in (line.split()[0].split("-") for line in f))


@needs_huge_pages
def test_empty_is_zero_filled_page_aligned_and_asks_for_huge_pages():
    t = hugepages.empty((3, BIG), torch.bfloat16)
    assert t.shape == (3, BIG) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % hugepages.PAGE_BYTES == 0
    assert "hg" in memory_flags(t)
    assert not t.any()
    assert hugepages.empty((0, 3), torch.float32).shape == (0, 3)  # no memory to map


@needs_huge_pages
def test_memory_is_returned_when_the_last_view_is_freed():
    t = hugepages.empty((4, BIG), torch.float32)
    address = t.data_ptr()
    view = t[2:]
    del t
    gc.collect()
    assert mapped(address) and view.sum() == 0  # the view holds the memory
    del view
    gc.collect()
    assert not mapped(address)


class Tied(nn.Module):
    """An embedding tied to an output layer (one huge page each and more), a small layer, a large buffer, and a
    buffer that is a view of another."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(1024, BIG // 1024 * 2)
        self.output = nn.Linear(BIG // 1024 * 2, 1024, bias=False)
        self.output.weight = self.embedding.weight
        self.small = nn.Linear(64, 64, bias=False)
        self.register_buffer("table", torch.randn(BIG + 5))
        self.register_buffer("half_table", self.table[: BIG // 2])


@needs_huge_pages
def test_use_huge_pages_moves_large_tensors_in_place_and_keeps_ties(monkeypatch):
    model = Tied()
    weight, small, table, half = model.embedding.weight, model.small.weight, model.table, model.half_table
    before = {name: t.clone() for name, t in model.state_dict().items()}
    # which tensors get huge-page memory, seen where it is made (the flags of torch's own memory are not ours to
    # assert: other code in the process may ask for huge pages too)
    made, empty = [], hugepages.empty
    monkeypatch.setattr(hugepages, "empty", lambda shape, dtype: made.append(shape) or empty(shape, dtype))

    moved = hugepages.use_huge_pages(model)

    assert moved == weight.nbytes  # the tied weight once; table shares its storage with a view: left
    assert model.embedding.weight is weight and model.output.weight is weight  # the same Parameter: still tied
    assert "hg" in memory_flags(weight) and weight.data_ptr() % hugepages.PAGE_BYTES == 0
    assert made == [tuple(weight.shape)]  # the small layer, under one huge page, got torch's memory
    assert model.small.weight is small and torch.equal(small, before["small.weight"])
    assert model.table is table and model.half_table is half and half.data_ptr() == table.data_ptr()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)  # the same bits
    x = torch.randint(0, 1024, (2, 3))
    torch.testing.assert_close(model.output(model.embedding(x)), model.embedding(x) @ before["embedding.weight"].T,
                               rtol=0, atol=0)


def test_where_huge_pages_are_off_tensors_get_torch_memory(tmp_path, monkeypatch):
    mode = tmp_path / "enabled"
    mode.write_text("always madvise [never]\n")
    monkeypatch.setattr(hugepages, "_MODE_FILE", mode)
    assert "[never]" in hugepages.unsupported() and str(mode) in hugepages.unsupported()
    monkeypatch.setattr(hugepages, "empty", lambda shape, dtype: pytest.fail("asked for huge-page memory"))
    t = torch.randn(2 * BIG)
    assert hugepages.copy_to_huge_pages(t) is t
    model = Tied()
    weight, before = model.embedding.weight, model.embedding.weight.detach().clone()
    assert hugepages.use_huge_pages(model) == 0
    assert model.output.weight is weight and torch.equal(weight, before)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory map (Linux)")
def test_a_model_that_viewed_its_checkpoint_file_no_longer_maps_it(hf_folder):
    """Weights loaded in the file's dtype are views of the memory-mapped safetensors file; after use_huge_pages
    every tensor has memory of its own (small ones too), so the file is unmapped, and the model computes the same
    logits."""
    folder, _ = hf_folder(seed=0, hidden_size=128, intermediate_size=4096, num_attention_heads=4,
                          num_key_value_heads=2, tie_word_embeddings=True)

    def mapped() -> bool:
        gc.collect()
        return str(folder) in Path("/proc/self/maps").read_text()

    model = Transformer.from_pretrained(folder, dtype=torch.float32, pack=False)  # the file holds float32
    tokens = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        before = model(tokens)
    assert mapped()  # the check can fail: the weights are views of the file
    hugepages.use_huge_pages(model)
    assert not mapped()
    with torch.no_grad():
        assert torch.equal(model(tokens), before)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the process's memory (Linux)")
def test_the_replaced_tensors_memory_goes_back_to_the_system():
    """Tensors of a few MiB live in malloc's heap once its mmap threshold has grown; freed, glibc would keep them
    for reuse, counted in the process's memory. After use_huge_pages the process holds one copy of the weights,
    not two. Run in a fresh process, whose heap this test controls."""
    import subprocess
    import sys

    script = """
import torch
from torch import nn
from llama31.cpu import hugepages
def rss(): return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
torch.ones(4 << 20)  # 16 MiB, freed at once: that raises glibc's mmap threshold, and what follows is heap
model = nn.Module()
for i in range(64):
    model.register_buffer(f"b{i}", torch.ones(1 << 20))  # 4 MiB each, 256 MiB in all
top = torch.ones(1 << 18)  # kept: the freed blocks lie below it, where glibc does not trim on its own
before = rss()
hugepages.use_huge_pages(model)
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert after <= before + 32, f"{before} MiB before, {after} MiB after: the old copies were kept"
