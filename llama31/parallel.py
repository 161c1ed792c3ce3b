"""Model (tensor) parallelism: one model split across several processes, the one place that knows about
fairscale and process groups.

70B and 405B do not fit one device. Each of N processes ("ranks") holds a 1/N slice of every large weight, and
the ranks exchange activations once per column/row pair of projections, as Meta's reference code does:

    role        fairscale layer                              each rank holds            after the matmul
    ---------   ------------------------------------------   ------------------------   --------------------------
    column      ColumnParallelLinear(gather_output=False)     1/N of the output rows     keeps its slice of heads
    kv          the same, over the kv heads                   1/N of the kv heads (*)    keeps its slice of heads
    row         RowParallelLinear(input_is_parallel=True)     1/N of the input columns   all-reduce (sum) the parts
    embedding   VocabParallelEmbedding                        1/N of the vocabulary      all-reduce (sum) the parts
    output      ColumnParallelLinear(gather_output=True)      1/N of the vocabulary      all-gather full logits

(*) or, with more ranks than kv heads, the one kv head its query heads read.
So attention splits by heads (wq, wk, wv column; wo row) and the FFN by hidden units (w1, w3 column; w2 row):
each block needs just two all-reduces. These splits are exactly how Meta's consolidated.NN.pth files are split.

Under torchrun (WORLD_SIZE > 1) ``Transformer.from_pretrained`` calls ``init_model_parallel()`` and builds with
``ParallelLayers``; each rank then reads only its slice of the checkpoint. With one process nothing here runs:
``ParallelLayers`` gives plain torch modules and no process group is created.

    torchrun --nproc_per_node 8 examples/generate.py --ckpt-dir Meta-Llama-3.1-70B/

Every rank ends with the same full logits, so every rank must sample with the same seed to pick the same tokens.
"""

from __future__ import annotations

import io
import os
from contextlib import contextmanager, redirect_stdout

import torch
import torch.distributed as dist
from torch import nn

from llama31.model.layers import Layers


def _fairscale():
    """fairscale's model-parallel modules, imported when a model is split (one process never needs them)."""
    from fairscale.nn.model_parallel import initialize, layers

    return initialize, layers


