// INT4 weights on the CPU, for decoding: y = x @ W.T for a few rows of x, W in the canonical layout of
// llama31/quant/packing.py (int32 words, column 8j + i in nibble i, stored as u = q + 8), read as it is.
//
// Decoding one token streams every weight once, so a kernel is fast when turning 4-bit weights back into
// products costs less time than reading them. Rows of W go in tiles of 4, each row's block of 128 columns (64
// bytes, one load) after the other's, with a prefetch of the next tile (rows of 1 KB are too short for the
// hardware prefetcher to follow), and the rows are split over torch's threads. Two ways to multiply a block:
//
// W4A16 (bf16 activations, what Int4Linear's "auto" takes): a 16-bit word holds four consecutive columns, one
// per nibble; ORing a nibble into 0x4300 gives the bfloat16 number 128 + u exactly (exponent of 128, u in the
// low mantissa bits), so
//   t[a]  = ((words >> 4a) & 0xF) | 0x4300                 columns 4j + a, a = 0..3: seven integer instructions
//   sum  += t[a] . x[4j + a]                               four vdpbf16ps (AVX512-BF16): 32 products each, fp32
// and each lane (columns 8l .. 8l+7) starts from -136 * (its sum of x): sum (128 + u) x - 136 sum x =
// sum (u - 8) x. x is rounded to bf16 (as torch's int4 op does), every product is exact in fp32, the sums are
// fp32 (the offset costs about 1e-6 of a group's sum, against the 2^-9 of rounding x).
//
// W4A8 (int8 activations, an option): x quantized per block of 32 columns to xq = round(x * (127 / max|x|)),
// scale s = max|x| / 127 (llama.cpp's Q8_0), and
//   lo, hi = bytes & 0xF, (bytes >> 4) & 0xF                byte j: column 2j low, 2j+1 high
//   sum   = -8 * (sum of xq) + lo . xq_even + hi . xq_odd   two vpdpbusd (AVX512-VNNI): exact int32
//   part += float(sum) * s                                  per lane
// The int8 dot product does twice the bf16 one's products per instruction; the rounding of x to 255 levels of
// its block is this path's price.
//
// Both: once per group of g columns, acc += part * w_scale[n, g] (per lane for g = 32 / 64); an asymmetric
// layer's zero point enters as sum_g zs[n, g] * (sum of x over group g), zs = zp * scale computed by the caller.
// Needs AVX512F/BW/VL, AVX512-BF16 and AVX512-VNNI at run time (int4_cpu_supported); the functions are compiled
// for them by target attributes, so the file builds with any x86-64 g++ and no -march flag.

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

#define LLAMA31_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

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
  std::vector<int8_t> q;
  std::vector<int32_t> offset;
  std::vector<float> scale;
};

// x of one call for the bf16 (W4A16) kernel. Per row of x and block of 128 columns:
//   b       bf16 bits [128]: columns 4j (j = 0..31), then 4j+1, 4j+2, 4j+3 (the order of a word's nibbles)
//   offset  float [16]: -136 * (sum of x over lane l's columns 8l .. 8l+7)
struct Bf16X {
  std::vector<uint16_t> b;
  std::vector<float> offset;
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
  const int64_t blocks = k / kBlock;
  out.q.resize(m * k), out.offset.resize(m * k / 8), out.scale.resize(m * k / 8);
  alignas(64) float xf[kBlock];
  alignas(64) int8_t xq[kBlock];
  float s[kBlock / kXBlock];
  for (int64_t i = 0; i < m; ++i)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const T* row = x + i * k + blk * kBlock;
      for (int c = 0; c < kBlock; ++c) xf[c] = as_float(row[c]);
      for (int b = 0; b < kBlock / kXBlock; ++b) s[b] = quantize_block(xf + b * kXBlock, xq + b * kXBlock);
      int8_t* q = out.q.data() + i * k + blk * kBlock;
      for (int j = 0; j < 64; ++j) {
        q[j] = xq[2 * j];
        q[64 + j] = xq[2 * j + 1];
      }
      const int64_t at = (i * blocks + blk) * 16;
      for (int l = 0; l < 16; ++l) {
        int32_t sum = 0;
        for (int e = 0; e < 8; ++e) sum += xq[8 * l + e];
        out.offset[at + l] = -8 * sum;
        out.scale[at + l] = s[8 * l / kXBlock];
      }
    }
}

