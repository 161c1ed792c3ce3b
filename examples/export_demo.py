"""Export a training run of examples/train.py as the embedded demo model, and record what it does.

    python examples/export_demo.py --checkpoint out/train/checkpoint.pt --data out/kjv

Writes, in the repository:
  llama31/demo/kjv.safetensors        the compact weights (llama31/demo/compact.py), bfloat16
  llama31/demo/record.json            the model, its corpus and training command, its held-out loss, and a greedy
                                      continuation of a fixed prompt, all measured here on the shipped weights
  tests/data/kjv_heldout_sample.json  the first tokens of the held-out split and this model's loss on them,
                                      which tests/test_demo_model.py checks the shipped model against

Everything is measured on what ships: the file is expanded into the demo's HF folder (llama31.demo's cache) and
loaded from there, the same way `Llama.build()` loads it.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # examples/ itself
from evaluate_demo import SEQ_LEN, heldout_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_FILE = ROOT / "tests" / "data" / "kjv_heldout_sample.json"
SAMPLE_TOKENS = 2049  # 2048 predicted tokens: 8 windows of SEQ_LEN
PROMPT = "And the LORD spake unto Moses, saying,"
GREEDY_TOKENS = 40


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("out/train/checkpoint.pt"))
    parser.add_argument("--data", type=Path, default=Path("out/kjv"), help="the corpus folder (kjv_corpus.py)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--unfinished", action="store_true", help="export a run that has not reached its last step "
                        "(to try the pipeline; never for the shipped model)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from llama31.config import ModelArgs, RopeScaling
    from llama31.demo import DEMO_ARGS, DEMO_FILE, RECORD_FILE, build_demo_model, demo_checkpoint
    from llama31.demo.compact import file_sha256, write_compact
    from llama31.generation import Llama

    run = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    scaling = run["model_args"]["rope_scaling"]
    trained = ModelArgs(**{**run["model_args"], "rope_scaling": RopeScaling(**scaling) if scaling else None})
    if trained.replace(vocab_size=DEMO_ARGS.vocab_size) != DEMO_ARGS:
        raise SystemExit(f"error: {args.checkpoint} has the shape {trained}, not llama31.demo.DEMO_ARGS {DEMO_ARGS}")
    if run["step"] != run["settings"]["steps"] and not args.unfinished:
        raise SystemExit(f"error: {args.checkpoint} is at step {run['step']} of {run['settings']['steps']}; "
                         "finish the run (--resume) before exporting")
    write_compact(DEMO_FILE, DEMO_ARGS, run["vocab_ids"], run["model"])
    DEMO_FILE.chmod(0o644)  # safetensors writes owner-only files; this one ships
    folder = demo_checkpoint()
    model = build_demo_model(dtype=torch.float32)

    corpus = json.loads((args.data / "corpus.json").read_text())
    heldout = torch.from_numpy(np.load(args.data / "heldout.npy").astype(np.int64))
    loss = heldout_loss(model, heldout)
    sample = heldout[:SAMPLE_TOKENS]
    sample_loss = heldout_loss(model, sample)

    llama = Llama.build()  # what examples/generate.py runs: the demo folder, with its default CPU kernels
    greedy = llama.text_completion([PROMPT], max_gen_len=GREEDY_TOKENS, temperature=0)[0]

    settings = run["settings"]
    n_params = sum(t.numel() for t in model.state_dict().values())
    stored = sum(t.numel() for t in run["model"].values())
    history = run["history"]
    record = {
        "model": {
            "architecture": "Llama 3.1 (LlamaForCausalLM): RMSNorm, grouped-query attention, SwiGLU, llama3 RoPE",
            "args": {k: v for k, v in DEMO_ARGS.to_hf_config().items() if k not in ("architectures", "torch_dtype")},
            "parameters": n_params,
            "parameters_stored": stored,
            "note": f"{n_params - stored:,} parameters are the zero rows of the "
                    f"{DEMO_ARGS.vocab_size - len(run['vocab_ids']):,} vocabulary ids the corpus never uses",
            "file": DEMO_FILE.name,
            "file_sha256": file_sha256(DEMO_FILE),
            "file_bytes": DEMO_FILE.stat().st_size,
            "dtype": "bfloat16",
        },
        "corpus": {k: corpus[k] for k in ("source", "cleaning", "tokenizer", "split_rule", "n_tokens",
                                          "n_distinct_ids", "sha256_text")},
        "training": {
            "command": shlex.join(run["command"]),
            "resumed": history.get("resumed", []),
            "corpus_command": "python examples/kjv_corpus.py",
            "steps": run["step"],
            "tokens_trained": run["step"] * settings["batch_size"] * settings["seq_len"],
            "epochs": run["step"] * settings["batch_size"] * settings["seq_len"] / corpus["n_tokens"]["train"],
            "settings": settings,
            "final_train_loss": history["train"][-1][2],
            "train_seconds": round(history["train_seconds"]),
            "tokens_per_second": round(run["step"] * settings["batch_size"] * settings["seq_len"]
                                       / history["train_seconds"]),
        },
        "heldout": {
            "loss_nats_per_token": loss,
            "perplexity": math.exp(loss),
            "tokens": len(heldout) - 1,
            "how": f"every held-out token after the first, full 128256-way softmax, float32, consecutive windows of "
                   f"{SEQ_LEN} tokens (examples/evaluate_demo.py heldout_loss)",
        },
        "greedy": {
            "prompt": PROMPT,
            "prompt_ids": greedy.prompt_tokens,
            "max_gen_len": GREEDY_TOKENS,
            "ids": greedy.tokens,
            "text": greedy.text,
            "stop_reason": greedy.stop_reason,
            "how": "Llama.build().text_completion([prompt], max_gen_len, temperature=0)",
        },
    }
    RECORD_FILE.write_text(json.dumps(record, indent=2) + "\n")
    SAMPLE_FILE.write_text(json.dumps({
        "what": f"the first {SAMPLE_TOKENS} token ids of the held-out split of examples/kjv_corpus.py, and the "
                f"demo model's mean loss over ids[1:] in windows of {SEQ_LEN} (written by examples/export_demo.py)",
        "demo_file_sha256": record["model"]["file_sha256"],
        "seq_len": SEQ_LEN,
        "loss": sample_loss,
        "ids": sample.tolist(),
    }) + "\n")
    print(f"wrote {DEMO_FILE} ({DEMO_FILE.stat().st_size / 1e6:.1f} MB), {RECORD_FILE}, {SAMPLE_FILE}; expanded to "
          f"{folder}\nheld-out loss {loss:.4f} nats/token (perplexity {math.exp(loss):.1f}); sample loss "
          f"{sample_loss:.6f}\ngreedy: {PROMPT!r} -> {greedy.text!r} ({greedy.stop_reason})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
