/* compact_cuda.cu: in-place compaction of K and V on CUDA (step 9 of docs/algorithm.md),
 * rpc_cuda_compact.
 *
 * Destination i and source idx[i] satisfy idx[i] >= i (strictly ascending indices), so processing
 * kept tokens in ascending chunks, reading a whole chunk before writing any of it, never overwrites a
 * source that is still to be read; the recent window moves down the same way afterwards. Runs on the
 * caller's stream; never synchronizes with the host.
 */
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <cstdio>

#include "cuda_common.cuh"
#include "rpc.h"

namespace {

/* ------------------------------------------------------------------------------------------------
 * Compaction
 *
 * A block owns one (sequence, head, tensor, column slice) and moves tokens in place in ascending
 * chunks: every thread first loads all of its chunk's words into registers (kUnroll independent
 * 16-byte loads in flight per thread), one barrier, then stores them. Why this is safe in place: the
 * destination of kept token i is start + i and its source start + idx[i] with idx[i] >= i, so
 *   - a chunk's stores land at or below its own tokens' indices, i.e. below every source a later chunk
 *     reads (a later token j has idx[j] >= j >= the chunk's end): earlier stores never clobber later
 *     reads;
 *   - a later chunk's stores may hit sources of an earlier chunk, but those were read before the
 *     earlier chunk's barrier, which every thread passed before storing anything later.
 * Columns are independent (an element only ever moves along its own column), so splitting the row into
 * column slices gives more blocks without any cross-block ordering: B * H * 2 * slices blocks fill the
 * GPU. The recent window moves after the kept tokens, the same way (source end + w >= destination).
 */

constexpr int kCompactThreads = 256;
constexpr int kUnroll = 8;

struct CompactTensor {
    unsigned char *base;
    int64_t s0, s1, s2; /* bytes */
};

struct CompactArgs {
    CompactTensor t[2]; /* K, V */
    int H, A;
    int units;          /* words of type W per token row */
    int slice;          /* words per column slice (the last slice may be shorter) */
    int slices;
    const int64_t *idx;
    int64_t idx_sb, idx_sa;
    int64_t start, end, L, keep;
};

/* grid.x = b * H + h, grid.y = tensor * slices + slice. */
template <typename W>
__global__ void __launch_bounds__(kCompactThreads) compact_kernel(const CompactArgs a) {
    const int64_t bh = blockIdx.x;
    const int64_t b = bh / a.H, h = bh % a.H;
    const int tensor = (int)blockIdx.y / a.slices, sl = (int)blockIdx.y % a.slices;
    const CompactTensor T = a.t[tensor];
    unsigned char *rowbase = T.base + b * T.s0 + h * T.s1;
    const int u0 = sl * a.slice;
    const int width = min(a.slice, a.units - u0);         /* words of this slice per token */
    const int per_pass = kCompactThreads / width;         /* tokens one pass of the block covers, >= 1 */
    const int slot = threadIdx.x / width, u = u0 + threadIdx.x % width;
    const bool active = slot < per_pass;                  /* threads past per_pass * width idle */
    const int64_t chunk = (int64_t)per_pass * kUnroll;    /* tokens per barrier */
    const int64_t N = a.end - a.start;
    const int64_t *idx = a.idx + b * a.idx_sb + (a.A == 1 ? 0 : h) * a.idx_sa;

    /* Kept candidates: destination start + i, source start + idx[i]. */
    for (int64_t c0 = 0; c0 < a.keep; c0 += chunk) {
        const int64_t c1 = c0 + chunk < a.keep ? c0 + chunk : a.keep;
        if (idx[c1 - 1] == c1 - 1) continue; /* ascending + idx[i] >= i: the whole chunk is in place (uniform) */
        int64_t src[kUnroll];
        W val[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t i = c0 + slot + (int64_t)j * per_pass;
            src[j] = -1;
            /* Memory safety against malformed indices (the caller validates them): skip sources outside
             * the candidates or below their destination. */
            if (active && i < c1) {
                const int64_t s = idx[i];
                if (s >= i && s < N) src[j] = s;
            }
        }
#pragma unroll
        for (int j = 0; j < kUnroll; ++j)
            if (src[j] >= 0) val[j] = reinterpret_cast<const W *>(rowbase + (a.start + src[j]) * T.s2)[u];
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t i = c0 + slot + (int64_t)j * per_pass;
            if (src[j] >= 0 && src[j] != i) reinterpret_cast<W *>(rowbase + (a.start + i) * T.s2)[u] = val[j];
        }
    }

    /* Recent window [end, L) -> [start + keep, ...): sources are above all destinations so far. */
    const int64_t wlen = a.L - a.end;
    const int64_t dst0 = a.start + a.keep;
    if (a.end == dst0) return;
    __syncthreads(); /* the last kept chunk's reads are done before window stores may overwrite them */
    for (int64_t c0 = 0; c0 < wlen; c0 += chunk) {
        const int64_t c1 = c0 + chunk < wlen ? c0 + chunk : wlen;
        W val[kUnroll];
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t w = c0 + slot + (int64_t)j * per_pass;
            if (active && w < c1) val[j] = reinterpret_cast<const W *>(rowbase + (a.end + w) * T.s2)[u];
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < kUnroll; ++j) {
            const int64_t w = c0 + slot + (int64_t)j * per_pass;
            if (active && w < c1) reinterpret_cast<W *>(rowbase + (dst0 + w) * T.s2)[u] = val[j];
        }
    }
}

