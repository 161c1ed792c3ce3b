// Weights on the CPU, for decoding: y = x @ W.T for a few rows of x (1 to 4), x and W both float32 or both
// bfloat16, y in their dtype from float32 sums (what F.linear computes; only the order of the additions differs).
//
// Decoding one token streams every weight once, so this product is fast when it reads W at the memory's speed. Each
// thread takes one contiguous range of W's rows and reads it front to back, one row after the other: a single
// stream, which the hardware prefetcher follows best (interleaving the rows of a tile, four streams per thread,
// measured slower). For one or two rows of x the hardware prefetcher alone keeps up, and a software prefetch costs
// 7-10% when the memory is fast (above ~70 GB/s); from three rows on, the arithmetic per load delays the loads, and
// a software prefetch a fixed distance ahead keeps the stream going (without it, four rows read a third slower). Per
// 64-byte load of a row (16 float32 or 32 bf16 weights) one instruction per row of x: an FMA, or vdpbf16ps
// (AVX512-BF16: 32 exact products summed pairwise into 16 float32 lanes). The sums along a row go to kChains
// independent accumulators, so the adds do not wait on each other's latency (one chain would cap a core below the
// memory's speed). Columns past the last full load are read with a masked load, so any in_features works.
//
// Needs AVX512F/BW and AVX512-BF16 at run time (gemv_supported); the functions are compiled for them by target
// attributes, so the file builds with any x86-64 g++ and no -march flag.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int kMaxRowsX = 4;              // rows of x per pass over W (the layer sends at most this many)
constexpr int kChains = 4;                // accumulators per row of x
constexpr int kPrefetchFromRowsX = 3;     // software prefetch when x has this many rows or more (see above)
constexpr int64_t kPrefetchBytes = 4096;  // how far ahead of the loads the software prefetch reads

#define LLAMA31_AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// one 64-byte load of W times the same columns of x, added to acc; masked: only the first columns of the load
struct Float32 {
  using T = float;
  using Mask = __mmask16;
  static constexpr int64_t kBlock = 16;
  LLAMA31_AVX512 static __m512 add(__m512 acc, const T* w, const T* x) {
    return _mm512_fmadd_ps(_mm512_loadu_ps(w), _mm512_loadu_ps(x), acc);
  }
  LLAMA31_AVX512 static __m512 add(__m512 acc, const T* w, const T* x, Mask m) {
    return _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w), _mm512_maskz_loadu_ps(m, x), acc);
  }
  static T out(float sum) { return sum; }
};

struct BFloat16 {
  using T = c10::BFloat16;
  using Mask = __mmask32;
  static constexpr int64_t kBlock = 32;
  LLAMA31_AVX512 static __m512 add(__m512 acc, const T* w, const T* x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(w), (__m512bh)_mm512_loadu_si512(x));
  }
  LLAMA31_AVX512 static __m512 add(__m512 acc, const T* w, const T* x, Mask m) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(m, w), (__m512bh)_mm512_maskz_loadu_epi16(m, x));
  }
  static T out(float sum) { return c10::BFloat16(sum); }  // round to nearest even, as F.linear's output
};

// rows [begin, end) of W times the M rows of x; out (M, n)
template <typename D, int M>
LLAMA31_AVX512 void rows(const typename D::T* x, const typename D::T* w, int64_t k, int64_t n, typename D::T* out,
                         int64_t begin, int64_t end) {
  constexpr int64_t kBlock = D::kBlock;
  const int64_t full = k / kBlock * kBlock;
  const auto tail = static_cast<typename D::Mask>((1ull << (k - full)) - 1);
  for (int64_t r = begin; r < end; ++r) {
    const typename D::T* row = w + r * k;
    __m512 acc[M][kChains];
    for (int i = 0; i < M; ++i)
      for (int c = 0; c < kChains; ++c) acc[i][c] = _mm512_setzero_ps();
    int64_t b = 0;
    for (; b + kChains * kBlock <= full; b += kChains * kBlock) {
      for (int c = 0; c < kChains; ++c) {
        const typename D::T* at = row + b + c * kBlock;
        if constexpr (M >= kPrefetchFromRowsX)
          _mm_prefetch(reinterpret_cast<const char*>(at) + kPrefetchBytes, _MM_HINT_T0);
        for (int i = 0; i < M; ++i) acc[i][c] = D::add(acc[i][c], at, x + i * k + b + c * kBlock);
      }
    }
    for (; b < full; b += kBlock)
      for (int i = 0; i < M; ++i) acc[i][0] = D::add(acc[i][0], row + b, x + i * k + b);
    if (full < k)  // the last k - full columns; masked-off lanes load as 0 and add nothing
      for (int i = 0; i < M; ++i) acc[i][0] = D::add(acc[i][0], row + full, x + i * k + full, tail);
    for (int i = 0; i < M; ++i) {
      __m512 sum = acc[i][0];
      for (int c = 1; c < kChains; ++c) sum = _mm512_add_ps(sum, acc[i][c]);
      out[i * n + r] = D::out(_mm512_reduce_add_ps(sum));
    }
  }
}

template <typename D>
void product(const at::Tensor& x, const at::Tensor& weight, at::Tensor& out, int64_t m) {
  const int64_t k = weight.size(1), n = weight.size(0);
  const auto* xp = x.data_ptr<typename D::T>();
  const auto* wp = weight.data_ptr<typename D::T>();
  auto* yp = out.data_ptr<typename D::T>();
  // parallel_for gives each thread one contiguous range of rows (at least 16 of them)
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    switch (m) {
      case 1: rows<D, 1>(xp, wp, k, n, yp, begin, end); break;
      case 2: rows<D, 2>(xp, wp, k, n, yp, begin, end); break;
      case 3: rows<D, 3>(xp, wp, k, n, yp, begin, end); break;
      default: rows<D, 4>(xp, wp, k, n, yp, begin, end); break;
    }
  });
}

bool gemv_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16");
}

// x (..., K) contiguous, at most kMaxRowsX rows; weight (N, K) contiguous; both float32 or both bfloat16.
// Returns (..., N) in their dtype.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == weight.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "gemv: x and weight must be both float32 or both bfloat16, got ", x.scalar_type(), " and ",
              weight.scalar_type());
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 2 && x.dim() >= 1,
              "gemv: x (..., K) and weight (N, K) must be contiguous, got ", x.sizes(), " and ", weight.sizes());
  const int64_t k = weight.size(1), n = weight.size(0);
  TORCH_CHECK(x.size(-1) == k, "gemv: x has ", x.size(-1), " columns, the weight ", k);
  const int64_t m = k ? x.numel() / k : 0;
  TORCH_CHECK(m <= kMaxRowsX, "gemv: at most ", kMaxRowsX, " rows of x, got ", m);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  if (m == 0 || n == 0) return out;
  TORCH_CHECK(k > 0, "gemv: the weight has no columns");
  if (x.scalar_type() == at::kFloat) product<Float32>(x, weight, out, m);
  else product<BFloat16>(x, weight, out, m);
  return out;
}

}  // namespace

TORCH_LIBRARY(llama31_gemv_cpu, m) {
  m.def("supported() -> bool", &gemv_supported);
  m.def("mm(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama31_gemv_cpu, CPU, m) {
  m.impl("mm", &gemv);
}
