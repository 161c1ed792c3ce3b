"""reference/: the shipped goldens and the checker that other engines run against them.

- Two independent engines (HF transformers and llama31) pass the fp32 tier on every shipped golden.
- The checker catches real bugs: candidates from deliberately broken llama31 models (each mistake made by
  editing a loaded model's weights or attributes, never the library) fail the fp32 tier, and the report names
  the first divergent prompt and position and the first divergent layer. The bf16 path fails fp32 and passes
  bf16; a 4-bit round-to-nearest model passes int4.
- Regenerating the tiny checkpoints and a golden from the seeds reproduces the shipped files.
- Malformed candidates are rejected with a message that says what is wrong.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llama31 import Transformer
from llama31.checkpoints.names import meta_rows_to_hf
from llama31.cpu import gemv
from llama31.cpu.packed import PackedLinear
from llama31.model.rope import RotaryEmbedding
from reference import check as check_module
from reference.check import FP32_TOL, check
from reference.compare import compare_topk, exact_kl
from reference.engines import common as engines_common
from reference.engines import hf as hf_engine
from reference.engines import llama31 as llama31_engine
from reference.engines.common import document
from reference.fileformat import FormatError, from_memory, load, load_json, save
from reference.make import VOLATILE_PROVENANCE, make_golden
from reference.make_tiny import RECIPES, write_tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "reference" / "checkpoints"
GOLDENS = REPO / "reference" / "goldens"
NAMES = sorted(RECIPES)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread, as make uses: the same numbers as the goldens, and no slowdown when other processes hold the
    cores (two threads of these tiny matmuls wait on each other, measured 0.2 s vs 4-25 s per candidate)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def goldens():
    return {name: load(GOLDENS / f"{name}.json") for name in NAMES}


def request(golden):
    return {"prompts": golden.prompts, "settings": golden.settings}


def candidate_from(model, golden, label="test"):
    """Run a llama31 model (possibly broken) as an engine on the golden's prompts; the validated candidate."""
    data, tensors = document(request(golden), llama31_engine.run(model, request(golden)), {"engine": label})
    return from_memory(data, tensors, label, golden)


def load_model(name, dtype=torch.float32, pack=False):
    """pack=False: plain F.linear weights, the arithmetic reference.make records (and weights a test can edit)."""
    return Transformer.from_pretrained(CHECKPOINTS / name, dtype=dtype, pack=pack)


# ---------------------------------------------------------------------------------------------- correct engines
@pytest.mark.parametrize("name", NAMES)
def test_hf_transformers_passes_fp32_through_the_adapter_cli(name, tmp_path, capsys):
    out = tmp_path / "hf.json"
    assert hf_engine.main(["--ckpt-dir", str(CHECKPOINTS / name), "--golden", str(GOLDENS / f"{name}.json"),
                           "--out", str(out)]) == 0
    assert check_module.main([str(GOLDENS / f"{name}.json"), str(out), "--tier", "fp32"]) == 0
    report = capsys.readouterr().out
    assert "PASS (tier fp32)" in report and "no divergence" in report
    assert "RoPE inverse frequencies agree" in report  # HF's float32 frequencies: within 1e-6 relative


@pytest.mark.parametrize("name", NAMES)
def test_llama31_passes_fp32_and_every_statistical_tier(name, goldens):
    golden = goldens[name]
    cand = candidate_from(load_model(name), golden)
    for tier in ("fp32", "bf16", "int4"):
        report = check(golden, cand, tier)
        assert report.passed, report.text
    # single-threaded, the same code and weights: the very same numbers
    assert check(golden, cand, "fp32").figures["max_deviation"] <= FP32_TOL / 10


