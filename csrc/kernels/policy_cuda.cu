/* policy_cuda.cu: CUDA kernels of the selection policies other than RPC (contracts: rpc.h, "selection
 * policies"; oracle: rpc_py/policy_reference.py; CPU counterparts and references: policy_cpu.c).
 *
 * These are straightforward, correct kernels rather than tuned ones: the policies they serve are
 * ablation baselines. Everything runs on the caller's stream, scratch comes from the stream-ordered
 * allocator, nothing synchronizes with the host, and every launch is checked.
 *
 * Window attention, two passes over K tiles of 32 keys staged (as float32) in shared memory:
 *   stats:  block (sequence b, KV head, key chunk, group of query rows): per row the running max and
 *           sum of exp over the keys of the chunk that lie in the row's denominator range. A NaN or
 *           +inf logit marks the row (its max becomes NaN), which later drops the row entirely, as
 *           the oracle's nan_to_num of a NaN softmax does.
 *   probs:  block (b, KV head, candidate chunk, row group): combines the chunk partials into each
 *           row's max and normalizer, recomputes the logits (same code, so the same values) and writes,
 *           per candidate, the sum of its probabilities over the block's rows.
 * Then a fixed-order reduction over row groups and KV heads (no atomics: deterministic), the
 * division, and RPC's pooling. In both passes a warp owns a query row at a time and a lane one key;
 * the query rows sit in shared memory (pre-scaled), so each logit is a D-long dot product of two
 * shared-memory rows. With gqa = max_logits a row is one selector query and its logit the NaN-
 * propagating max of the G heads' dot products. H2O's per-step accumulation runs the same two
 * passes with one query per head and the range [pad, length), then adds the per-key sums into the
 * accumulator (in double, rounded once).
 *
 * Redundancy (R-KV), per (b, KV head), with the keys normalized on the fly (inverse norms in double
 * from a first kernel) and 32 x 32 similarity tiles built in shared memory, D in chunks of 32:
 *   newest: block per 32 rows, sweeping every column tile: the largest column above the threshold
 *           per row (shared atomicMax; 0 when none);
 *   colsum: block per 32 columns, sweeping every row tile: the column sums without the diagonal and
 *           without each row's newest entry, in double, reduced in a fixed order;
 *   softmax of the column means per head.
 * No n x n matrix exists anywhere; the price is computing each similarity twice.
 *
 * fill_scores evaluates rpc.h's rpc_random_uniform (the very function the CPU uses) per element.
 * The accumulator compaction moves float32 rows in place exactly like RPC's K/V compaction (sources
 * never below destinations; each chunk read into shared memory before it is written) and skips,
 * never follows, malformed indices.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "cuda_common.cuh"
#include "rpc.h"

namespace {

/* Stream-ordered scratch memory, released (stream-ordered too) when the launcher returns. */
class PolicyScratch {
  public:
    explicit PolicyScratch(cudaStream_t s) : stream_(s) {}
    PolicyScratch(const PolicyScratch &) = delete;
    PolicyScratch &operator=(const PolicyScratch &) = delete;
    cudaError_t alloc(size_t nbytes) { return cudaMallocAsync(&ptr_, nbytes > 0 ? nbytes : 256, stream_); }
    unsigned char *get() const { return static_cast<unsigned char *>(ptr_); }
    cudaError_t release() {
        cudaError_t e = cudaSuccess;
        if (ptr_) e = cudaFreeAsync(ptr_, stream_);
        ptr_ = nullptr;
        return e;
    }
    ~PolicyScratch() { (void)release(); }

  private:
    cudaStream_t stream_;
    void *ptr_ = nullptr;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ int64_t clamp_i64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

/* max that propagates NaN from either side (torch.amax semantics) */
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

/* ------------------------------------------------------------------------------------------------
 * Window attention
 */

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 32;    /* keys per tile: one per lane */
constexpr int kMaxRows = 32; /* logical rows per block */

struct AttnArgs {
    const void *q, *k;
    int64_t qs[4], ks[4];
    int64_t B, Hkv, G, R, D, L;
    int64_t start, end, N;      /* candidates */
    const int64_t *qpos;        /* [R] (causal) */
    const int64_t *padding;     /* [B] or null */
    const float *qw;            /* [R] query weights or null (all 1) */
    int norm, max_logits;
    float scale;
    int M;                      /* logical rows per KV head: G * R (mean of probabilities) or R (max logits) */
    int RB;                     /* logical rows per block (<= kMaxRows) */
    int QG;                     /* row groups per KV head */
    int PR;                     /* query rows staged per block: RB, or RB * G for max logits */
    int64_t k0;                 /* pass 1 covers keys [k0, k0 + C1 * T1 * kTile) clipped to L */
    int C1, T1;                 /* pass 1: key chunks, tiles per chunk */
    int C2, T2;                 /* pass 2: candidate chunks, tiles per chunk */
    float *pmax, *psum;         /* [B * Hkv * M, C1] */
    float *part;                /* [B * Hkv * QG, N] */
};

/* Denominator range [lo, hi) of query r in sequence b, clamped to [0, L] (the device values of padding
 * and query positions are not validated by anyone: clamping keeps every access in bounds). */
__device__ __forceinline__ void denom_range(const AttnArgs &a, int64_t b, int64_t r, int64_t *lo, int64_t *hi) {
    const int64_t L = a.L;
    const int64_t pad = a.padding ? clamp_i64(a.padding[b], 0, L) : 0;
    int64_t x, y;
    if (a.norm == RPC_NORM_CANDIDATES) {
        x = a.start;
        y = a.end;
    } else if (a.norm == RPC_NORM_PAST) {
        x = pad;
        y = a.end;
    } else {
        const int64_t qp = a.qpos[r];
        x = pad;
        y = qp >= L ? L : (qp < 0 ? 0 : qp + 1);
    }
    *lo = clamp_i64(x, 0, L);
    *hi = clamp_i64(y, *lo, L);
}

__device__ __forceinline__ int64_t row_query(const AttnArgs &a, int64_t l) { return a.max_logits ? l : l % a.R; }

/* Stages the block's query rows (times scale, as float32) into qsm [PR][D]: staged row p is logical row
 * l0 + p (mean of probabilities) or head g = p % G of logical row l0 + p / G (max logits). */
template <typename T>
__device__ void stage_queries(const AttnArgs &a, int64_t b, int64_t kvh, int l0, int rbv, float *qsm) {
    const T *q = static_cast<const T *>(a.q);
    const int64_t D = a.D;
    const int64_t total = (int64_t)a.PR * D;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
        const int p = (int)(e / D);
        const int64_t d = e - (int64_t)p * D;
        int64_t l, g;
        if (a.max_logits) {
            l = l0 + p / a.G;
            g = p % a.G;
        } else {
            l = l0 + p;
            g = l / a.R;
        }
        float v = 0.0f;
        if (l < l0 + rbv) {
            const int64_t r = row_query(a, l);
            const int64_t off = b * a.qs[0] + (kvh * a.G + g) * a.qs[1] + r * a.qs[2] + d * a.qs[3];
            v = to_f(q[off]) * a.scale;
        }
        qsm[e] = v;
    }
}

