"""Train a small Llama 3.1 from scratch: next-token cross-entropy on the project's own decoder.

    python examples/kjv_corpus.py                            # the corpus: out/kjv/{train,heldout}.npy
    python examples/train.py --out out/train --threads 1     # the demo model's run (the defaults are its settings)
    python examples/train.py --out out/train --resume        # continue it from out/train/checkpoint.pt
    python examples/train.py --preset tiny --out out/tiny    # a tiny model in seconds (the smoke test's)

The model is ``llama31.model.Transformer``, the same decoder that loads Meta's checkpoints: RMSNorm, grouped-query
attention with llama3-scaled RoPE, SwiGLU. The loop, top to bottom: a batch of random windows of the training ids,
logits, the loss, backward, clip the gradient norm, an AdamW step at a learning rate that warms up linearly and
then decays along a cosine; every --eval-every steps the loss on held-out chapters; a checkpoint every
--save-every steps (``--resume`` continues from it and gives the same model as an uninterrupted run: the batch
of step s is drawn from a generator seeded with (seed, s), and the optimizer state is saved); at the end the
loss on the whole held-out split and a plot of both curves (loss.png, if matplotlib is installed).

The sparse-vocabulary loss (what makes this fit on a CPU). Llama 3's vocabulary has 128256 tokens, but an
English corpus uses about 10K of them, and at this model size the output projection over all 128256 would cost
more than the rest of the model together. Tokens that never occur are never a target and never an input, so the
model is built with only the ``n_seen`` rows that occur (ids remapped to compact ids 0 .. n_seen - 1), and the
exported full-vocabulary model gets those rows where they belong and zero rows everywhere else. A zero row of
the output matrix gives a logit of exactly 0, so the full model's softmax normaliser is

    log Z = logsumexp(l_1 .. l_n_seen, 0, 0, ..., 0)  =  logaddexp(logsumexp(l_seen), log(n_unseen))

with n_unseen = 128256 - n_seen zeros, and the loss -log p(target) = log Z - l_target is computed from the
n_seen logits alone (``sparse_vocab_loss``). The numbers are those of the full-vocabulary model: what is
trained is exactly what ships.

The seen set is every id of the whole corpus, training and held-out. The few ids that occur only in held-out
chapters get rows that training only ever pushes down (they are never a training target), so the model learns
nothing about the held-out text from them; including them keeps the held-out loss exactly the full-vocabulary
model's loss with no special case for an input id that has no row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from llama31.config import ModelArgs, RopeScaling
from llama31.model import Transformer

FULL_VOCAB_SIZE = 128256  # Llama 3's vocabulary: 128000 BPE tokens + 256 special tokens

# Everything a run depends on. "demo" is the shipped model's run; "tiny" trains in seconds (tests, a first try).
PRESETS = {
    "demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, hidden_dim=768, seq_len=256, batch_size=8,
                 steps=1600, lr=2e-3, min_lr=2e-4, warmup=100, weight_decay=0.1, clip=1.0, seed=1337,
                 eval_every=100, eval_tokens=8192, save_every=100, log_every=25),
    "tiny": dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, seq_len=32, batch_size=8,
                 steps=30, lr=3e-2, min_lr=3e-3, warmup=5, weight_decay=0.1, clip=1.0, seed=1337,
                 eval_every=10, eval_tokens=512, save_every=10, log_every=5),
}
# The settings that define the model a run produces: a --resume must use the same ones.
RUN_SETTINGS = ("data", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "seq_len", "batch_size", "steps",
                "lr", "min_lr", "warmup", "weight_decay", "clip", "seed")


# ---------------------------------------------------------------------------------------------- the vocabulary
class SeenVocabulary:
    """The ids that occur in the corpus, and the map from real ids to compact ids 0 .. n_seen - 1."""

    def __init__(self, ids: torch.Tensor, full_vocab_size: int = FULL_VOCAB_SIZE):
        self.ids = torch.as_tensor(ids, dtype=torch.long).unique()  # sorted, (n_seen,)
        self.n_unseen = full_vocab_size - len(self.ids)
        self.compact_of = torch.full((full_vocab_size,), -1, dtype=torch.long)
        self.compact_of[self.ids] = torch.arange(len(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def to_compact(self, ids: torch.Tensor) -> torch.Tensor:
        """Real ids (any shape) -> compact ids; ValueError if one has no row."""
        compact = self.compact_of[ids]
        if (compact < 0).any():
            raise ValueError(f"ids {ids[compact < 0].unique().tolist()[:10]} are not in the seen vocabulary")
        return compact


def sparse_vocab_loss(logits: torch.Tensor, targets: torch.Tensor, n_unseen: int) -> torch.Tensor:
    """Mean cross-entropy of the full-vocabulary model whose n_unseen other output rows are zero (logit 0).

    logits: (..., n_seen) float32, the seen rows' logits; targets: (...) compact ids. Returns a scalar (nats).
    """
    lse_seen = torch.logsumexp(logits, dim=-1)  # (...)
    # log Z = log(sum_seen e^l + n_unseen * e^0)
    log_z = torch.logaddexp(lse_seen, torch.tensor(math.log(n_unseen), dtype=logits.dtype)) if n_unseen else lse_seen
    target_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (...)
    return (log_z - target_logit).mean()


# ---------------------------------------------------------------------------------------------- the model
def model_args(settings: argparse.Namespace, vocab_size: int) -> ModelArgs:
    """The Llama 3.1 architecture at this run's size; vocab_size: n_seen to train, 128256 to ship."""
    return ModelArgs(dim=settings.dim, n_layers=settings.n_layers, n_heads=settings.n_heads,
                     n_kv_heads=settings.n_kv_heads, hidden_dim=settings.hidden_dim, vocab_size=vocab_size,
                     rope_scaling=RopeScaling(), max_seq_len=8192)


