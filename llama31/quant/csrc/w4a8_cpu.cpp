// INT4 weights times int8 activations (W4A8) on the CPU: y = x @ W.T, with x quantized to 8 bits on the fly.
//
// Decoding one token streams every weight once, so a kernel is fast when turning 4-bit weights back into
// products costs less time than reading them. With bf16 activations it does not, on two cores: a bf16 dot
// product instruction does 32 multiply-adds, and the cores fall behind the memory. An int8 dot product
// instruction (AVX512-VNNI vpdpbusd: 64 products of unsigned by signed bytes, summed by fours into int32) does
// twice that work per instruction, and a nibble is already an unsigned byte once masked, so a block of 128
// columns of a weight row (64 bytes, one load) costs:
//
//   bytes = load 64 bytes                       byte j: column 2j in the low nibble, 2j+1 in the high (u = q + 8)
//   lo    = bytes & 0xF;  hi = (bytes >> 4) & 0xF
//   sum   = -8 * (x sums) + lo . xq_even + hi . xq_odd      two vpdpbusd: exact int32 sum of (u - 8) * xq
//   part += float(sum) * x_scale                 per lane: lane l covers columns 8l .. 8l+7 of the block
//
// and once per group of g columns acc += part * w_scale[n, g]. This is what llama.cpp does for Q4_0 (its
// activations are quantized to Q8_0, blocks of 32 with one scale each), on our canonical layout
// (llama31/quant/packing.py; nothing is repacked). Rows of W go in tiles of 4, each row's block of 128 after the
// other's, with a prefetch of the next tile: rows of 1 KB are too short for the hardware prefetcher to follow.
//
// The arithmetic: x quantized per block of 32 columns to xq = round(x * (127 / max|x|)), scale s = max|x| / 127
// (that rounding is the price of this path: up to s / 2 per element, against bf16's 2^-9 relative); the integer
// sums exact; the scales applied in fp32. An asymmetric layer's zero point enters as sum_g zs[n, g] * sum_{k in g} s * xq[k],
// with zs = zp * scale computed by the caller.
//
// Needs AVX512F, AVX512BW and AVX512-VNNI at run time (int4_cpu_supported); the functions are compiled for them
// by target attributes, so the file builds with any x86-64 g++ and no -march flag.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kBlock = 128;  // columns per load: 64 bytes of nibbles
constexpr int64_t kXBlock = 32;  // columns of x per int8 scale (Q8_0's block)
constexpr int kMaxRowsX = 4;     // rows of x per pass over a tile of weight rows (more: another pass, from cache)
constexpr int kTileRows = 4;     // rows of W per tile

#define LLAMA31_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