/* Stages keys [kt0, kt0 + nv) of (b, kvh) into ksm [kTile][D + 1] (rows past nv zeroed). */
template <typename T>
__device__ void stage_keys(const AttnArgs &a, int64_t b, int64_t kvh, int64_t kt0, int nv, float *ksm) {
    const T *k = static_cast<const T *>(a.k);
    const int64_t D = a.D;
    const int64_t total = (int64_t)kTile * D;
    const int64_t base = b * a.ks[0] + kvh * a.ks[1];
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
        const int i = (int)(e / D);
        const int64_t d = e - (int64_t)i * D;
        ksm[i * (D + 1) + d] = i < nv ? to_f(k[base + (kt0 + i) * a.ks[2] + d * a.ks[3]]) : 0.0f;
    }
}

/* Logit of logical row lr (block-local) against staged key `lane`. */
__device__ __forceinline__ float row_logit(const AttnArgs &a, const float *qsm, const float *ksm, int lr, int lane) {
    const int64_t D = a.D;
    const float *kr = ksm + lane * (D + 1);
    if (!a.max_logits) {
        const float *qr = qsm + (int64_t)lr * D;
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc = fmaf(qr[d], kr[d], acc);
        return acc;
    }
    float best = 0.0f;
    for (int64_t g = 0; g < a.G; ++g) {
        const float *qr = qsm + ((int64_t)lr * a.G + g) * D;
        float acc = 0.0f;
        for (int64_t d = 0; d < D; ++d) acc = fmaf(qr[d], kr[d], acc);
        best = g == 0 ? acc : max_nan(best, acc);
    }
    return best;
}

/* grid.x = (b * Hkv + kvh) * C1 + chunk, grid.y = row group. */
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_stats_kernel(const AttnArgs a) {
    extern __shared__ float smem[];
    __shared__ int64_t s_lo[kMaxRows], s_hi[kMaxRows];
    __shared__ float s_m[kMaxRows], s_s[kMaxRows];
    __shared__ int s_bad[kMaxRows];
    __shared__ int s_any;
    float *qsm = smem;
    float *ksm = smem + (int64_t)a.PR * a.D;

    const int64_t unit = blockIdx.x / (unsigned)a.C1;
    const int chunk = (int)(blockIdx.x % (unsigned)a.C1);
    const int64_t b = unit / a.Hkv, kvh = unit % a.Hkv;
    const int l0 = blockIdx.y * a.RB;
    const int rbv = min(a.RB, a.M - l0);
    const int64_t c_lo = a.k0 + (int64_t)chunk * a.T1 * kTile;
    const int64_t c_hi = min(a.L, c_lo + (int64_t)a.T1 * kTile);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    if (threadIdx.x == 0) s_any = 0;
    __syncthreads();
    if ((int)threadIdx.x < rbv) {
        int64_t lo, hi;
        denom_range(a, b, row_query(a, l0 + threadIdx.x), &lo, &hi);
        s_lo[threadIdx.x] = lo;
        s_hi[threadIdx.x] = hi;
        s_m[threadIdx.x] = -INFINITY;
        s_s[threadIdx.x] = 0.0f;
        s_bad[threadIdx.x] = 0;
        if (max(lo, c_lo) < min(hi, c_hi)) atomicOr(&s_any, 1);
    }
    __syncthreads();
    if (s_any) {
        stage_queries<T>(a, b, kvh, l0, rbv, qsm);
        for (int64_t kt0 = c_lo; kt0 < c_hi; kt0 += kTile) {
            const int nv = (int)min((int64_t)kTile, c_hi - kt0);
            __syncthreads(); /* the previous tile's readers are done (and, first time, qsm is written) */
            stage_keys<T>(a, b, kvh, kt0, nv, ksm);
            __syncthreads();
            for (int lr = warp; lr < rbv; lr += kWarps) {
                const int64_t j = kt0 + lane;
                const bool valid = lane < nv && j >= s_lo[lr] && j < s_hi[lr];
                const float x = row_logit(a, qsm, ksm, lr, lane);
                const bool bad = valid && (x != x || x == INFINITY);
                const float xv = valid ? x : -INFINITY;
                const unsigned any_bad = __any_sync(0xffffffffu, bad);
                const float tmax = warp_max(bad ? -INFINITY : xv);
                const float m_old = s_m[lr];
                const float m_new = fmaxf(m_old, tmax);
                float e = 0.0f;
                if (valid && !bad && m_new > -INFINITY) e = expf(xv - m_new);
                const float tsum = warp_sum(e);
                __syncwarp();
                if (lane == 0) {
                    if (any_bad) s_bad[lr] = 1;
                    if (m_new > -INFINITY) {
                        s_s[lr] = s_s[lr] * expf(m_old - m_new) + tsum;
                        s_m[lr] = m_new;
                    }
                }
                __syncwarp();
            }
        }
    }
    __syncthreads();
    if ((int)threadIdx.x < rbv) {
        const int64_t row = unit * a.M + l0 + threadIdx.x;
        a.pmax[row * a.C1 + chunk] = s_bad[threadIdx.x] ? NAN : s_m[threadIdx.x];
        a.psum[row * a.C1 + chunk] = s_s[threadIdx.x];
    }
}

