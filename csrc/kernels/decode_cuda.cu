/* decode_cuda.cu: CUDA kernels of the capture-friendly decode step (contracts in rpc.h, "decode").
 *
 * Nothing here takes a position from the host: the live length and the tokens seen are read from
 * the layer's device `lengths` ({length, seen}) when the kernel runs, so a launch sequence recorded
 * once in a CUDA graph stays right while the cache grows by one token per replay and is compacted
 * in place between replays. Every launch goes on the caller's stream and is checked.
 *
 * Decode attention (one query token, q_len = 1) is split along the sequence, flash-decoding style:
 *   1. split kernel, grid (splits, Hkv * head_groups, B), 128 threads. A block owns one KV head of one
 *      sequence, up to GM of that head's query heads (GQA: K and V are read once for all of them) and
 *      one contiguous chunk of the live keys. The chunk size is computed on the device from the live
 *      length (ceil(live / splits), at least 64 keys), so every block has similar work whatever the
 *      length and blocks past the end retire at once. A warp takes 32 / (D / 8) keys per step, each key
 *      read by D / 8 lanes as 16-byte words (8 elements per lane); the dot product is reduced over
 *      those lanes with shuffles. Each lane group keeps an online softmax (running max m, sum l,
 *      unnormalised accumulator) in base-2 (exp2f with log2(e) folded into the query). Groups are
 *      merged with a shuffle butterfly, warps through shared memory; the block writes its partial
 *      (acc[D], m, l) per query head into the workspace.
 *   2. combine kernel, one block per (b, query head): rescales the partials to the global max and
 *      divides by the global sum. Empty partials (m = -inf) are skipped, so a fully masked sequence
 *      gets zeros, as in the CPU kernels.
 * Left padding: keys [0, padding[b]) are never read. Supported: head_dim 64, 128 or 256; K/V rows
 * aligned to 16 bytes (the KVCache layout always is); any number of query heads per KV head.
 *
 * append_at_length writes the step's K/V rows at lengths[0] (a second one-thread kernel then bumps
 * both counters, so that no block can see a half-updated length); ring_write puts query token i in
 * slot (lengths[1] + offset + i) mod window.
 */
#include "cuda_common.cuh"
#include "mma_common.cuh"
#include "rpc.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int64_t kMinChunk = 64;
constexpr float kLog2e = 1.4426950408889634f;

/* ------------------------------------------------------------------ element access */

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

/* Eight consecutive elements (16-byte aligned for 2-byte types, 32-byte for float) as floats. */
__device__ __forceinline__ void load8(const float *p, float *x) {
    const float4 a = reinterpret_cast<const float4 *>(p)[0];
    const float4 b = reinterpret_cast<const float4 *>(p)[1];
    x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w;
    x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}

__device__ __forceinline__ void load8(const __half *p, float *x) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h;
        memcpy(&h, &w[i], sizeof h);
        const float2 f = __half22float2(h);
        x[2 * i] = f.x;
        x[2 * i + 1] = f.y;
    }
}

