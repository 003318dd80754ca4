/* score_cuda.cu: RPC's scoring on CUDA (steps 3-7 of docs/algorithm.md), rpc_cuda_score.
 *
 * Scoring never materializes the [B, Hq, R, N] logits nor a GQA-repeated K. A thread block owns one
 * (batch b, KV head, group of query rows, chunk of candidates): its query rows (the G*R selector
 * queries of that KV head, or a slice of them when they do not fit in shared memory) stay resident,
 * and K is streamed through in tiles of 32 keys. Each tile's logits are a [rows x 32] product computed
 * with tensor cores (fp16/bf16 inputs, fp32 accumulation: the products of 16-bit inputs are exact in
 * fp32, so this is as accurate as an fp32 dot product) or, for float32 inputs, with a register-tiled
 * fp32 loop.
 *   pass 1: per query row and chunk, the running max and sum of exp over the chunk's keys;
 *   pass 2: combines the chunk partials into the softmax max/normalizer of each row, recomputes the
 *           logits and writes, per key, the sum of probabilities over the block's rows;
 *   agg:    sums those per-(KV head, row group) sums in a fixed order (deterministic: no atomics)
 *           and divides by the number of query heads aggregated;
 *   pool:   rpc_pool_at of rpc.h (the pooling every kernel shares), stride 1.
 * Logits are pre-multiplied by log2(e) so that the softmax uses exp2 (same result, cheaper, within
 * float32 rounding). The two GEMM passes are the price of an exact softmax without storing logits.
 * Version 1 runs WMMA tiles (and the fp32 loop); version 2 (fp16/bf16, head_dim a multiple of 16 up
 * to 256, aligned key rows) keeps Q fragments in registers and streams K through a cp.async
 * pipeline with mma.sync. The workspace comes from the caller (rpc_cuda_score_workspace sizes it).
 *
 * Every launcher sets the requested device (restoring the caller's afterwards), runs on the caller's
 * stream, checks every runtime call and launch, and never synchronizes with the host.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>

#include "cuda_common.cuh"
#include "mma_common.cuh"
#include "rpc.h"

namespace {

/* ------------------------------------------------------------------------------------------------
 * Scratch memory (errors and device selection: cuda_common.cuh)
 */

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

/* ------------------------------------------------------------------------------------------------
 * Scoring
 */

constexpr int kThreads = 256;          /* threads per scoring block */
constexpr int kWarps = kThreads / 32;
constexpr int kTileN = 32;             /* keys per K tile: one key per lane in the epilogues */
constexpr int kLdl = kTileN + 4;       /* leading dim of the logits tile (floats, multiple of 4) */
constexpr size_t kSmemBudget = 110 * 1024; /* two blocks per SM on sm_80 and sm_90 */

/* Storage type of an element in shared memory: the raw bits, no conversion while staging. */
template <typename T> struct Bits;
template <> struct Bits<float> { typedef uint32_t type; };
template <> struct Bits<__half> { typedef uint16_t type; };
template <> struct Bits<__nv_bfloat16> { typedef uint16_t type; };

/* Row padding of staged Q and K. Tensor-core path: D rounded up to 16 (zero-filled, the MMA runs
 * over whole 16-wide steps) plus 8 elements so that rows start in different banks. fp32 path: an
 * odd leading dimension makes the column-wise reads of the register-tiled loop conflict-free. */
template <typename T> __host__ __device__ inline int staged_ld(int D) {
    if (sizeof(T) == 2) return (D + 15) / 16 * 16 + 8;
    return (D % 2 == 0) ? D + 1 : D;
}

/* Shared memory layout of a scoring block holding `QR` query rows (QR multiple of 16). Host and
 * device compute it with the same function. Every region starts at a multiple of 128 bytes, as
 * WMMA fragment loads/stores need 32-byte aligned tiles. */
struct ScoreSmem {
    size_t q, k, logits, stat_a, stat_b, red, total;
};

template <typename T> __host__ __device__ inline ScoreSmem score_smem_layout(int QR, int D) {
    const size_t ld = (size_t)staged_ld<T>(D);
    ScoreSmem s;
    size_t off = 0;
    s.q = off;
    off += (QR * ld * sizeof(T) + 127) / 128 * 128;
    s.k = off;
    off += (kTileN * ld * sizeof(T) + 127) / 128 * 128;
    s.logits = off;
    off += ((size_t)QR * kLdl * sizeof(float) + 127) / 128 * 128;
    s.stat_a = off;
    off += ((size_t)QR * sizeof(float) + 127) / 128 * 128;
    s.stat_b = off;
    off += ((size_t)QR * sizeof(float) + 127) / 128 * 128;
    s.red = off;
    off += ((size_t)kWarps * 32 * sizeof(float) + 127) / 128 * 128;
    s.total = off;
    return s;
}

struct ScoreArgs {
    const void *q, *k;
    int64_t qs[4], ks[4];   /* strides in elements */
    int64_t start;          /* first candidate position in K */
    int N;                  /* candidates */
    int R, D, G, Hkv, Hq, B_;
    int GR;                 /* G * R query rows per KV head */
    int QR;                 /* query rows per block (multiple of 16) */
    int QG;                 /* row groups: ceil(GR / QR) */
    int C;                  /* candidate chunks */
    int tiles_per_chunk;
    bool q_vec, k_vec;      /* 16-byte vector loads allowed */
    float scale2;           /* logit scale times log2(e): the softmax is computed with exp2 */
    float *pmax, *psum;     /* [B*Hq*R, C] chunk partials (pass 1 writes, pass 2 reads) */
    float *part;            /* [B, Hkv, QG, N] per-key probability sums (pass 2 writes) */
};

/* Copies `nalloc` rows of D elements into shared memory (leading dim `ld`), rows >= nvalid as
 * zeros. row_off(i) gives the element offset of row i in `src`; `dstride` is the D stride. With
 * `vec`, rows are read as 16-byte vectors (D stride 1, every used address 16-byte aligned). */