template <typename W>
int compact_launch(const CompactArgs &a0, int64_t rows, int64_t row_bytes, int sms, cudaStream_t st, char *err) {
    CompactArgs a = a0;
    a.units = (int)(row_bytes / (int64_t)sizeof(W));
    /* Column slices: at most one block's worth of words each, then split further (by halves, keeping a
     * slice at least 4 words = 64 bytes of uint4 wide) until there are ~4 blocks per SM. */
    int slices = (a.units + kCompactThreads - 1) / kCompactThreads;
    const int64_t want = 4 * (int64_t)(sms > 0 ? sms : 1);
    while (rows * 2 * slices < want && (a.units + 2 * slices - 1) / (2 * slices) >= 4) slices *= 2;
    a.slice = (a.units + slices - 1) / slices;
    a.slices = (a.units + a.slice - 1) / a.slice;
    if ((int64_t)a.slices * 2 > 65535) return rpc_value_error(err, "rpc compact (cuda): head dim too large");
    compact_kernel<W><<<dim3((unsigned)rows, (unsigned)(2 * a.slices)), kCompactThreads, 0, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc compact: kernel launch");
    return RPC_OK;
}

} // namespace

extern "C" int rpc_cuda_compact(int device, const rpc_compact_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "rpc compact (cuda): params is NULL");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "rpc compact (cuda): dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->H < 0 || p->L < 0 || p->D < 1)
        return rpc_value_error(err, "rpc compact (cuda): sizes must be non-negative (D >= 1)");
    if (p->start < 0 || p->start > p->end || p->end > p->L)
        return rpc_value_error(err, "rpc compact (cuda): need 0 <= start <= end <= L");
    if (p->keep < 0 || p->keep > p->end - p->start)
        return rpc_value_error(err, "rpc compact (cuda): need 0 <= keep <= end - start");
    if (!(p->A == 1 || p->A == p->H))
        return rpc_value_error(err, "rpc compact (cuda): indices rows A must be 1 or H");
    if (p->D > 1 && (p->k_stride[3] != 1 || p->v_stride[3] != 1))
        return rpc_value_error(err, "rpc compact (cuda): the head-dim stride of keys and values must be 1");
    const size_t es = rpc_dtype_size(p->dtype);
    const int64_t row_bytes = p->D * (int64_t)es;
    if (row_bytes > 65536) return rpc_value_error(err, "rpc compact (cuda): head dim too large (rows over 64 KiB)");
    if (p->B * p->H > INT_MAX) return rpc_value_error(err, "rpc compact (cuda): B * H too large");
    if (p->B == 0 || p->H == 0) return RPC_OK;
    if (p->keep == p->end - p->start) return RPC_OK; /* indices are 0..keep-1 and the window stays */
    if (!p->k || !p->v || (p->keep > 0 && !p->indices))
        return rpc_value_error(err, "rpc compact (cuda): NULL tensor pointer");

    CompactArgs a;
    a.t[0].base = static_cast<unsigned char *>(p->k);
    a.t[0].s0 = p->k_stride[0] * (int64_t)es;
    a.t[0].s1 = p->k_stride[1] * (int64_t)es;
    a.t[0].s2 = p->k_stride[2] * (int64_t)es;
    a.t[1].base = static_cast<unsigned char *>(p->v);
    a.t[1].s0 = p->v_stride[0] * (int64_t)es;
    a.t[1].s1 = p->v_stride[1] * (int64_t)es;
    a.t[1].s2 = p->v_stride[2] * (int64_t)es;
    a.H = (int)p->H;
    a.A = (int)p->A;
    a.units = a.slice = a.slices = 0; /* set by compact_launch */
    a.idx = p->indices;
    a.idx_sb = p->idx_stride_b;
    a.idx_sa = p->idx_stride_a;
    a.start = p->start;
    a.end = p->end;
    a.L = p->L;
    a.keep = p->keep;

    /* Widest unit that divides the row and every base/stride (strides of size-1 dims unused). */
    const int64_t sizes[3] = {p->B, p->H, p->L};
    int64_t g = row_bytes;
    for (int t = 0; t < 2; ++t) {
        g |= (int64_t)(uintptr_t)a.t[t].base;
        const int64_t s[3] = {a.t[t].s0, a.t[t].s1, a.t[t].s2};
        for (int d = 0; d < 3; ++d)
            if (sizes[d] > 1) g |= s[d];
    }
    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "rpc compact: cudaSetDevice");
    int sms = 0;
    RPC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                   "rpc compact: cudaDeviceGetAttribute");
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    const int64_t rows = p->B * p->H;
    if (rows > 2147483647LL) return rpc_value_error(err, "rpc compact (cuda): B * H too large");
    if (g % 16 == 0) return compact_launch<uint4>(a, rows, row_bytes, sms, st, err);
    if (g % 8 == 0) return compact_launch<uint2>(a, rows, row_bytes, sms, st, err);
    if (g % 4 == 0) return compact_launch<uint32_t>(a, rows, row_bytes, sms, st, err);
    return compact_launch<uint16_t>(a, rows, row_bytes, sms, st, err);
}