__device__ __forceinline__ void load8(const __nv_bfloat16 *p, float *x) {
    const uint4 u = *reinterpret_cast<const uint4 *>(p);
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        /* bf16 -> float is a 16-bit shift: low half is element 2i, high half element 2i+1. */
        x[2 * i] = __uint_as_float(w[i] << 16);
        x[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

/* ------------------------------------------------------------------ decode attention */

struct DecodeArgs {
    const void *q, *k, *v;
    void *out;
    float *ws_acc, *ws_m, *ws_l; /* [B, Hq, splits, D], [B, Hq, splits], [B, Hq, splits] */
    const int64_t *lengths, *padding;
    int64_t B, Hq, Hkv, G, groups, cap, splits;
    int64_t qs0, qs1, qs2, os0, os1, os2;
    int64_t ks0, ks1, ks2, vs0, vs1, vs2;
    float scale_log2; /* scale * log2(e) */
};

template <typename T, int D, int GM>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const DecodeArgs a) {
    constexpr int LPT = D / 8;    /* lanes per key */
    constexpr int TPW = 32 / LPT; /* keys per warp step */
    const int64_t split = blockIdx.x;
    const int64_t kh = blockIdx.y / a.groups;
    const int64_t g0 = (blockIdx.y % a.groups) * GM;
    const int64_t b = blockIdx.z;
    const int gcount = (int)(a.G - g0 < GM ? a.G - g0 : GM);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int grp = lane / LPT, d0 = (lane % LPT) * 8;

    int64_t live = a.lengths[0];
    live = live < 0 ? 0 : (live > a.cap ? a.cap : live);
    int64_t pad = a.padding != nullptr ? a.padding[b] : 0;
    pad = pad < 0 ? 0 : (pad > live ? live : pad);
    int64_t chunk = (live + a.splits - 1) / a.splits;
    chunk = chunk < kMinChunk ? kMinChunk : chunk;
    int64_t t0 = split * chunk;
    int64_t t1 = t0 + chunk < live ? t0 + chunk : live;
    t0 = t0 > pad ? t0 : pad;

    float q[GM][8], acc[GM][8], m[GM], l[GM];
#pragma unroll
    for (int g = 0; g < GM; g++) {
        const int64_t h = kh * a.G + g0 + (g < gcount ? g : 0);
        const T *qp = static_cast<const T *>(a.q) + b * a.qs0 + h * a.qs1;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            q[g][i] = to_float(qp[(d0 + i) * a.qs2]) * a.scale_log2;
            acc[g][i] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }

    const T *kp = static_cast<const T *>(a.k) + b * a.ks0 + kh * a.ks1 + d0;
    const T *vp = static_cast<const T *>(a.v) + b * a.vs0 + kh * a.vs1 + d0;
    /* The loop bound is uniform across the warp, so the shuffles below never diverge. */
    for (int64_t base = t0 + (int64_t)warp * TPW; base < t1; base += (int64_t)kWarps * TPW) {
        const int64_t t = base + grp;
        const bool valid = t < t1;
        float kf[8], vf[8];
        if (valid) {
            load8(kp + t * a.ks2, kf);
            load8(vp + t * a.vs2, vf);
        } else {
#pragma unroll
            for (int i = 0; i < 8; i++) kf[i] = vf[i] = 0.0f;
        }
#pragma unroll
        for (int g = 0; g < GM; g++) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; i++) s = fmaf(q[g][i], kf[i], s);
#pragma unroll
            for (int off = LPT / 2; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
            if (valid) {
                const float mn = fmaxf(m[g], s);
                const float c = exp2f(m[g] - mn); /* 0 while m is still -inf */
                const float p = exp2f(s - mn);
                l[g] = l[g] * c + p;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = fmaf(acc[g][i], c, p * vf[i]);
                m[g] = mn;
            }
        }
    }

    /* Merge the key groups of the warp (lanes that hold the same dims are LPT apart). */
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) {
#pragma unroll
        for (int g = 0; g < GM; g++) {
            const float mo = __shfl_xor_sync(0xffffffffu, m[g], off);
            const float lo = __shfl_xor_sync(0xffffffffu, l[g], off);
            float ao[8];
#pragma unroll
            for (int i = 0; i < 8; i++) ao[i] = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
            const float mn = fmaxf(m[g], mo);
            if (mn != -INFINITY) {
                const float ca = exp2f(m[g] - mn), cb = exp2f(mo - mn);
                l[g] = l[g] * ca + lo * cb;
#pragma unroll
                for (int i = 0; i < 8; i++) acc[g][i] = acc[g][i] * ca + ao[i] * cb;
                m[g] = mn;
            }
        }
    }

    __shared__ float sm_m[kWarps][GM], sm_l[kWarps][GM], sm_acc[kWarps][GM][D];
    if (grp == 0) {
#pragma unroll
        for (int g = 0; g < GM; g++) {
#pragma unroll
            for (int i = 0; i < 8; i++) sm_acc[warp][g][d0 + i] = acc[g][i];
            if (lane == 0) {
                sm_m[warp][g] = m[g];
                sm_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();

    for (int idx = threadIdx.x; idx < gcount * D; idx += kThreads) {
        const int g = idx / D, d = idx % D;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; w++) mx = fmaxf(mx, sm_m[w][g]);
        float sum = 0.0f, out = 0.0f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < kWarps; w++) {
                const float c = exp2f(sm_m[w][g] - mx);
                sum += sm_l[w][g] * c;
                out += sm_acc[w][g][d] * c;
            }
        }
        const int64_t h = kh * a.G + g0 + g;
        const int64_t row = (b * a.Hq + h) * a.splits + split;
        a.ws_acc[row * D + d] = out;
        if (d == 0) {
            a.ws_m[row] = mx;
            a.ws_l[row] = sum;
        }
    }
}