/* grid.x = (b * Hkv + kvh) * C2 + chunk, grid.y = row group. */
template <typename T>
__global__ void __launch_bounds__(kThreads) attn_probs_kernel(const AttnArgs a) {
    extern __shared__ float smem[];
    __shared__ int64_t s_lo[kMaxRows], s_hi[kMaxRows];
    __shared__ float s_m[kMaxRows], s_inv[kMaxRows];
    __shared__ float red[kWarps][32];
    __shared__ int s_any;
    float *qsm = smem;
    float *ksm = smem + (int64_t)a.PR * a.D;

    const int64_t unit = blockIdx.x / (unsigned)a.C2;
    const int chunk = (int)(blockIdx.x % (unsigned)a.C2);
    const int64_t b = unit / a.Hkv, kvh = unit % a.Hkv;
    const int l0 = blockIdx.y * a.RB;
    const int rbv = min(a.RB, a.M - l0);
    const int64_t c_lo = a.start + (int64_t)chunk * a.T2 * kTile;
    const int64_t c_hi = min(a.end, c_lo + (int64_t)a.T2 * kTile);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float *out = a.part + (unit * a.QG + blockIdx.y) * a.N - a.start; /* indexed by key position */

    if (threadIdx.x == 0) s_any = 0;
    __syncthreads();
    if ((int)threadIdx.x < rbv) {
        int64_t lo, hi;
        denom_range(a, b, row_query(a, l0 + threadIdx.x), &lo, &hi);
        const int64_t row = unit * a.M + l0 + threadIdx.x;
        const float *pm = a.pmax + row * a.C1;
        const float *ps = a.psum + row * a.C1;
        bool bad = false;
        float m = -INFINITY;
        for (int c = 0; c < a.C1; ++c) {
            if (pm[c] != pm[c]) bad = true;
            else m = fmaxf(m, pm[c]);
        }
        float s = 0.0f;
        if (!bad && m > -INFINITY)
            for (int c = 0; c < a.C1; ++c)
                if (pm[c] > -INFINITY) s += ps[c] * expf(pm[c] - m);
        const bool ok = !bad && m > -INFINITY && s > 0.0f;
        s_lo[threadIdx.x] = ok ? lo : 0;
        s_hi[threadIdx.x] = ok ? hi : 0; /* an unusable row gets an empty range: it adds nothing */
        s_m[threadIdx.x] = m;
        const float weight = a.qw ? a.qw[row_query(a, l0 + threadIdx.x)] : 1.0f;
        s_inv[threadIdx.x] = ok ? weight / s : 0.0f;
        if (ok && max(lo, c_lo) < min(hi, c_hi)) atomicOr(&s_any, 1);
    }
    __syncthreads();
    if (!s_any) {
        for (int64_t j = c_lo + threadIdx.x; j < c_hi; j += blockDim.x) out[j] = 0.0f;
        return;
    }
    stage_queries<T>(a, b, kvh, l0, rbv, qsm);
    for (int64_t kt0 = c_lo; kt0 < c_hi; kt0 += kTile) {
        const int nv = (int)min((int64_t)kTile, c_hi - kt0);
        __syncthreads(); /* previous tile's readers (and the red[] reduction) are done */
        stage_keys<T>(a, b, kvh, kt0, nv, ksm);
        __syncthreads();
        float acc = 0.0f;
        const int64_t j = kt0 + lane;
        for (int lr = warp; lr < rbv; lr += kWarps) {
            if (!(lane < nv && j >= s_lo[lr] && j < s_hi[lr])) continue;
            const float x = row_logit(a, qsm, ksm, lr, lane);
            acc += expf(x - s_m[lr]) * s_inv[lr];
        }
        red[warp][lane] = acc;
        __syncthreads();
        if (warp == 0 && lane < nv) {
            float s = 0.0f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) s += red[w][lane];
            out[j] = s;
        }
    }
}

/* raw[b, a, n] = sum over the aggregated KV heads and row groups of part, divided by `div`. */
__global__ void attn_aggregate_kernel(const float *__restrict__ part, float *__restrict__ raw, int64_t B, int64_t A,
                                      int64_t Hkv, int64_t QG, int64_t N, float div) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * A * N) return;
    const int64_t n = idx % N, ba = idx / N;
    const int64_t b = ba / A, a_ = ba % A;
    const int64_t h0 = A == 1 ? 0 : a_, h1 = A == 1 ? Hkv : a_ + 1;
    float s = 0.0f;
    for (int64_t h = h0; h < h1; ++h)
        for (int64_t g = 0; g < QG; ++g) s += part[((b * Hkv + h) * QG + g) * N + n];
    raw[idx] = s / div;
}

/* RPC's pooling (rpc_pool_at of rpc.h, the definition every kernel shares). */
__global__ void attn_pool_kernel(const float *__restrict__ raw, float *__restrict__ out, int64_t rows, int64_t N,
                                 int ksize, int is_max) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * N) return;
    const int64_t n = idx % N;
    out[idx] = rpc_pool_at_f32(raw + (idx - n), N, n, ksize, is_max);
}

/* rpc_cuda_pool: float32 rows pooled with a double sum (rpc_pool_at_f32_d), as rpc_cpu_pool. */
__global__ void pool_rows_kernel(const float *__restrict__ in, float *__restrict__ out, int64_t rows, int64_t N,
                                 int ksize, int is_max) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * N) return;
    const int64_t n = idx % N;
    out[idx] = rpc_pool_at_f32_d(in + (idx - n), N, n, ksize, is_max);
}