@pytest.mark.parametrize("kernel", ["packed", "gemv"])
@pytest.mark.parametrize("name", NAMES)
def test_llama31_default_cpu_kernels_pass_fp32(name, kernel, goldens):
    """What users run on a CPU (from_pretrained's default kernels for large layers, llama31/cpu/defaults.py:
    oneDNN's packed layout, and our matrix-vector kernel for float32 decode steps) is another float32 kernel:
    other summation order, not the same bits, but within the fp32 tier. Forced here on every layer: these models
    are tiny."""
    golden = goldens[name]
    if kernel == "packed":
        model = Transformer.from_pretrained(CHECKPOINTS / name, pack=True)
        assert isinstance(model.output, PackedLinear)
    else:
        if gemv.unsupported():
            pytest.skip(f"our matrix-vector kernel cannot run here: {gemv.unsupported()}")
        model = load_model(name)
        assert gemv.use_gemv(model) > 0 and isinstance(model.output, gemv.GemvLinear)
    report = check(golden, candidate_from(model, golden, kernel), "fp32")
    assert report.passed, report.text


def test_both_adapters_read_a_meta_folder(goldens, tmp_path):
    """A Meta folder (params.json + consolidated.00.pth) of the same weights gives the same candidate; the HF
    adapter converts it to an HF folder first."""
    from llama31.convert import convert

    golden = goldens["tiny-llama3.2"]
    meta = tmp_path / "meta"
    convert(CHECKPOINTS / "tiny-llama3.2", meta, to="meta")
    for engine, model in ((llama31_engine, Transformer.from_pretrained(meta)), (hf_engine, hf_engine.load(meta))):
        data, tensors = document(request(golden), engine.run(model, request(golden)), {"engine": "meta"})
        report = check(golden, from_memory(data, tensors, "meta", golden), "fp32")
        assert report.passed, report.text


def test_long_prompts_prefilled_in_chunks_pass_too(goldens, monkeypatch):
    """The path a real checkpoint's 16K-token probe takes (chunked prefill into the KV cache, then decoding from
    it), forced here on the 375-token probe with chunks of 100, in both adapters."""
    golden = goldens["tiny-llama3.1"]
    monkeypatch.setattr(engines_common, "CHUNK", 100)  # decides which prompts are long, and sizes the chunks
    for engine, model in ((llama31_engine, load_model("tiny-llama3.1")),
                          (hf_engine, hf_engine.load(CHECKPOINTS / "tiny-llama3.1"))):
        long_lengths = []

        def spy(forward, ids, *args, _real=engines_common.chunked_prompt_then_greedy):
            long_lengths.append(len(ids))
            return _real(forward, ids, *args)

        monkeypatch.setattr(engine, "chunked_prompt_then_greedy", spy)
        data, tensors = document(request(golden), engine.run(model, request(golden)), {"engine": "chunked"})
        assert long_lengths and min(long_lengths) > 100  # the long probe took the chunked path
        report = check(golden, from_memory(data, tensors, "chunked", golden), "fp32")
        assert report.passed, report.text


# ---------------------------------------------------------------------------------------------- broken engines
def rope_scaling_ignored(model):
    model.rope = RotaryEmbedding(model.args.replace(rope_scaling=None))


def qk_permutation_skipped(model):
    """HF's rotate-half rows fed to Meta's interleaved RoPE: what an engine gets if it forgets to un-permute."""
    with torch.no_grad():
        for layer in model.layers:
            attn = layer.attention
            attn.wq.weight.copy_(meta_rows_to_hf(attn.wq.weight, model.args.n_heads))
            attn.wk.weight.copy_(meta_rows_to_hf(attn.wk.weight, model.args.n_kv_heads))


def norm_eps_wrong(model):
    for module in model.modules():
        if hasattr(module, "eps"):
            module.eps = 1e-6  # Llama 1's value, the default of many configs; 3.1 uses 1e-5


def gqa_mapping_off_by_one(model):
    """Query head h reads kv head (h // n_rep) - 1: the kv-head blocks of wk and wv rolled by one."""
    a = model.args
    with torch.no_grad():
        for layer in model.layers:
            for w in (layer.attention.wk.weight, layer.attention.wv.weight):
                w.copy_(w.view(a.n_kv_heads, a.head_dim, a.dim).roll(1, dims=0).reshape(w.shape))


