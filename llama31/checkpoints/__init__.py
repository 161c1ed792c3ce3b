"""Checkpoint folders: Meta (params.json + consolidated.NN.pth) and Hugging Face (config.json + safetensors).

names.py   the name table and the q/k row permutation between the two
meta.py    reading (shards merged) and writing (split as fairscale splits) Meta folders
hf.py      reading and writing HF folders
load.py    strict loading into a Transformer
"""

from llama31.checkpoints.hf import HFCheckpoint, save_hf
from llama31.checkpoints.load import load_pretrained, load_weights, open_checkpoint
from llama31.checkpoints.meta import MetaCheckpoint, save_meta, shard_dim

__all__ = ["HFCheckpoint", "MetaCheckpoint", "load_pretrained", "load_weights", "open_checkpoint", "save_hf",
           "save_meta", "shard_dim"]