inline uint16_t bf16_bits(float value) { return c10::BFloat16(value).x; }  // round to nearest even
inline uint16_t bf16_bits(c10::BFloat16 value) { return value.x; }

template <typename T>
void prepare_bf16(const T* x, int64_t m, int64_t k, Bf16X& out) {
  const int64_t blocks = k / kBlock;
  out.b.resize(m * k), out.offset.resize(m * k / 8);
  for (int64_t i = 0; i < m; ++i)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const T* row = x + i * k + blk * kBlock;
      uint16_t* b = out.b.data() + i * k + blk * kBlock;
      for (int a = 0; a < 4; ++a)
        for (int j = 0; j < 32; ++j) b[32 * a + j] = bf16_bits(row[4 * j + a]);
      for (int l = 0; l < 16; ++l) {
        double sum = 0;
        for (int e = 0; e < 8; ++e) sum += bf16_to_float(bf16_bits(row[8 * l + e]));
        out.offset[(i * blocks + blk) * 16 + l] = static_cast<float>(-136.0 * sum);
      }
    }
}

// One product: W (N, K) in weight_packed / weight_scale (Scale: bf16 bits or float), out (M, N) of Out.
template <typename Scale, typename Out>
struct Product {
  const int8_t* xq;           // QuantizedX's arrays (int8 activations)
  const int32_t* x_offset;
  const float* x_scale;
  const uint16_t* xb;         // Bf16X's arrays (bf16 activations)
  const float* xb_offset;
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
template <typename Scale, typename Out, int M, int NR, int G, bool I8>
LLAMA31_AVX512 void tile_kernel(const Product<Scale, Out>& p, int64_t i0, int64_t n0) {
  const __m512i nibble = _mm512_set1_epi8(0xF);
  const __m512i nibble16 = _mm512_set1_epi16(0xF), exponent = _mm512_set1_epi16(0x4300);
  const int64_t k = p.k, ldw = k / 2, n_blocks = k / kBlock, n_groups = k / p.group_size;
  const int64_t blocks_per_step = G ? 1 : p.group_size / kBlock;  // blocks between weight-scale updates
  const int8_t* xq = I8 ? p.xq + i0 * k : nullptr;
  const int32_t* x_offset = I8 ? p.x_offset + i0 * n_blocks * 16 : nullptr;
  const float* x_scale = I8 ? p.x_scale + i0 * n_blocks * 16 : nullptr;
  const uint16_t* xb = I8 ? nullptr : p.xb + i0 * k;
  const float* xb_offset = I8 ? nullptr : p.xb_offset + i0 * n_blocks * 16;
  __m512 acc[M][NR];
  for (int i = 0; i < M; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_setzero_ps();

  for (int64_t blk = 0; blk < n_blocks; blk += blocks_per_step) {
    __m512 part[M][NR];
    for (int i = 0; i < M; ++i)
      for (int r = 0; r < NR; ++r) part[i][r] = _mm512_setzero_ps();
    for (int64_t b = blk; b < blk + blocks_per_step; ++b) {
      if constexpr (I8) {
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
          // the hardware prefetcher to find each one's stream in time, so the kernel asks one tile ahead (past
          // the last row too: a prefetch never faults)
          _mm_prefetch(reinterpret_cast<const char*>(row + NR * ldw), _MM_HINT_T0);
          const __m512i bytes = _mm512_loadu_si512(row);                             // (64,) two nibbles each
          const __m512i lo = _mm512_and_si512(bytes, nibble);                        // columns c, c+2, ..., c+126
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);  // columns c+1, ..., c+127
          for (int i = 0; i < M; ++i) {
            const __m512i sum = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(offset[i], lo, x_even[i]), hi, x_odd[i]);
            part[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), x_scales[i], part[i][r]);  // sum (u-8) x
          }
        }
      } else {
        __m512bh x4[M][4];  // columns 4j + a of the block, a = 0..3
        __m512 offset[M];
        for (int i = 0; i < M; ++i) {
          for (int a = 0; a < 4; ++a) x4[i][a] = (__m512bh)_mm512_loadu_si512(xb + i * k + b * kBlock + 32 * a);
          offset[i] = _mm512_loadu_ps(xb_offset + (i * n_blocks + b) * 16);
        }
        for (int r = 0; r < NR; ++r) {
          const uint8_t* row = p.w + (n0 + r) * ldw + b * (kBlock / 2);
          _mm_prefetch(reinterpret_cast<const char*>(row + NR * ldw), _MM_HINT_T0);  // as above
          const __m512i words = _mm512_loadu_si512(row);  // (32,) four nibbles each: columns 4j .. 4j+3
          // ((words >> 4a) & 0xF) | 0x4300: the bf16 number 128 + u (0xEA: (a & b) | c, one instruction)
          const __m512bh t0 = (__m512bh)_mm512_ternarylogic_epi32(words, nibble16, exponent, 0xEA);
          const __m512bh t1 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 4), nibble16,
                                                                    exponent, 0xEA);
          const __m512bh t2 = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(words, 8), nibble16,
                                                                    exponent, 0xEA);
          const __m512bh t3 = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 12), exponent);
          for (int i = 0; i < M; ++i) {
            // sum (128 + u) x - 136 sum x = sum (u - 8) x, per lane
            __m512 s0 = _mm512_dpbf16_ps(offset[i], t0, x4[i][0]);
            __m512 s1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), t1, x4[i][1]);
            s0 = _mm512_dpbf16_ps(s0, t2, x4[i][2]);
            s1 = _mm512_dpbf16_ps(s1, t3, x4[i][3]);
            part[i][r] = _mm512_add_ps(part[i][r], _mm512_add_ps(s0, s1));
          }
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
template <typename Scale, typename Out, int NR, int G, bool I8>
LLAMA31_AVX512 void tile(const Product<Scale, Out>& p, int64_t n0) {
  for (int64_t i0 = 0; i0 < p.m; i0 += kMaxRowsX) {
    switch (p.m - i0 < kMaxRowsX ? p.m - i0 : kMaxRowsX) {
      case 1: tile_kernel<Scale, Out, 1, NR, G, I8>(p, i0, n0); break;
      case 2: tile_kernel<Scale, Out, 2, NR, G, I8>(p, i0, n0); break;
      case 3: tile_kernel<Scale, Out, 3, NR, G, I8>(p, i0, n0); break;
      default: tile_kernel<Scale, Out, 4, NR, G, I8>(p, i0, n0); break;
    }
  }
}

