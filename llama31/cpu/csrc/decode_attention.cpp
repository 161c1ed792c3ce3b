// Attention of one new token over the KV cache, on the CPU, in one pass per kv head:
//
//   s[r, t] = scale * q_r . k_t            r: the n_rep query heads that share kv head g, t: 0 .. T-1
//   p[r, t] = exp(s[r, t] - max_t s[r, .]) / sum_t exp(...)
//   out_r   = sum_t p[r, t] v_t
//
// the formula of decode_attention (llama31/model/attention.py), every sum in float32. Why a kernel: ATen's
// batched matrix products (q k^T, then p v) cost tens of microseconds a call however short the context, two
// calls per layer; here one call per layer reads the keys and values once, front to back. A key row is
// short (head_dim numbers), so the dot products of 16 consecutive keys are summed across their lanes
// together (hsum16) rather than one by one.
//
// q (bs, n_heads, 1, head_dim); k, v (bs, n_kv_heads, T, head_dim), any strides with the last dimension
// contiguous (views into a longer cache); float32 or bfloat16, all three the same. head_dim a multiple of 32.
// Needs AVX512F/BW/DQ and AVX512-BF16 at run time (decode_attention_supported); the functions are compiled for
// them by target attributes, so the file builds with any x86-64 g++ and no -march flag.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

#define LLAMA31_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512bf16")))

constexpr int kMaxRep = 16;  // query heads per kv head (Llama: 1 to 8)

// lane i of the result = the sum of the 16 lanes of v[i]
LLAMA31_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 a[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [x0+x2, y0+y2, x1+x3, y1+y3] of x = v[2i], y = v[2i+1]
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int j = 0; j < 4; ++j) {  // per block: the block's sum of v[4j], v[4j+1], v[4j+2], v[4j+3]
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    c[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // the 4 x 4 blocks of c transposed and summed: block j of the result sums the blocks of c[j]
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44), _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44), _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88), _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

// exp(x) for x <= 0 (softmax's s - max): 2^n * 2^f, x log2(e) = n + f, |f| <= 1/2, 2^f by its Taylor series
// to degree 7 (truncation below 1e-8 relative, under float32's rounding); below -87 the result is 0 or tiny.
LLAMA31_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));  // f ln 2
  // e^g, g = f ln 2, |g| <= 0.347: Horner's rule on 1 + g + g^2/2! + ... + g^7/7!
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// 16 numbers of a row as float32
LLAMA31_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
LLAMA31_AVX512 inline __m512 load16(const c10::BFloat16* p) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// q_r . k_t as 16 lanes to be summed: float32 products, or bf16 pairs by vdpbf16ps (exact products, float32 sums)
template <typename T>
struct Dot;
template <>
struct Dot<float> {
  LLAMA31_AVX512 static __m512 lanes(const float* q, const float* k, int64_t hd) {
    __m512 acc = _mm512_mul_ps(load16(q), load16(k));
    for (int64_t d = 16; d < hd; d += 16) acc = _mm512_fmadd_ps(load16(q + d), load16(k + d), acc);
    return acc;
  }
};
template <>
struct Dot<c10::BFloat16> {
  LLAMA31_AVX512 static __m512 lanes(const c10::BFloat16* q, const c10::BFloat16* k, int64_t hd) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(k + d), (__m512bh)_mm512_loadu_si512(q + d));
    return acc;
  }
};

LLAMA31_AVX512 inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
// round to nearest even, as c10::BFloat16 does (vcvtneps2bf16 would flush subnormals to zero)
LLAMA31_AVX512 inline void store16(c10::BFloat16* p, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  const __m512i out = _mm512_mask_blend_epi32(nan, _mm512_srli_epi32(rounded, 16), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(out));
}

// 16-lane mask of the first `count` (0..16) lanes
inline __mmask16 first(int64_t count) { return static_cast<__mmask16>((1u << count) - 1); }