/* One block per (b, query head), one thread per dim. */
template <typename T>
__global__ void decode_combine_kernel(const DecodeArgs a, int D) {
    const int64_t bh = blockIdx.x;
    const int64_t b = bh / a.Hq, h = bh % a.Hq;
    const int d = threadIdx.x;
    const float *ms = a.ws_m + bh * a.splits;
    const float *ls = a.ws_l + bh * a.splits;
    const float *as = a.ws_acc + bh * a.splits * D;
    float mx = -INFINITY;
    for (int64_t s = 0; s < a.splits; s++) mx = fmaxf(mx, ms[s]);
    float sum = 0.0f, acc = 0.0f;
    if (mx != -INFINITY) {
        for (int64_t s = 0; s < a.splits; s++) {
            if (ms[s] == -INFINITY) continue;
            const float c = exp2f(ms[s] - mx);
            sum += ls[s] * c;
            acc += as[s * D + d] * c;
        }
    }
    T *out = static_cast<T *>(a.out) + b * a.os0 + h * a.os1 + d * a.os2;
    *out = from_float<T>(sum > 0.0f ? acc / sum : 0.0f);
}

template <typename T, int D, int GM>
cudaError_t launch_decode(const DecodeArgs &a, cudaStream_t stream) {
    const dim3 grid((unsigned)a.splits, (unsigned)(a.Hkv * a.groups), (unsigned)a.B);
    decode_split_kernel<T, D, GM><<<grid, kThreads, 0, stream>>>(a);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    decode_combine_kernel<T><<<(unsigned)(a.B * a.Hq), D, 0, stream>>>(a, D);
    return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_gm(const DecodeArgs &a, int gm, cudaStream_t stream) {
    switch (gm) {
    case 1: return launch_decode<T, D, 1>(a, stream);
    case 2: return launch_decode<T, D, 2>(a, stream);
    case 4: return launch_decode<T, D, 4>(a, stream);
    default: return launch_decode<T, D, 8>(a, stream);
    }
}

template <typename T>
cudaError_t dispatch_d(const DecodeArgs &a, int D, int gm, cudaStream_t stream) {
    switch (D) {
    case 64: return dispatch_gm<T, 64>(a, gm, stream);
    case 128: return dispatch_gm<T, 128>(a, gm, stream);
    default: return dispatch_gm<T, 256>(a, gm, stream);
    }
}

/* ------------------------------------------------------------------ decode attention v2 (fp16 / bf16)
 *
 * Same contract and workspace format as the v1 split kernel above (partials in base-2 log units, merged
 * by decode_combine_kernel), built to stream K/V at memory bandwidth instead of being instruction
 * bound:
 *   - A CTA (4 warps) owns one (sequence, KV head, group of up to 16 query heads, sequence chunk): the
 *     query group is padded to the 16 rows of a tensor-core tile, so K and V are read once for all the
 *     query heads of a KV head (GQA 7 uses 7 of the 16 rows; decode is memory bound, the idle rows cost
 *     tensor-core cycles that are free).
 *   - The chunk is cut into 16-key tiles dealt round robin to the warps (the 4 warps together stream
 *     one contiguous run of keys). Each warp has a private cp.async pipeline of kStages tiles in shared
 *     memory (16-byte copies, no register staging), so no block-wide barrier runs inside the loop and
 *     kStages - 1 tiles per warp are in flight while one is computed.
 *   - Per tile and warp: S[16 x 16] = Q K^T with mma.m16n8k16 (Q and K fragments through ldmatrix),
 *     one row max (a 4-lane shuffle), one rescale of the accumulators, P = exp2(S - m) turned directly
 *     into the A fragment of O += P V (V fragments through ldmatrix.trans). P is rounded to the input
 *     type for that MMA, as flash attention does; the row sums l are kept in fp32.
 *   - Keys outside [max(chunk start, padding), min(chunk end, length)) are masked to -inf, and their
 *     K/V rows are zero-filled by the copy (src-size 0), never read: NaN in unused cache slots cannot
 *     leak into the output through 0 * NaN.
 *   - At the end the warps merge their (m, l, O) through shared memory (reusing their pipeline buffers)
 *     and the CTA writes one partial per query head, exactly like v1.
 * Shared memory rows are padded by 16 bytes (kLd = D + 8 elements) so that the eight 16-byte row reads
 * of an ldmatrix hit distinct banks. */

namespace v2 {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kRows = 16;  /* query rows per CTA (one MMA tile) */
constexpr int kKeys = 16;  /* keys per warp tile (the k extent of the P V MMA) */

template <int D> struct Cfg {
    static constexpr int kStages = D == 64 ? 4 : (D == 128 ? 3 : 2);
    static constexpr int kLd = D + 8;                         /* smem row stride in elements */
    static constexpr int kTile = kKeys * kLd;                 /* elements of one K or V tile */
    static constexpr int kWarpElems = kStages * 2 * kTile;    /* a warp's pipeline: [stage][K, V][key][kLd] */
    static constexpr int kQElems = kRows * kLd;
    static constexpr size_t kSmemBytes = (size_t)(kQElems + kWarps * kWarpElems) * 2;
    static constexpr int kChunksPerRow = D / 8;               /* 16-byte chunks per key row */
    static constexpr int kCopies = kKeys * kChunksPerRow / 32; /* per lane, per tensor, per tile */
    static constexpr int kMergeLd = D + 4;                    /* merge buffer row stride (floats) */
    static constexpr int kMergeFloats = 2 * kRows + kRows * kMergeLd;
    static_assert(D % 16 == 0 && (kKeys * kChunksPerRow) % 32 == 0, "tile shape");
    static_assert((size_t)kMergeFloats * 4 <= (size_t)kWarpElems * 2, "merge buffer must fit a warp's pipeline");
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_v2_kernel(const DecodeArgs a) {
    using C = Cfg<D>;
    using namespace rpc_mma;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    uint16_t *sq = reinterpret_cast<uint16_t *>(smem_raw); /* [kRows][kLd], raw 16-bit elements */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    uint16_t *sw = sq + C::kQElems + warp * C::kWarpElems; /* this warp's pipeline */

    const int64_t split = blockIdx.x;
    const int64_t kh = blockIdx.y / a.groups;
    const int64_t g0 = (blockIdx.y % a.groups) * kRows;
    const int64_t b = blockIdx.z;
    const int rows = (int)(a.G - g0 < kRows ? a.G - g0 : kRows);

    /* Live range of this split (block-uniform). Same clamping as v1: corrupt lengths cannot make a
     * block read outside [0, cap). */
    int64_t live = a.lengths[0];
    live = live < 0 ? 0 : (live > a.cap ? a.cap : live);
    int64_t pad = a.padding != nullptr ? a.padding[b] : 0;
    pad = pad < 0 ? 0 : (pad > live ? live : pad);
    int64_t chunk = (live + a.splits - 1) / a.splits;
    chunk = chunk < kMinChunk ? kMinChunk : chunk;
    chunk = (chunk + kKeys - 1) / kKeys * kKeys;
    int64_t t0 = split * chunk;
    int64_t t1 = t0 + chunk < live ? t0 + chunk : live;
    t0 = t0 > pad ? t0 : pad;
    const int64_t row0 = (b * a.Hq + kh * a.G + g0) * a.splits + split; /* workspace row of query row 0 */

    if (t0 >= t1) { /* nothing to attend to: an empty partial, skipped by the combine kernel */
        for (int r = threadIdx.x; r < rows; r += kThreads) {
            a.ws_m[row0 + (int64_t)r * a.splits] = -INFINITY;
            a.ws_l[row0 + (int64_t)r * a.splits] = 0.0f;
        }
        return;
    }

    /* Query rows of the group (zeros past `rows`), staged once for ldmatrix. */
    {
        const uint16_t *qg = static_cast<const uint16_t *>(a.q) + b * a.qs0 + (kh * a.G + g0) * a.qs1;
        for (int e = threadIdx.x; e < kRows * D; e += kThreads) {
            const int r = e / D, d = e - r * D;
            sq[r * C::kLd + d] = r < rows ? qg[(int64_t)r * a.qs1 + (int64_t)d * a.qs2] : (uint16_t)0;
        }
    }
    __syncthreads();

    const uint16_t *kbase = static_cast<const uint16_t *>(a.k) + b * a.ks0 + kh * a.ks1;
    const uint16_t *vbase = static_cast<const uint16_t *>(a.v) + b * a.vs0 + kh * a.vs1;
    const int64_t ntiles = (t1 - t0 + kKeys - 1) / kKeys;
    const int64_t mine = ntiles > warp ? (ntiles - warp + kWarps - 1) / kWarps : 0; /* warp-uniform */

    /* Issues the copies of the warp's tile i (keys t0 + 16 * (warp + 4 i) ...) into stage `st`. */
    auto load_tile = [&](int64_t i, int st) {
        const int64_t ts = t0 + (int64_t)(warp + kWarps * i) * kKeys;
        uint16_t *dk = sw + st * 2 * C::kTile;
        uint16_t *dv = dk + C::kTile;
#pragma unroll
        for (int c = 0; c < C::kCopies; ++c) {
            const int id = lane + 32 * c;
            const int r = id / C::kChunksPerRow, part = id % C::kChunksPerRow;
            const int64_t key = ts + r;
            const bool ok = key < t1;
            const int64_t src = ok ? key : t0; /* a mapped row; nothing is read when !ok */
            cp_async16(dk + r * C::kLd + part * 8, kbase + src * a.ks2 + part * 8, ok);
            cp_async16(dv + r * C::kLd + part * 8, vbase + src * a.vs2 + part * 8, ok);
        }
    };

    /* Per-lane ldmatrix row/column offsets (see mma_common.cuh for the fragment layouts). */
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8; /* Q and V^T */
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;  /* K */
    const int tq = lane & 3, gq = lane >> 2;

    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m_lo = -INFINITY, m_hi = -INFINITY; /* running max of rows gq and gq + 8 (base-2 units) */
    float l_lo = 0.0f, l_hi = 0.0f;           /* this lane's part of the row sums */
    const float scale2 = a.scale_log2;

#pragma unroll
    for (int st = 0; st < C::kStages - 1; ++st) {
        if (st < mine) load_tile(st, st);
        cp_async_commit(); /* empty groups keep the group count uniform */
    }
    for (int64_t i = 0; i < mine; ++i) {
        {
            const int64_t nxt = i + C::kStages - 1;
            if (nxt < mine) load_tile(nxt, (int)(nxt % C::kStages)); /* the stage computed at i - 1 */
            cp_async_commit();
        }
        cp_async_wait<C::kStages - 1>(); /* this lane's copies of tile i have landed */
        __syncwarp();                    /* ... and every lane's are visible */
        const uint16_t *tk = sw + (int)(i % C::kStages) * 2 * C::kTile;
        const uint16_t *tv = tk + C::kTile;

        float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            uint32_t qa[4], kb[4];
            ldmatrix_x4(qa, sq + a_row * C::kLd + kk * 16 + a_col);
            ldmatrix_x4(kb, tk + k_row * C::kLd + kk * 16 + k_col);
            mma_16816<T>(s[0], qa, kb[0], kb[1]);
            mma_16816<T>(s[1], qa, kb[2], kb[3]);
        }

        /* Scale (any sign: the caller may pass one), mask (only the tile holding t1 can be partial:
         * a warp-uniform test), one max per row and tile. */
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) s[j][c] *= scale2;
        const int64_t ts = t0 + (int64_t)(warp + kWarps * i) * kKeys;
        if (ts + kKeys > t1) {
#pragma unroll
            for (int j = 0; j < 2; ++j)
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    if (ts + 2 * tq + 8 * j + (c & 1) >= t1) s[j][c] = -INFINITY;
        }
        float mx_lo = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
        float mx_hi = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float mn_lo = fmaxf(m_lo, mx_lo), mn_hi = fmaxf(m_hi, mx_hi);
        /* While a row has seen only masked keys its max is -inf: use 0 as the reference so that
         * exp2(-inf - 0) = 0 everywhere and no inf - inf appears. */
        const float ref_lo = mn_lo == -INFINITY ? 0.0f : mn_lo, ref_hi = mn_hi == -INFINITY ? 0.0f : mn_hi;
        const float al_lo = ex2(m_lo - ref_lo), al_hi = ex2(m_hi - ref_hi);
        m_lo = mn_lo;
        m_hi = mn_hi;
        float p[2][4];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            p[j][0] = ex2(s[j][0] - ref_lo);
            p[j][1] = ex2(s[j][1] - ref_lo);
            p[j][2] = ex2(s[j][2] - ref_hi);
            p[j][3] = ex2(s[j][3] - ref_hi);
        }
        l_lo = l_lo * al_lo + (p[0][0] + p[0][1]) + (p[1][0] + p[1][1]);
        l_hi = l_hi * al_hi + (p[0][2] + p[0][3]) + (p[1][2] + p[1][3]);
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            o[n][0] *= al_lo;
            o[n][1] *= al_lo;
            o[n][2] *= al_hi;
            o[n][3] *= al_hi;
        }
        /* The S accumulators of keys 0-7 and 8-15 are exactly the A fragment of P (16 x 16 keys). */
        const uint32_t pa[4] = {pack2<T>(p[0][0], p[0][1]), pack2<T>(p[0][2], p[0][3]), pack2<T>(p[1][0], p[1][1]),
                                pack2<T>(p[1][2], p[1][3])};
#pragma unroll
        for (int n2 = 0; n2 < D / 16; ++n2) {
            uint32_t vb[4];
            ldmatrix_x4_trans(vb, tv + a_row * C::kLd + n2 * 16 + a_col);
            mma_16816<T>(o[2 * n2], pa, vb[0], vb[1]);
            mma_16816<T>(o[2 * n2 + 1], pa, vb[2], vb[3]);
        }
        __syncwarp(); /* every lane is done with this stage before it is refilled */
    }
    cp_async_wait<0>();
    __syncwarp();

    /* Row sums over the quad, then the warp's (m, l, O) into its own pipeline buffer. */
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
    {
        float *mb = reinterpret_cast<float *>(sw);
        if (tq == 0) {
            mb[gq] = m_lo;
            mb[gq + 8] = m_hi;
            mb[kRows + gq] = l_lo;
            mb[kRows + gq + 8] = l_hi;
        }
        float *ob = mb + 2 * kRows;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            ob[gq * C::kMergeLd + 8 * n + 2 * tq] = o[n][0];
            ob[gq * C::kMergeLd + 8 * n + 2 * tq + 1] = o[n][1];
            ob[(gq + 8) * C::kMergeLd + 8 * n + 2 * tq] = o[n][2];
            ob[(gq + 8) * C::kMergeLd + 8 * n + 2 * tq + 1] = o[n][3];
        }
    }
    __syncthreads();

    /* Merge the warps (fixed order: deterministic) and write the CTA's partial per query head. */
    for (int idx = threadIdx.x; idx < rows * D; idx += kThreads) {
        const int r = idx / D, d = idx - r * D;
        float mw[kWarps], mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
            mw[w] = reinterpret_cast<const float *>(sq + C::kQElems + w * C::kWarpElems)[r];
            mx = fmaxf(mx, mw[w]);
        }
        float sum = 0.0f, acc = 0.0f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float *mb = reinterpret_cast<const float *>(sq + C::kQElems + w * C::kWarpElems);
                const float c = exp2f(mw[w] - mx);
                sum += mb[kRows + r] * c;
                acc += mb[2 * kRows + r * C::kMergeLd + d] * c;
            }
        }
        const int64_t row = row0 + (int64_t)r * a.splits;
        a.ws_acc[row * D + d] = acc;
        if (d == 0) {
            a.ws_m[row] = mx;
            a.ws_l[row] = sum;
        }
    }
}