BUGS = {"rope-scaling-ignored": rope_scaling_ignored, "qk-permutation-skipped": qk_permutation_skipped,
        "norm-eps-wrong": norm_eps_wrong, "gqa-off-by-one": gqa_mapping_off_by_one}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bug", BUGS)
def test_broken_model_fails_fp32_and_the_report_locates_it(name, bug, goldens):
    golden = goldens[name]
    model = load_model(name)
    BUGS[bug](model)
    report = check(golden, candidate_from(model, golden, bug), "fp32")
    assert not report.passed
    # every bug is in the first block and shows on the first prompt: the report says so
    first = report.first
    assert first["prompt"] == golden.prompts[0]["name"] and "position" in first
    assert f"FIRST DIVERGENCE: prompt '{first['prompt']}' (#0), position {first['position']}" in report.text
    assert report.first_layer == "block 0"  # the embeddings agree, the first block's output does not
    # position 0 has angle 0: a RoPE mistake (scaling, permutation) can only show from position 1 on
    assert first["position"] == (1 if bug in ("rope-scaling-ignored", "qk-permutation-skipped") else 0)
    if bug == "rope-scaling-ignored":
        assert "the llama3 scaling is not applied" in report.text
    # the smallest of these errors (eps, on the tied model) is 5.9e-2: ~600x the tolerance
    assert report.figures["max_deviation"] > 100 * FP32_TOL


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bug", ["rope-scaling-ignored", "qk-permutation-skipped", "gqa-off-by-one"])
def test_gross_bugs_fail_the_statistical_tiers_too(name, bug, goldens):
    golden = goldens[name]
    model = load_model(name)
    BUGS[bug](model)
    cand = candidate_from(model, golden, bug)
    assert not check(golden, cand, "bf16").passed
    assert not check(golden, cand, "int4").passed


@pytest.mark.parametrize("name", NAMES)
def test_bf16_path_fails_fp32_and_passes_bf16(name, goldens):
    golden = goldens[name]
    cand = candidate_from(load_model(name, torch.bfloat16), golden, "bf16")
    fp32 = check(golden, cand, "fp32")
    assert not fp32.passed and fp32.first is not None and "FIRST DIVERGENCE" in fp32.text
    bf16 = check(golden, cand, "bf16")
    assert bf16.passed, bf16.text
    assert bf16.figures["top1"] >= 0.95 and bf16.figures["mean_kl"] <= 5e-3


def fake_int4(model, group=32):
    """Symmetric round-to-nearest 4-bit weights (scale = absmax / 7.5, groups along the input), dequantized."""
    with torch.no_grad():
        for layer in model.layers:
            for lin in (layer.attention.wq, layer.attention.wk, layer.attention.wv, layer.attention.wo,
                        layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3):
                w = lin.weight.view(lin.weight.shape[0], -1, group)
                scale = w.abs().amax(-1, keepdim=True) / 7.5
                lin.weight.copy_(((w / scale).round().clamp(-8, 7) * scale).view_as(lin.weight))


@pytest.mark.parametrize("name", NAMES)
def test_int4_round_to_nearest_passes_int4_only(name, goldens):
    golden = goldens[name]
    model = load_model(name)
    fake_int4(model)
    cand = candidate_from(model, golden, "int4-rtn")
    assert check(golden, cand, "int4").passed
    assert not check(golden, cand, "bf16").passed and not check(golden, cand, "fp32").passed


# ---------------------------------------------------------------------------------------------- the comparisons
def test_kl_estimate_is_exact_with_full_lists_and_a_lower_bound_with_top_k():
    g = torch.Generator().manual_seed(0)
    logits_g = torch.randn(64, generator=g, dtype=torch.float64) * 3
    logits_c = logits_g + torch.randn(64, generator=g, dtype=torch.float64) * 0.3
    exact = exact_kl(logits_g.numpy(), logits_c.numpy())

    def top(logits, k):
        lp, ids = torch.log_softmax(logits, -1).topk(k)
        return ids.numpy()[None], lp.numpy()[None]

    full = compare_topk(*top(logits_g, 64), *top(logits_c, 64))
    assert full.kl[0] == pytest.approx(exact, rel=1e-9)
    assert full.max_abs[0] == pytest.approx(float((torch.log_softmax(logits_g, -1)
                                                   - torch.log_softmax(logits_c, -1)).abs().max()), rel=1e-9)
    # merging the tail into one bin can only lower a KL divergence (the candidate lists all golden tokens here)
    partial = compare_topk(*top(logits_g, 10), *top(logits_c, 64))
    assert 0 < partial.kl[0] <= exact


