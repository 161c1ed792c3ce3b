"""Golden outputs that other Llama 3.1 inference engines test themselves against, and the checker they run.

    python -m reference.make_tiny --out reference/checkpoints          the tiny random checkpoints, from seeds
    python -m reference.make --ckpt-dir DIR --out GOLDEN.json          a golden, written by llama31 (fp32, CPU)
    python -m reference.engines.hf --ckpt-dir DIR --golden G --out C   a candidate from HF transformers
    python -m reference.check GOLDEN.json CANDIDATE.json --tier fp32   is the candidate right? where does it diverge?

Modules, in the order the data flows:
    prompts.py      prompt specs (text, chat dialogs, a long-context probe) -> token ids; the tiny vocab map
    make_tiny.py    the shipped tiny checkpoints, deterministic from a seed
    logits.py       logits -> top-k ids, logprobs, log-sum-exp; hidden-state summaries
    engines/        adapters that run an engine on a golden's prompt ids and write a candidate
    make.py         a golden: llama31's results plus provenance and debug aids, cross-checked against HF
    fileformat.py   reading, validating and writing golden and candidate files (JSON + safetensors)
    compare.py      per-position comparisons and the KL estimate
    check.py        the tiers and the verdict (report.py words the report)

Used from a checkout (the repository root on sys.path); it is not part of the installed llama31 package.
See reference/README.md.
"""