template <typename T, int D> cudaError_t launch(const DecodeArgs &a, cudaStream_t stream) {
    const size_t smem = Cfg<D>::kSmemBytes;
    cudaError_t e = cudaFuncSetAttribute(decode_v2_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)smem);
    if (e != cudaSuccess) return e;
    const dim3 grid((unsigned)a.splits, (unsigned)(a.Hkv * a.groups), (unsigned)a.B);
    decode_v2_kernel<T, D><<<grid, kThreads, smem, stream>>>(a);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    decode_combine_kernel<T><<<(unsigned)(a.B * a.Hq), D, 0, stream>>>(a, D);
    return cudaGetLastError();
}

template <typename T> cudaError_t dispatch(const DecodeArgs &a, int D, cudaStream_t stream) {
    switch (D) {
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    default: return launch<T, 256>(a, stream);
    }
}

size_t smem_for(int D) {
    switch (D) {
    case 64: return Cfg<64>::kSmemBytes;
    case 128: return Cfg<128>::kSmemBytes;
    default: return Cfg<256>::kSmemBytes;
    }
}

} // namespace v2

/* ------------------------------------------------------------------ append / ring */

template <typename E>
__global__ void append_rows_kernel(E *kd, E *vd, const E *ks, const E *vs, const int64_t *lengths, int64_t H,
                                   int64_t t, int64_t D, int64_t cap, int64_t total, int64_t d0, int64_t d1,
                                   int64_t d2, int64_t d3, int64_t k0, int64_t k1, int64_t k2, int64_t k3,
                                   int64_t v0, int64_t v1, int64_t v2, int64_t v3) {
    const int64_t pos = lengths[0];
    if (!rpc_append_fits(pos, t, cap)) return; /* the documented no-op */
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t d = i % D;
        int64_t r = i / D;
        const int64_t j = r % t;
        r /= t;
        const int64_t h = r % H;
        const int64_t b = r / H;
        const int64_t dst = b * d0 + h * d1 + (pos + j) * d2 + d * d3;
        kd[dst] = ks[b * k0 + h * k1 + j * k2 + d * k3];
        vd[dst] = vs[b * v0 + h * v1 + j * v2 + d * v3];
    }
}