def test_a_token_missing_from_one_list_is_bounded_by_that_lists_last_entry():
    g_ids, g_lp = np.array([[1, 2, 3, 4, 5]]), np.array([[-0.5, -1.0, -2.0, -3.0, -4.0]])
    # the candidate drops token 5 (-4.0) and lists token 9 at -3.5 instead: golden(9) <= -4.0, so >= 0.5 off
    c_ids, c_lp = np.array([[1, 2, 3, 4, 9]]), np.array([[-0.5, -1.0, -2.0, -3.0, -3.5]])
    r = compare_topk(g_ids, g_lp, c_ids, c_lp)
    assert r.max_abs[0] == 0.0 and r.unlisted[0] == pytest.approx(0.5)
    # a token at the edge of both lists is no evidence of an error
    c_lp2 = np.array([[-0.5, -1.0, -2.0, -3.0, -4.00001]])
    assert compare_topk(g_ids, g_lp, c_ids, c_lp2).unlisted[0] <= FP32_TOL


# ---------------------------------------------------------------------------------------------- regeneration
def test_tiny_checkpoints_regenerate_byte_identically(tmp_path):
    for name, recipe in RECIPES.items():
        folder = write_tiny_checkpoint(recipe, tmp_path / name)
        shipped = sorted(p.name for p in (CHECKPOINTS / name).iterdir())
        assert sorted(p.name for p in folder.iterdir()) == shipped
        for file in shipped:
            assert (folder / file).read_bytes() == (CHECKPOINTS / name / file).read_bytes(), f"{name}/{file}"