template <typename T, typename RowOff>
__device__ __forceinline__ void stage_rows(typename Bits<T>::type *__restrict__ dst, int ld, int nalloc,
                                           int nvalid, int D, const T *__restrict__ src_t,
                                           int64_t dstride, bool vec, RowOff row_off) {
    typedef typename Bits<T>::type U;
    const U *__restrict__ src = reinterpret_cast<const U *>(src_t);
    if (vec) {
        constexpr int V = 16 / sizeof(U);
        const int per_row = D / V;
        const int total = nalloc * per_row;
        constexpr int kBatch = 4; /* several loads in flight per thread */
        for (int base = threadIdx.x; base < total; base += kBatch * blockDim.x) {
            uint4 val[kBatch];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int e = base + u * (int)blockDim.x;
                val[u] = make_uint4(0u, 0u, 0u, 0u);
                if (e < total) {
                    const int i = e / per_row, v = e - i * per_row;
                    if (i < nvalid) val[u] = __ldg(reinterpret_cast<const uint4 *>(src + row_off(i)) + v);
                }
            }
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
                const int e = base + u * (int)blockDim.x;
                if (e < total) {
                    const int i = e / per_row, v = e - i * per_row;
                    U *d = dst + (size_t)i * ld + (size_t)v * V;
                    if constexpr (sizeof(U) == 2) {
                        *reinterpret_cast<uint4 *>(d) = val[u]; /* ld % 8 == 0: row starts are 16B aligned */
                    } else {
                        d[0] = val[u].x; /* odd ld: scalar stores */
                        d[1] = val[u].y;
                        d[2] = val[u].z;
                        d[3] = val[u].w;
                    }
                }
            }
        }
    } else {
        const int total = nalloc * D;
        for (int e = threadIdx.x; e < total; e += blockDim.x) {
            const int i = e / D, d = e - i * D;
            U x = 0;
            if (i < nvalid) x = src[row_off(i) + (int64_t)d * dstride];
            dst[(size_t)i * ld + d] = x;
        }
    }
}

/* Logits tile (unscaled dot products) [QRp x kTileN] -> ls, tensor cores. Each warp owns 16-row
 * stripes and computes both 16-key column tiles of a stripe. Zero padding of Q rows/columns and of
 * K columns contributes nothing. */
template <typename T>
__device__ __forceinline__ void logits_tile_mma(const T *qs, const T *ks, int ld, float *ls, int QRp, int D) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int Dp = (D + 15) / 16 * 16;
    for (int rt = warp; rt < QRp / 16; rt += kWarps) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc0, acc1;
        wmma::fill_fragment(acc0, 0.0f);
        wmma::fill_fragment(acc1, 0.0f);
        for (int kk = 0; kk < Dp; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b0, b1;
            wmma::load_matrix_sync(a, qs + (size_t)rt * 16 * ld + kk, ld);
            /* K staged as [key][d]: column-major view of the [d x key] operand */
            wmma::load_matrix_sync(b0, ks + kk, ld);
            wmma::load_matrix_sync(b1, ks + (size_t)16 * ld + kk, ld);
            wmma::mma_sync(acc0, a, b0, acc0);
            wmma::mma_sync(acc1, a, b1, acc1);
        }
        wmma::store_matrix_sync(ls + (size_t)rt * 16 * kLdl, acc0, kLdl, wmma::mem_row_major);
        wmma::store_matrix_sync(ls + (size_t)rt * 16 * kLdl + 16, acc1, kLdl, wmma::mem_row_major);
    }
}

/* fp32 logits tile: thread (ty = tid / 8, tx = tid % 8) computes rows rb + ty + 32*i (i < 4) times
 * keys tx + 8*j (j < 4). Rows past QRp are clamped for the reads and not stored. */
__device__ __forceinline__ void logits_tile_fp32(const float *qs, const float *ks, int ld, float *ls, int QRp,
                                                 int D) {
    const int tx = threadIdx.x % 8, ty = threadIdx.x / 8;
    for (int rb = 0; rb < QRp; rb += 128) {
        float acc[4][4];
        const float *qrow[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            int row = rb + ty + 32 * i;
            if (row >= QRp) row = QRp - 1;
            qrow[i] = qs + (size_t)row * ld;
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
        }
        for (int d = 0; d < D; ++d) {
            float kv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) kv[j] = ks[(size_t)(tx + 8 * j) * ld + d];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float qv = qrow[i][d];
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(qv, kv[j], acc[i][j]);
            }
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = rb + ty + 32 * i;
            if (row < QRp) {
#pragma unroll
                for (int j = 0; j < 4; ++j) ls[(size_t)row * kLdl + tx + 8 * j] = acc[i][j];
            }
        }
    }
}

template <typename T>
__device__ __forceinline__ void logits_tile(const T *qs, const T *ks, int ld, float *ls, int QRp, int D) {
    logits_tile_mma<T>(qs, ks, ld, ls, QRp, D);
}
template <>
__device__ __forceinline__ void logits_tile<float>(const float *qs, const float *ks, int ld, float *ls, int QRp,
                                                   int D) {
    logits_tile_fp32(qs, ks, ld, ls, QRp, D);
}

/* grid.x = (b * Hkv + kvh) * C + chunk, grid.y = row group. PASS2 = false: softmax partials;
 * PASS2 = true: per-key probability sums. */