template <typename Scale, typename Out, int G, bool I8>
void rows(const Product<Scale, Out>& p, int64_t begin, int64_t end) {
  int64_t n = begin;
  for (; n + kTileRows <= end; n += kTileRows) tile<Scale, Out, kTileRows, G, I8>(p, n);
  for (; n < end; ++n) tile<Scale, Out, 1, G, I8>(p, n);
}

template <typename Scale, typename Out, bool I8>
void run(const Product<Scale, Out>& p) {
  const int64_t grain = 16;  // rows of W per task at the least; parallel_for splits N over the threads
  at::parallel_for(0, p.n, grain, [&](int64_t begin, int64_t end) {
    if (p.group_size == 32) rows<Scale, Out, 32, I8>(p, begin, end);
    else if (p.group_size == 64) rows<Scale, Out, 64, I8>(p, begin, end);
    else rows<Scale, Out, 0, I8>(p, begin, end);
  });
}

bool int4_cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("avx512bf16");
}

// x (..., K) float32 or bfloat16, contiguous; weight_packed int32 (N, K/8); weight_scale (N, K/g) bf16 or fp32;
// zero_scale (N, K/g) fp32 = zp * scale, or none; int8_activations: W4A8, else W4A16. Returns (..., N) in x's
// dtype.
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& weight_packed, const at::Tensor& weight_scale,
                   const std::optional<at::Tensor>& zero_scale, int64_t group_size, bool int8_activations) {
  TORCH_CHECK(int4_cpu_supported(),
              "int4 mm: this CPU lacks AVX512-VNNI or AVX512-BF16; use Int4Linear backend 'cpu_fused'");
  TORCH_CHECK(x.device().is_cpu() && weight_packed.device().is_cpu() && weight_scale.device().is_cpu(),
              "int4 mm: every tensor must be on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int4 mm: x must be a contiguous float32 or bfloat16 tensor, got ", x.sizes(), " ", x.scalar_type());
  const int64_t k = x.size(-1), m = k ? x.numel() / k : 0, n = weight_packed.size(0);
  TORCH_CHECK(weight_packed.scalar_type() == at::kInt && weight_packed.is_contiguous() &&
              weight_packed.dim() == 2 && weight_packed.size(1) * 8 == k,
              "int4 mm: weight_packed must be contiguous int32 (N, K/8) with K = ", k, ", got ",
              weight_packed.sizes());
  TORCH_CHECK(k % kBlock == 0 && (group_size == 32 || group_size == 64 || group_size % kBlock == 0) &&
              k % group_size == 0,
              "int4 mm: needs K % 128 == 0 and a group size of 32, 64 or a multiple of 128 dividing K; got K = ",
              k, ", g = ", group_size);
  const int64_t n_groups = k / group_size;
  TORCH_CHECK(weight_scale.dim() == 2 && weight_scale.size(0) == n && weight_scale.size(1) == n_groups &&
              weight_scale.is_contiguous() &&
              (weight_scale.scalar_type() == at::kBFloat16 || weight_scale.scalar_type() == at::kFloat),
              "int4 mm: weight_scale must be contiguous bf16 or fp32 (", n, ", ", n_groups, "), got ",
              weight_scale.sizes(), " ", weight_scale.scalar_type());
  const bool with_zero = zero_scale.has_value() && zero_scale->defined();
  if (with_zero) {
    TORCH_CHECK(zero_scale->scalar_type() == at::kFloat && zero_scale->is_contiguous() &&
                zero_scale->sizes() == weight_scale.sizes(),
                "int4 mm: zero_scale must be contiguous fp32 shaped like weight_scale, got ", zero_scale->sizes());
  }
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());

  static thread_local QuantizedX xq;
  static thread_local Bf16X xb;
  const bool fp32_x = x.scalar_type() == at::kFloat;
  if (int8_activations) {
    if (fp32_x) quantize_x(x.data_ptr<float>(), m, k, xq);
    else quantize_x(x.data_ptr<c10::BFloat16>(), m, k, xq);
  } else {
    if (fp32_x) prepare_bf16(x.data_ptr<float>(), m, k, xb);
    else prepare_bf16(x.data_ptr<c10::BFloat16>(), m, k, xb);
  }
  const float* zs = nullptr;
  std::vector<float> x_group_sums;
  if (with_zero) {  // the sum of the activations as the kernel sees them, per row and group
    zs = zero_scale->data_ptr<float>();
    x_group_sums.assign(static_cast<size_t>(m * n_groups), 0.f);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t blk = 0; blk < k / kBlock; ++blk)
        for (int l = 0; l < 16; ++l) {
          const int64_t at = (i * (k / kBlock) + blk) * 16 + l;
          const float lane_sum = int8_activations ? xq.scale[at] * (xq.offset[at] / -8.f) : xb.offset[at] / -136.f;
          x_group_sums[i * n_groups + (blk * kBlock + 8 * l) / group_size] += lane_sum;
        }
  }
  const uint8_t* w = reinterpret_cast<const uint8_t*>(weight_packed.data_ptr());
  const float* sums = x_group_sums.data();
  auto product = [&](auto* scale, auto* y) {
    using Scale = std::remove_const_t<std::remove_pointer_t<decltype(scale)>>;
    using Out = std::remove_pointer_t<decltype(y)>;
    const Product<Scale, Out> p{xq.q.data(), xq.offset.data(), xq.scale.data(), xb.b.data(), xb.offset.data(),
                                m, k, w, scale, zs, sums, group_size, n, y};
    if (int8_activations) run<Scale, Out, true>(p);
    else run<Scale, Out, false>(p);
  };
  const auto* scale_bits = reinterpret_cast<const uint16_t*>(weight_scale.data_ptr());  // bf16 as its bits
  if (fp32_x) {
    if (weight_scale.scalar_type() == at::kBFloat16) product(scale_bits, out.data_ptr<float>());
    else product(weight_scale.data_ptr<float>(), out.data_ptr<float>());
  } else {
    if (weight_scale.scalar_type() == at::kBFloat16) product(scale_bits, out.data_ptr<c10::BFloat16>());
    else product(weight_scale.data_ptr<float>(), out.data_ptr<c10::BFloat16>());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(llama31_int4_cpu, m) {
  m.def("supported() -> bool", &int4_cpu_supported);
  m.def("mm(Tensor x, Tensor weight_packed, Tensor weight_scale, Tensor? zero_scale, int group_size, "
        "bool int8_activations) -> Tensor");
}

TORCH_LIBRARY_IMPL(llama31_int4_cpu, CPU, m) {
  m.impl("mm", &int4_mm);
}
