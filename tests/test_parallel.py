"""Model parallelism: a model split over 2 or 4 processes (torchrun, gloo on CPU) computes what one process
computes; each process reads only its slice of the checkpoint; a broken file stops every process with its name;
Meta folders reshard to any number of files and back bit-exactly.

The multi-process checks share two torchrun launches (module fixtures), each loading several folders, to keep
the file fast on a 2-core machine: process start-up (importing torch) dominates.

Tolerance 1e-5 (max abs logit error, float32): the row-parallel layers add N partial products with an
all-reduce where one process computes one matmul, so the sums are rounded in a different order. Measured:
9.5e-7 with 2 and with 4 processes, on logits of magnitude up to ~2.5 (a few float32 ulps). A wrong split (a slice
from the wrong rank, a kv head not repeated, a q/k slice permuted with the wrong head count) moves logits by > 1e-2.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hf_model
from parallel_worker import greedy, prompt_tokens
from torch import nn
from torch.nn import Linear

from llama31 import ModelArgs, Transformer
from llama31.checkpoints import open_checkpoint, shard_dim
from llama31.checkpoints.meta import MetaCheckpoint
from llama31.convert import convert

TOL = 1e-5
ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "parallel_worker.py"
LAUNCH_TIMEOUT = 180  # seconds; a launch takes ~8 s here, a hang would take forever
FOLDERS = ["meta2", "meta1", "hf"]  # 2 files (one per rank), 1 file (split on load), safetensors (sliced)


def torchrun(nproc: int, out: Path, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(out), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(out), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The tiny model (4 query heads, 2 kv heads) as an HF folder, Meta folders of 2 and 1 files, and broken
    copies of the 2-file folder."""
    root = tmp_path_factory.mktemp("parallel")
    hf_model(seed=41).save_pretrained(root / "hf")
    convert(root / "hf", root / "meta2", to="meta", shards=2)
    convert(root / "hf", root / "meta1", to="meta", shards=1)

    convert(root / "hf", root / "truncated01", to="meta", shards=2)  # an incomplete download of rank 1's file
    data = (root / "truncated01" / "consolidated.01.pth").read_bytes()
    (root / "truncated01" / "consolidated.01.pth").write_bytes(data[:len(data) // 2])

    convert(root / "hf", root / "badshape01", to="meta", shards=2)  # rank 1's file holds a wrong-sized wq
    shard = torch.load(root / "badshape01" / "consolidated.01.pth", weights_only=True)
    shard["layers.0.attention.wq.weight"] = shard["layers.0.attention.wq.weight"][:16].clone()
    torch.save(shard, root / "badshape01" / "consolidated.01.pth")

    convert(root / "hf", root / "missing00", to="meta", shards=2)
    (root / "missing00" / "consolidated.00.pth").unlink()
    return root


@pytest.fixture(scope="module")
def reference(folders):
    """One process: logits and greedy tokens of the same prompt."""
    model = Transformer.from_pretrained(folders / "hf")
    with torch.no_grad():
        logits = model(prompt_tokens())
    return {"logits": logits, "greedy": greedy(model, prompt_tokens(), 8),
            "numel": sum(p.numel() for p in model.parameters()),
            "replicated": sum(p.numel() for n, p in model.named_parameters() if "norm" in n)}


def _launch(folders, nproc, *args):
    out = folders / f"out{nproc}"
    out.mkdir()
    run = torchrun(nproc, out, *args)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) if (out / f"rank{r}.pt").exists() else None
             for r in range(nproc)]
    assert all(ranks), f"a rank wrote no results:\n{run.stdout}\n{run.stderr}"
    return run, ranks


@pytest.fixture(scope="module")
def two(folders):
    """2 processes: the three good folders, the broken ones (errors caught), then a broken one left uncaught."""
    return _launch(folders, 2, *(folders / f for f in FOLDERS),
                   "--expect-error", folders / "truncated01", folders / "badshape01", folders / "missing00",
                   "--fail", folders / "truncated01")


@pytest.fixture(scope="module")
def four(folders):
    """4 processes over 2 kv heads: each rank holds 1 query head and a copy of 1 kv head."""
    run, ranks = _launch(folders, 4, *(folders / f for f in FOLDERS))
    assert run.returncode == 0, run.stderr
    return run, ranks


# ---------------------------------------------------------------- several processes equal one