template <typename T, bool PASS2>
__global__ void __launch_bounds__(kThreads) score_pass_kernel(const ScoreArgs a) {
    typedef typename Bits<T>::type U;
    extern __shared__ __align__(128) unsigned char smem[];

    const int chunk = (int)(blockIdx.x % (unsigned)a.C);
    const int64_t bh = blockIdx.x / (unsigned)a.C; /* b * Hkv + kvh */
    const int b = (int)(bh / a.Hkv), kvh = (int)(bh % a.Hkv);
    const int qg = blockIdx.y;
    const int row0 = qg * a.QR;
    const int QRv = min(a.QR, a.GR - row0); /* valid query rows of this block, >= 1 */
    const int QRp = (QRv + 15) / 16 * 16;
    const int ld = staged_ld<T>(a.D);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

    const ScoreSmem L = score_smem_layout<T>(a.QR, a.D);
    U *qs = reinterpret_cast<U *>(smem + L.q);
    U *ks = reinterpret_cast<U *>(smem + L.k);
    float *ls = reinterpret_cast<float *>(smem + L.logits);
    float *sa = reinterpret_cast<float *>(smem + L.stat_a); /* pass 1: running max; pass 2: max */
    float *sb = reinterpret_cast<float *>(smem + L.stat_b); /* pass 1: running sum; pass 2: 1/sum */
    float *red = reinterpret_cast<float *>(smem + L.red);

    /* Zero the Q and K buffers: the padding columns (D..ld) are never written by the staging and
     * must be finite zeros for the MMA. */
    {
        uint4 *z = reinterpret_cast<uint4 *>(smem);
        const int n16 = (int)(L.logits / 16);
        for (int i = threadIdx.x; i < n16; i += blockDim.x) z[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    /* Row statistics. Pass 2 combines the chunk partials of pass 1 (same order in every block). */
    const int64_t rowbase = bh * a.GR + row0; /* = b*Hq*R + hq*R + r for the block's first row */
    for (int i = threadIdx.x; i < QRp; i += blockDim.x) {
        if (!PASS2) {
            sa[i] = -INFINITY;
            sb[i] = 0.0f;
        } else if (i < QRv) {
            const float *pm = a.pmax + (rowbase + i) * a.C;
            const float *ps = a.psum + (rowbase + i) * a.C;
            float m = -INFINITY;
            for (int c = 0; c < a.C; ++c) m = fmaxf(m, pm[c]);
            float s = 0.0f;
            for (int c = 0; c < a.C; ++c) s += ps[c] * exp2f(pm[c] - m);
            sa[i] = m;
            sb[i] = 1.0f / s;
        } else {
            sa[i] = 0.0f;
            sb[i] = 0.0f;
        }
    }
    __syncthreads();

    /* Query rows of this block: row i is selector query r of query head kvh*G + g. */
    {
        const T *q = static_cast<const T *>(a.q);
        const int64_t qb = (int64_t)b * a.qs[0];
        const int R = a.R, G = a.G;
        const int64_t qs1 = a.qs[1], qs2 = a.qs[2];
        stage_rows<T>(qs, ld, QRp, QRv, a.D, q, a.qs[3], a.q_vec, [=](int i) -> int64_t {
            const int gr = row0 + i;
            const int g = gr / R, r = gr - g * R;
            return qb + (int64_t)(kvh * G + g) * qs1 + (int64_t)r * qs2;
        });
    }

    const T *k = static_cast<const T *>(a.k);
    const int64_t kb = (int64_t)b * a.ks[0] + (int64_t)kvh * a.ks[1];
    const int64_t ks2 = a.ks[2];
    const int ntiles = (a.N + kTileN - 1) / kTileN;
    const int t_begin = chunk * a.tiles_per_chunk;
    const int t_end = min(ntiles, t_begin + a.tiles_per_chunk);
    const float scale2 = a.scale2;

    for (int t = t_begin; t < t_end; ++t) {
        const int n0 = t * kTileN;
        const int nv = min(kTileN, a.N - n0);
        const int64_t kpos0 = a.start + n0;
        stage_rows<T>(ks, ld, kTileN, nv, a.D, k, a.ks[3], a.k_vec,
                      [=](int i) -> int64_t { return kb + (kpos0 + i) * ks2; });
        __syncthreads(); /* K tile (and, first time, Q and stats) visible; previous epilogue done */

        logits_tile<T>(reinterpret_cast<const T *>(qs), reinterpret_cast<const T *>(ks), ld, ls, QRp, a.D);
        __syncthreads(); /* logits visible */

        if (!PASS2) {
            /* Thread i owns row i (and i + blockDim...): only it touches the row's running state.
             * Column order is rotated by the row so that the 32 threads of a warp, reading rows
             * kLdl = 36 floats apart, hit 32 different banks ((36 i + (j + i) % 32) % 32 distinct). */
            for (int i = threadIdx.x; i < QRv; i += blockDim.x) {
                const float *lrow = ls + (size_t)i * kLdl;
                float x[kTileN];
                float m = -INFINITY;
#pragma unroll
                for (int j = 0; j < kTileN; ++j) {
                    const int c = (j + i) & (kTileN - 1);
                    x[j] = c < nv ? lrow[c] * scale2 : -INFINITY;
                    m = fmaxf(m, x[j]);
                }
                float s = 0.0f;
#pragma unroll
                for (int j = 0; j < kTileN; ++j) s += exp2f(x[j] - m); /* exp2(-inf) = 0 for padding */
                const float m_old = sa[i];
                const float m_new = fmaxf(m_old, m);
                sb[i] = sb[i] * exp2f(m_old - m_new) + s * exp2f(m - m_new);
                sa[i] = m_new;
            }
        } else {
            float acc = 0.0f;
            for (int i = warp; i < QRv; i += kWarps)
                acc += exp2f(ls[(size_t)i * kLdl + lane] * scale2 - sa[i]) * sb[i];
            red[warp * 32 + lane] = acc;
            __syncthreads();
            if (warp == 0 && lane < nv) {
                float s = 0.0f;
#pragma unroll
                for (int w = 0; w < kWarps; ++w) s += red[w * 32 + lane];
                a.part[(bh * a.QG + qg) * (int64_t)a.N + n0 + lane] = s;
            }
            /* `red` is rewritten only after the next tile's two barriers */
        }
    }

    if (!PASS2) {
        for (int i = threadIdx.x; i < QRv; i += blockDim.x) {
            a.pmax[(rowbase + i) * a.C + chunk] = sa[i];
            a.psum[(rowbase + i) * a.C + chunk] = sb[i];
        }
    }
}

/* agg[b, a, n] = sum of part over the aggregated KV heads and row groups, in a fixed order,
 * divided by the number of query heads aggregated. */
__global__ void score_aggregate_kernel(const float *__restrict__ part, float *__restrict__ agg, int64_t B,
                                       int A, int Hkv, int QG, int64_t N, float heads) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= B * A * N) return;
    const int64_t n = idx % N;
    const int64_t ba = idx / N;
    const int64_t b = ba / A, a_ = ba % A;
    const int h0 = (A == 1) ? 0 : (int)a_;
    const int h1 = (A == 1) ? Hkv : (int)a_ + 1;
    float s = 0.0f;
    for (int h = h0; h < h1; ++h)
        for (int g = 0; g < QG; ++g) s += part[((b * Hkv + h) * QG + g) * N + n];
    agg[idx] = s / heads;
}

