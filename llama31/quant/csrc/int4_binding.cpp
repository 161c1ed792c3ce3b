// The torch side of llama31's INT4 CUDA kernels: argument checks, then raw pointers to int4_kernels.cu.
// Only <torch/extension.h> and <cuda_runtime.h>: no ATen CUDA headers, so this file also compiles
// against a CPU build of torch (the stream arrives as an integer, torch.cuda.current_stream().cuda_stream).

#include <torch/extension.h>
#include <cuda_runtime.h>

#include <optional>

#include "int4_kernels.h"

namespace {

// Make `device` current for the launch and restore the caller's device afterwards.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

void check_cuda_contiguous(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "llama31 int4: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "llama31 int4: ", name, " is on ", t.device(), " but the weights are on ",
              like.device());
  TORCH_CHECK(t.is_contiguous(), "llama31 int4: ", name, " must be contiguous (call .contiguous())");
}

void check_aligned(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "llama31 int4: ", name,
              " must be 16-byte aligned for 128-bit loads (a sliced view is not; pass a fresh tensor)");
}

// The canonical weight tensors (int4_kernels.h); returns {N, K}.
std::pair<int64_t, int64_t> check_weights(const torch::Tensor& packed, const torch::Tensor& scale,
                                          const std::optional<torch::Tensor>& zero_point, int64_t group_size) {
  check_cuda_contiguous(packed, "weight_packed", packed);
  check_cuda_contiguous(scale, "weight_scale", packed);
  TORCH_CHECK(packed.scalar_type() == torch::kInt32 && packed.dim() == 2,
              "llama31 int4: weight_packed must be int32 [N, K/8], got ", packed.scalar_type(), " ", packed.sizes());
  const int64_t n = packed.size(0), k = packed.size(1) * 8;
  TORCH_CHECK(group_size > 0 && k % group_size == 0, "llama31 int4: K=", k, " is not a multiple of group_size ",
              group_size);
  TORCH_CHECK(scale.dim() == 2 && scale.size(0) == n && scale.size(1) == k / group_size,
              "llama31 int4: weight_scale must be [N, K/g] = [", n, ", ", k / group_size, "], got ", scale.sizes());
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 || scale.scalar_type() == torch::kHalf,
              "llama31 int4: weight_scale must be bf16 or fp16 (the activation dtype), got ", scale.scalar_type());
  if (zero_point.has_value()) {
    const torch::Tensor& zp = zero_point.value();
    check_cuda_contiguous(zp, "weight_zero_point", packed);
    TORCH_CHECK(zp.scalar_type() == torch::kInt32 && zp.dim() == 2 && zp.size(0) == (n + 7) / 8 &&
                    zp.size(1) == k / group_size,
                "llama31 int4: weight_zero_point must be int32 [ceil(N/8), K/g] = [", (n + 7) / 8, ", ",
                k / group_size, "], got ", zp.scalar_type(), " ", zp.sizes());
  }
  TORCH_CHECK(n <= INT32_MAX && k <= INT32_MAX, "llama31 int4: N and K must fit in 32 bits");
  return {n, k};
}

void check_status(int status, const char* what) {
  TORCH_CHECK(status == static_cast<int>(cudaSuccess), "llama31 int4: ", what, " failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(status)));
}

}  // namespace

// out [M, N] = x [M, K] @ W.T, 1 <= M <= 16, written in place (every element).
void gemv(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scale,
          const std::optional<torch::Tensor>& zero_point, torch::Tensor& out, int64_t group_size, int64_t stream) {
  const auto [n, k] = check_weights(packed, scale, zero_point, group_size);
  TORCH_CHECK(group_size % 32 == 0, "llama31 int4: the gemv kernel needs group_size % 32 == 0, got ", group_size);
  check_cuda_contiguous(x, "x", packed);
  check_cuda_contiguous(out, "out", packed);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "llama31 int4: x must be [M, K] with K=", k, ", got ", x.sizes());
  const int64_t m = x.size(0);
  TORCH_CHECK(m >= 1 && m <= LLAMA31_INT4_GEMV_MAX_ROWS, "llama31 int4: gemv takes 1..",
              LLAMA31_INT4_GEMV_MAX_ROWS, " rows, got ", m);
  TORCH_CHECK(x.scalar_type() == scale.scalar_type() && out.scalar_type() == scale.scalar_type(),
              "llama31 int4: x, weight_scale and out must share one dtype, got ", x.scalar_type(), ", ",
              scale.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == m && out.size(1) == n, "llama31 int4: out must be [", m, ", ", n,
              "], got ", out.sizes());
  check_aligned(x, "x");
  check_aligned(packed, "weight_packed");

  DeviceGuard guard(packed.get_device());
  const int status = llama31_int4_gemv(
      x.data_ptr(), packed.data_ptr<int32_t>(), scale.data_ptr(),
      zero_point.has_value() ? zero_point->data_ptr<int32_t>() : nullptr, out.data_ptr(), static_cast<int>(m),
      static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
      scale.scalar_type() == torch::kBFloat16 ? 1 : 0, reinterpret_cast<cudaStream_t>(stream));
  check_status(status, "llama31_int4_gemv");
}

// out [N, K] = W, in the dtype of weight_scale.
void dequantize(const torch::Tensor& packed, const torch::Tensor& scale, const std::optional<torch::Tensor>& zero_point,
                torch::Tensor& out, int64_t group_size, int64_t stream) {
  const auto [n, k] = check_weights(packed, scale, zero_point, group_size);
  check_cuda_contiguous(out, "out", packed);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == k && out.scalar_type() == scale.scalar_type(),
              "llama31 int4: out must be [", n, ", ", k, "] in ", scale.scalar_type(), ", got ", out.scalar_type(),
              " ", out.sizes());
  check_aligned(out, "out");

  DeviceGuard guard(packed.get_device());
  const int status = llama31_int4_dequantize(
      packed.data_ptr<int32_t>(), scale.data_ptr(), zero_point.has_value() ? zero_point->data_ptr<int32_t>() : nullptr,
      out.data_ptr(), static_cast<int>(n), static_cast<int>(k), static_cast<int>(group_size),
      scale.scalar_type() == torch::kBFloat16 ? 1 : 0, reinterpret_cast<cudaStream_t>(stream));
  check_status(status, "llama31_int4_dequantize");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llama31 INT4 (W4A16) CUDA kernels; see llama31/quant/cuda.py";
  m.def("gemv", &gemv, "out[M, N] = x[M, K] @ W.T for 1 <= M <= 16", py::arg("x"), py::arg("weight_packed"),
        py::arg("weight_scale"), py::arg("weight_zero_point"), py::arg("out"), py::arg("group_size"),
        py::arg("stream"));
  m.def("dequantize", &dequantize, "out[N, K] = W", py::arg("weight_packed"), py::arg("weight_scale"),
        py::arg("weight_zero_point"), py::arg("out"), py::arg("group_size"), py::arg("stream"));
}