@pytest.mark.parametrize("folder", FOLDERS)
def test_two_processes_give_the_logits_of_one(two, reference, folder):
    _, ranks = two
    assert ranks[0]["world_size"] == 2
    assert ranks[0][folder]["local_heads"] == 2  # really split: 2 of the 4 query heads per rank
    err = max((r[folder]["logits"] - reference["logits"]).abs().max().item() for r in ranks)
    print(f"2 processes, {folder}: max abs logit error {err:.1e}")
    assert err <= TOL
    # every rank holds the same full logits, bit for bit: with one seed, all ranks sample the same tokens
    assert all(torch.equal(r[folder]["logits"], ranks[0][folder]["logits"]) for r in ranks)


@pytest.mark.parametrize("folder", FOLDERS)
def test_four_processes_over_two_kv_heads_give_the_logits_of_one(four, reference, folder):
    _, ranks = four
    assert ranks[0][folder]["local_heads"] == 1
    err = max((r[folder]["logits"] - reference["logits"]).abs().max().item() for r in ranks)
    print(f"4 processes, {folder}: max abs logit error {err:.1e}")
    assert err <= TOL
    assert all(torch.equal(r[folder]["logits"], ranks[0][folder]["logits"]) for r in ranks)


def test_greedy_generation_with_the_kv_cache_gives_the_tokens_of_one_process(two, four, reference):
    for _, ranks in (two, four):
        for r in ranks:
            for folder in FOLDERS:
                assert torch.equal(r[folder]["greedy"], reference["greedy"]), folder


def test_each_process_holds_a_1_over_n_slice_of_the_weights(two, four, reference):
    """Memory per rank: 1/N of the split weights plus the replicated norms (kv heads repeated with 4 ranks)."""
    split = reference["numel"] - reference["replicated"]
    assert two[1][0]["meta2"]["numel"] == split // 2 + reference["replicated"]
    # with 4 ranks over 2 kv heads, wk and wv (2 layers x 2 x 32 x 64) are held twice in all
    assert four[1][0]["meta2"]["numel"] == (split + 2 * 2 * 32 * 64) // 4 + reference["replicated"]


# ---------------------------------------------------------------- failures stop every rank

def test_a_broken_file_fails_every_rank_naming_the_file(two):
    _, ranks = two
    assert ranks[1]["truncated01"].startswith("InputError: ")  # llama31.errors.InputError, a ValueError
    assert "consolidated.01.pth: cannot be loaded" in ranks[1]["truncated01"]
    # rank 0's own file is fine: it is told which rank failed, and why
    assert ranks[0]["truncated01"].startswith("RuntimeError: rank 1 failed to load")
    assert "consolidated.01.pth: cannot be loaded" in ranks[0]["truncated01"]
    for r in ranks:
        # checked against the config before any module is built: rank 1's file holds half the rows it should
        assert "params.json: n_heads gives attention.wq 4 heads x head_dim 16 = 64 output rows, but " \
               "layers.0.attention.wq.weight in " in r["badshape01"] and "consolidated.01.pth has 32" in r["badshape01"]
        assert "consolidated.00.pth is missing" in r["missing00"]


def test_the_launch_ends_when_a_rank_fails(two):
    run, _ = two  # finished within LAUNCH_TIMEOUT, or subprocess.run raised TimeoutExpired
    assert run.returncode != 0
    assert "loaded without error" not in run.stderr
    assert "consolidated.01.pth: cannot be loaded" in run.stderr
    assert "RuntimeError: rank 1 failed to load" in run.stderr


# ---------------------------------------------------------------- reading slices (one process)