/* Runs after append_rows_kernel on the same stream, so every block above saw the old length. */
__global__ void bump_lengths_kernel(int64_t *lengths, int64_t t, int64_t cap) {
    const int64_t pos = lengths[0];
    if (!rpc_append_fits(pos, t, cap)) return;
    lengths[0] = pos + t;
    lengths[1] = rpc_wrapping_add(lengths[1], t);
}

template <typename E>
__global__ void ring_write_kernel(E *ring, const E *q, const int64_t *lengths, int64_t Hq, int64_t t, int64_t D,
                                  int64_t W, int64_t offset, int64_t total, int64_t r0, int64_t r1, int64_t r2,
                                  int64_t r3, int64_t q0, int64_t q1, int64_t q2, int64_t q3) {
    const int64_t base = rpc_ring_slot(lengths[1], offset, W);
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t d = i % D;
        int64_t r = i / D;
        const int64_t j = r % t;
        r /= t;
        const int64_t h = r % Hq;
        const int64_t b = r / Hq;
        const int64_t slot = (base + j) % W;
        ring[b * r0 + h * r1 + slot * r2 + d * r3] = q[b * q0 + h * q1 + j * q2 + d * q3];
    }
}

unsigned blocks_for(int64_t total, int threads) {
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 4096) blocks = 4096; /* grid-stride loops cover the rest */
    return (unsigned)(blocks < 1 ? 1 : blocks);
}