@torch.no_grad()
def init_weights(model: Transformer, seed: int) -> None:
    """GPT-2's initialisation: every matrix ~ N(0, 0.02), the two that write into the residual stream (wo, w2)
    scaled down by sqrt(2 n_layers) so that the stream's variance does not grow with depth; norms 1."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * model.args.n_layers)
    for name, param in model.named_parameters():  # a fixed order, so a fixed draw per parameter
        if param.dim() == 2:
            std = residual_std if name.endswith(("wo.weight", "w2.weight")) else 0.02
            param.copy_(torch.randn(param.shape, generator=generator) * std)


# ---------------------------------------------------------------------------------------------- data
def training_batch(train: torch.Tensor, step: int, batch_size: int, seq_len: int, seed: int):
    """Step `step`'s batch: batch_size random windows of train (compact ids), inputs and next-token targets,
    each (batch_size, seq_len). A function of (seed, step) alone, so a resumed run sees the same batches."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(train) - seq_len, (batch_size,), generator=generator)
    windows = torch.stack([train[s:s + seq_len + 1] for s in starts.tolist()])  # (batch_size, seq_len + 1)
    return windows[:, :-1], windows[:, 1:]


def heldout_windows(ids: torch.Tensor, seq_len: int):
    """Consecutive windows that predict every token of ids after the first exactly once: (inputs, targets)
    pairs of at most seq_len tokens. Each window starts afresh: its first target is predicted from one token."""
    for start in range(0, len(ids) - 1, seq_len):
        end = min(start + seq_len, len(ids) - 1)
        yield ids[start:end], ids[start + 1:end + 1]


@torch.no_grad()
def evaluate(model: Transformer, ids: torch.Tensor, seq_len: int, n_unseen: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats/token) of the full-vocabulary model over ids (compact), in windows of seq_len."""
    total, count = 0.0, 0
    windows = list(heldout_windows(ids, seq_len))
    for i in range(0, len(windows), batch_size):
        group = windows[i:i + batch_size]
        same_length = [w for w in group if len(w[0]) == seq_len]
        batches = [same_length] + [[w] for w in group if len(w[0]) != seq_len]  # the short last window alone
        for batch in filter(None, batches):
            inputs = torch.stack([w[0] for w in batch])  # (b, seqlen)
            targets = torch.stack([w[1] for w in batch])
            loss = sparse_vocab_loss(model(inputs), targets, n_unseen)
            total += loss.item() * targets.numel()
            count += targets.numel()
    return total / count


def learning_rate(step: int, settings: argparse.Namespace) -> float:
    """Linear warm-up from 0 to lr over `warmup` steps, then a cosine from lr down to min_lr at the last step."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.min_lr + 0.5 * (settings.lr - settings.min_lr) * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, optimizer, step: int, settings, vocab: SeenVocabulary, history: dict,
                    command: list[str]) -> None:
    """Everything a resume needs; written to a temporary name and renamed, so a crash never leaves half a file."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
             "settings": {k: getattr(settings, k) for k in RUN_SETTINGS}, "vocab_ids": vocab.ids,
             "history": history, "command": command, "model_args": dataclasses.asdict(model.args)}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, settings) -> dict:
    """The checkpoint at path; SystemExit if it was made with other settings than this run's."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    differ = {k: (v, getattr(settings, k)) for k, v in state["settings"].items() if v != getattr(settings, k)}
    if differ:
        raise SystemExit(f"error: {path} was trained with other settings (checkpoint, now): {differ}; "
                         "resume with the same flags")
    return state