/* Pooling along N (rpc_pool_at of rpc.h, the definition every kernel shares). */
__global__ void score_pool_kernel(const float *__restrict__ agg, float *__restrict__ out, int64_t rows, int64_t N,
                                  int ksize, int is_max) {
    const int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= rows * N) return;
    const int64_t n = idx % N;
    out[idx] = rpc_pool_at_f32(agg + (idx - n), N, n, ksize, is_max);
}

/* ------------------------------------------------------------------------------------------------
 * Scoring v2 (fp16 / bf16, D a multiple of 16, K rows 16-byte aligned): tensor cores through raw
 * mma.m16n8k16 (mma_common.cuh) instead of WMMA.
 *   - A CTA holds up to 8 warps x SPW stripes of 16 query rows. Each warp loads the A fragments of its
 *     stripes once (ldmatrix from a staging copy) and keeps them in registers for the whole sweep: Q
 *     never changes in a CTA. The warp count follows the stripe count (GQA 7 x R 32 = 14 stripes = 7
 *     warps of 2), so no warp idles on an uneven split.
 *   - K comes in 32-key tiles through a 4-stage cp.async pipeline shared by the CTA (one barrier per
 *     tile). A warp loads each K fragment once with ldmatrix and uses it for all its stripes.
 *   - Logits never go to shared memory: pass 1 keeps the per-row running max / sum in registers (one
 *     max and one rescale per tile and row, exp2 per element); pass 2 turns each logit into its
 *     probability, sums it over the warp's rows with shuffles and over the warps through a small
 *     double-buffered shared array that the next tile's barrier orders, so the cross-warp sum costs no
 *     extra barrier. Both passes sum in a fixed order: the result is deterministic.
 * Candidate rows past N are zero-filled by the copy and masked to -inf in the logits. Padding rows of
 * a stripe (row >= G * R) have zero queries, and pass 2 gives them weight 0. */

namespace sv2 {

constexpr int kMaxWarps = 8;
constexpr int kTile = 32;   /* keys per tile */
constexpr int kStages = 4;  /* K tiles in the pipeline */

__host__ __device__ inline int ld_of(int D) {
    return D + 8; /* 16-byte row padding: ldmatrix rows land in distinct banks */
}

/* Shared memory: [union of the Q staging copy and the K pipeline][pass-2 cross-warp buffer]. */
__host__ __device__ inline size_t smem_bytes(int rows, int D) {
    const size_t q = (size_t)rows * ld_of(D) * 2;
    const size_t k = (size_t)kStages * kTile * ld_of(D) * 2;
    const size_t u = ((q > k ? q : k) + 15) / 16 * 16;
    return u + (size_t)2 * kMaxWarps * kTile * sizeof(float);
}

/* grid.x = (b * Hkv + kvh) * C + chunk, grid.y = row group; blockDim.x = 32 * warps. KS = ksteps
 * bound (D <= 16 * KS); SPW = stripes per warp; EXACT: D == 16 * KS, so that the row stride, the
 * k-step count and the copy mapping are compile-time constants (D = 64, 128, 256). */
template <typename T, int KS, int SPW, bool PASS2, bool EXACT>
__global__ void __launch_bounds__(kMaxWarps * 32, 1) score_v2_kernel(const ScoreArgs a) {
    using namespace rpc_mma;
    extern __shared__ __align__(16) unsigned char smem[];
    const int D = EXACT ? 16 * KS : a.D;
    const int ld = ld_of(D);
    const int ksteps = D / 16;
    const int nwarps = (int)(blockDim.x / 32);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tq = lane & 3, gq = lane >> 2;
    const int chunk = (int)(blockIdx.x % (unsigned)a.C);
    const int64_t bh = blockIdx.x / (unsigned)a.C; /* b * Hkv + kvh */
    const int b = (int)(bh / a.Hkv), kvh = (int)(bh % a.Hkv);
    const int qg = blockIdx.y;
    const int row0 = qg * a.QR;                     /* first query row (of G * R) of this CTA */
    uint16_t *sbuf = reinterpret_cast<uint16_t *>(smem);
    const size_t ubytes = smem_bytes(a.QR, D) - (size_t)2 * kMaxWarps * kTile * sizeof(float);
    float *red = reinterpret_cast<float *>(smem + ubytes); /* [2][kMaxWarps][kTile] */

    /* 1. Stage the CTA's query rows (zeros past G * R), load this warp's fragments, free the buffer. */
    {
        const uint16_t *q = static_cast<const uint16_t *>(a.q);
        const int64_t qb = (int64_t)b * a.qs[0];
        for (int e = threadIdx.x; e < a.QR * D; e += blockDim.x) {
            const int i = e / D, d = e - i * D;
            const int gr = row0 + i;
            uint16_t x = 0;
            if (gr < a.GR) {
                const int g = gr / a.R, r = gr - g * a.R;
                x = q[qb + (int64_t)(kvh * a.G + g) * a.qs[1] + (int64_t)r * a.qs[2] + (int64_t)d * a.qs[3]];
            }
            sbuf[i * ld + d] = x;
        }
    }
    __syncthreads();
    uint32_t qf[SPW][KS][4];
    const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8, a_col = (lane >> 4) * 8;
    const int k_row = (lane & 7) + (lane >> 4) * 8, k_col = ((lane >> 3) & 1) * 8;
#pragma unroll
    for (int s = 0; s < SPW; ++s) {
        const int stripe = warp * SPW + s; /* < nwarps * SPW * 16 <= a.QR rows: always staged */
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            if (kk < ksteps) {
                ldmatrix_x4(qf[s][kk], sbuf + (stripe * 16 + a_row) * ld + kk * 16 + a_col);
            } else {
                qf[s][kk][0] = qf[s][kk][1] = qf[s][kk][2] = qf[s][kk][3] = 0u;
            }
        }
    }

