/* mma_common.cuh: warp-level building blocks of the v2 CUDA kernels (sm_80 and newer): asynchronous
 * 16-byte global->shared copies, ldmatrix fragment loads and the m16n8k16 tensor-core MMA with fp32
 * accumulation, for fp16 and bf16 inputs.
 *
 * Why raw PTX instead of nvcuda::wmma: the fragment layout of mma.sync is documented (PTX ISA,
 * "Matrix fragments for mma.m16n8k16"), so a kernel can keep fragments in registers across tiles,
 * turn an accumulator into the next MMA's A operand without a trip through shared memory, and load
 * bf16 operands with ldmatrix (WMMA's bf16 loads compile to generic 32-bit loads). Fragment layouts
 * used by the kernels, per lane l with g = l / 4 (groupID) and t = l % 4:
 *   A (16 x 16, row major), 4 x b32: a0 = (row g, cols 2t..2t+1), a1 = (row g+8, same cols),
 *                                    a2 = (row g, cols 2t+8..2t+9), a3 = (row g+8, cols 2t+8..2t+9)
 *   B (16 x 8, "col"),      2 x b32: b0 = (rows 2t..2t+1, col g), b1 = (rows 2t+8..2t+9, col g)
 *   C/D (16 x 8, fp32),     4 x f32: c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, same cols)
 * In every packed b32 the element with the lower index sits in the low 16 bits.
 *
 * Every function here is warp-synchronous where PTX says so (ldmatrix, mma): all 32 lanes must call it
 * with converged control flow.
 */
#ifndef RPC_PY_MMA_COMMON_CUH
#define RPC_PY_MMA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdint.h>
#include <string.h>

namespace rpc_mma {

__device__ __forceinline__ uint32_t smem_u32(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

/* 16 bytes global -> shared without going through registers or L1 (.cg). With valid == false nothing
 * is read and the 16 destination bytes are zero-filled (src-size 0), so callers pass any mapped
 * address as `gmem` for rows past the end. Both addresses must be 16-byte aligned. */
__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, bool valid) {
    const int src_bytes = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

/* Waits until at most N of this thread's committed groups are still in flight. Other threads' copies
 * are visible only after a barrier (__syncwarp / __syncthreads) that follows this wait. */
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives it. */
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem))
                 : "memory");
}

/* Same, each matrix transposed (row-major [k][n] storage -> "col" B fragments). */
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(smem))
                 : "memory");
}

/* d += a * b: m16n8k16, A row major, B col major, fp32 accumulators. */
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* 2^x with the hardware approximation, subnormal results flushed to zero (ex2.approx.ftz: about 2 ulp,
 * ex2(-inf) = +0). exp2f() adds a range fix-up of three instructions per call for subnormal results;
 * in a softmax every term that small is below float32 resolution of the sum it joins, whose largest
 * term is 2^0. */
__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

/* Two floats rounded to the 16-bit type, `lo` in the low half. */
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return u;
}

} // namespace rpc_mma

#endif /* RPC_PY_MMA_COMMON_CUH */