// one kv head: its n_rep queries (q, rows q_stride apart) over its len keys and values (rows k_stride, v_stride
// apart) -> out (n_rep, hd), contiguous; s: room for the n_rep x len scores
template <typename T>
LLAMA31_AVX512 void one_group(const T* q, int64_t q_stride, const T* k, int64_t k_stride, const T* v,
                              int64_t v_stride, T* out, int64_t n_rep, int64_t len, int64_t hd, float scale,
                              std::vector<float>& s) {
  s.resize(static_cast<size_t>(n_rep * len));
  // scores s[r, t] = scale * q_r . k_t, 16 positions at a time (the last block masked)
  for (int64_t t0 = 0; t0 < len; t0 += 16) {
    const int64_t count = std::min<int64_t>(16, len - t0);
    for (int64_t r = 0; r < n_rep; ++r) {
      __m512 lanes[16];
      for (int i = 0; i < 16; ++i)
        lanes[i] = i < count ? Dot<T>::lanes(q + r * q_stride, k + (t0 + i) * k_stride, hd) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(s.data() + r * len + t0, first(count),
                            _mm512_mul_ps(hsum16(lanes), _mm512_set1_ps(scale)));
    }
  }
  // softmax of each query's row, in place; 1 / its sum kept for the end
  float inv_sum[kMaxRep];
  for (int64_t r = 0; r < n_rep; ++r) {
    float* row = s.data() + r * len;
    const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
    __m512 mx = minus_inf;
    for (int64_t t = 0; t < len; t += 16)
      mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(minus_inf, first(std::min<int64_t>(16, len - t)), row + t));
    const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t += 16) {
      const __mmask16 valid = first(std::min<int64_t>(16, len - t));
      const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, row + t), m);
      const __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(x));  // lanes past len add nothing
      _mm512_mask_storeu_ps(row + t, valid, e);
      sum = _mm512_add_ps(sum, e);
    }
    inv_sum[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
  // out_r = sum_t p[r, t] v_t, 64 columns of head_dim at a time (4 x n_rep accumulators)
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    const int chunks = static_cast<int>(std::min<int64_t>(4, (hd - d0) / 16));
    __m512 acc[kMaxRep][4];
    for (int64_t r = 0; r < n_rep; ++r)
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; ++t) {
      const T* vt = v + t * v_stride + d0;
      __m512 vv[4];
      for (int c = 0; c < chunks; ++c) vv[c] = load16(vt + 16 * c);
      for (int64_t r = 0; r < n_rep; ++r) {
        const __m512 p = _mm512_set1_ps(s[r * len + t]);
        for (int c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(p, vv[c], acc[r][c]);
      }
    }
    for (int64_t r = 0; r < n_rep; ++r)
      for (int c = 0; c < chunks; ++c)
        store16(out + r * hd + d0 + 16 * c, _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv_sum[r])));
  }
}

// every (batch row, kv head) as one task: each reads its keys and values once
template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, float scale) {
  const int64_t n_heads = q.size(1), n_kv = k.size(1), n_rep = n_heads / n_kv, len = k.size(2), hd = q.size(3);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, q.size(0) * n_kv, 1, [&](int64_t begin, int64_t end) {
    static thread_local std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_kv, g = task % n_kv;  // batch row b, kv head g: query heads g*n_rep ..
      one_group<T>(qp + b * q.stride(0) + g * n_rep * q.stride(1), q.stride(1),
                   kp + b * k.stride(0) + g * k.stride(1), k.stride(2), vp + b * v.stride(0) + g * v.stride(1),
                   v.stride(2), op + (b * n_heads + g * n_rep) * hd, n_rep, len, hd, scale, scores);
    }
  });
}

bool decode_attention_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bf16");
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "decode attention: q (bs, n_heads, 1, head_dim), k and v (bs, n_kv_heads, T, head_dim); got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "decode attention: k and v must match, and q's batch and head_dim theirs; got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "decode attention: q, k, v must all be float32 or all bfloat16");
  const int64_t bs = q.size(0), n_heads = q.size(1), n_kv = k.size(1), len = k.size(2), hd = q.size(3);
  TORCH_CHECK(n_kv > 0 && n_heads % n_kv == 0 && n_heads / n_kv <= kMaxRep,
              "decode attention: n_heads must be a multiple of n_kv_heads, at most ", kMaxRep, " times; got ",
              n_heads, " and ", n_kv);
  TORCH_CHECK(hd % 32 == 0 && len > 0, "decode attention: head_dim must be a multiple of 32 and T positive; got ",
              hd, " and ", len);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode attention: the last dimension of q, k and v must be contiguous");
  at::Tensor out = at::empty({bs, n_heads, 1, hd}, q.options());
  if (q.scalar_type() == at::kFloat) run<float>(q, k, v, out, static_cast<float>(scale));
  else run<c10::BFloat16>(q, k, v, out, static_cast<float>(scale));
  return out;
}

}  // namespace

TORCH_LIBRARY(llama31_attention_cpu, m) {
  m.def("supported() -> bool", &decode_attention_supported);
  m.def("decode(Tensor q, Tensor k, Tensor v, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama31_attention_cpu, CPU, m) {
  m.impl("decode", &decode_attention);
}
