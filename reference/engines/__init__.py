"""Adapters that run an engine on a golden's prompt ids and write a candidate (see common.py for the contract).

    python -m reference.engines.hf       --ckpt-dir DIR --golden GOLDEN --out CANDIDATE [--dtype bfloat16]
    python -m reference.engines.llama31  --ckpt-dir DIR --golden GOLDEN --out CANDIDATE [--dtype bfloat16]
    python -m reference.engines.llamacpp (--ckpt-dir DIR | --gguf FILE) --golden GOLDEN --out CANDIDATE
"""