/* acc[b, h, j] += the per-key sums (double add, one rounding), j in [pad_b, length). */
__global__ void accumulate_finish_kernel(const float *__restrict__ part, float *__restrict__ acc, int64_t B,
                                         int64_t Hkv, int64_t QG, int64_t N, const int64_t *__restrict__ padding,
                                         int64_t as0, int64_t as1, int64_t as2) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * Hkv * N) return;
    const int64_t j = idx % N, u = idx / N;
    const int64_t b = u / Hkv, h = u % Hkv;
    const int64_t pad = padding ? clamp_i64(padding[b], 0, N) : 0;
    if (j < pad) return;
    double s = 0.0;
    for (int64_t g = 0; g < QG; ++g) s += (double)part[(u * QG + g) * N + j];
    float *x = acc + b * as0 + h * as1 + j * as2;
    *x = (float)((double)*x + s);
}

/* Row blocking, chunking and shared memory of the two passes; fills a.RB .. a.T2. */
int attn_plan(AttnArgs &a, size_t *smem, char *err) {
    int dev = 0, sms = 0, optin = 0;
    RPC_CUDA_CHECK(cudaGetDevice(&dev), "policy attention: cudaGetDevice");
    RPC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev),
                   "policy attention: cudaDeviceGetAttribute");
    RPC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                   "policy attention: cudaDeviceGetAttribute");
    const size_t budget = (size_t)optin - 4096; /* room for the static shared arrays */
    const size_t ksz = (size_t)kTile * (size_t)(a.D + 1) * sizeof(float);
    const size_t per_row = (size_t)a.D * sizeof(float) * (size_t)(a.max_logits ? a.G : 1);
    if (ksz + per_row > budget)
        return rpc_value_error(err, "policy attention (cuda): head_dim (times the GQA group for max_logits) too "
                                    "large for the kernel's shared memory");
    int64_t rb = (int64_t)((budget - ksz) / per_row);
    if (rb > kMaxRows) rb = kMaxRows;
    if (rb > a.M) rb = a.M;
    a.RB = (int)rb;
    a.QG = (int)ceil_div(a.M, rb);
    a.PR = (int)(a.max_logits ? rb * a.G : rb);
    *smem = (size_t)a.PR * (size_t)a.D * sizeof(float) + ksz;

    const int64_t units = a.B * a.Hkv;
    const int64_t want = 8 * (int64_t)(sms > 0 ? sms : 1);
    /* pass 1 over the keys any row can use: [start, end) for norm candidates, otherwise [0, L) */
    const int64_t span_lo = a.norm == RPC_NORM_CANDIDATES ? a.start : 0;
    const int64_t span_hi = a.norm == RPC_NORM_CANDIDATES ? a.end : a.L;
    const int64_t tiles1 = ceil_div(span_hi - span_lo, kTile);
    int64_t c1 = ceil_div(want, units * a.QG);
    c1 = c1 < 1 ? 1 : (c1 > tiles1 ? tiles1 : c1);
    const int64_t t1 = ceil_div(tiles1, c1);
    a.k0 = span_lo;
    a.T1 = (int)t1;
    a.C1 = (int)ceil_div(tiles1, t1);
    const int64_t tiles2 = ceil_div(a.N, kTile);
    int64_t c2 = ceil_div(want, units * a.QG);
    c2 = c2 < 1 ? 1 : (c2 > tiles2 ? tiles2 : c2);
    const int64_t t2 = ceil_div(tiles2, c2);
    a.T2 = (int)t2;
    a.C2 = (int)ceil_div(tiles2, t2);
    if (units * a.C1 > INT_MAX || units * a.C2 > INT_MAX || a.QG > 65535)
        return rpc_value_error(err, "policy attention (cuda): problem too large for the launch grid");
    return RPC_OK;
}