    /* Rows of this lane: stripe s, half h (0: row gq, 1: row gq + 8). */
    float st_m[SPW][2], st_l[SPW][2]; /* pass 1: running max / sum; pass 2: max / 1 over sum */
#pragma unroll
    for (int s = 0; s < SPW; ++s) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int gr = row0 + (warp * SPW + s) * 16 + gq + 8 * h;
            if (!PASS2) {
                st_m[s][h] = -INFINITY;
                st_l[s][h] = 0.0f;
            } else if (gr < a.GR && gr < row0 + a.QR) {
                const float *pm = a.pmax + (bh * a.GR + gr) * a.C;
                const float *ps = a.psum + (bh * a.GR + gr) * a.C;
                float m = -INFINITY;
                for (int c = 0; c < a.C; ++c) m = fmaxf(m, pm[c]);
                float l = 0.0f;
                for (int c = 0; c < a.C; ++c) l += ps[c] * exp2f(pm[c] - m);
                st_m[s][h] = m;
                st_l[s][h] = 1.0f / l;
            } else {
                st_m[s][h] = 0.0f; /* padding row: weight 0 */
                st_l[s][h] = 0.0f;
            }
        }
    }
    __syncthreads(); /* every warp holds its Q fragments: the staging buffer becomes the K pipeline */

    const uint16_t *k = static_cast<const uint16_t *>(a.k);
    const int64_t kb = (int64_t)b * a.ks[0] + (int64_t)kvh * a.ks[1];
    const int64_t ks2 = a.ks[2];
    const int ntiles = (a.N + kTile - 1) / kTile;
    const int t_begin = chunk * a.tiles_per_chunk;
    const int t_end = min(ntiles, t_begin + a.tiles_per_chunk);
    const int count = t_end > t_begin ? t_end - t_begin : 0;
    const int cpr = D / 8; /* 16-byte chunks per key row */
    const float scale2 = a.scale2;

    /* Copy mapping, fixed per thread: 16-byte column `cpart` of key rows crow, crow + cstep, ...
     * (blockDim >= 32 >= cpr, so every column has at least one thread). */
    const int cstep = (int)blockDim.x / cpr;
    const int cpart = threadIdx.x % cpr, crow = threadIdx.x / cpr < cstep ? threadIdx.x / cpr : kTile;
    auto load_tile = [&](int i, int stage) {
        const int n0 = (t_begin + i) * kTile;
        uint16_t *dst = sbuf + stage * kTile * ld + cpart * 8;
        const uint16_t *src = k + kb + cpart * 8;
        for (int r = crow; r < kTile; r += cstep) {
            const bool ok = n0 + r < a.N;
            const int64_t pos = a.start + (ok ? n0 + r : 0);
            cp_async16(dst + r * ld, src + pos * ks2, ok);
        }
    };

