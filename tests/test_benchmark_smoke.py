"""examples/bench/benchmark.py runs end to end on the tiny preset (one repetition, a few tokens): it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "examples" / "bench"


def kv_bytes(model: dict, element_bytes: int, context: float) -> float:
    """K and V bytes one decode step of one row reads at `context` cached positions (INT4 keeps a bf16 cache)."""
    head_dim = model["dim"] // model["n_heads"]
    return model["n_layers"] * 2 * model["n_kv_heads"] * head_dim * context * element_bytes


def test_benchmark_runs_on_the_tiny_preset_and_writes_its_results(tmp_path):
    out = tmp_path / "results.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, str(BENCH / "benchmark.py"), "--preset", "tiny", "--reps", "1", "--threads", "1",
         "--dtypes", "fp32,int4o", "--decode-tokens", "3", "--decode-prompt", "4", "--prefill-lens", "8",
         "--batch-sizes", "1,2", "--engines", "llama31,llama31-compile,hf", "--read-mib", "64",
         "--cache-dir", str(tmp_path / "cache"), "--out-json", str(out), "--plot", str(tmp_path / "plot.png")],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert {"llama31 fp32", "llama31-compile fp32", "hf fp32"} <= set(report["configs"])
    for name, config in report["configs"].items():
        assert set(config["ops"]) == {"decode_b1", "decode_b2", "prefill_8", "ttft_8", "generate_b1"}
        assert all(op["median"] > 0 for op in config["ops"].values())
        assert 0 < config["ops"]["decode_b1"]["fraction_of_roofline"]
        # each decode's roofline is drawn from reads in its own worker, one per repetition
        decode = config["ops"]["decode_b1"]
        assert decode["read_GBps"] > 0
        step_bytes = config["weight_bytes_read_per_step"] + kv_bytes(report["model"], 4 if "fp32" in name else 2,
                                                                     4 + 3 / 2)  # 4 prompt tokens, 3 steps
        assert decode["roofline_tok_s"] == pytest.approx(decode["read_GBps"] * 1e9 / step_bytes)
    bandwidth = report["bandwidth"]
    assert 0 < bandwidth["read_GBps_min"] <= bandwidth["read_GBps"] <= bandwidth["read_GBps_max"]
    # the fastest reader (inductor's kernel, as the compiled engine decodes with), not the amax fallback
    assert bandwidth["readers"] == ["inductor matrix-vector product"] and bandwidth["buffer_MiB"] == 64
    # the same weights and greedy decoding: in fp32 the two engines pick the same tokens
    for engine in ("llama31", "llama31-compile"):
        assert report["greedy_agreement"][f"{engine} fp32 decode_b1"] == "4/4 tokens equal before the first difference"
    assert {"llama31 fp32 / hf fp32", "llama31-compile fp32 / llama31 fp32"} <= set(report["ratios"])
    # one graph for every batch-1 step (batch 2 runs eagerly)
    assert report["configs"]["llama31-compile fp32"]["graphs_compiled"] == 1
    assert "decode b1" in result.stdout and "paired ratios" in result.stdout
    assert {"llama31 int4o", "llama31-compile int4o"} <= set(report["configs"])
    # int4o: every linear layer INT4 (the output layer too), a step reads under a quarter of fp32's weight bytes
    read = {name: config["weight_bytes_read_per_step"] for name, config in report["configs"].items()}
    assert read["llama31 int4o"] < read["llama31 fp32"] / 4
    assert "llama31 int4o / hf fp32" in report["ratios"]
    # compiled INT4 decoding: the same weights read, one graph for every batch-1 step, paired with eager INT4
    assert read["llama31-compile int4o"] == read["llama31 int4o"]
    assert report["configs"]["llama31-compile int4o"]["graphs_compiled"] == 1
    assert "llama31-compile int4o / llama31 int4o" in report["ratios"]
    # the plot is optional: drawn with matplotlib, a clear message without it
    assert (tmp_path / "plot.png").exists() or "plot skipped: matplotlib is not installed" in result.stdout


def test_gemv_benchmark_runs_and_reports_every_kernel_against_a_read(tmp_path):
    import torch

    from llama31.cpu import gemv
    from llama31.cpu.packed import packing_supported

    can_pack = packing_supported(torch.zeros(1, 1)) is None
    out = tmp_path / "gemv.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(BENCH / "bench_gemv.py"), "--quick", "--reps", "1",
                             "--threads", "1", "--inductor", "--json", str(out)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["shapes"]) == {"256x512", "512x256"}
    for shape in report["shapes"].values():
        assert shape["MiB"] >= 31  # 32 MiB of copies: the quick run still walks more than the L2 holds
        expected = ({"F.linear", "torch.mv", "inductor"} | ({"oneDNN packed"} if can_pack else set())
                    | ({"llama31 gemv"} if gemv.unsupported() is None else set()))
        assert expected <= set(shape["kernels"])
        assert all(k["GBps"] > 0 and k["fraction_of_read"] > 0 for k in shape["kernels"].values())


def test_int4_stream_benchmark_times_the_kernels_against_a_read(tmp_path):
    from llama31.quant import cpu_int4

    if cpu_int4.unsupported(256, 128):
        pytest.skip(f"our INT4 CPU kernels cannot run here: {cpu_int4.unsupported(256, 128)}")
    out = tmp_path / "stream.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(BENCH / "bench_int4_stream.py"), "--quick", "--reps", "1",
                             "--threads", "1", "--rows", "1,4", "--json", str(out)], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {f"rows {r} {s}" for r in (1, 4) for s in ("256x512", "512x256")}
    for shape in report.values():
        assert shape["bytes"] >= 16 * 2**20 * 0.99  # copies that fill the 16 MiB asked for: past the L2
        assert all(shape[k]["GBps"] > 0 and shape[k]["of_read"] > 0 for k in ("read", "torch op", "w4a16", "w4a8"))


def test_compile_benchmark_runs_both_modes_on_the_tiny_preset(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = [sys.executable, str(BENCH / "bench_compile.py"), "--preset", "tiny", "--dtypes", "fp32",
              "--threads", "1", "--steps", "2", "--cache-dir", str(tmp_path / "cache")]
    # eager packed, eager plain and compiled steps, side by side
    result = subprocess.run(script + ["--prompt", "4"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stdout.splitlines() if line.startswith("fp32"))
    assert row.count(" ms") == 3 and row.rstrip().endswith("x")
    # --against: llama31/cpu/compiled.py's settings paired with other ones, each compiled once
    result = subprocess.run(script + ["--layers", "1", "--reps", "2", "--against", '{"pattern_matcher": true}'],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("A/B") == 2 and "median over 2: speed of B / A" in result.stdout
    assert "with {'pattern_matcher': True}" in result.stdout


def test_compile_benchmark_refuses_bad_arguments_before_loading_a_model(tmp_path, capsys, monkeypatch):
    """An argument error that says what is wrong (argparse's exit status 2); run in-process, as the checks come
    before any model is built."""
    import importlib.util

    monkeypatch.syspath_prepend(str(BENCH))  # bench_compile imports benchmark.py beside it
    spec = importlib.util.spec_from_file_location("bench_compile", BENCH / "bench_compile.py")
    bench_compile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_compile)
    base = ["--preset", "tiny", "--dtypes", "fp32", "--cache-dir", str(tmp_path / "cache")]
    for bad, message in ((["--against", "cpp_wrapper=false"], "--against must be a JSON object of inductor settings"),
                         (["--against", '{"no_such_setting": 1}'], "config.no_such_setting does not exist"),
                         (["--layers", "2"], "--layers and --reps apply only with --against"),
                         (["--dtypes", "fp16"], "--dtypes: unknown fp16; choose from")):
        with pytest.raises(SystemExit) as exit_info:
            bench_compile.main(base + bad)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, bad
    assert not (tmp_path / "cache").exists()  # no model was built


def test_decode_attention_benchmark_times_both_formulas_against_a_read():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(BENCH / "bench_decode_attention.py"), "--quick", "--reps", "1",
                             "--threads", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("T ")]
    assert [int(row.split()[1]) for row in rows] == [64, 256]
    from llama31.cpu import attention

    kernel = attention.unsupported() is None  # our kernel is timed too where it runs
    for row in rows:
        assert row.count(" GB/s") == 3 + kernel and "decode_attention" in row and "q k^T" in row and "read" in row
        assert ("kernel" in row) == kernel
