/*
 * llama31 INT4 (W4A16) CUDA kernels: the C interface shared by int4_kernels.cu and int4_binding.cpp.
 *
 * Weights in llama31's canonical layout (compressed-tensors "pack-quantized", see llama31/quant/packing.py):
 *   packed      int32 [N, K/8]          nibble i of word j is column 8j+i, stored as q + 8 (q in [-8, 7])
 *   scale       T     [N, K/g]          T = the activation dtype (fp16 or bf16)
 *   zero_point  int32 [ceil(N/8), K/g]  or NULL (symmetric): nibble i of word [j, group] is the zero point
 *                                       of row 8j+i, stored as zp + 8
 *   W[n, k] = (q[n, k] - zp[n, k/g]) * scale[n, k/g]
 * All tensors row-major and contiguous; x, packed and out 16-byte aligned.
 * Each launcher returns a cudaError_t as int: cudaSuccess, cudaErrorInvalidValue for arguments outside the
 * documented limits, or the launch error.
 */
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The most activation rows the gemv kernel handles; larger batches use dequantize + a GEMM. */
#define LLAMA31_INT4_GEMV_MAX_ROWS 16

/*
 * out[m, n] = sum_k x[m, k] * W[n, k], accumulated in fp32, for 1 <= M <= 16.
 * x [M, K], out [M, N] in T. Requires K % 32 == 0 and group_size % 32 == 0 and K % group_size == 0.
 * is_bf16: 1 for __nv_bfloat16 activations and scales, 0 for __half.
 */
int llama31_int4_gemv(const void* x, const int32_t* packed, const void* scale, const int32_t* zero_point,
                      void* out, int M, int N, int K, int group_size, int is_bf16, cudaStream_t stream);

/*
 * out[n, k] = W[n, k] in T, [N, K]. Requires K % 8 == 0, group_size % 8 == 0 and K % group_size == 0.
 */
int llama31_int4_dequantize(const int32_t* packed, const void* scale, const int32_t* zero_point, void* out,
                            int N, int K, int group_size, int is_bf16, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
