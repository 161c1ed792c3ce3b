"""examples/train.py: its sparse-vocabulary loss is the full-vocabulary model's cross-entropy, a few steps of the
tiny preset lower the loss, and a stopped and resumed run ends with the same weights as an uninterrupted one."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llama31.demo.compact import expand_vocabulary
from llama31.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
FULL_VOCAB = 128256


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_example", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seen_ids(n, seed=0):
    """n distinct real ids, sorted, spread over the whole vocabulary (special tokens included)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(FULL_VOCAB, generator=generator)[:n].sort().values


def test_sparse_loss_is_the_cross_entropy_of_the_explicitly_expanded_logits(train):
    ids = seen_ids(50)
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 7, len(ids), generator=generator, dtype=torch.float64) * 5  # (bs, seqlen, n_seen)
    targets = torch.randint(0, len(ids), (3, 7), generator=generator)  # compact ids
    full = torch.zeros(3, 7, FULL_VOCAB, dtype=torch.float64)  # every unseen row's logit is exactly 0
    full[..., ids] = logits
    oracle = F.cross_entropy(full.flatten(0, 1), ids[targets].flatten())
    loss = train.sparse_vocab_loss(logits, targets, FULL_VOCAB - len(ids))
    # float64: the two differ only in the order of the additions inside logsumexp (~1e-16 relative on a loss of
    # ~15); 1e-12 is far below any real difference (a missing unseen term alone moves it by ~1e-1)
    assert abs(loss.item() - oracle.item()) < 1e-12


def test_the_exported_full_vocabulary_model_gives_the_training_loss(train):
    """A compact model (n_seen rows) expanded to 128256 rows, as llama31.demo does for the shipped model."""
    from llama31.config import ModelArgs

    ids = seen_ids(40, seed=2)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=len(ids), max_seq_len=64)
    compact = Transformer(args)
    train.init_weights(compact, seed=3)
    with torch.no_grad():  # larger output rows: confident logits, so that the unseen mass is not the whole loss
        compact.output.weight.mul_(20)
    full = Transformer(args.replace(vocab_size=FULL_VOCAB))
    full.load_state_dict(expand_vocabulary(compact.state_dict(), ids, FULL_VOCAB))

    generator = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, len(ids), (2, 17), generator=generator)  # compact ids
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        sparse = train.sparse_vocab_loss(compact(inputs), targets, FULL_VOCAB - len(ids))
        full_logits = full(ids[inputs])  # (2, 16, 128256)
    oracle = F.cross_entropy(full_logits.flatten(0, 1), ids[targets].flatten())
    # The logits are float32: the two models' output matmuls have different shapes (40 vs 128256 rows), so their
    # sums may round differently (~1e-6 relative), and the full logsumexp adds 128256 float32 terms (~1e-6
    # relative); on a loss of ~10 that is ~1e-5 at worst. A wrong row, a missing zero row or a wrong unseen count
    # moves the loss by more than 1e-3.
    assert abs(sparse.item() - oracle.item()) < 1e-4
    assert torch.equal(full_logits[..., ids], full_logits[..., ids])  # no NaN
    unseen = torch.ones(FULL_VOCAB, dtype=torch.bool)
    unseen[ids] = False
    assert full_logits[..., unseen].abs().max() == 0  # a zero row's logit is exactly 0


@pytest.fixture
def tiny_corpus(tmp_path):
    """A corpus with structure to learn: each real id is followed by one of two successors."""
    ids = seen_ids(24, seed=5).numpy()
    rng = np.random.default_rng(6)
    walk = [0]
    for _ in range(6000):
        walk.append((walk[-1] * 5 + rng.integers(1, 3)) % len(ids))
    tokens = ids[np.array(walk)].astype(np.uint32)
    np.save(tmp_path / "train.npy", tokens[:5000])
    np.save(tmp_path / "heldout.npy", tokens[5000:])
    return tmp_path


def run(train, data, out, *extra):
    return train.main(["--preset", "tiny", "--data", str(data), "--out", str(out), "--threads", "1", *extra])


def test_a_few_steps_of_the_tiny_preset_lower_the_loss(train, tiny_corpus, tmp_path):
    history = run(train, tiny_corpus, tmp_path / "run", "--steps", "30")
    first, last = history["train"][0][2], history["train"][-1][2]
    # Untrained, the loss is about log(128256) = 11.8 nats. The corpus has 1 bit of entropy per token (0.69 nats);
    # knowing only which 24 ids occur gives log(24) = 3.2 nats. Below 1.5 the model has learned the successors.
    assert first > 10 and last < 1.5, history["train"]
    assert history["final_heldout"] < 1.5
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and (tmp_path / "run" / "history.json").is_file()


def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(train, tiny_corpus, tmp_path):
    run(train, tiny_corpus, tmp_path / "straight", "--steps", "12")
    run(train, tiny_corpus, tmp_path / "resumed", "--steps", "12", "--stop-at", "7")
    history = run(train, tiny_corpus, tmp_path / "resumed", "--steps", "12", "--resume")
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 12
    assert history["resumed"][0][0] == 7
    for name, tensor in straight["model"].items():
        # the same batches (seeded per step), the same optimizer state and the same kernels on one thread
        assert torch.equal(resumed["model"][name], tensor), name


def test_resume_refuses_other_settings(train, tiny_corpus, tmp_path):
    run(train, tiny_corpus, tmp_path / "run", "--steps", "4")
    with pytest.raises(SystemExit, match="lr"):
        run(train, tiny_corpus, tmp_path / "run", "--steps", "4", "--lr", "0.5", "--resume")
