"""The CUDA kernels compile warning-free for sm_80 and sm_90 with plain nvcc (no GPU needed), and the check
can fail: a deliberately broken copy does not compile.

The binding (.cpp) is compiled against the installed torch too (~30 s on two cores): it proves that the
torch-facing half builds, even against a CPU-only torch.
"""

import os
import shutil
import subprocess

import pytest

from llama31.quant.cuda import CSRC

NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA build checks need the toolkit")

# The flags torch.utils.cpp_extension passes to nvcc that change what the source may do: no implicit
# half / bfloat16 conversions or operators.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _nvcc(source, out):
    command = [NVCC, "-c", str(source), "-o", str(out), "-O3", "-Xcompiler", "-fPIC", "-Werror", "all-warnings",
               *ARCHS, *TORCH_NVCC_DEFINES, "-I", str(CSRC)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_kernels_compile_for_sm80_and_sm90_without_warnings(tmp_path):
    result = _nvcc(CSRC / "int4_kernels.cu", tmp_path / "int4_kernels.o")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "int4_kernels.o").stat().st_size > 0


def test_a_broken_kernel_fails_to_compile(tmp_path):
    source = (CSRC / "int4_kernels.cu").read_text()
    # An implicit float -> __half conversion: legal C++ for a plain compile, rejected under torch's defines.
    broken = source.replace("return __float2half_rn(v);", "return v;")
    assert broken != source
    (tmp_path / "broken.cu").write_text(broken)
    result = _nvcc(tmp_path / "broken.cu", tmp_path / "broken.o")
    assert result.returncode != 0
    assert "error" in result.stderr and "__half" in result.stderr  # failed for the planted reason


def test_binding_builds_against_this_torch(tmp_path):
    from torch.utils.cpp_extension import load

    result = _nvcc(CSRC / "int4_kernels.cu", tmp_path / "int4_kernels.o")
    assert result.returncode == 0, result.stderr
    cuda_root = os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))
    if not os.path.exists(os.path.join(cuda_root, "include", "cuda_runtime.h")):  # a wrapper script on PATH
        cuda_root = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    libdir = next(d for d in ("lib64", "lib") if os.path.isdir(os.path.join(cuda_root, d)))
    module = load(name="llama31_int4_binding_probe", sources=[str(CSRC / "int4_binding.cpp")],
                  extra_include_paths=[os.path.join(cuda_root, "include")],
                  extra_ldflags=[str(tmp_path / "int4_kernels.o"), f"-L{os.path.join(cuda_root, libdir)}", "-lcudart"],
                  build_directory=str(tmp_path))
    assert hasattr(module, "gemv") and hasattr(module, "dequantize")
    import torch

    # Without a GPU the argument checks still run, and say what is wrong.
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        module.gemv(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(8, 8, dtype=torch.int32),
                    torch.zeros(8, 2, dtype=torch.bfloat16), None, torch.zeros(1, 8, dtype=torch.bfloat16), 32, 0)