def world_size() -> int:
    """How many processes run the model: the process group's size, or torchrun's WORLD_SIZE before it exists."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank, 0 .. world_size() - 1 (0 without torchrun)."""
    if dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the one process that should print and write files."""
    return rank() == 0


def init_model_parallel(backend: str | None = None) -> int:
    """Set up the process group and fairscale's model-parallel group over all processes; returns their number.

    Safe to call again (it does nothing the second time) and with one process (it does nothing at all).
    backend: None picks NCCL for CUDA tensors when every process on this machine has a GPU of its own (and
    gloo for CPU tensors, so a model left on the CPU still runs), gloo alone otherwise (CPU, no NCCL).
    With a GPU per process, each selects its own (LOCAL_RANK): "cuda" means that GPU from then on.
    Reads torchrun's environment: WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT.
    """
    n = world_size()
    if n == 1:
        return 1
    gpu_each = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if gpu_each:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if gpu_each else "gloo"))
    fs_init, _ = _fairscale()
    if not fs_init.model_parallel_is_initialized():
        # every process holds one slice of one model; fairscale announces its groups on stdout, which belongs
        # to the caller (only rank 0 prints generated text)
        with redirect_stdout(io.StringIO()):
            fs_init.initialize_model_parallel(n)
    return n


def close() -> None:
    """Tear down the process groups at the end of a run (NCCL warns at exit otherwise). Safe without any."""
    if not dist.is_initialized():
        return
    fs_init, _ = _fairscale()
    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def all_ranks_succeed(what: str):
    """Run a block on every rank; if it raises on any rank, raise on every rank.

    Without this, a rank whose checkpoint file is broken would exit while the others wait for it in their
    first collective. Each rank's own error is re-raised as is; the others raise one naming the failed rank.
    """
    error = None
    try:
        yield
    except Exception as e:  # re-raised below, once every rank has heard of it
        error = e
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    for failed_rank, message in enumerate(errors):
        if message is not None:
            raise RuntimeError(f"rank {failed_rank} failed {what}: {message}")


class ParallelLayers(Layers):
    """fairscale's tensor-parallel layers over all processes, split as Meta's model-parallel files are split.

    Creating one sets up the process groups (``init_model_parallel``). With a single process it builds the
    plain ``Layers`` modules. Weights are left uninitialised: load them (``Transformer.from_pretrained``).
    """

    def __init__(self):
        self.model_parallel_size = init_model_parallel()
        self.model_parallel_rank = rank()

    def local_heads(self, n_heads: int, n_kv_heads: int) -> tuple[int, int]:
        """Each of mp ranks computes n_heads / mp query heads and the kv heads they read. With more ranks than kv
        heads (70B on 16 ranks), each kv head is repeated on mp / n_kv_heads ranks, one per rank (see kv)."""
        mp = self.model_parallel_size
        if n_heads % mp or max(n_kv_heads, mp) % min(n_kv_heads, mp):
            raise ValueError(f"the model-parallel size {mp} must divide n_heads {n_heads} and divide or be a "
                             f"multiple of n_kv_heads {n_kv_heads}")
        return n_heads // mp, max(n_kv_heads, mp) // mp

    def kv(self, in_features: int, n_kv_heads: int, head_dim: int, *, dtype: torch.dtype, device) -> nn.Module:
        # with more ranks than kv heads, wk and wv are built as if the model had one kv head per rank; each rank
        # loads the one its query heads read (llama31/checkpoints/sharding.py)
        n_kv_heads = max(n_kv_heads, self.model_parallel_size)
        return self.column(in_features, n_kv_heads * head_dim, dtype=dtype, device=device)

    def column(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        if self.model_parallel_size == 1:
            return super().column(in_features, out_features, dtype=dtype, device=device)
        # each rank keeps its slice of the outputs: its own heads (wq/wk/wv) or hidden units (w1/w3)
        _, fs_layers = _fairscale()
        return _placed(fs_layers.ColumnParallelLinear(in_features, out_features, bias=False, gather_output=False,
                                            init_method=_keep), dtype, device)

    def row(self, in_features: int, out_features: int, *, dtype: torch.dtype, device) -> nn.Module:
        if self.model_parallel_size == 1:
            return super().row(in_features, out_features, dtype=dtype, device=device)
        # the input is the column layer's slice; the partial products are summed across ranks
        _, fs_layers = _fairscale()
        return _placed(fs_layers.RowParallelLinear(in_features, out_features, bias=False, input_is_parallel=True,
                                         init_method=_keep), dtype, device)

    def embedding(self, vocab_size: int, dim: int, *, dtype: torch.dtype, device) -> nn.Module:
        if self.model_parallel_size == 1:
            return super().embedding(vocab_size, dim, dtype=dtype, device=device)
        _, fs_layers = _fairscale()
        return _placed(fs_layers.VocabParallelEmbedding(vocab_size, dim, init_method=_keep), dtype, device)

    def output(self, dim: int, vocab_size: int, *, dtype: torch.dtype, device) -> nn.Module:
        if self.model_parallel_size == 1:
            return super().output(dim, vocab_size, dtype=dtype, device=device)
        # every rank needs every logit to sample the next token: gather the vocabulary slices
        _, fs_layers = _fairscale()
        output = fs_layers.ColumnParallelLinear(dim, vocab_size, bias=False, gather_output=True, init_method=_keep)
        return _placed(output, dtype, device)


def _keep(weight: torch.Tensor) -> torch.Tensor:
    """fairscale's init_method: leave the weight as it is. Any real initialisation would make every rank
    build (and fill) the full, unsplit master weight first; the loader overwrites the weights anyway."""
    return weight


def _placed(layer: nn.Module, dtype: torch.dtype, device) -> nn.Module:
    """fairscale allocates its weight as float32 on the CPU (it takes no dtype or device): replace it by an
    uninitialised one of the same (per-rank) shape in the requested dtype and device ("meta" while loading)."""
    layer.weight = nn.Parameter(torch.empty(layer.weight.shape, dtype=dtype, device=device))
    return layer