inline float bf16_to_float(uint16_t bits) {
  uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

template <typename Scale>
inline float scale_at(const Scale* scale, int64_t i);
template <>
inline float scale_at<uint16_t>(const uint16_t* scale, int64_t i) { return bf16_to_float(scale[i]); }
template <>
inline float scale_at<float>(const float* scale, int64_t i) { return scale[i]; }

// x of one call, quantized and laid out for the kernel. Per row of x and block of 128 columns:
//   q       int8 [128]: the even columns, then the odd ones (the order of the low and high nibbles)
//   offset  int32 [16]: -8 * (sum of xq over lane l's columns 8l .. 8l+7)
//   scale   float [16]: the int8 scale of lane l's block of 32
// One buffer per thread, reused from call to call (a decode step makes over a hundred calls).
struct QuantizedX {
  int64_t m = 0, k = 0, blocks = 0;
  std::vector<int8_t> q;
  std::vector<int32_t> offset;
  std::vector<float> scale;
};

inline float as_float(float value) { return value; }
inline float as_float(c10::BFloat16 value) { return bf16_to_float(value.x); }

// Quantize a block of 32 values: s = max|x| / 127, xq = round(x * (127 / max|x|)), half to even (the CPU's
// rounding mode); an all-zero block gets s = 0 and xq = 0.
LLAMA31_AVX512 inline float quantize_block(const float* x, int8_t* xq) {
  const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
  const __m512 inverse = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  _mm_storeu_si128((__m128i*)xq, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
  _mm_storeu_si128((__m128i*)(xq + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
  return amax / 127.f;
}

template <typename T>
LLAMA31_AVX512 void quantize_x(const T* x, int64_t m, int64_t k, QuantizedX& out) {
  out.m = m, out.k = k, out.blocks = k / kBlock;
  out.q.resize(m * k), out.offset.resize(m * k / 8), out.scale.resize(m * k / 8);
  alignas(64) float xf[kBlock];
  alignas(64) int8_t xq[kBlock];
  float s[kBlock / kXBlock];
  for (int64_t i = 0; i < m; ++i)
    for (int64_t blk = 0; blk < out.blocks; ++blk) {
      const T* row = x + i * k + blk * kBlock;
      for (int c = 0; c < kBlock; ++c) xf[c] = as_float(row[c]);
      for (int b = 0; b < kBlock / kXBlock; ++b) s[b] = quantize_block(xf + b * kXBlock, xq + b * kXBlock);
      int8_t* q = out.q.data() + i * k + blk * kBlock;
      for (int j = 0; j < 64; ++j) {
        q[j] = xq[2 * j];
        q[64 + j] = xq[2 * j + 1];
      }
      const int64_t at = (i * out.blocks + blk) * 16;
      for (int l = 0; l < 16; ++l) {
        int32_t sum = 0;
        for (int e = 0; e < 8; ++e) sum += xq[8 * l + e];
        out.offset[at + l] = -8 * sum;
        out.scale[at + l] = s[8 * l / kXBlock];
      }
    }
}

// One product: W (N, K) in weight_packed / weight_scale (Scale: bf16 bits or float), out (M, N) of Out.
template <typename Scale, typename Out>
struct Product {
  const int8_t* xq;           // QuantizedX's arrays
  const int32_t* x_offset;
  const float* x_scale;
  int64_t m, k;
  const uint8_t* w;
  const Scale* scale;
  const float* zero_scale;    // zp * scale (N, K/g), or nullptr (symmetric)
  const float* x_group_sums;  // (M, K/g): sum of s * xq over each group, read with zero_scale
  int64_t group_size, n;
  Out* out;
};

// Rows [n0, n0 + NR) of W times rows [i0, i0 + M) of x. G: the group size if it is 32 or 64 (each lane of a block
// of 128 then has its own weight scale), else 0: a multiple of 128, one scale per group for every lane.
template <typename Scale, typename Out, int M, int NR, int G>
LLAMA31_AVX512 void tile_kernel(const Product<Scale, Out>& p, int64_t i0, int64_t n0) {
  const __m512i nibble = _mm512_set1_epi8(0xF);
  const int64_t k = p.k, ldw = k / 2, n_blocks = k / kBlock, n_groups = k / p.group_size;
  const int64_t blocks_per_step = G ? 1 : p.group_size / kBlock;  // blocks between weight-scale updates
  const int8_t* xq = p.xq + i0 * k;
  const int32_t* x_offset = p.x_offset + i0 * n_blocks * 16;
  const float* x_scale = p.x_scale + i0 * n_blocks * 16;
  __m512 acc[M][NR];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();

  for (int64_t blk = 0; blk < n_blocks; blk += blocks_per_step) {
    __m512 part[M][NR];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < NR; ++r) part[i][r] = _mm512_setzero_ps();
    for (int64_t b = blk; b < blk + blocks_per_step; ++b) {
      __m512i x_even[M], x_odd[M], offset[M];
      __m512 x_scales[M];
      for (int i = 0; i < M; ++i) {
        x_even[i] = _mm512_loadu_si512(xq + i * k + b * kBlock);
        x_odd[i] = _mm512_loadu_si512(xq + i * k + b * kBlock + 64);
        offset[i] = _mm512_loadu_si512(x_offset + (i * n_blocks + b) * 16);
        x_scales[i] = _mm512_loadu_ps(x_scale + (i * n_blocks + b) * 16);
      }
      for (int r = 0; r < NR; ++r) {
        const uint8_t* row = p.w + (n0 + r) * ldw + b * (kBlock / 2);
        // the same line of the next tile's row: a tile is a few short rows (1 KB at K = 2048), too short for
        // the hardware prefetcher to find each one's stream in time, so the kernel asks one tile ahead (past the
        // last row too: a prefetch never faults)
        _mm_prefetch(reinterpret_cast<const char*>(row + NR * ldw), _MM_HINT_T0);
        const __m512i bytes = _mm512_loadu_si512(row);                             // (64,) two nibbles each
        const __m512i lo = _mm512_and_si512(bytes, nibble);                        // columns c, c+2, ..., c+126
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);  // columns c+1, ..., c+127
        for (int i = 0; i < M; ++i) {
          const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(offset[i], lo, x_even[i]), hi, x_odd[i]);
          part[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), x_scales[i], part[i][r]);  // sum (u-8) x, per lane
        }
      }
    }
    for (int r = 0; r < NR; ++r) {
      const Scale* row_scale = p.scale + (n0 + r) * n_groups;
      __m512 s;
      if (G == 0) {
        s = _mm512_set1_ps(scale_at(row_scale, blk / blocks_per_step));
      } else {  // lane l sums columns 8l .. 8l+7 of the block: group (128 * blk + 8l) / G
        constexpr int kPerBlock = kBlock / (G ? G : kBlock);  // groups in a block: 4 (g = 32) or 2 (g = 64)
        const __m512 first = _mm512_set1_ps(scale_at(row_scale, blk * kPerBlock));
        if (kPerBlock == 2) {
          s = _mm512_mask_blend_ps(0xFF00, first, _mm512_set1_ps(scale_at(row_scale, blk * 2 + 1)));
        } else {
          s = _mm512_mask_blend_ps(0x00F0, first, _mm512_set1_ps(scale_at(row_scale, blk * 4 + 1)));
          s = _mm512_mask_blend_ps(0x0F00, s, _mm512_set1_ps(scale_at(row_scale, blk * 4 + 2)));
          s = _mm512_mask_blend_ps(0xF000, s, _mm512_set1_ps(scale_at(row_scale, blk * 4 + 3)));
        }
      }
      for (int i = 0; i < M; ++i) acc[i][r] = _mm512_fmadd_ps(part[i][r], s, acc[i][r]);
    }
  }
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < NR; ++r) {
      float y = _mm512_reduce_add_ps(acc[i][r]);
      if (p.zero_scale)  // an asymmetric layer: y -= sum_g zp * scale * (sum of x over group g)
        for (int64_t g = 0; g < n_groups; ++g)
          y -= p.zero_scale[(n0 + r) * n_groups + g] * p.x_group_sums[(i0 + i) * n_groups + g];
      p.out[(i0 + i) * p.n + n0 + r] = Out(y);
    }
}