def plot_losses(history: dict, file: Path) -> bool:
    """Train and held-out loss against tokens seen, as a PNG; False (and says why) if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no loss plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    train, heldout = np.array(history["train"]), np.array(history["heldout"])
    ax.plot(train[:, 1] / 1e6, train[:, 2], label="train (mean of the last steps)", lw=1)
    ax.plot(heldout[:, 1] / 1e6, heldout[:, 2], "o-", label="held-out sample (the first --eval-tokens)", ms=3)
    if history.get("final_heldout") is not None:
        ax.plot(train[-1, 1] / 1e6, history["final_heldout"], "k*", ms=9, label="held-out, all tokens (end)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 8))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------- the loop
def parse_args(argv):
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    preset = first.parse_known_args(argv)[0].preset
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[first])
    parser.add_argument("--data", default="out/kjv", help="folder with train.npy and heldout.npy (kjv_corpus.py)")
    parser.add_argument("--out", default="out/train", help="folder for checkpoint.pt, history.json, loss.png")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--stop-at", type=int, help="save and stop at this step (continue later with --resume)")
    for name, value in PRESETS[preset].items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                            help=f"(default {value}, from --preset {preset})")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    """Run the training; returns the history (losses per step) that it also writes to OUT/history.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = parse_args(argv)
    command = ["python", "examples/train.py", *argv]
    torch.set_num_threads(settings.threads)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_file = out / "checkpoint.pt"

    # The corpus, as compact ids.
    data = Path(settings.data)
    train_ids = torch.from_numpy(np.load(data / "train.npy").astype(np.int64))
    heldout_ids = torch.from_numpy(np.load(data / "heldout.npy").astype(np.int64))
    vocab = SeenVocabulary(torch.cat([train_ids, heldout_ids]))
    train, heldout = vocab.to_compact(train_ids), vocab.to_compact(heldout_ids)
    eval_sample = heldout[:settings.eval_tokens + 1]

    # The model (built with the seen rows only) and the optimizer: weight decay on the matrices, not the norms.
    model = Transformer(model_args(settings, len(vocab)), dtype=torch.float32)
    init_weights(model, settings.seed)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": settings.weight_decay},
                                   {"params": vectors, "weight_decay": 0.0}], lr=settings.lr, betas=(0.9, 0.95))
    step, history = 0, {"train": [], "heldout": [], "final_heldout": None}
    if settings.resume:
        state = load_checkpoint(checkpoint_file, settings)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        history.setdefault("resumed", []).append([step, shlex.join(command)])
        command = state["command"]  # the run is still the one that command started
        print(f"resumed {checkpoint_file} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = settings.batch_size * settings.seq_len
    print(f"{len(train):,} train / {len(heldout):,} held-out tokens, {len(vocab):,} seen ids "
          f"({vocab.n_unseen:,} zero rows); {n_params / 1e6:.2f} M parameters trained, {tokens_per_step} tokens/step, "
          f"{settings.steps} steps, {settings.threads} threads")

    window_losses, window_seconds = [], 0.0
    while step < settings.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        inputs, targets = training_batch(train, step, settings.batch_size, settings.seq_len, settings.seed)
        logits = model(inputs)  # (batch_size, seq_len, n_seen), float32
        loss = sparse_vocab_loss(logits, targets, vocab.n_unseen)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        optimizer.step()
        step += 1
        window_losses.append(loss.item())
        window_seconds += time.perf_counter() - started  # training time only: evaluation and saving excluded

        if step % settings.log_every == 0 or step in (settings.steps, settings.stop_at):
            mean_loss = sum(window_losses) / len(window_losses)
            history["train"].append([step, step * tokens_per_step, mean_loss])
            history["train_seconds"] = history.get("train_seconds", 0.0) + window_seconds
            speed = len(window_losses) * tokens_per_step / window_seconds
            eta = (settings.steps - step) * window_seconds / len(window_losses)
            print(f"step {step:>5}/{settings.steps} | loss {mean_loss:.4f} | lr {learning_rate(step - 1, settings):.2e}"
                  f" | {speed:,.0f} tok/s | ETA {eta / 60:.1f} min", flush=True)
            window_losses, window_seconds = [], 0.0
        if step % settings.eval_every == 0 or step == settings.steps:
            heldout_loss = evaluate(model, eval_sample, settings.seq_len, vocab.n_unseen)
            history["heldout"].append([step, step * tokens_per_step, heldout_loss])
            print(f"step {step:>5} | held-out loss {heldout_loss:.4f} (first {len(eval_sample) - 1:,} tokens)",
                  flush=True)
        if step % settings.save_every == 0 and step % settings.log_every == 0:  # no half-counted window is saved
            save_checkpoint(checkpoint_file, model, optimizer, step, settings, vocab, history, command)
        if step == settings.stop_at:
            save_checkpoint(checkpoint_file, model, optimizer, step, settings, vocab, history, command)
            print(f"stopped at step {step}; continue with --resume")
            return history

    history["final_heldout"] = evaluate(model, heldout, settings.seq_len, vocab.n_unseen)
    history["tokens_per_second"] = step * tokens_per_step / history["train_seconds"]
    save_checkpoint(checkpoint_file, model, optimizer, step, settings, vocab, history, command)
    (out / "history.json").write_text(json.dumps(history, indent=1) + "\n")
    plot_losses(history, out / "loss.png")
    print(f"held-out loss {history['final_heldout']:.4f} nats/token (perplexity "
          f"{math.exp(history['final_heldout']):.1f}) on all {len(heldout) - 1:,} predicted held-out tokens; "
          f"checkpoint {checkpoint_file}; command: {shlex.join(command)}")
    return history


if __name__ == "__main__":
    main()