template <typename E>
cudaError_t launch_append(const rpc_append_params *p, cudaStream_t stream) {
    const int64_t total = p->B * p->H * p->t * p->D;
    if (total > 0) {
        append_rows_kernel<E><<<blocks_for(total, 256), 256, 0, stream>>>(
            static_cast<E *>(p->k_dst), static_cast<E *>(p->v_dst), static_cast<const E *>(p->k_src),
            static_cast<const E *>(p->v_src), p->lengths, p->H, p->t, p->D, p->cap, total, p->dst_stride[0],
            p->dst_stride[1], p->dst_stride[2], p->dst_stride[3], p->k_src_stride[0], p->k_src_stride[1],
            p->k_src_stride[2], p->k_src_stride[3], p->v_src_stride[0], p->v_src_stride[1], p->v_src_stride[2],
            p->v_src_stride[3]);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return e;
    }
    bump_lengths_kernel<<<1, 1, 0, stream>>>(p->lengths, p->t, p->cap);
    return cudaGetLastError();
}

template <typename E>
cudaError_t launch_ring(const rpc_ring_params *p, cudaStream_t stream) {
    const int64_t total = p->B * p->Hq * p->t * p->D;
    if (total == 0) return cudaSuccess;
    ring_write_kernel<E><<<blocks_for(total, 256), 256, 0, stream>>>(
        static_cast<E *>(p->ring), static_cast<const E *>(p->q), p->lengths, p->Hq, p->t, p->D, p->window,
        p->offset, total, p->ring_stride[0], p->ring_stride[1], p->ring_stride[2], p->ring_stride[3],
        p->q_stride[0], p->q_stride[1], p->q_stride[2], p->q_stride[3]);
    return cudaGetLastError();
}