#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
        if (s < count) load_tile(s, s);
        cp_async_commit();
    }
    for (int i = 0; i < count; ++i) {
        cp_async_wait<kStages - 2>(); /* tile i landed (this thread's copies) */
        __syncthreads();              /* everyone's copies visible; tile i - 1 fully consumed */
        if (i + kStages - 1 < count) load_tile(i + kStages - 1, (i + kStages - 1) % kStages);
        cp_async_commit();
        const int n0 = (t_begin + i) * kTile;
        if (PASS2 && warp == 0 && i > 0) { /* cross-warp sum of the previous tile (ordered by the barrier) */
            const float *rb = red + ((i - 1) & 1) * kMaxWarps * kTile;
            float sum = 0.0f;
            for (int w = 0; w < nwarps; ++w) sum += rb[w * kTile + lane];
            const int n = n0 - kTile + lane;
            if (n < a.N) a.part[(bh * a.QG + qg) * (int64_t)a.N + n] = sum;
        }
        const uint16_t *tk = sbuf + (i % kStages) * kTile * ld;

        float acc[SPW][4][4];
#pragma unroll
        for (int s = 0; s < SPW; ++s)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[s][j][0] = acc[s][j][1] = acc[s][j][2] = acc[s][j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            if (kk < ksteps) {
#pragma unroll
                for (int np = 0; np < 2; ++np) {
                    uint32_t kf[4];
                    ldmatrix_x4(kf, tk + (np * 16 + k_row) * ld + kk * 16 + k_col);
#pragma unroll
                    for (int s = 0; s < SPW; ++s) {
                        mma_16816<T>(acc[s][2 * np], qf[s][kk], kf[0], kf[1]);
                        mma_16816<T>(acc[s][2 * np + 1], qf[s][kk], kf[2], kf[3]);
                    }
                }
            }
        }

        /* Key of accumulator (j, c): n0 + 8 j + 2 tq + (c & 1); row half c >> 1. Only the last tile
         * of the candidates is partial (block-uniform test); its missing keys become -inf, which
         * every use below maps to probability 0. Logits are raw dot products until here: the scale
         * (> 0, so it keeps the order) is applied inside the exponent with one FFMA. */
        if (n0 + kTile > a.N) {
            const int nbase = n0 + 2 * tq;
#pragma unroll
            for (int s = 0; s < SPW; ++s)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c)
                        if (nbase + 8 * j + (c & 1) >= a.N) acc[s][j][c] = -INFINITY;
        }
        if (!PASS2) {
#pragma unroll
            for (int s = 0; s < SPW; ++s) {
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) mx[c >> 1] = fmaxf(mx[c >> 1], acc[s][j][c]);
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
                    mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
                    const float mn = fmaxf(st_m[s][h], mx[h] * scale2);
                    const float ref = mn == -INFINITY ? 0.0f : mn;
                    float sum = 0.0f;
#pragma unroll
                    for (int j = 0; j < 4; ++j)
                        sum += ex2(fmaf(acc[s][j][2 * h], scale2, -ref)) + ex2(fmaf(acc[s][j][2 * h + 1], scale2, -ref));
                    st_l[s][h] = st_l[s][h] * ex2(st_m[s][h] - ref) + sum;
                    st_m[s][h] = mn;
                }
            }
        } else {
            float ksum[4][2];
#pragma unroll
            for (int j = 0; j < 4; ++j) ksum[j][0] = ksum[j][1] = 0.0f;
#pragma unroll
            for (int s = 0; s < SPW; ++s)
#pragma unroll
                for (int j = 0; j < 4; ++j)
#pragma unroll
                    for (int c = 0; c < 4; ++c) {
                        const int h = c >> 1;
                        ksum[j][c & 1] = fmaf(ex2(fmaf(acc[s][j][c], scale2, -st_m[s][h])), st_l[s][h], ksum[j][c & 1]);
                    }
            /* Sum over the 8 row groups of the warp (lanes with the same tq hold the same keys). */
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int c = 0; c < 2; ++c) {
                    float v = ksum[j][c];
                    v += __shfl_xor_sync(0xffffffffu, v, 4);
                    v += __shfl_xor_sync(0xffffffffu, v, 8);
                    v += __shfl_xor_sync(0xffffffffu, v, 16);
                    ksum[j][c] = v;
                }
            if (gq == 0) {
                float *rb = red + (i & 1) * kMaxWarps * kTile + warp * kTile;
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    rb[8 * j + 2 * tq] = ksum[j][0];
                    rb[8 * j + 2 * tq + 1] = ksum[j][1];
                }
            }
        }
    }
    cp_async_wait<0>();
    if (PASS2) {
        __syncthreads();
        if (warp == 0 && count > 0) {
            const float *rb = red + ((count - 1) & 1) * kMaxWarps * kTile;
            float sum = 0.0f;
            for (int w = 0; w < nwarps; ++w) sum += rb[w * kTile + lane];
            const int n = (t_begin + count - 1) * kTile + lane;
            if (n < a.N) a.part[(bh * a.QG + qg) * (int64_t)a.N + n] = sum;
        }
    } else {
#pragma unroll
        for (int s = 0; s < SPW; ++s)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                float l = st_l[s][h];
                l += __shfl_xor_sync(0xffffffffu, l, 1);
                l += __shfl_xor_sync(0xffffffffu, l, 2);
                const int local = (warp * SPW + s) * 16 + gq + 8 * h;
                const int gr = row0 + local;
                if (tq == 0 && local < a.QR && gr < a.GR) {
                    a.pmax[(bh * a.GR + gr) * a.C + chunk] = st_m[s][h];
                    a.psum[(bh * a.GR + gr) * a.C + chunk] = l;
                }
            }
    }
}

} // namespace sv2

/* True when every address base + sum(i_d * stride_d) (d < 3, dims of size > 1) is 16-byte aligned,
 * the D stride is 1 and a row is a whole number of 16-byte vectors. */
bool vec16_ok(const void *base, const int64_t shape[4], const int64_t stride[4], size_t esize) {
    if ((uintptr_t)base % 16 != 0) return false;
    if (shape[3] > 1 && stride[3] != 1) return false;
    if ((shape[3] * (int64_t)esize) % 16 != 0) return false;
    for (int d = 0; d < 3; ++d)
        if (shape[d] > 1 && (stride[d] * (int64_t)esize) % 16 != 0) return false;
    return true;
}

/* Everything the scoring launch decides from the shape and the device, computed the same way when the
 * caller sizes the workspace (rpc_cuda_score_workspace) and when it launches (rpc_cuda_score). */
struct ScorePlan {
    int version;          /* 1: WMMA / fp32 kernels; 2: sv2 kernels */
    int64_t QR, QG, C, tpc;
    int warps, KS, SPW;   /* v2 only */
    size_t smem;
    size_t n_part, n_keys, n_agg;
    size_t bytes;         /* workspace */
};