// Every row of x times NR rows of W from n0: the tile's weights (NR * K/2 bytes) stay in the cache while
// further rows of x pass over them.
template <typename Scale, typename Out, int NR, int G>
LLAMA31_AVX512 void tile(const Product<Scale, Out>& p, int64_t n0) {
  for (int64_t i0 = 0; i0 < p.m; i0 += kMaxRowsX) {
    switch (p.m - i0 < kMaxRowsX ? p.m - i0 : kMaxRowsX) {
      case 1: tile_kernel<Scale, Out, 1, NR, G>(p, i0, n0); break;
      case 2: tile_kernel<Scale, Out, 2, NR, G>(p, i0, n0); break;
      case 3: tile_kernel<Scale, Out, 3, NR, G>(p, i0, n0); break;
      default: tile_kernel<Scale, Out, 4, NR, G>(p, i0, n0); break;
    }
  }
}

template <typename Scale, typename Out, int G>
void rows(const Product<Scale, Out>& p, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + kTileRows <= end; n += kTileRows) tile<Scale, Out, kTileRows, G>(p, n);
  for (; n < end; ++n) tile<Scale, Out, 1, G>(p, n);
}

template <typename Scale, typename Out>
void run(const Product<Scale, Out>& p) {
  const int64_t grain = 16;  // rows of W per task at the least; parallel_for splits N over the threads
  at::parallel_for(0, p.n, grain, [&](int64_t begin, int64_t end) {
    if (p.group_size == 32) rows<Scale, Out, 32>(p, begin, end);
    else if (p.group_size == 64) rows<Scale, Out, 64>(p, begin, end);
    else rows<Scale, Out, 0>(p, begin, end);
  });
}

bool int4_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