bool aligned16(const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

} // namespace

extern "C" {

int rpc_cuda_decode_attention(int device, const rpc_decode_params *p, void *stream, char *err) {
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "decode_attention: dtype must be float32, float16 or bfloat16");
    if (p->B == 0) return RPC_OK; /* empty batch: nothing to write (a zero-sized grid is an error) */
    if (p->B < 1 || p->Hq < 1 || p->Hkv < 1 || p->Hq % p->Hkv != 0 || p->cap < 0)
        return rpc_value_error(err, "decode_attention: bad batch/head/capacity sizes");
    if (p->D != 64 && p->D != 128 && p->D != 256)
        return rpc_value_error(err, "decode_attention: the CUDA kernel supports head_dim 64, 128 or 256");
    if (p->lengths == NULL || p->workspace == NULL)
        return rpc_value_error(err, "decode_attention: lengths and workspace are required on CUDA");
    if (p->splits < 1 || p->splits > 65535)
        return rpc_value_error(err, "decode_attention: splits must be in [1, 65535]");
    if (p->version < 0 || p->version > 2)
        return rpc_value_error(err, "decode_attention: version must be 0 (automatic), 1 or 2");
    if (p->version == 2 && p->dtype == RPC_F32)
        return rpc_value_error(err, "decode_attention: the v2 kernel (tensor cores) takes float16 or bfloat16 only");
    if (p->k_stride[3] != 1 || p->v_stride[3] != 1 || !aligned16(p->k) || !aligned16(p->v))
        return rpc_value_error(err, "decode_attention: keys/values need unit stride along head_dim and 16-byte alignment");
    for (int i = 0; i < 3; i++) {
        if (p->k_stride[i] % 8 != 0 || p->v_stride[i] % 8 != 0)
            return rpc_value_error(err, "decode_attention: key/value strides must be multiples of 8 elements on CUDA");
    }
    const int64_t G = p->Hq / p->Hkv;
    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "decode_attention: cudaSetDevice");
    /* v2 (tensor cores, fp16/bf16) unless asked for v1 or the device cannot give it its shared memory
     * (sm_80 and sm_90 can; a PTX-JIT build on a smaller part may not). */
    bool use_v2 = p->dtype != RPC_F32 && p->version != 1;
    if (use_v2) {
        int optin = 0;
        RPC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                       "decode_attention: cudaDeviceGetAttribute");
        if ((size_t)optin < v2::smem_for((int)p->D)) {
            if (p->version == 2)
                return rpc_value_error(err, "decode_attention: this device has too little shared memory for the v2 kernel");
            use_v2 = false;
        }
    }
    int gm = 8;
    if (use_v2) gm = v2::kRows;
    else if (G <= 1) gm = 1;
    else if (G <= 2) gm = 2;
    else if (G <= 4) gm = 4;
    const int64_t groups = (G + gm - 1) / gm;
    if (p->B > 65535 || p->Hkv * groups > 65535)
        return rpc_value_error(err, "decode_attention: batch or head count too large for one launch");
    DecodeArgs a;
    a.q = p->q;
    a.k = p->k;
    a.v = p->v;
    a.out = p->out;
    a.ws_acc = p->workspace;
    a.ws_m = p->workspace + p->B * p->Hq * p->splits * p->D;
    a.ws_l = a.ws_m + p->B * p->Hq * p->splits;
    a.lengths = p->lengths;
    a.padding = p->padding;
    a.B = p->B;
    a.Hq = p->Hq;
    a.Hkv = p->Hkv;
    a.G = G;
    a.groups = groups;
    a.cap = p->cap;
    a.splits = p->splits;
    a.qs0 = p->q_stride[0];
    a.qs1 = p->q_stride[1];
    a.qs2 = p->q_stride[2];
    a.os0 = p->out_stride[0];
    a.os1 = p->out_stride[1];
    a.os2 = p->out_stride[2];
    a.ks0 = p->k_stride[0];
    a.ks1 = p->k_stride[1];
    a.ks2 = p->k_stride[2];
    a.vs0 = p->v_stride[0];
    a.vs1 = p->v_stride[1];
    a.vs2 = p->v_stride[2];
    a.scale_log2 = p->scale * kLog2e;

    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e;
    if (use_v2) {
        e = p->dtype == RPC_F16 ? v2::dispatch<__half>(a, (int)p->D, s) : v2::dispatch<__nv_bfloat16>(a, (int)p->D, s);
    } else {
        switch (p->dtype) {
        case RPC_F32: e = dispatch_d<float>(a, (int)p->D, gm, s); break;
        case RPC_F16: e = dispatch_d<__half>(a, (int)p->D, gm, s); break;
        default: e = dispatch_d<__nv_bfloat16>(a, (int)p->D, gm, s); break;
        }
    }
    RPC_CUDA_CHECK(e, "decode_attention kernel launch");
    return RPC_OK;
}

int rpc_cuda_append_at_length(int device, const rpc_append_params *p, void *stream, char *err) {
    if (p->lengths == NULL || p->B < 0 || p->H < 0 || p->t < 0 || p->D < 0 || p->cap < 0)
        return rpc_value_error(err, "append_at_length: bad sizes or NULL lengths");
    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "append_at_length: cudaSetDevice");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e = rpc_dtype_size(p->dtype) == 4 ? launch_append<uint32_t>(p, s) : launch_append<uint16_t>(p, s);
    RPC_CUDA_CHECK(e, "append_at_length kernel launch");
    return RPC_OK;
}

int rpc_cuda_ring_write(int device, const rpc_ring_params *p, void *stream, char *err) {
    if (p->lengths == NULL || p->window < 1 || p->t < 0 || p->t > p->window)
        return rpc_value_error(err, "ring_write: bad window/tokens or NULL lengths");
    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "ring_write: cudaSetDevice");
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e = rpc_dtype_size(p->dtype) == 4 ? launch_ring<uint32_t>(p, s) : launch_ring<uint16_t>(p, s);
    RPC_CUDA_CHECK(e, "ring_write kernel launch");
    return RPC_OK;
}

} /* extern "C" */
