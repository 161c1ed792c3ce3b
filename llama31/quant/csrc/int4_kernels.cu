/*
 * llama31 INT4 (W4A16) CUDA kernels. The layout and the C interface are described in int4_kernels.h.
 * This file includes no torch header, so plain nvcc compiles it (tests/test_int4_cuda_build.py does).
 *
 * gemv: decode (M = 1..16 activation rows) is memory-bound, so the kernel is organised around reading
 * the 4-bit weights once, at full width:
 *   - a warp owns kRowsPerWarp = 4 output rows; each lane reads 128-bit vectors (4 words = 32 values) of
 *     every row, striding along K by 32 vectors so a warp's loads are contiguous (coalesced);
 *   - the nibbles are dequantized in registers, (u - zu) * scale with u, zu the stored nibbles (q + 8,
 *     zp + 8), and multiplied with activations read as 8-value 128-bit loads; each activation loaded is
 *     used for the 4 rows, each dequantized weight for the M rows;
 *   - fp32 accumulators, reduced across the warp with shuffles at the end; one lane writes each output.
 * dequantize: one thread per 32-bit word, writing 8 values with one 128-bit store.
 */

#include "int4_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kWarpSize = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kRowsPerWarp = 4;    // output rows per warp: every activation loaded is reused this often
constexpr int kValuesPerVec = 32;  // one uint4 of weight_packed = 4 int32 words = 32 4-bit values

// Explicit conversions only: torch builds extensions with __CUDA_NO_HALF_CONVERSIONS__ and friends.
template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Eight consecutive 16-bit activations, one 128-bit load, widened to fp32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int j = 0; j < 8; ++j) out[j] = to_float(v[j]);
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// The stored zero-point nibble (zp + 8) of row n in `group`; 8 (zp = 0) for symmetric weights.
__device__ __forceinline__ float stored_zero(const int32_t* zero_point, int n, int group, int groups) {
  if (zero_point == nullptr) return 8.0f;
  const uint32_t word = static_cast<uint32_t>(zero_point[static_cast<size_t>(n / 8) * groups + group]);
  return static_cast<float>((word >> (4 * (n % 8))) & 0xFu);
}

template <typename T, int MAX_M>
__global__ void __launch_bounds__(kWarpsPerBlock * kWarpSize)
    int4_gemv_kernel(const T* __restrict__ x, const int32_t* __restrict__ packed, const T* __restrict__ scale,
                     const int32_t* __restrict__ zero_point, T* __restrict__ out, int M, int N, int K,
                     int group_size) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n0 = (blockIdx.x * kWarpsPerBlock + warp) * kRowsPerWarp;
  if (n0 >= N) return;  // the whole warp leaves together, so the full-warp shuffles below stay legal

  const int groups = K / group_size;
  const int vecs_per_row = K / kValuesPerVec;

  // Rows past N (the last warp when N % 4 != 0) read row n0 again with scale 0 and are never written.
  int row[kRowsPerWarp];
  bool valid[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    valid[r] = n0 + r < N;
    row[r] = valid[r] ? n0 + r : n0;
  }

  float acc[MAX_M][kRowsPerWarp];
#pragma unroll
  for (int m = 0; m < MAX_M; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) acc[m][r] = 0.0f;

  for (int v = lane; v < vecs_per_row; v += kWarpSize) {
    const int k0 = v * kValuesPerVec;
    const int group = k0 / group_size;  // group_size % 32 == 0: the 32 values share one group

    uint4 w[kRowsPerWarp];
    float s[kRowsPerWarp];
    float z[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const uint4* row_vecs = reinterpret_cast<const uint4*>(packed + static_cast<size_t>(row[r]) * (K / 8));
      w[r] = __ldg(row_vecs + v);
      s[r] = valid[r] ? to_float(scale[static_cast<size_t>(row[r]) * groups + group]) : 0.0f;
      z[r] = stored_zero(zero_point, row[r], group, groups);
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i of the vector: columns k0 + 8i .. k0 + 8i + 7
      float wf[kRowsPerWarp][8];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const uint32_t word = word_of(w[r], i);
#pragma unroll
        for (int j = 0; j < 8; ++j) wf[r][j] = (static_cast<float>((word >> (4 * j)) & 0xFu) - z[r]) * s[r];
      }
#pragma unroll
      for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {
          float xf[8];
          load8(x + static_cast<size_t>(m) * K + k0 + 8 * i, xf);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[m][r] = fmaf(wf[r][j], xf[j], acc[m][r]);
        }
      }
    }
  }

  // Sum the 32 lanes' partial dot products; afterwards every lane holds every total.
#pragma unroll
  for (int m = 0; m < MAX_M; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      float a = acc[m][r];
#pragma unroll
      for (int offset = kWarpSize / 2; offset > 0; offset /= 2) a += __shfl_xor_sync(0xffffffffu, a, offset);
      acc[m][r] = a;
    }

  // Spread the stores over the lanes (static register indexing: each lane tests its own pairs).
