"""The INT4 examples run: quantize.py writes a folder and reports sizes, bench_int4.py's smoke mode runs, and
bench_int4_cuda.py's checking logic (run here on the CPU against the reference) passes and can fail."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quantize_example_writes_a_folder_and_prints_every_part(tmp_path, capsys):
    from conftest import hf_model

    hf_model(hidden_size=64, intermediate_size=192).save_pretrained(tmp_path / "src")
    quantize = _example("quantize")
    assert quantize.main(["--ckpt-dir", str(tmp_path / "src"), "--out", str(tmp_path / "dst"),
                          "--group-size", "32"]) == 0
    printed = capsys.readouterr().out
    for part in ("embedding", "attention", "feed-forward", "norms", "output layer", "total"):
        assert part in printed
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] == 32
    # a second run must not overwrite the folder
    assert quantize.main(["--ckpt-dir", str(tmp_path / "src"), "--out", str(tmp_path / "dst")]) == 1
    assert "not empty" in capsys.readouterr().err


def test_quantize_example_quantize_output_writes_a_tied_model_untied(tmp_path, capsys):
    from conftest import hf_model

    hf_model(hidden_size=64, intermediate_size=192, tie_word_embeddings=True).save_pretrained(tmp_path / "src")
    quantize = _example("quantize")
    assert quantize.main(["--ckpt-dir", str(tmp_path / "src"), "--out", str(tmp_path / "dst"), "--group-size", "32",
                          "--quantize-output"]) == 0
    printed = capsys.readouterr().out
    # the output layer had no bytes of its own before (it was the embedding): its row has no ratio
    output_row = next(line for line in printed.splitlines() if line.startswith("output layer"))
    assert output_row.split()[-1] == "-" and "output layer quantized" in printed
    config = json.loads((tmp_path / "dst" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["ignore"] == []


def test_cpu_benchmark_smoke_mode(tmp_path, capsys):
    bench = _example("bench/bench_int4")
    assert bench.main(["--quick", "--json", str(tmp_path / "bench.json")]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    paths = {row["path"] for row in results["layers"]}
    assert paths == {"fp32 F.linear", "bf16 F.linear", "fp32 packed", "bf16 packed", "int4 reference", "int4 cpu_fused"}
    prefill = {row["path"] for row in results["prefill_layers"]}
    assert prefill == {"bf16 F.linear", "bf16 packed", "int4 op", "int4 dequantize+matmul"}
    assert all(row["ms"] > 0 and row["rows"] == 128 for row in results["prefill_layers"])
    assert all(results["model"][f"{name} tok/s"] > 0 for name in ("fp32", "bf16", "int4"))
    assert results["model"]["int4 linear bytes"] < 0.3 * results["model"]["bf16 linear bytes"]


def test_gpu_benchmark_checks_run_on_cpu_with_the_reference(tmp_path):
    bench = _example("bench/bench_int4_cuda")
    assert bench.main(["--device", "cpu", "--impl", "reference", "--quick", "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    checks = report["checks"]
    assert {c["dtype"] for c in checks} == {"bf16", "fp16"} and {c["group_size"] for c in checks} == {32, 64, 128}
    assert any(c["zero_point"] for c in checks) and all(c["ok"] for c in checks)


@pytest.mark.parametrize("bug", ["unwritten column", "one group's scale 10% off", "swapped nibble order"])
def test_gpu_benchmark_checks_catch_a_broken_kernel(bug):
    from llama31.quant import quantize_weight
    from llama31.quant.linear import int4_linear_reference
    from llama31.quant.packing import dequantize, pack_int4, unpack_int4

    bench = _example("bench/bench_int4_cuda")
    n, k, g = 256, 512, 32
    tensors = quantize_weight(torch.randn(n, k) * 0.02, g, scale_dtype=torch.bfloat16)
    w32 = dequantize(**tensors)
    x = torch.randn(3, k).bfloat16()

    def broken(x, tensors, group_size, out):
        packed, scale = tensors["weight_packed"], tensors["weight_scale"]
        if bug == "one group's scale 10% off":
            scale = scale.clone()
            scale[:, 0] *= 1.1
        if bug == "swapped nibble order":
            packed = pack_int4(unpack_int4(packed, k).view(n, k // 8, 8).flip(-1).reshape(n, k))
        y = int4_linear_reference(x, packed, scale)
        if bug == "unwritten column":
            y = y[:, :-1]
        out[:, : y.shape[1]] = y

    result = bench.check_one(broken, x, tensors, w32, g)
    assert not result["ok"]
    assert result["unwritten"] > 0 or result["out_of_tolerance"] > 0
