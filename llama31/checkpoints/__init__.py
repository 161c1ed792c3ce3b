"""Checkpoint folders: Meta (params.json + consolidated.NN.pth) and Hugging Face (config.json + safetensors).

names.py     the name table and the q/k row permutation between the two
sharding.py  which slice of each parameter a model-parallel rank holds (the split of Meta's files)
meta.py      reading (files merged, or one rank's slice) and writing (split as fairscale splits) Meta folders
hf.py        reading (whole, or one rank's slice) and writing HF folders
load.py      strict loading into a Transformer (on one process, or each rank its slice)
gguf.py      writing a GGUF file, llama.cpp's format (python -m llama31.convert --to gguf)
"""

from llama31.checkpoints.hf import HFCheckpoint, save_hf
from llama31.checkpoints.load import load_pretrained, load_weights, open_checkpoint
from llama31.checkpoints.meta import MetaCheckpoint, save_meta
from llama31.checkpoints.sharding import shard_dim, shard_range

__all__ = ["HFCheckpoint", "MetaCheckpoint", "load_pretrained", "load_weights", "open_checkpoint", "save_hf",
           "save_meta", "shard_dim", "shard_range"]