int score_plan(const rpc_score_params *p, int device, ScorePlan *pl, char *err) {
    const int64_t B = p->B, Hq = p->Hq, Hkv = p->Hkv, R = p->R, D = p->D, N = p->end - p->start;
    const int64_t G = Hq / Hkv, GR = G * R;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    const int64_t ntiles = ceil_div(N, kTileN);
    const size_t es = rpc_dtype_size(p->dtype);
    int sms = 0, optin = 0;
    RPC_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device),
                   "rpc score: cudaDeviceGetAttribute");
    RPC_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
                   "rpc score: cudaDeviceGetAttribute");
    if (p->version < 0 || p->version > 2) return rpc_value_error(err, "rpc score (cuda): version must be 0, 1 or 2");

    const int64_t kshape[4] = {B, Hkv, N, D};
    const bool k_vec = vec16_ok(static_cast<const unsigned char *>(p->k) + p->start * p->k_stride[2] * (int64_t)es,
                                kshape, p->k_stride, es);
    /* v2 takes row maxima of the raw dot products, so it needs a positive scale (always 1/sqrt(D)
     * from the bindings; a caller of the C API could pass anything, and v1 handles any sign). */
    bool v2 = p->dtype != RPC_F32 && D % 16 == 0 && D <= 256 && k_vec && p->version != 1 && p->scale > 0.0f;
    if (v2) {
        pl->SPW = D <= 128 ? 2 : 1;
        pl->KS = D <= 64 ? 4 : (D <= 128 ? 8 : 16);
        const int64_t stripes = ceil_div(GR, 16);
        int64_t qg = ceil_div(stripes, (int64_t)sv2::kMaxWarps * pl->SPW);
        const int64_t per = ceil_div(stripes, qg);
        pl->warps = (int)ceil_div(per, pl->SPW);
        pl->QR = (int64_t)pl->warps * pl->SPW * 16;
        pl->QG = ceil_div(GR, pl->QR);
        pl->smem = sv2::smem_bytes((int)pl->QR, (int)D);
        if (pl->smem > (size_t)optin) v2 = false;
    }
    if (p->version == 2 && !v2)
        return rpc_value_error(err, "rpc score (cuda): the v2 kernel needs float16/bfloat16, head_dim a multiple of 16 "
                                    "up to 256, 16-byte aligned key rows and a positive scale");
    pl->version = v2 ? 2 : 1;
    if (!v2) {
        /* v1: query rows per block as many as fit the shared-memory budget (multiple of 16), then
         * balanced over the resulting number of row groups. */
        const size_t budget = (size_t)optin < kSmemBudget ? (size_t)optin : kSmemBudget;
        const int64_t GRp = ceil_div(GR, 16) * 16;
        int64_t qr_cap = 0;
        ScoreSmem (*layout)(int, int) = p->dtype == RPC_F16    ? score_smem_layout<__half>
                                        : p->dtype == RPC_BF16 ? score_smem_layout<__nv_bfloat16>
                                                               : score_smem_layout<float>;
        if (layout(16, (int)D).total <= budget) {
            const size_t fixed = layout(0, (int)D).total;
            const size_t per16 = layout(16, (int)D).total - fixed;
            qr_cap = (int64_t)((budget - fixed) / per16) * 16;
            if (qr_cap > GRp) qr_cap = GRp;
            while (qr_cap > 16 && layout((int)qr_cap, (int)D).total > budget) qr_cap -= 16;
        }
        if (qr_cap < 16) {
            char msg[RPC_ERR_LEN];
            snprintf(msg, sizeof msg, "rpc score (cuda): head dim %lld is too large for the CUDA scoring kernel",
                     (long long)D);
            return rpc_value_error(err, msg);
        }
        int64_t QG = ceil_div(GR, qr_cap);
        pl->QR = ceil_div(ceil_div(GR, QG), 16) * 16;
        pl->QG = ceil_div(GR, pl->QR);
        pl->smem = layout((int)pl->QR, (int)D).total;
        pl->warps = kWarps;
    }
    /* Candidate chunks: enough blocks for several waves, each chunk a whole number of tiles. */
    int64_t C = ceil_div(8 * (int64_t)(sms > 0 ? sms : 1), B * Hkv * pl->QG);
    if (C > ntiles) C = ntiles;
    if (C < 1) C = 1;
    pl->tpc = ceil_div(ntiles, C);
    pl->C = ceil_div(ntiles, pl->tpc);
    if (B * Hkv * pl->C > INT_MAX || pl->QG > 65535 || ceil_div(B * A * N, 256) > INT_MAX)
        return rpc_value_error(err, "rpc score (cuda): problem too large for the launch grid");
    pl->n_part = (size_t)(B * Hq * R * pl->C);
    pl->n_keys = (size_t)(B * Hkv * pl->QG * N);
    pl->n_agg = (size_t)(B * A * N);
    pl->bytes = align_up(pl->n_part * 4, 256) * 2 + align_up(pl->n_keys * 4, 256) + align_up(pl->n_agg * 4, 256);
    return RPC_OK;
}

template <typename T, int KS, int SPW, bool EXACT>
int launch_v2(const ScoreArgs &a, const ScorePlan &pl, cudaStream_t st, char *err) {
    RPC_CUDA_CHECK(cudaFuncSetAttribute(sv2::score_v2_kernel<T, KS, SPW, false, EXACT>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem),
                   "rpc score: cudaFuncSetAttribute");
    RPC_CUDA_CHECK(cudaFuncSetAttribute(sv2::score_v2_kernel<T, KS, SPW, true, EXACT>,
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, (int)pl.smem),
                   "rpc score: cudaFuncSetAttribute");
    const dim3 grid((unsigned)(a.B_ * a.Hkv * pl.C), (unsigned)pl.QG);
    sv2::score_v2_kernel<T, KS, SPW, false, EXACT><<<grid, pl.warps * 32, pl.smem, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of pass 1");
    sv2::score_v2_kernel<T, KS, SPW, true, EXACT><<<grid, pl.warps * 32, pl.smem, st>>>(a);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of pass 2");
    return RPC_OK;
}

template <typename T> int launch_v2_t(const ScoreArgs &a, const ScorePlan &pl, cudaStream_t st, char *err) {
    const bool exact = a.D == 16 * pl.KS;
    if (pl.KS == 4) return exact ? launch_v2<T, 4, 2, true>(a, pl, st, err) : launch_v2<T, 4, 2, false>(a, pl, st, err);
    if (pl.KS == 8) return exact ? launch_v2<T, 8, 2, true>(a, pl, st, err) : launch_v2<T, 8, 2, false>(a, pl, st, err);
    return exact ? launch_v2<T, 16, 1, true>(a, pl, st, err) : launch_v2<T, 16, 1, false>(a, pl, st, err);
}