/* Both passes; a.pmax / a.psum / a.part must point at scratch of the planned sizes. */
template <typename T> int attn_passes(const AttnArgs &a, size_t smem, cudaStream_t st, char *err) {
    RPC_CUDA_CHECK(cudaFuncSetAttribute(attn_stats_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                   "policy attention: cudaFuncSetAttribute");
    RPC_CUDA_CHECK(cudaFuncSetAttribute(attn_probs_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem),
                   "policy attention: cudaFuncSetAttribute");
    const int64_t units = a.B * a.Hkv;
    attn_stats_kernel<T><<<dim3((unsigned)(units * a.C1), (unsigned)a.QG), kThreads, smem, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy attention: launch of the stats pass");
    attn_probs_kernel<T><<<dim3((unsigned)(units * a.C2), (unsigned)a.QG), kThreads, smem, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy attention: launch of the probability pass");
    return RPC_OK;
}

int attn_passes_dispatch(rpc_dtype dt, const AttnArgs &a, size_t smem, cudaStream_t st, char *err) {
    switch (dt) {
    case RPC_F16: return attn_passes<__half>(a, smem, st, err);
    case RPC_BF16: return attn_passes<__nv_bfloat16>(a, smem, st, err);
    default: return attn_passes<float>(a, smem, st, err);
    }
}

/* Scratch for the passes: pmax, psum, part, plus `extra_floats` after them. */
int attn_scratch(AttnArgs &a, size_t extra_floats, PolicyScratch &scratch, float **extra, char *err) {
    const size_t rows = (size_t)(a.B * a.Hkv * a.M);
    const size_t n_stat = rows * (size_t)a.C1;
    const size_t n_part = (size_t)(a.B * a.Hkv * a.QG) * (size_t)a.N;
    const size_t b_stat = align_up(n_stat * 4, 256), b_part = align_up(n_part * 4, 256);
    RPC_CUDA_CHECK(scratch.alloc(2 * b_stat + b_part + extra_floats * 4), "policy attention: cudaMallocAsync of scratch");
    unsigned char *base = scratch.get();
    a.pmax = reinterpret_cast<float *>(base);
    a.psum = reinterpret_cast<float *>(base + b_stat);
    a.part = reinterpret_cast<float *>(base + 2 * b_stat);
    *extra = reinterpret_cast<float *>(base + 2 * b_stat + b_part);
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Redundancy
 */

constexpr int kRT = 32;  /* similarity tile: 32 rows x 32 columns */
constexpr int kRDC = 32; /* head-dim chunk staged per step */

struct RedArgs {
    const void *k;
    int64_t ks[4];
    int64_t B, Hkv, L, D;
    const int64_t *padding;
    double threshold;
    const double *inv;  /* [B * Hkv, L] inverse norms (valid positions) */
    int *newest;        /* [B * Hkv, L] per row (offset from pad) */
    double *colsum;     /* [B * Hkv, L] */
    float *out;         /* [B * Hkv, L] */
};

__device__ __forceinline__ int64_t red_pad(const RedArgs &a, int64_t b) {
    return a.padding ? clamp_i64(a.padding[b], 0, a.L) : 0;
}

/* One warp per key: 1 / (|k| + 1e-8), the norm in double. */
template <typename T> __global__ void red_norm_kernel(const RedArgs a, double *inv) {
    const int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (w >= a.B * a.Hkv * a.L) return;
    const int64_t i = w % a.L, u = w / a.L;
    const int64_t b = u / a.Hkv, h = u % a.Hkv;
    const T *k = static_cast<const T *>(a.k) + b * a.ks[0] + h * a.ks[1] + i * a.ks[2];
    double ss = 0.0;
    for (int64_t d = lane; d < a.D; d += 32) {
        const double v = to_f(k[d * a.ks[3]]);
        ss += v * v;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (lane == 0) inv[w] = 1.0 / (sqrt(ss) + 1e-8);
}

/* Stages normalized keys [p0, p0 + 32) (offsets from pad; past n zeroed), dims [d0, d0 + kRDC), into
 * tile[32][kRDC + 1]. */
template <typename T>
__device__ void red_stage(const RedArgs &a, int64_t b, int64_t h, int64_t pad, int64_t n, int64_t p0, int64_t d0,
                          float (*tile)[kRDC + 1]) {
    const T *k = static_cast<const T *>(a.k) + b * a.ks[0] + h * a.ks[1];
    const double *inv = a.inv + (b * a.Hkv + h) * a.L;
    for (int e = threadIdx.x; e < kRT * kRDC; e += blockDim.x) {
        const int i = e / kRDC, dd = e % kRDC;
        const int64_t p = p0 + i, d = d0 + dd;
        float v = 0.0f;
        if (p < n && d < a.D) v = (float)((double)to_f(k[(pad + p) * a.ks[2] + d * a.ks[3]]) * inv[pad + p]);
        tile[i][dd] = v;
    }
}

/* The 32 x 32 similarities of rows [r0, r0 + 32) and columns [c0, c0 + 32): thread t holds row t / 8,
 * columns t % 8 + 8 c (c < 4). Contains barriers: every thread of the block calls it. */
template <typename T>
__device__ void red_tile(const RedArgs &a, int64_t b, int64_t h, int64_t pad, int64_t n, int64_t r0, int64_t c0,
                         float (*rt)[kRDC + 1], float (*ct)[kRDC + 1], float acc[4]) {
    const int ti = threadIdx.x / 8, tj = threadIdx.x % 8;
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] = 0.0f;
    for (int64_t d0 = 0; d0 < a.D; d0 += kRDC) {
        __syncthreads(); /* previous readers of rt/ct are done */
        red_stage<T>(a, b, h, pad, n, r0, d0, rt);
        red_stage<T>(a, b, h, pad, n, c0, d0, ct);
        __syncthreads();
#pragma unroll 8
        for (int dd = 0; dd < kRDC; ++dd) {
            const float x = rt[ti][dd];
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[c] = fmaf(x, ct[tj + 8 * c][dd], acc[c]);
        }
    }
}

/* grid (B * Hkv, ceil(L / 32)): newest[i] = the largest column j with sim(i, j) > threshold (the
 * diagonal counting as 0), 0 when none. */
template <typename T> __global__ void __launch_bounds__(256) red_newest_kernel(const RedArgs a) {
    __shared__ float rt[kRT][kRDC + 1], ct[kRT][kRDC + 1];
    __shared__ int s_newest[kRT];
    const int64_t u = blockIdx.x, b = u / a.Hkv, h = u % a.Hkv;
    const int64_t pad = red_pad(a, b), n = a.L - pad;
    const int64_t r0 = (int64_t)blockIdx.y * kRT;
    if (r0 >= n) return; /* uniform over the block */
    if (threadIdx.x < kRT) s_newest[threadIdx.x] = 0;
    const int ti = threadIdx.x / 8, tj = threadIdx.x % 8;
    const int64_t i = r0 + ti;
    int best = 0;
    for (int64_t c0 = 0; c0 < n; c0 += kRT) {
        float acc[4];
        red_tile<T>(a, b, h, pad, n, r0, c0, rt, ct, acc);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int64_t j = c0 + tj + 8 * c;
            const float s = j == i ? 0.0f : acc[c];
            if (i < n && j < n && (double)s > a.threshold && j > best) best = (int)j;
        }
    }
    __syncthreads();
    atomicMax(&s_newest[ti], best);
    __syncthreads();
    if (threadIdx.x < kRT && r0 + threadIdx.x < n) a.newest[u * a.L + r0 + threadIdx.x] = s_newest[threadIdx.x];
}

/* grid (B * Hkv, ceil(L / 32)): colsum[j] = sum over rows i != j whose newest is not j of sim(i, j). */
template <typename T> __global__ void __launch_bounds__(256) red_colsum_kernel(const RedArgs a) {
    __shared__ float rt[kRT][kRDC + 1], ct[kRT][kRDC + 1];
    __shared__ double part[kRT][kRT + 1];
    __shared__ int s_newest[kRT];
    const int64_t u = blockIdx.x, b = u / a.Hkv, h = u % a.Hkv;
    const int64_t pad = red_pad(a, b), n = a.L - pad;
    const int64_t c0 = (int64_t)blockIdx.y * kRT;
    if (c0 >= n) return; /* uniform over the block */
    const int ti = threadIdx.x / 8, tj = threadIdx.x % 8;
    double sums[4] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t r0 = 0; r0 < n; r0 += kRT) {
        if (threadIdx.x < kRT)
            s_newest[threadIdx.x] = r0 + threadIdx.x < n ? a.newest[u * a.L + r0 + threadIdx.x] : -1;
        float acc[4];
        red_tile<T>(a, b, h, pad, n, r0, c0, rt, ct, acc); /* its barriers also publish s_newest */
        const int64_t i = r0 + ti;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int64_t j = c0 + tj + 8 * c;
            if (i < n && j < n && i != j && s_newest[ti] != j) sums[c] += (double)acc[c];
        }
        __syncthreads(); /* s_newest is rewritten next round */
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) part[ti][tj + 8 * c] = sums[c];
    __syncthreads();
    if (threadIdx.x < kRT && c0 + threadIdx.x < n) {
        double s = 0.0;
        for (int r = 0; r < kRT; ++r) s += part[r][threadIdx.x];
        a.colsum[u * a.L + c0 + threadIdx.x] = s;
    }
}

