/* select_cuda.cu: top-k selection of scores on CUDA (step 8 of docs/algorithm.md), rpc_cuda_select.
 *
 * One block per row. Scores map to order-preserving uint32 keys (NaN lowest, -0 == +0); a 4-pass
 * 8-bit radix select finds the key of the keep-th largest element and how many of the elements equal
 * to it are taken; one ordered pass with a block-wide prefix sum then writes the kept indices in
 * ascending order (ties resolved towards lower indices by construction). Runs on the caller's stream;
 * never synchronizes with the host.
 */
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdio>

#include "cuda_common.cuh"
#include "rpc.h"

namespace {

/* ------------------------------------------------------------------------------------------------
 * Selection
 */

constexpr int kSelThreads = 512;
constexpr int kSelWarps = kSelThreads / 32;

/* Order-preserving key: larger score -> larger key; every NaN -> 0 (below -inf); -0 -> +0. */
__device__ __forceinline__ uint32_t score_key(float x) {
    if (isnan(x)) return 0u;
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) == 0u) u = 0u; /* -0 ties with +0 */
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* Exclusive block-wide prefix sum of `v`; *total receives the block sum. Uses `ws` (kSelWarps
 * ints). Contains barriers: every thread of the block must call it. */
__device__ __forceinline__ int block_exclusive_scan(int v, int *ws, int *total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    if (lane == 31) ws[warp] = x;
    __syncthreads();
    if (warp == 0) {
        int w = lane < kSelWarps ? ws[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < kSelWarps) ws[lane] = w; /* inclusive warp totals */
    }
    __syncthreads();
    const int before = (warp > 0 ? ws[warp - 1] : 0) + x - v;
    *total = ws[kSelWarps - 1];
    __syncthreads(); /* ws may be reused by the next call */
    return before;
}

__global__ void __launch_bounds__(kSelThreads) select_kernel(const float *__restrict__ scores, int64_t N,
                                                             int64_t keep, int64_t *__restrict__ indices) {
    __shared__ unsigned int hist[256];
    __shared__ int ws[kSelWarps];
    __shared__ uint32_t s_prefix;
    __shared__ int64_t s_rank;

    const float *row = scores + (int64_t)blockIdx.x * N;
    int64_t *out = indices + (int64_t)blockIdx.x * keep;

    if (keep == N) { /* everything is kept, in index order */
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) out[i] = i;
        return;
    }

    /* Radix select, most significant byte first: find the key T of the keep-th largest element
     * and `need`, the number of elements equal to T that are kept. Counts fit in 32 bits: the
     * launcher rejects N >= 2^31. */
    uint32_t prefix = 0, mask = 0;
    int64_t rank = keep; /* 1-based rank of the threshold among elements matching the prefix */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0u;
        __syncthreads();
        for (int64_t i = threadIdx.x; i < N; i += blockDim.x) {
            const uint32_t key = score_key(row[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            int64_t above = 0; /* matching elements with a larger digit */
            int digit = 255;
            for (; digit > 0; --digit) {
                if (above + (int64_t)hist[digit] >= rank) break;
                above += hist[digit];
            }
            s_prefix = prefix | ((uint32_t)digit << shift);
            s_rank = rank - above;
        }
        __syncthreads();
        prefix = s_prefix;
        rank = s_rank;
        mask |= 255u << shift;
        __syncthreads(); /* s_prefix/s_rank and hist are rewritten in the next pass */
    }
    const uint32_t thresh = prefix;
    const int64_t need = rank; /* >= 1: elements equal to thresh taken, lowest indices first */

    /* Ordered pass: taken(i) = key > thresh, or key == thresh among the first `need` equal ones.
     * Output slot of a taken element = #greater before it + min(#equal before it, need). */
    int64_t gt_before = 0, eq_before = 0;
    for (int64_t base = 0; base < N; base += blockDim.x) {
        const int64_t i = base + threadIdx.x;
        int gt = 0, eq = 0;
        if (i < N) {
            const uint32_t key = score_key(row[i]);
            gt = key > thresh;
            eq = key == thresh;
        }
        int tot = 0;
        const int packed = block_exclusive_scan(gt | (eq << 16), ws, &tot); /* <= 512 per field */
        const int64_t gt_ex = gt_before + (packed & 0xffff);
        const int64_t eq_ex = eq_before + (packed >> 16);
        if (gt || (eq && eq_ex < need)) out[gt_ex + (eq_ex < need ? eq_ex : need)] = i;
        gt_before += tot & 0xffff;
        eq_before += tot >> 16;
        if (gt_before + (eq_before < need ? eq_before : need) >= keep) break; /* uniform */
    }
}

} // namespace

extern "C" int rpc_cuda_select(int device, const rpc_select_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "rpc select (cuda): params is NULL");
    if (p->rows < 0 || p->N < 0 || p->keep < 0 || p->keep > p->N)
        return rpc_value_error(err, "rpc select (cuda): need rows >= 0 and 0 <= keep <= N");
    if (p->N >= INT_MAX || p->rows > INT_MAX)
        return rpc_value_error(err, "rpc select (cuda): rows and N must be below 2^31");
    if (p->rows == 0 || p->keep == 0) return RPC_OK;
    if (!p->scores || !p->indices) return rpc_value_error(err, "rpc select (cuda): NULL tensor pointer");

    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "rpc select: cudaSetDevice");
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    select_kernel<<<(unsigned)p->rows, kSelThreads, 0, st>>>(p->scores, p->N, p->keep, p->indices);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc select: kernel launch");
    return RPC_OK;
}