#pragma unroll
  for (int m = 0; m < MAX_M; ++m)
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
      if (m < M && valid[r] && lane == (m * kRowsPerWarp + r) % kWarpSize)
        out[static_cast<size_t>(m) * N + n0 + r] = from_float<T>(acc[m][r]);
}

template <typename T>
__global__ void int4_dequantize_kernel(const int32_t* __restrict__ packed, const T* __restrict__ scale,
                                       const int32_t* __restrict__ zero_point, T* __restrict__ out, int N, int K,
                                       int group_size) {
  const size_t words_per_row = static_cast<size_t>(K) / 8;
  const size_t total = static_cast<size_t>(N) * words_per_row;
  const int groups = K / group_size;
  for (size_t idx = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const int n = static_cast<int>(idx / words_per_row);
    const int k0 = static_cast<int>(idx % words_per_row) * 8;
    const int group = k0 / group_size;  // group_size % 8 == 0: the word's 8 values share one group
    const uint32_t word = static_cast<uint32_t>(packed[idx]);
    const float s = to_float(scale[static_cast<size_t>(n) * groups + group]);
    const float z = stored_zero(zero_point, n, group, groups);
    uint4 result;
    T* values = reinterpret_cast<T*>(&result);
#pragma unroll
    for (int j = 0; j < 8; ++j) values[j] = from_float<T>((static_cast<float>((word >> (4 * j)) & 0xFu) - z) * s);
    *reinterpret_cast<uint4*>(out + static_cast<size_t>(n) * K + k0) = result;
  }
}

template <typename T, int MAX_M>
cudaError_t launch_gemv(const void* x, const int32_t* packed, const void* scale, const int32_t* zero_point,
                        void* out, int M, int N, int K, int group_size, cudaStream_t stream) {
  constexpr int rows_per_block = kWarpsPerBlock * kRowsPerWarp;
  const dim3 grid((N + rows_per_block - 1) / rows_per_block);
  int4_gemv_kernel<T, MAX_M><<<grid, kWarpsPerBlock * kWarpSize, 0, stream>>>(
      static_cast<const T*>(x), packed, static_cast<const T*>(scale), zero_point, static_cast<T*>(out), M, N, K,
      group_size);
  return cudaGetLastError();
}

// Instantiate for the smallest power of two >= M, so M = 1 does not pay for 16 rows of registers.
template <typename T>
cudaError_t dispatch_gemv(const void* x, const int32_t* packed, const void* scale, const int32_t* zero_point,
                          void* out, int M, int N, int K, int group_size, cudaStream_t stream) {
  if (M <= 1) return launch_gemv<T, 1>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
  if (M <= 2) return launch_gemv<T, 2>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
  if (M <= 4) return launch_gemv<T, 4>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
  if (M <= 8) return launch_gemv<T, 8>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
  return launch_gemv<T, 16>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
}

template <typename T>
cudaError_t launch_dequantize(const int32_t* packed, const void* scale, const int32_t* zero_point, void* out, int N,
                              int K, int group_size, cudaStream_t stream) {
  constexpr int threads = 256;
  const size_t words = static_cast<size_t>(N) * (K / 8);
  const size_t wanted = (words + threads - 1) / threads;
  const unsigned int blocks = static_cast<unsigned int>(wanted < (1u << 20) ? wanted : (1u << 20));  // grid-stride
  int4_dequantize_kernel<T><<<blocks, threads, 0, stream>>>(packed, static_cast<const T*>(scale), zero_point,
                                                           static_cast<T*>(out), N, K, group_size);
  return cudaGetLastError();
}

}  // namespace

extern "C" int llama31_int4_gemv(const void* x, const int32_t* packed, const void* scale, const int32_t* zero_point,
                                 void* out, int M, int N, int K, int group_size, int is_bf16, cudaStream_t stream) {
  if (M < 1 || M > LLAMA31_INT4_GEMV_MAX_ROWS || N < 1 || K < kValuesPerVec || K % kValuesPerVec != 0 ||
      group_size < kValuesPerVec || group_size % kValuesPerVec != 0 || K % group_size != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaError_t status =
      is_bf16 ? dispatch_gemv<__nv_bfloat16>(x, packed, scale, zero_point, out, M, N, K, group_size, stream)
              : dispatch_gemv<__half>(x, packed, scale, zero_point, out, M, N, K, group_size, stream);
  return static_cast<int>(status);
}

extern "C" int llama31_int4_dequantize(const int32_t* packed, const void* scale, const int32_t* zero_point, void* out,
                                       int N, int K, int group_size, int is_bf16, cudaStream_t stream) {
  if (N < 1 || K < 8 || K % 8 != 0 || group_size < 8 || group_size % 8 != 0 || K % group_size != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  const cudaError_t status =
      is_bf16 ? launch_dequantize<__nv_bfloat16>(packed, scale, zero_point, out, N, K, group_size, stream)
              : launch_dequantize<__half>(packed, scale, zero_point, out, N, K, group_size, stream);
  return static_cast<int>(status);
}