/* One block per head: out[pad + j] = softmax over j of colsum[j] / n (a NaN makes the row NaN). */
__global__ void __launch_bounds__(256) red_softmax_kernel(const RedArgs a) {
    __shared__ double sh[256];
    __shared__ int s_bad;
    const int64_t u = blockIdx.x, b = u / a.Hkv;
    const int64_t pad = red_pad(a, b), n = a.L - pad;
    if (n <= 0) return;
    const double *col = a.colsum + u * a.L;
    float *out = a.out + u * a.L + pad;
    if (threadIdx.x == 0) s_bad = 0;
    __syncthreads();
    double m = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
        const double v = col[j] / (double)n;
        if (v != v) s_bad = 1;
        m = fmax(m, v);
    }
    sh[threadIdx.x] = m;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] = fmax(sh[threadIdx.x], sh[threadIdx.x + o]);
        __syncthreads();
    }
    m = sh[0];
    const int bad = s_bad || !isfinite(m);
    __syncthreads();
    double s = 0.0;
    if (!bad)
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += exp(col[j] / (double)n - m);
    sh[threadIdx.x] = s;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if (threadIdx.x < o) sh[threadIdx.x] += sh[threadIdx.x + o];
        __syncthreads();
    }
    s = sh[0];
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
        out[j] = bad ? NAN : (float)(exp(col[j] / (double)n - m) / s);
}

template <typename T> int red_launch(RedArgs &a, cudaStream_t st, char *err) {
    const int64_t units = a.B * a.Hkv;
    const int64_t cells = units * a.L;
    PolicyScratch scratch(st);
    const size_t b_inv = align_up((size_t)cells * 8, 256), b_new = align_up((size_t)cells * 4, 256);
    RPC_CUDA_CHECK(scratch.alloc(b_inv + b_new + (size_t)cells * 8), "policy redundancy: cudaMallocAsync of scratch");
    unsigned char *base = scratch.get();
    double *inv = reinterpret_cast<double *>(base);
    a.inv = inv;
    a.newest = reinterpret_cast<int *>(base + b_inv);
    a.colsum = reinterpret_cast<double *>(base + b_inv + b_new);
    RPC_CUDA_CHECK(cudaMemsetAsync(a.out, 0, (size_t)cells * sizeof(float), st), "policy redundancy: cudaMemsetAsync");
    const int64_t nwarps = cells, tpb = 256;
    red_norm_kernel<T><<<(unsigned)ceil_div(nwarps * 32, tpb), (unsigned)tpb, 0, st>>>(a, inv);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy redundancy: launch of the norm kernel");
    const dim3 grid((unsigned)units, (unsigned)ceil_div(a.L, kRT));
    red_newest_kernel<T><<<grid, 256, 0, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy redundancy: launch of the newest kernel");
    red_colsum_kernel<T><<<grid, 256, 0, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy redundancy: launch of the column-sum kernel");
    red_softmax_kernel<<<(unsigned)units, 256, 0, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy redundancy: launch of the softmax kernel");
    RPC_CUDA_CHECK(scratch.release(), "policy redundancy: cudaFreeAsync of scratch");
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------------------
 * fill_scores, accumulator compaction
 */

__global__ void fill_kernel(float *__restrict__ out, int64_t total, int64_t n, int kind, uint64_t seed,
                            uint64_t layer, uint64_t compression) {
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = idx % n, row = idx / n;
        out[idx] = kind == RPC_FILL_RECENT ? (float)j
                                           : rpc_random_uniform(seed, layer, compression, (uint64_t)row, (uint64_t)j);
    }
}

constexpr int kAccChunk = 2048;

__global__ void __launch_bounds__(256) compact_acc_kernel(const rpc_acc_compact_params p) {
    __shared__ float buf[kAccChunk];
    const int64_t bh = blockIdx.x, b = bh / p.H, h = bh % p.H;
    float *x = p.acc + b * p.acc_stride[0] + h * p.acc_stride[1];
    const int64_t s2 = p.acc_stride[2];
    const int64_t *idx = p.indices + b * p.idx_stride_b + (p.A == 1 ? 0 : h) * p.idx_stride_a;
    const int64_t N = p.end - p.start, W = p.L - p.end;
    for (int64_t c0 = 0; c0 < p.keep; c0 += kAccChunk) {
        const int64_t cn = min((int64_t)kAccChunk, p.keep - c0);
        for (int64_t e = threadIdx.x; e < cn; e += blockDim.x) {
            const int64_t src = idx[c0 + e];
            /* malformed indices (not ascending, out of range) are skipped, never followed */
            if (src >= c0 + e && src < N) buf[e] = x[(p.start + src) * s2];
        }
        __syncthreads();
        for (int64_t e = threadIdx.x; e < cn; e += blockDim.x) {
            const int64_t src = idx[c0 + e];
            if (src >= c0 + e && src < N) x[(p.start + c0 + e) * s2] = buf[e];
        }
        __syncthreads();
    }
    if (p.start + p.keep != p.end) {
        for (int64_t c0 = 0; c0 < W; c0 += kAccChunk) {
            const int64_t cn = min((int64_t)kAccChunk, W - c0);
            for (int64_t e = threadIdx.x; e < cn; e += blockDim.x) buf[e] = x[(p.end + c0 + e) * s2];
            __syncthreads();
            for (int64_t e = threadIdx.x; e < cn; e += blockDim.x) x[(p.start + p.keep + c0 + e) * s2] = buf[e];
            __syncthreads();
        }
    }
    for (int64_t t = p.start + p.keep + W + threadIdx.x; t < p.L; t += blockDim.x) x[t * s2] = 0.0f;
}

} // namespace