def _merge(slices, name, dim, n_kv_heads, world_size):
    if ".attention.wk." in name or ".attention.wv." in name:
        slices = slices[::max(world_size // n_kv_heads, 1)]  # one copy of each repeated kv head
    return torch.cat(slices, dim=dim)


@pytest.mark.parametrize("files", [1, 2, 4])
def test_rank_slices_join_to_the_full_tensors(tmp_path, files):
    """For Meta folders of 1, 2 and 4 files and HF folders, on 1, 2, 4 and 8 ranks (8 > 4 kv heads: repeated),
    rank slices read with read_shard put together give read()'s full tensor."""
    hf_model(seed=42, num_attention_heads=8, num_key_value_heads=4, hidden_size=128).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "meta", to="meta", shards=files)
    for folder in (tmp_path / "meta", tmp_path / "hf"):
        full = open_checkpoint(folder)
        for world_size in (1, 2, 4, 8):
            ckpts = [open_checkpoint(folder, rank=r, world_size=world_size) for r in range(world_size)]
            for name in full.keys():
                slices = [c.read_shard(name, r, world_size) for r, c in enumerate(ckpts)]
                dim, expected = shard_dim(name), full.read(name)
                if dim is None:
                    assert all(torch.equal(s, expected) for s in slices), name
                else:
                    assert torch.equal(_merge(slices, name, dim, 4, world_size), expected), (folder, name, world_size)


def test_with_as_many_ranks_as_files_each_rank_opens_only_its_own_file(folders):
    for rank in range(2):
        ckpt = MetaCheckpoint(folders / "meta2", rank=rank, world_size=2)
        for name in ckpt.keys():
            ckpt.read_shard(name, rank, 2)
        assert list(ckpt._shards) == [rank]


def test_kv_heads_are_repeated_when_ranks_outnumber_them(folders):
    """4 ranks over 2 kv heads: ranks 0 and 1 hold kv head 0, ranks 2 and 3 kv head 1 (head h's queries use
    kv head h // n_rep: rank r's single query head is r, and r // 2 is its kv head)."""
    full = open_checkpoint(folders / "hf")
    wk = full.read("layers.0.attention.wk.weight")  # (2 kv heads * 16, 64)
    for rank, head in [(0, 0), (1, 0), (2, 1), (3, 1)]:
        for folder in ("hf", "meta2", "meta1"):
            ckpt = open_checkpoint(folders / folder, rank=rank, world_size=4)
            assert torch.equal(ckpt.read_shard("layers.0.attention.wk.weight", rank, 4), wk[16 * head:16 * (head + 1)])


# ---------------------------------------------------------------- construction

def test_model_parallel_size_must_fit_the_heads():
    from llama31.parallel import ParallelLayers

    class ThreeRanks(ParallelLayers):
        def __init__(self):  # the sizes of rank 0 of 3, without a process group
            self.model_parallel_size, self.model_parallel_rank = 3, 0

    # Attention asks the factory how many heads its rank holds (the 2- and 4-process tests above run that path)
    with pytest.raises(ValueError, match="model-parallel size 3 must divide n_heads 4 and divide or be a multiple "
                                         "of n_kv_heads 2"):
        ThreeRanks().local_heads(4, 2)
    assert ThreeRanks().local_heads(6, 3) == (2, 1)
    assert ThreeRanks().local_heads(6, 1) == (2, 1)  # 1 kv head repeated on all 3 ranks


def test_one_process_builds_plain_modules_and_no_process_group(monkeypatch):
    from llama31 import parallel

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    layers = parallel.ParallelLayers()
    model = Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=12, hidden_dim=32),
                        layers=layers, device="meta")
    assert layers.model_parallel_size == 1 and parallel.init_model_parallel() == 1
    assert type(model.layers[0].attention.wq) is Linear and type(model.tok_embeddings) is nn.Embedding
    assert not torch.distributed.is_initialized()
    assert parallel.is_main_process() and parallel.rank() == 0


# ---------------------------------------------------------------- resharding Meta folders

def _files(folder):
    return {p.name: torch.load(p, weights_only=True) for p in sorted(folder.glob("consolidated.*.pth"))}


def test_resharding_1_2_4_1_files_round_trips_bit_exactly(tmp_path):
    hf_model(seed=43, num_attention_heads=8, num_key_value_heads=4, hidden_size=128).save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "m1", to="meta", shards=1)
    convert(tmp_path / "m1", tmp_path / "m2", to="meta", shards=2)
    run = subprocess.run([sys.executable, "-m", "llama31.convert", str(tmp_path / "m2"), str(tmp_path / "m4"),
                          "--to", "meta", "--shards", "4"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    convert(tmp_path / "m4", tmp_path / "back", to="meta", shards=1)
    assert len(_files(tmp_path / "m2")) == 2 and len(_files(tmp_path / "m4")) == 4
    original, back = _files(tmp_path / "m1")["consolidated.00.pth"], _files(tmp_path / "back")["consolidated.00.pth"]
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert (tmp_path / "m1" / "params.json").read_text() == (tmp_path / "back" / "params.json").read_text()
    # the 4 files split as 4 ranks read them
    quarter = _files(tmp_path / "m4")["consolidated.02.pth"]
    assert torch.equal(quarter["layers.1.attention.wo.weight"], original["layers.1.attention.wo.weight"][:, 64:96])


def test_more_files_than_kv_heads_is_refused_with_the_reason(folders, tmp_path):
    with pytest.raises(ValueError, match=r"4 files cannot split 2 kv heads evenly .* write a divisor of 2 files"):
        convert(folders / "meta2", tmp_path / "m4", to="meta", shards=4)