// x (..., K) float32 or bfloat16, contiguous; weight_packed int32 (N, K/8); weight_scale (N, K/g) bf16 or fp32;
// zero_scale (N, K/g) fp32 = zp * scale, or none. Returns (..., N) in x's dtype.
at::Tensor int4_w4a8(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& weight_scale,
                     const std::optional<at::Tensor>& zero_scale, int64_t group_size) {
  TORCH_CHECK(int4_cpu_supported(), "int4 w4a8: this CPU lacks AVX512-VNNI; use Int4Linear backend 'cpu_fused'");
  TORCH_CHECK(x.device().is_cpu() && weight_packed.device().is_cpu() && weight_scale.device().is_cpu(),
              "int4 w4a8: every tensor must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4 w4a8: x must be a contiguous float32 or bfloat16 tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t k = x.size(-1), m = k ? x.numel() / k : 0, n = weight_packed.size(0);
  TORCH_CHECK(weight_packed.scalar_type() == at::kInt && weight_packed.is_contiguous() &&
              weight_packed.dim() == 2 && weight_packed.size(1) * 8 == k,
              "int4 w4a8: weight_packed must be contiguous int32 (N, K/8) with K = ", k, ", got ",
              weight_packed.sizes());
  TORCH_CHECK(k % kBlock == 0 && (group_size == 32 || group_size == 64 || group_size % kBlock == 0) &&
              k % group_size == 0,
              "int4 w4a8: needs K % 128 == 0 and a group size of 32, 64 or a multiple of 128 dividing K; got K = ",
              k, ", g = ", group_size);
  const int64_t n_groups = k / group_size;
  TORCH_CHECK(weight_scale.dim() == 2 && weight_scale.size(0) == n && weight_scale.size(1) == n_groups &&
              weight_scale.is_contiguous() &&
              (weight_scale.scalar_type() == at::kBFloat16 || weight_scale.scalar_type() == at::kFloat),
              "int4 w4a8: weight_scale must be contiguous bf16 or fp32 (", n, ", ", n_groups, "), got ",
              weight_scale.sizes(), " ", weight_scale.scalar_type());
  const bool with_zero = zero_scale.has_value() && zero_scale->defined();
  if (with_zero) {
    TORCH_CHECK(zero_scale->scalar_type() == at::kFloat && zero_scale->is_contiguous() &&
                zero_scale->sizes() == weight_scale.sizes(),
                "int4 w4a8: zero_scale must be contiguous fp32 shaped like weight_scale, got ", zero_scale->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());

  static thread_local QuantizedX xq;
  if (x.scalar_type() == at::kFloat)
    quantize_x(x.data_ptr<float>(), m, k, xq);
  else
    quantize_x(x.data_ptr<c10::BFloat16>(), m, k, xq);
  const float* zs = nullptr;
  std::vector<float> x_group_sums;
  if (with_zero) {
    zs = zero_scale->data_ptr<float>();
    x_group_sums.assign(static_cast<size_t>(m * n_groups), 0.f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t blk = 0; blk < xq.blocks; ++blk)
        for (int l = 0; l < 16; ++l) {
          const int64_t at = (i * xq.blocks + blk) * 16 + l;
          x_group_sums[i * n_groups + (blk * kBlock + 8 * l) / group_size] += xq.scale[at] * (xq.offset[at] / -8.f);
        }
  }
  const uint8_t* w = reinterpret_cast<const uint8_t*>(weight_packed.data_ptr());
  const float* sums = x_group_sums.data();
  auto product = [&](auto* scale, auto* y) {
    using Scale = std::remove_const_t<std::remove_pointer_t<decltype(scale)>>;
    using Out = std::remove_pointer_t<decltype(y)>;
    run(Product<Scale, Out>{xq.q.data(), xq.offset.data(), xq.scale.data(), m, k, w, scale, zs, sums, group_size,
                            n, y});
  };
  const auto* scale_bits = reinterpret_cast<const uint16_t*>(weight_scale.data_ptr());  // bf16 as its bits
  if (x.scalar_type() == at::kFloat) {
    if (weight_scale.scalar_type() == at::kBFloat16) product(scale_bits, out.data_ptr<float>());
    else product(weight_scale.data_ptr<float>(), out.data_ptr<float>());
  } else {
    if (weight_scale.scalar_type() == at::kBFloat16) product(scale_bits, out.data_ptr<c10::BFloat16>());
    else product(weight_scale.data_ptr<float>(), out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(llama31_w4a8, m) {
  m.def("supported() -> bool", &int4_cpu_supported);
  m.def("w4a8(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? zero_scale, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama31_w4a8, CPU, m) {
  m.impl("w4a8", &int4_w4a8);
}