/* ================================================================================================
 * Launchers (rpc.h)
 */

extern "C" int rpc_cuda_attn_scores(int device, const rpc_attn_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "attention scores (cuda): params is NULL");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "attention scores (cuda): dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->R < 1 || p->D < 1 || p->Hq % p->Hkv != 0)
        return rpc_value_error(err, "attention scores (cuda): bad sizes (need Hq % Hkv == 0, R >= 1, D >= 1)");
    if (p->start < 0 || p->end <= p->start || p->end > p->L)
        return rpc_value_error(err, "attention scores (cuda): need 0 <= start < end <= L");
    if (p->kernel_size < 1 || p->kernel_size % 2 == 0)
        return rpc_value_error(err, "attention scores (cuda): kernel_size must be odd and >= 1");
    if ((unsigned)p->norm > RPC_NORM_CAUSAL || (unsigned)p->gqa > RPC_GQA_MAX_LOGITS ||
        (unsigned)p->reduce > RPC_REDUCE_MEAN || (p->agg != RPC_AGG_ALL && p->agg != RPC_AGG_GROUP) ||
        (p->pool != RPC_POOL_AVG && p->pool != RPC_POOL_MAX))
        return rpc_value_error(err, "attention scores (cuda): unknown option value");
    if (p->norm == RPC_NORM_CAUSAL && !p->query_positions)
        return rpc_value_error(err, "attention scores (cuda): norm causal needs query_positions");
    const int64_t G = p->Hq / p->Hkv;
    const int64_t M = p->gqa == RPC_GQA_MAX_LOGITS ? p->R : G * p->R;
    if (p->L >= INT_MAX / 2 || M > INT_MAX / 2 || p->D > 65536)
        return rpc_value_error(err, "attention scores (cuda): sizes too large");
    if (p->B == 0) return RPC_OK;
    if (!p->q || !p->k || !p->out) return rpc_value_error(err, "attention scores (cuda): NULL tensor pointer");

    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    AttnArgs a = {};
    a.q = p->q;
    a.k = p->k;
    for (int d = 0; d < 4; ++d) {
        a.qs[d] = p->q_stride[d];
        a.ks[d] = p->k_stride[d];
    }
    a.B = p->B;
    a.Hkv = p->Hkv;
    a.G = G;
    a.R = p->R;
    a.D = p->D;
    a.L = p->L;
    a.start = p->start;
    a.end = p->end;
    a.N = p->end - p->start;
    a.qpos = p->query_positions;
    a.padding = p->padding;
    a.qw = p->query_weights;
    a.norm = (int)p->norm;
    a.max_logits = p->gqa == RPC_GQA_MAX_LOGITS;
    a.scale = p->scale;
    a.M = (int)M;
    size_t smem = 0;
    int rc = attn_plan(a, &smem, err);
    if (rc != RPC_OK) return rc;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : p->Hkv;
    const int64_t n_out = p->B * A * a.N;
    PolicyScratch scratch(st);
    float *agg = nullptr;
    rc = attn_scratch(a, p->raw ? 0 : (size_t)n_out, scratch, &agg, err);
    if (rc != RPC_OK) return rc;
    if (p->raw) agg = p->raw;
    rc = attn_passes_dispatch(p->dtype, a, smem, st, err);
    if (rc != RPC_OK) return rc;
    double div = p->gqa == RPC_GQA_MEAN_PROBS ? (double)(A == 1 ? p->Hq : G) : (double)(A == 1 ? p->Hkv : 1);
    if (p->reduce == RPC_REDUCE_MEAN) div *= (double)p->R;
    const unsigned blocks = (unsigned)ceil_div(n_out, 256);
    attn_aggregate_kernel<<<blocks, 256, 0, st>>>(a.part, agg, p->B, A, p->Hkv, a.QG, a.N, (float)div);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy attention: launch of the aggregation");
    attn_pool_kernel<<<blocks, 256, 0, st>>>(agg, p->out, p->B * A, a.N, p->kernel_size, p->pool == RPC_POOL_MAX);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy attention: launch of the pooling");
    RPC_CUDA_CHECK(scratch.release(), "policy attention: cudaFreeAsync of scratch");
    return RPC_OK;
}

extern "C" int rpc_cuda_accumulate(int device, const rpc_accumulate_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "accumulate (cuda): params is NULL");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "accumulate (cuda): dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->D < 1 || p->Hq % p->Hkv != 0 || p->length < 0)
        return rpc_value_error(err, "accumulate (cuda): bad sizes");
    if (p->length >= INT_MAX / 2 || p->Hq > INT_MAX / 2 || p->D > 65536)
        return rpc_value_error(err, "accumulate (cuda): sizes too large");
    if (p->B == 0 || p->length == 0) return RPC_OK;
    if (!p->q || !p->k || !p->acc) return rpc_value_error(err, "accumulate (cuda): NULL tensor pointer");

    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    AttnArgs a = {};
    a.q = p->q;
    a.k = p->k;
    for (int d = 0; d < 4; ++d) {
        a.qs[d] = p->q_stride[d];
        a.ks[d] = p->k_stride[d];
    }
    a.B = p->B;
    a.Hkv = p->Hkv;
    a.G = p->Hq / p->Hkv;
    a.R = 1;
    a.D = p->D;
    a.L = p->length;
    a.start = 0;
    a.end = p->length;
    a.N = p->length;
    a.padding = p->padding;
    a.norm = RPC_NORM_PAST;
    a.max_logits = 0;
    a.scale = p->scale;
    a.M = (int)a.G;
    size_t smem = 0;
    int rc = attn_plan(a, &smem, err);
    if (rc != RPC_OK) return rc;
    PolicyScratch scratch(st);
    float *unused = nullptr;
    rc = attn_scratch(a, 0, scratch, &unused, err);
    if (rc != RPC_OK) return rc;
    rc = attn_passes_dispatch(p->dtype, a, smem, st, err);
    if (rc != RPC_OK) return rc;
    const int64_t total = a.B * a.Hkv * a.N;
    accumulate_finish_kernel<<<(unsigned)ceil_div(total, 256), 256, 0, st>>>(
        a.part, p->acc, a.B, a.Hkv, a.QG, a.N, p->padding, p->acc_stride[0], p->acc_stride[1], p->acc_stride[2]);
    RPC_CUDA_CHECK(cudaGetLastError(), "policy accumulate: launch of the finishing kernel");
    RPC_CUDA_CHECK(scratch.release(), "policy accumulate: cudaFreeAsync of scratch");
    return RPC_OK;
}