template <typename T>
int score_launch(const rpc_score_params *p, const ScorePlan &pl, int64_t N, cudaStream_t st, char *err) {
    const int64_t B = p->B, Hq = p->Hq, Hkv = p->Hkv, R = p->R, D = p->D;
    const int64_t G = Hq / Hkv, GR = G * R;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    unsigned char *base = static_cast<unsigned char *>(p->workspace);

    ScoreArgs a;
    a.q = p->q;
    a.k = p->k;
    for (int d = 0; d < 4; ++d) {
        a.qs[d] = p->q_stride[d];
        a.ks[d] = p->k_stride[d];
    }
    a.start = p->start;
    a.N = (int)N;
    a.R = (int)R;
    a.D = (int)D;
    a.G = (int)G;
    a.Hkv = (int)Hkv;
    a.Hq = (int)Hq;
    a.B_ = (int)B;
    a.GR = (int)GR;
    a.QR = (int)pl.QR;
    a.QG = (int)pl.QG;
    a.C = (int)pl.C;
    a.tiles_per_chunk = (int)pl.tpc;
    const int64_t qshape[4] = {B, Hq, R, D};
    const int64_t kshape[4] = {B, Hkv, N, D};
    a.q_vec = vec16_ok(p->q, qshape, p->q_stride, sizeof(T));
    a.k_vec = vec16_ok(static_cast<const T *>(p->k) + p->start * p->k_stride[2], kshape, p->k_stride, sizeof(T));
    a.scale2 = (float)((double)p->scale * 1.4426950408889634); /* log2(e) */
    a.pmax = reinterpret_cast<float *>(base);
    a.psum = reinterpret_cast<float *>(base + align_up(pl.n_part * 4, 256));
    a.part = reinterpret_cast<float *>(base + 2 * align_up(pl.n_part * 4, 256));
    float *agg = p->raw ? p->raw
                        : reinterpret_cast<float *>(base + 2 * align_up(pl.n_part * 4, 256) +
                                                    align_up(pl.n_keys * 4, 256));

    if (pl.version == 2) {
        if constexpr (sizeof(T) == 2) {
            const int rc = launch_v2_t<T>(a, pl, st, err);
            if (rc != RPC_OK) return rc;
        } else {
            return rpc_value_error(err, "rpc score (cuda): internal error: v2 plan for float32");
        }
    } else {
        RPC_CUDA_CHECK(cudaFuncSetAttribute(score_pass_kernel<T, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)pl.smem),
                       "rpc score: cudaFuncSetAttribute");
        RPC_CUDA_CHECK(cudaFuncSetAttribute(score_pass_kernel<T, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            (int)pl.smem),
                       "rpc score: cudaFuncSetAttribute");
        const dim3 grid((unsigned)(B * Hkv * pl.C), (unsigned)pl.QG);
        score_pass_kernel<T, false><<<grid, kThreads, pl.smem, st>>>(a);
        RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of pass 1");
        score_pass_kernel<T, true><<<grid, kThreads, pl.smem, st>>>(a);
        RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of pass 2");
    }

    const int64_t n_out = B * A * N;
    const unsigned eblocks = (unsigned)ceil_div(n_out, 256);
    const float heads = (float)(A == 1 ? Hq : G);
    score_aggregate_kernel<<<eblocks, 256, 0, st>>>(a.part, agg, B, (int)A, (int)Hkv, (int)pl.QG, N, heads);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of aggregation");
    score_pool_kernel<<<eblocks, 256, 0, st>>>(agg, p->out, B * A, N, p->kernel_size, p->pool == RPC_POOL_MAX);
    RPC_CUDA_CHECK(cudaGetLastError(), "rpc score: launch of pooling");
    return RPC_OK;
}

} // namespace

/* ================================================================================================
 * Launchers (rpc.h)
 */

/* Shape checks shared by rpc_cuda_score and rpc_cuda_score_workspace. */
static int score_check(const rpc_score_params *p, char *err) {
    if (!p) return rpc_value_error(err, "rpc score (cuda): params is NULL");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_value_error(err, "rpc score (cuda): dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->R < 1 || p->D < 1)
        return rpc_value_error(err, "rpc score (cuda): sizes must be positive (B >= 0)");
    if (p->Hq % p->Hkv != 0)
        return rpc_value_error(err, "rpc score (cuda): query heads must be a multiple of KV heads");
    if (p->start < 0 || p->end <= p->start)
        return rpc_value_error(err, "rpc score (cuda): candidates [start, end) must be non-empty, start >= 0");
    if (p->kernel_size < 1 || p->kernel_size % 2 == 0)
        return rpc_value_error(err, "rpc score (cuda): kernel_size must be odd and >= 1");
    if (p->agg != RPC_AGG_ALL && p->agg != RPC_AGG_GROUP)
        return rpc_value_error(err, "rpc score (cuda): unknown aggregation");
    if (p->pool != RPC_POOL_AVG && p->pool != RPC_POOL_MAX)
        return rpc_value_error(err, "rpc score (cuda): unknown pooling");
    const int64_t N = p->end - p->start;
    if (N > INT_MAX / 2 || p->Hq * p->R > INT_MAX / 2 || p->D > 65536 || p->B > INT_MAX / 2)
        return rpc_value_error(err, "rpc score (cuda): sizes too large");
    return RPC_OK;
}

extern "C" int rpc_cuda_score_workspace(int device, const rpc_score_params *p, size_t *bytes, char *err) {
    *bytes = 0;
    int rc = score_check(p, err);
    if (rc != RPC_OK || p->B == 0) return rc;
    ScorePlan pl;
    rc = score_plan(p, device, &pl, err);
    if (rc == RPC_OK) *bytes = pl.bytes;
    return rc;
}

extern "C" int rpc_cuda_score(int device, const rpc_score_params *p, void *stream, char *err) {
    int rc = score_check(p, err);
    if (rc != RPC_OK) return rc;
    if (p->B == 0) return RPC_OK;
    if (!p->q || !p->k || !p->out) return rpc_value_error(err, "rpc score (cuda): NULL tensor pointer");
    ScorePlan pl;
    rc = score_plan(p, device, &pl, err);
    if (rc != RPC_OK) return rc;
    if (!p->workspace || p->workspace_bytes < pl.bytes || (uintptr_t)p->workspace % 256 != 0) {
        char msg[RPC_ERR_LEN];
        snprintf(msg, sizeof msg,
                 "rpc score (cuda): workspace of %zu bytes (256-byte aligned) required, got %zu bytes at %p",
                 pl.bytes, p->workspace_bytes, p->workspace);
        return rpc_value_error(err, msg);
    }
    const int64_t N = p->end - p->start;
    RpcDeviceGuard guard;
    RPC_CUDA_CHECK(guard.enter(device), "rpc score: cudaSetDevice");
    cudaStream_t st = static_cast<cudaStream_t>(stream);
    switch (p->dtype) {
    case RPC_F16: return score_launch<__half>(p, pl, N, st, err);
    case RPC_BF16: return score_launch<__nv_bfloat16>(p, pl, N, st, err);
    default: return score_launch<float>(p, pl, N, st, err);
    }
}