@pytest.mark.parametrize("name", NAMES)
def test_make_reproduces_the_shipped_golden(name, tmp_path):
    """make (with its HF cross-check) writes the same golden again: identical JSON apart from the provenance
    fields that name versions, the commit and the platform; on the platform that made it (same torch, CPU
    instruction set, one thread), byte-identical arrays. Elsewhere BLAS kernels may round differently, so the
    arrays must then agree within the fp32 tolerance and the ids exactly."""
    data, tensors = make_golden(CHECKPOINTS / name, log=lambda *a: None)
    out = tmp_path / f"{name}.json"
    save(out, data, tensors)
    shipped = json.loads((GOLDENS / f"{name}.json").read_text())
    fresh = json.loads(out.read_text())
    for doc in (shipped, fresh):
        for key in VOLATILE_PROVENANCE:
            doc["provenance"].pop(key)
    assert fresh == shipped  # prompts, ids, continuations, texts, file hashes, settings, tensor names
    assert fresh["provenance"]["checkpoint"]["sha256"] == shipped["provenance"]["checkpoint"]["sha256"]

    recorded = json.loads((GOLDENS / f"{name}.json").read_text())["provenance"]
    same_platform = (recorded["torch_version"] == torch.__version__ and
                     recorded["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability())
    if same_platform:
        assert out.with_suffix(".safetensors").read_bytes() == (GOLDENS / f"{name}.safetensors").read_bytes()
    else:
        from safetensors.numpy import load_file

        a, b = load_file(out.with_suffix(".safetensors")), load_file(GOLDENS / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            if a[key].dtype.kind == "i":
                np.testing.assert_array_equal(a[key], b[key], err_msg=key)
            else:
                np.testing.assert_allclose(a[key], b[key], rtol=0, atol=FP32_TOL, err_msg=key)


def test_make_refuses_a_golden_that_hf_transformers_disagrees_with(tmp_path, monkeypatch, capsys):
    """The cross-check: if HF and llama31 part (here: HF's RMSNorm eps made wrong), nothing is written."""
    load_hf = hf_engine.load

    def hf_with_wrong_eps(*args, **kwargs):
        model = load_hf(*args, **kwargs)
        for module in model.modules():
            if hasattr(module, "variance_epsilon"):
                module.variance_epsilon = 1e-6
        return model

    monkeypatch.setattr(hf_engine, "load", hf_with_wrong_eps)
    out = tmp_path / "golden.json"
    from reference.make import main as make_main

    assert make_main(["--ckpt-dir", str(CHECKPOINTS / "tiny-llama3.2"), "--out", str(out)]) == 1
    assert not out.exists() and not out.with_suffix(".safetensors").exists()
    err = capsys.readouterr().err
    assert "HF transformers disagrees with llama31" in err and "FIRST DIVERGENCE" in err


# ---------------------------------------------------------------------------------------------- the format
@pytest.fixture(scope="module")
def minimal(goldens):
    """The smallest valid candidate for tiny-llama3.1: prompt names and ids, top-k and continuation, all inline
    (as README.md shows), with the golden's own numbers."""
    golden = goldens["tiny-llama3.1"]
    results = {}
    for p in golden.prompts:
        r = golden.results[p["name"]]
        results[p["name"]] = {
            "prompt_topk_ids": r.topk_ids[:, :5].tolist(), "prompt_topk_logprobs": r.topk_logprobs[:, :5].tolist(),
            "continuation": {"ids": r.gen_ids, "topk_ids": r.gen_topk_ids[:, :5].tolist(),
                             "topk_logprobs": r.gen_topk_logprobs[:, :5].tolist()}}
    return {"format": "llama31-reference", "format_version": 1, "kind": "candidate",
            "producer": {"engine": "hand-written"},
            "prompts": [{"name": p["name"], "ids": p["ids"]} for p in golden.prompts], "results": results}


def test_a_minimal_inline_candidate_passes(minimal, goldens, tmp_path):
    golden = goldens["tiny-llama3.1"]
    path = tmp_path / "cand.json"
    save(path, minimal)
    assert not path.with_suffix(".safetensors").exists()
    report = check(golden, load(path, golden), "fp32")
    assert report.passed, report.text
    assert "gave no layer summaries" in report.text


def _broken(minimal, edit):
    data = copy.deepcopy(minimal)
    edit(data)
    return data


MALFORMED = {
    "missing prompt": (lambda d: d["prompts"].pop(3), "no prompt 'chat-user'"),
    "missing result": (lambda d: d["results"].pop("chat-tool"), "no entry for prompt 'chat-tool'"),
    "missing top-k": (lambda d: d["results"]["chat-user"].pop("prompt_topk_logprobs"),
                      "has no \"prompt_topk_logprobs\""),
    "missing continuation": (lambda d: d["results"]["chat-user"].pop("continuation"), "no \"continuation\""),
    "a row short": (lambda d: d["results"]["chat-user"]["prompt_topk_ids"].pop(),
                    "expected (17, k): one row per prompt position"),
    "k too small": (lambda d: d["results"]["chat-user"].update(
        prompt_topk_ids=[r[:3] for r in d["results"]["chat-user"]["prompt_topk_ids"]],
        prompt_topk_logprobs=[r[:3] for r in d["results"]["chat-user"]["prompt_topk_logprobs"]]),
        "k = 3; give at least the top 5"),
    "ragged rows": (lambda d: d["results"]["chat-user"]["prompt_topk_logprobs"][2].pop(), "not a numeric array"),
    "re-tokenized prompt": (lambda d: d["prompts"][0]["ids"].__setitem__(4, 7),
                            "differs from the golden's ids at index 4"),
    "extra BOS": (lambda d: d["prompts"][0]["ids"].insert(0, 501), "has 26 ids, the golden's has 25"),
    "id outside the vocabulary": (lambda d: d["results"]["chat-user"]["continuation"]["ids"].__setitem__(0, 128009),
                                  "outside 0..511"),
    "too many tokens": (lambda d: d["results"]["chat-user"]["continuation"].update(
        ids=[1] * 17, topk_ids=[[1, 2, 3, 4, 5]] * 17, topk_logprobs=[[-1.0] * 5] * 17),
        "17 tokens; expected 1 to max_new_tokens = 16"),
    "dangling tensor": (lambda d: d["results"]["chat-user"].update(prompt_topk_ids={"tensor": "nope"}),
                        "refers to tensor 'nope'"),
    "wrong format": (lambda d: d.update(format="something-else"), "not a llama31-reference file"),
}


@pytest.mark.parametrize("margin, passes", [(5e-5, True), (5e-3, False)])
def test_greedy_may_part_at_a_tie_and_nowhere_else(margin, passes, minimal, goldens):
    """At fp32 the greedy ids must be identical, except where the golden's top two tokens are within 2 x tol:
    there rounding decides, and either choice passes. Made by editing step 3 of one prompt on both sides."""
    golden = copy.deepcopy(goldens["tiny-llama3.1"])
    g = golden.results["chat-user"]
    first, second = g.gen_topk_ids[3, :2]
    g.gen_topk_logprobs[3, 1] = g.gen_topk_logprobs[3, 0] - margin  # a near-tie (or not) in the golden
    data = copy.deepcopy(minimal)
    c = data["results"]["chat-user"]["continuation"]
    c["ids"] = c["ids"][:3] + [int(second)]  # the candidate takes the other token and stops there
    c["topk_ids"], c["topk_logprobs"] = c["topk_ids"][:4], c["topk_logprobs"][:4]
    lp = g.gen_topk_logprobs[3]
    c["topk_ids"][3] = [int(second), int(first)] + g.gen_topk_ids[3, 2:5].tolist()
    c["topk_logprobs"][3] = [float(lp[1]), float(lp[0])] + lp[2:5].tolist()  # ranked its way, same values
    c["topk_logprobs"][3][0] += margin  # ... and its top two reversed within rounding of the golden's
    report = check(golden, from_memory(data, None, "tie", golden), "fp32")
    assert report.passed == passes, report.text
    if passes:
        assert "departs from the golden's greedy ids at step 3, at a tie" in report.text
    else:
        assert "greedy ids differ: prompt 'chat-user' from step 3" in report.failures


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_candidates_are_rejected_with_a_clear_message(case, minimal, goldens, tmp_path, capsys):
    edit, message = MALFORMED[case]
    path = tmp_path / "cand.json"
    save(path, _broken(minimal, edit))
    with pytest.raises(FormatError) as error:
        load(path, goldens["tiny-llama3.1"])
    assert message in str(error.value)
    assert check_module.main([str(GOLDENS / "tiny-llama3.1.json"), str(path)]) == 1
    assert message in capsys.readouterr().err


def test_not_json_is_rejected(tmp_path):
    path = tmp_path / "cand.json"
    path.write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_json(path)


def test_the_cli_exit_status_is_0_for_a_pass_and_1_for_a_failure(goldens, tmp_path):
    """As an engine's CI runs it: python -m reference.check from the repository root."""
    golden = goldens["tiny-llama3.2"]
    model = load_model("tiny-llama3.2")
    good = tmp_path / "good.json"
    save(good, *document(request(golden), llama31_engine.run(model, request(golden)), {"engine": "llama31"}))
    norm_eps_wrong(model)
    bad = tmp_path / "bad.json"
    save(bad, *document(request(golden), llama31_engine.run(model, request(golden)), {"engine": "eps"}))
    env_path = str(REPO)
    run = lambda cand: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "reference.check", str(GOLDENS / "tiny-llama3.2.json"), str(cand)],
        cwd=REPO, capture_output=True, text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
    ok, fail = run(good), run(bad)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert fail.returncode == 1 and "FIRST DIVERGENCE: prompt 'completion-story'" in fail.stdout