extern "C" int rpc_cuda_redundancy(int device, const rpc_redundancy_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "redundancy (cuda): params is NULL");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "redundancy (cuda): dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hkv < 0 || p->L < 0 || p->D < 1) return rpc_value_error(err, "redundancy (cuda): bad sizes");
    if (std::isnan(p->threshold)) return rpc_value_error(err, "redundancy (cuda): threshold is NaN");
    if (p->L >= INT_MAX / 2 || p->B * p->Hkv > INT_MAX || p->B * p->Hkv * p->L > INT64_MAX / 64)
        return rpc_value_error(err, "redundancy (cuda): sizes too large");
    if (p->B * p->Hkv * p->L == 0) return RPC_OK;
    if (!p->k || !p->out) return rpc_value_error(err, "redundancy (cuda): NULL tensor pointer");
    if (ceil_div(p->L, kRT) > 65535) return rpc_value_error(err, "redundancy (cuda): L too large for the launch grid");

    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    RedArgs a = {};
    a.k = p->k;
    for (int d = 0; d < 4; ++d) a.ks[d] = p->k_stride[d];
    a.B = p->B;
    a.Hkv = p->Hkv;
    a.L = p->L;
    a.D = p->D;
    a.padding = p->padding;
    a.threshold = p->threshold;
    a.out = p->out;
    switch (p->dtype) {
    case RPC_F16: return red_launch<__half>(a, st, err);
    case RPC_BF16: return red_launch<__nv_bfloat16>(a, st, err);
    default: return red_launch<float>(a, st, err);
    }
}

extern "C" int rpc_cuda_fill_scores(int device, const rpc_fill_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "fill_scores (cuda): params is NULL");
    if (p->kind != RPC_FILL_RECENT && p->kind != RPC_FILL_RANDOM)
        return rpc_value_error(err, "fill_scores (cuda): unknown kind");
    if (p->batch < 0 || p->rows < 0 || p->n < 0 || (p->kind == RPC_FILL_RECENT && p->n > ((int64_t)1 << 24)))
        return rpc_value_error(err, "fill_scores (cuda): bad sizes");
    const int64_t total = p->batch * p->rows * p->n;
    if (total == 0) return RPC_OK;
    if (!p->out) return rpc_value_error(err, "fill_scores (cuda): NULL pointer");
    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    int64_t blocks = ceil_div(total, 256);
    if (blocks > 65535LL * 16) blocks = 65535LL * 16; /* grid-stride loop covers the rest */
    fill_kernel<<<(unsigned)blocks, 256, 0, st>>>(p->out, total, p->n, (int)p->kind, p->seed, p->layer,
                                                  p->compression);
    RPC_CUDA_CHECK(cudaGetLastError(), "fill_scores: kernel launch");
    return RPC_OK;
}

extern "C" int rpc_cuda_pool(int device, const float *scores, int64_t rows, int64_t N, rpc_pooling pool,
                             int kernel_size, float *out, void *stream, char *err) {
    if (rows < 0 || N < 0 || kernel_size < 1 || kernel_size % 2 == 0 || (pool != RPC_POOL_AVG && pool != RPC_POOL_MAX))
        return rpc_value_error(err, "pool (cuda): need rows, N >= 0, an odd kernel_size and a known pooling");
    const int64_t total = rows * N;
    if (total == 0) return RPC_OK;
    if (!scores || !out) return rpc_value_error(err, "pool (cuda): NULL pointer");
    if (ceil_div(total, 256) > INT_MAX) return rpc_value_error(err, "pool (cuda): too many scores");
    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    pool_rows_kernel<<<(unsigned)ceil_div(total, 256), 256, 0, st>>>(scores, out, rows, N, kernel_size,
                                                                     pool == RPC_POOL_MAX);
    RPC_CUDA_CHECK(cudaGetLastError(), "pool: kernel launch");
    return RPC_OK;
}

extern "C" int rpc_cuda_compact_acc(int device, const rpc_acc_compact_params *p, void *stream, char *err) {
    if (!p) return rpc_value_error(err, "compact accumulator (cuda): params is NULL");
    if (p->B < 0 || p->H < 0 || p->start < 0 || p->end < p->start || p->end > p->L || p->keep < 0 ||
        p->keep > p->end - p->start)
        return rpc_value_error(err, "compact accumulator (cuda): need 0 <= start <= end <= L, keep <= end - start");
    if (p->A != 1 && p->A != p->H) return rpc_value_error(err, "compact accumulator (cuda): A must be 1 or H");
    if (p->B * p->H > INT_MAX) return rpc_value_error(err, "compact accumulator (cuda): B * H too large");
    if (p->B == 0 || p->H == 0 || p->L == 0) return RPC_OK;
    if (!p->acc || (p->keep > 0 && !p->indices))
        return rpc_value_error(err, "compact accumulator (cuda): NULL pointer");
    RPC_DEVICE_GUARD(device);
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    compact_acc_kernel<<<(unsigned)(p->B * p->H), 256, 0, st>>>(*p);
    RPC_CUDA_CHECK(cudaGetLastError(), "compact accumulator: kernel launch");
    return RPC_OK;
}
