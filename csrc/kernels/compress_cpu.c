/* compress_cpu.c: CPU kernels of one RPC compression (docs/algorithm.md steps 3-9).
 *
 * Scoring is a batched "Q K^T, softmax along N, column sums" problem with a tiny M (the G*R selector
 * queries of one KV head) and a long N (the candidates). The fast path works per work item
 * (batch, kv head, range of query rows):
 *   1. the item's candidate keys are converted to float32 once and packed into NR-wide panels
 *      [N/NR][D][NR], so every query of the group reuses them;
 *   2. the queries are packed (pre-scaled by 1/sqrt(D)) into MR-wide panels and a register-blocked
 *      MR x NR micro-kernel writes float32 logits for a chunk of rows into a row block [rows, N]
 *      sized to stay in L2 (never a [B, Hq, R, N] tensor);
 *   3. each row is turned into exp(l - max) with a vectorized float32 exp, summed in double and
 *      added (weighted by 1/sum) into the item's double accumulator row.
 * Item rows are reduced in a fixed order (deterministic for any thread count), divided by the number
 * of heads, and pooled. The micro-kernel and exp have AVX-512 and AVX2+FMA versions chosen at run
 * time, plus plain C for every other machine; `rpc_cpu_score_scalar` is the obvious loop nest kept as
 * the reference the tests compare against.
 *
 * Selection is quickselect on the total order (score desc, index asc, NaN last), then a sort of the
 * kept indices. Compaction moves whole tokens (D contiguous) forward with memmove; destinations never
 * pass their sources because kept offsets are strictly ascending.
 *
 * No Python API in this file: errors are a negative rpc_status plus a message in `err`.
 */
#include "cpu_common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#define RPC_PRAGMA(x) _Pragma(#x)
#else
#define RPC_PRAGMA(x)
#endif

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define RPC_X86 1
#include <immintrin.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define RPC_RESTRICT __restrict__
#else
#define RPC_RESTRICT
#endif

/* ------------------------------------------------------------------------------------------ util */

static int check_score_params(const rpc_score_params *p, char *err)
{
    if (!p || !p->q || !p->k || !p->out) return rpc_fail(err, RPC_ERR_VALUE, "score: null pointer");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_fail(err, RPC_ERR_VALUE, "score: dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->R < 1 || p->D < 1 || p->Hq % p->Hkv != 0)
        return rpc_fail(err, RPC_ERR_VALUE, "score: bad sizes (need Hq % Hkv == 0, R >= 1, D >= 1)");
    if (p->start < 0 || p->end <= p->start)
        return rpc_fail(err, RPC_ERR_VALUE, "score: need 0 <= start < end");
    if (p->kernel_size < 1 || p->kernel_size % 2 == 0)
        return rpc_fail(err, RPC_ERR_VALUE, "score: kernel_size must be odd and >= 1");
    if (p->agg != RPC_AGG_ALL && p->agg != RPC_AGG_GROUP)
        return rpc_fail(err, RPC_ERR_VALUE, "score: unknown aggregation");
    if (p->pool != RPC_POOL_AVG && p->pool != RPC_POOL_MAX)
        return rpc_fail(err, RPC_ERR_VALUE, "score: unknown pooling");
    return RPC_OK;
}

/* --------------------------------------------------------------------------- scalar reference */

int rpc_cpu_score_scalar(const rpc_score_params *p, char *err)
{
    int st = check_score_params(p, err);
    if (st) return st;
    const int64_t B = p->B, Hq = p->Hq, Hkv = p->Hkv, R = p->R, D = p->D;
    const int64_t G = Hq / Hkv, N = p->end - p->start;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    double *acc = (double *)calloc((size_t)(B * A * N) + 1, sizeof(double));
    float *logit = (float *)malloc((size_t)N * sizeof(float));
    if (!acc || !logit) {
        free(acc);
        free(logit);
        return rpc_fail(err, RPC_ERR_NOMEM, "score: out of memory");
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < Hq; h++) {
            int64_t kh = h / G;
            double *row = acc + (b * A + (A == 1 ? 0 : kh)) * N;
            for (int64_t r = 0; r < R; r++) {
                int64_t qo = b * p->q_stride[0] + h * p->q_stride[1] + r * p->q_stride[2];
                float mx = -INFINITY;
                for (int64_t n = 0; n < N; n++) {
                    int64_t ko = b * p->k_stride[0] + kh * p->k_stride[1] + (p->start + n) * p->k_stride[2];
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++)
                        dot += rpc_load_elem(p->q, qo + d * p->q_stride[3], p->dtype) *
                               rpc_load_elem(p->k, ko + d * p->k_stride[3], p->dtype);
                    logit[n] = dot * p->scale;
                    if (logit[n] > mx) mx = logit[n];
                }
                double sum = 0.0;
                for (int64_t n = 0; n < N; n++) {
                    logit[n] = expf(logit[n] - mx);
                    sum += logit[n];
                }
                for (int64_t n = 0; n < N; n++) row[n] += logit[n] / sum;
            }
        }
    }
    const double heads = (double)(A == 1 ? Hq : G);
    for (int64_t i = 0; i < B * A; i++) {
        double *row = acc + i * N;
        for (int64_t n = 0; n < N; n++) row[n] /= heads;
        rpc_pool_row_f64(row, N, p->pool, p->kernel_size, p->out + i * N, p->raw ? p->raw + i * N : NULL);
    }
    free(acc);
    free(logit);
    return RPC_OK;
}

/* ------------------------------------------------------------------ fast path: ISA-specific parts */

/* One ISA's building blocks. micro: out[i*ldo + j] = sum_d qp[d*mr + i] * kp[d*nr + j] for an
 * mr x nr block. row_max: max of x[0..n), n >= 1. exp_sum: x[i] <- exp(x[i] - m) for i < n, returns the sum (double). accumulate:
 * acc[i] += w * x[i]. */
typedef struct {
    int mr, nr;
    const char *name;
    void (*micro)(const float *qp, const float *kp, int64_t D, float *out, int64_t ldo);
    float (*row_max)(const float *x, int64_t n);
    double (*exp_sum)(float *x, int64_t n, float m);
    void (*accumulate)(double *acc, const float *x, int64_t n, double w);
} cpu_isa_ops;

#define GEN_MR 4
#define GEN_NR 8

static void micro_generic(const float *RPC_RESTRICT qp, const float *RPC_RESTRICT kp, int64_t D,
                          float *RPC_RESTRICT out, int64_t ldo)
{
    float acc[GEN_MR][GEN_NR];
    memset(acc, 0, sizeof(acc));
    for (int64_t d = 0; d < D; d++) {
        const float *a = qp + d * GEN_MR;
        const float *b = kp + d * GEN_NR;
        for (int i = 0; i < GEN_MR; i++) {
            float ai = a[i];
            RPC_PRAGMA(omp simd)
            for (int j = 0; j < GEN_NR; j++) acc[i][j] += ai * b[j];
        }
    }
    for (int i = 0; i < GEN_MR; i++)
        for (int j = 0; j < GEN_NR; j++) out[i * ldo + j] = acc[i][j];
}

/* Eight independent running maxima: a single chain would be bound by the compare latency. */
static float row_max_generic(const float *x, int64_t n)
{
    float m[8];
    int64_t i = 0;
    for (int j = 0; j < 8; j++) m[j] = x[0];
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
    for (; i < n; i++) m[0] = x[i] > m[0] ? x[i] : m[0];
    for (int j = 1; j < 8; j++) m[0] = m[j] > m[0] ? m[j] : m[0];
    return m[0];
}

static double exp_sum_generic(float *x, int64_t n, float m)
{
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    return s;
}

static void accumulate_generic(double *RPC_RESTRICT acc, const float *RPC_RESTRICT x, int64_t n, double w)
{
    RPC_PRAGMA(omp simd)
    for (int64_t i = 0; i < n; i++) acc[i] += w * (double)x[i];
}

#ifdef RPC_X86
/* float32 exp for x <= 0 (softmax after max subtraction): 2^n * poly(r), |r| <= ln2/2, Cephes
 * coefficients, relative error about 1e-7. Inputs below -87 are clamped (result ~1e-38, irrelevant
 * next to the row maximum's 1). */
#define RPC_EXP_BODY(V, SET1, MUL, ADD, FMA, FNMA, MAX, ROUND, CVT, IADD, SLLI, CASTI, VI, ISET1)           \
    x = MAX(x, SET1(-87.0f));                                                                         \
    V n = ROUND(MUL(x, SET1(1.44269504088896341f)));                                                 \
    V r = FNMA(n, SET1(0.693359375f), x);                                                             \
    r = FNMA(n, SET1(-2.12194440e-4f), r);                                                            \
    V y = SET1(1.9875691500e-4f);                                                                     \
    y = FMA(y, r, SET1(1.3981999507e-3f));                                                            \
    y = FMA(y, r, SET1(8.3334519073e-3f));                                                            \
    y = FMA(y, r, SET1(4.1665795894e-2f));                                                            \
    y = FMA(y, r, SET1(1.6666665459e-1f));                                                            \
    y = FMA(y, r, SET1(5.0000001201e-1f));                                                            \
    y = FMA(y, MUL(r, r), ADD(r, SET1(1.0f)));                                                        \
    VI e = SLLI(IADD(CVT(n), ISET1(127)), 23);                                                        \
    return MUL(y, CASTI(e));

#define RPC_ROUND256(v) _mm256_round_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define RPC_ROUND512(v) _mm512_roundscale_ps((v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

__attribute__((target("avx2,fma"))) static inline __m256 exp256(__m256 x)
{
    RPC_EXP_BODY(__m256, _mm256_set1_ps, _mm256_mul_ps, _mm256_add_ps, _mm256_fmadd_ps,
                 _mm256_fnmadd_ps, _mm256_max_ps, RPC_ROUND256, _mm256_cvtps_epi32, _mm256_add_epi32,
                 _mm256_slli_epi32, _mm256_castsi256_ps, __m256i, _mm256_set1_epi32)
}

__attribute__((target("avx2,fma"))) static void micro_avx2(const float *RPC_RESTRICT qp,
                                                          const float *RPC_RESTRICT kp, int64_t D,
                                                          float *RPC_RESTRICT out, int64_t ldo)
{
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t d = 0; d < D; d++) {
        __m256 b0 = _mm256_loadu_ps(kp + d * 16), b1 = _mm256_loadu_ps(kp + d * 16 + 8);
        const float *a = qp + d * 6;
        __m256 a0 = _mm256_broadcast_ss(a + 0);
        c00 = _mm256_fmadd_ps(a0, b0, c00);
        c01 = _mm256_fmadd_ps(a0, b1, c01);
        __m256 a1 = _mm256_broadcast_ss(a + 1);
        c10 = _mm256_fmadd_ps(a1, b0, c10);
        c11 = _mm256_fmadd_ps(a1, b1, c11);
        __m256 a2 = _mm256_broadcast_ss(a + 2);
        c20 = _mm256_fmadd_ps(a2, b0, c20);
        c21 = _mm256_fmadd_ps(a2, b1, c21);
        __m256 a3 = _mm256_broadcast_ss(a + 3);
        c30 = _mm256_fmadd_ps(a3, b0, c30);
        c31 = _mm256_fmadd_ps(a3, b1, c31);
        __m256 a4 = _mm256_broadcast_ss(a + 4);
        c40 = _mm256_fmadd_ps(a4, b0, c40);
        c41 = _mm256_fmadd_ps(a4, b1, c41);
        __m256 a5 = _mm256_broadcast_ss(a + 5);
        c50 = _mm256_fmadd_ps(a5, b0, c50);
        c51 = _mm256_fmadd_ps(a5, b1, c51);
    }
    _mm256_storeu_ps(out + 0 * ldo, c00);
    _mm256_storeu_ps(out + 0 * ldo + 8, c01);
    _mm256_storeu_ps(out + 1 * ldo, c10);
    _mm256_storeu_ps(out + 1 * ldo + 8, c11);
    _mm256_storeu_ps(out + 2 * ldo, c20);
    _mm256_storeu_ps(out + 2 * ldo + 8, c21);
    _mm256_storeu_ps(out + 3 * ldo, c30);
    _mm256_storeu_ps(out + 3 * ldo + 8, c31);
    _mm256_storeu_ps(out + 4 * ldo, c40);
    _mm256_storeu_ps(out + 4 * ldo + 8, c41);
    _mm256_storeu_ps(out + 5 * ldo, c50);
    _mm256_storeu_ps(out + 5 * ldo + 8, c51);
}

__attribute__((target("avx2,fma"))) static float row_max_avx2(const float *x, int64_t n)
{
    __m256 m0 = _mm256_set1_ps(x[0]), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
        m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
    float m = lanes[0];
    for (int j = 1; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

__attribute__((target("avx2,fma"))) static double exp_sum_avx2(float *x, int64_t n, float m)
{
    __m256 vm = _mm256_set1_ps(m);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm));
        _mm256_storeu_ps(x + i, e);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(s0, s1));
    double s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    if (i < n) {
        float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t t = n - i;
        for (int64_t j = 0; j < 8; j++) tail[j] = j < t ? x[i + j] - m : -INFINITY;
        _mm256_storeu_ps(tail, exp256(_mm256_loadu_ps(tail)));
        for (int64_t j = 0; j < t; j++) {
            x[i + j] = tail[j];
            s += tail[j];
        }
    }
    return s;
}

__attribute__((target("avx2,fma"))) static void accumulate_avx2(double *RPC_RESTRICT acc,
                                                               const float *RPC_RESTRICT x, int64_t n,
                                                               double w)
{
    __m256d vw = _mm256_set1_pd(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        _mm256_storeu_pd(acc + i, _mm256_fmadd_pd(vw, lo, _mm256_loadu_pd(acc + i)));
        _mm256_storeu_pd(acc + i + 4, _mm256_fmadd_pd(vw, hi, _mm256_loadu_pd(acc + i + 4)));
    }
    for (; i < n; i++) acc[i] += w * (double)x[i];
}

__attribute__((target("avx512f"))) static inline __m512 exp512(__m512 x)
{
    RPC_EXP_BODY(__m512, _mm512_set1_ps, _mm512_mul_ps, _mm512_add_ps, _mm512_fmadd_ps,
                 _mm512_fnmadd_ps, _mm512_max_ps, RPC_ROUND512, _mm512_cvtps_epi32, _mm512_add_epi32,
                 _mm512_slli_epi32, _mm512_castsi512_ps, __m512i, _mm512_set1_epi32)
}

/* 8 x 32 block: 16 zmm accumulators, 2 panel loads and 8 broadcasts per d. */
__attribute__((target("avx512f"))) static void micro_avx512(const float *RPC_RESTRICT qp,
                                                           const float *RPC_RESTRICT kp, int64_t D,
                                                           float *RPC_RESTRICT out, int64_t ldo)
{
    __m512 c[8][2];
    for (int i = 0; i < 8; i++) c[i][0] = c[i][1] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d++) {
        __m512 b0 = _mm512_loadu_ps(kp + d * 32), b1 = _mm512_loadu_ps(kp + d * 32 + 16);
        const float *a = qp + d * 8;
        for (int i = 0; i < 8; i++) {
            __m512 ai = _mm512_set1_ps(a[i]);
            c[i][0] = _mm512_fmadd_ps(ai, b0, c[i][0]);
            c[i][1] = _mm512_fmadd_ps(ai, b1, c[i][1]);
        }
    }
    for (int i = 0; i < 8; i++) {
        _mm512_storeu_ps(out + i * ldo, c[i][0]);
        _mm512_storeu_ps(out + i * ldo + 16, c[i][1]);
    }
}

__attribute__((target("avx512f"))) static float row_max_avx512(const float *x, int64_t n)
{
    __m512 m0 = _mm512_set1_ps(x[0]), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(x + i));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(x + i + 16));
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

__attribute__((target("avx512f"))) static double exp_sum_avx512(float *x, int64_t n, float m)
{
    __m512 vm = _mm512_set1_ps(m);
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    int64_t i = 0;
    for (; i < n; i += 16) {
        __mmask16 k = (n - i) >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u);
        __m512 v = _mm512_mask_loadu_ps(vm, k, x + i); /* masked-off lanes give exp(0) */
        __m512 e = exp512(_mm512_sub_ps(v, vm));
        e = _mm512_maskz_mov_ps(k, e);
        _mm512_mask_storeu_ps(x + i, k, e);
        s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(e)));
        s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

__attribute__((target("avx512f"))) static void accumulate_avx512(double *RPC_RESTRICT acc,
                                                                const float *RPC_RESTRICT x, int64_t n,
                                                                double w)
{
    __m512d vw = _mm512_set1_pd(w);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512d v = _mm512_cvtps_pd(_mm256_loadu_ps(x + i));
        _mm512_storeu_pd(acc + i, _mm512_fmadd_pd(vw, v, _mm512_loadu_pd(acc + i)));
    }
    for (; i < n; i++) acc[i] += w * (double)x[i];
}
#endif /* RPC_X86 */

static const cpu_isa_ops isa_generic = {GEN_MR, GEN_NR, "generic", micro_generic, row_max_generic, exp_sum_generic,
                                        accumulate_generic};
#ifdef RPC_X86
static const cpu_isa_ops isa_avx2 = {6, 16, "avx2", micro_avx2, row_max_avx2, exp_sum_avx2, accumulate_avx2};
static const cpu_isa_ops isa_avx512 = {8, 32, "avx512", micro_avx512, row_max_avx512, exp_sum_avx512, accumulate_avx512};
#endif

/* The ISA: rpc_cpu_isa (cpu_isa.c, the one dispatcher of every CPU kernel). */
static const cpu_isa_ops *isa_ops(void)
{
#ifdef RPC_X86
    int isa = rpc_cpu_isa();
    if (isa == RPC_CPU_ISA_AVX512) return &isa_avx512;
    if (isa == RPC_CPU_ISA_AVX2) return &isa_avx2;
#endif
    return &isa_generic;
}

/* ------------------------------------------------------------------------------ fast path: driver */

#define LOGIT_BLOCK_BYTES (1u << 20) /* row block of logits per thread; stays in L2 */

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

int rpc_cpu_score(const rpc_score_params *p, char *err)
{
    int st = check_score_params(p, err);
    if (st) return st;
    const cpu_isa_ops *ops = isa_ops();
    const int64_t B = p->B, Hq = p->Hq, Hkv = p->Hkv, R = p->R, D = p->D;
    const int64_t G = Hq / Hkv, N = p->end - p->start, M = G * R;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    const int64_t mr = ops->mr, nr = ops->nr, Npad = round_up(N, nr);
    if (B == 0) return RPC_OK;

    /* Work items: (b, kv head, row range). Split rows when there are too few (b, kv head) pairs to
     * keep every thread busy; rows are independent (one softmax per query row). */
    const int64_t units = B * Hkv;
    const int64_t nthreads = rpc_max_threads();
    int64_t splits = 1;
    if (units < 2 * nthreads) splits = (2 * nthreads + units - 1) / units;
    int64_t rows_per_item = round_up((M + splits - 1) / splits, mr);
    splits = (M + rows_per_item - 1) / rows_per_item;
    const int64_t items = units * splits;
    int64_t chunk = (int64_t)(LOGIT_BLOCK_BYTES / ((size_t)Npad * sizeof(float))) / mr * mr;
    if (chunk < mr) chunk = mr;
    if (chunk > rows_per_item) chunk = rows_per_item;

    double *part = (double *)malloc((size_t)(items * N) * sizeof(double));
    double *agg = (double *)malloc((size_t)N * sizeof(double));
    if (!part || !agg) {
        free(part);
        free(agg);
        return rpc_fail(err, RPC_ERR_NOMEM, "score: out of memory");
    }
    int failed = 0;
    const float scale = p->scale;

    RPC_PRAGMA(omp parallel)
    {
        float *kp = (float *)malloc((size_t)(Npad * D) * sizeof(float));
        float *qp = (float *)malloc((size_t)(chunk * D) * sizeof(float));
        float *lg = (float *)malloc((size_t)(chunk * Npad) * sizeof(float));
        int ok = kp && qp && lg;
        if (!ok) {
            RPC_PRAGMA(omp atomic write)
            failed = 1;
        }
        RPC_PRAGMA(omp for schedule(dynamic, 1))
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            const int64_t u = it / splits, s = it % splits;
            const int64_t b = u / Hkv, kh = u % Hkv;
            const int64_t r0 = s * rows_per_item;
            const int64_t r1 = r0 + rows_per_item < M ? r0 + rows_per_item : M;
            double *acc = part + it * N;
            memset(acc, 0, (size_t)N * sizeof(double));

            /* keys -> float32 panels [Npad / nr][D][nr], zero columns past N */
            const int64_t kbase = b * p->k_stride[0] + kh * p->k_stride[1];
            for (int64_t n = 0; n < Npad; n++) {
                float *dst = kp + (n / nr) * D * nr + (n % nr);
                if (n < N) {
                    int64_t ko = kbase + (p->start + n) * p->k_stride[2];
                    if (p->dtype == RPC_F32 && p->k_stride[3] == 1) {
                        const float *src = (const float *)p->k + ko;
                        for (int64_t d = 0; d < D; d++) dst[d * nr] = src[d];
                    } else {
                        for (int64_t d = 0; d < D; d++) dst[d * nr] = rpc_load_elem(p->k, ko + d * p->k_stride[3], p->dtype);
                    }
                } else {
                    for (int64_t d = 0; d < D; d++) dst[d * nr] = 0.0f;
                }
            }

            for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
                const int64_t c1 = c0 + chunk < r1 ? c0 + chunk : r1;
                const int64_t rows = c1 - c0, rpad = round_up(rows, mr);
                /* scaled queries -> panels [rpad / mr][D][mr], zero rows past the chunk */
                for (int64_t i = 0; i < rpad; i++) {
                    float *dst = qp + (i / mr) * D * mr + (i % mr);
                    if (i < rows) {
                        const int64_t row = c0 + i;
                        const int64_t qo = b * p->q_stride[0] + (kh * G + row / R) * p->q_stride[1] +
                                           (row % R) * p->q_stride[2];
                        for (int64_t d = 0; d < D; d++)
                            dst[d * mr] = rpc_load_elem(p->q, qo + d * p->q_stride[3], p->dtype) * scale;
                    } else {
                        for (int64_t d = 0; d < D; d++) dst[d * mr] = 0.0f;
                    }
                }
                for (int64_t pn = 0; pn < Npad / nr; pn++) {
                    const float *kpp = kp + pn * D * nr;
                    for (int64_t rp = 0; rp < rpad / mr; rp++)
                        ops->micro(qp + rp * D * mr, kpp, D, lg + rp * mr * Npad + pn * nr, Npad);
                }
                for (int64_t i = 0; i < rows; i++) {
                    float *x = lg + i * Npad;
                    float mx = ops->row_max(x, N);
                    double sum = ops->exp_sum(x, N, mx);
                    ops->accumulate(acc, x, N, 1.0 / sum);
                }
            }
        }
        free(kp);
        free(qp);
        free(lg);
    }
    if (failed) {
        free(part);
        free(agg);
        return rpc_fail(err, RPC_ERR_NOMEM, "score: out of memory (per-thread scratch)");
    }

    /* Deterministic reduction: items of one output row, in item order. */
    const double heads = (double)(A == 1 ? Hq : G);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t a = 0; a < A; a++) {
            memset(agg, 0, (size_t)N * sizeof(double));
            int64_t kh0 = A == 1 ? 0 : a, kh1 = A == 1 ? Hkv : a + 1;
            for (int64_t kh = kh0; kh < kh1; kh++)
                for (int64_t s = 0; s < splits; s++) {
                    const double *src = part + ((b * Hkv + kh) * splits + s) * N;
                    for (int64_t n = 0; n < N; n++) agg[n] += src[n];
                }
            for (int64_t n = 0; n < N; n++) agg[n] /= heads;
            int64_t o = (b * A + a) * N;
            rpc_pool_row_f64(agg, N, p->pool, p->kernel_size, p->out + o, p->raw ? p->raw + o : NULL);
        }
    }
    free(part);
    free(agg);
    return RPC_OK;
}

/* -------------------------------------------------------------------------------------- select */

typedef struct {
    float s;
    int nan;
    int64_t i;
} ranked;

/* 1 when x ranks before y: higher score, NaN last, ties to the lower index (a strict total order). */
static inline int ranks_before(const ranked *x, const ranked *y)
{
    if (x->nan != y->nan) return y->nan;
    if (!x->nan && x->s != y->s) return x->s > y->s;
    return x->i < y->i;
}

static int cmp_ranked(const void *a, const void *b)
{
    const ranked *x = (const ranked *)a, *y = (const ranked *)b;
    return ranks_before(x, y) ? -1 : (ranks_before(y, x) ? 1 : 0);
}

static int cmp_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static inline void swap_ranked(ranked *a, ranked *b)
{
    ranked t = *a;
    *a = *b;
    *b = t;
}

/* Rearranges v[0..n) so that v[0..k) are the k first in rank order (in any order). Quickselect with
 * a median-of-three pivot; after too many rounds it falls back to sorting the remaining range, which
 * bounds the worst case at O(n log n). */
static void select_first_k(ranked *v, int64_t n, int64_t k)
{
    int64_t lo = 0, hi = n; /* the k-th boundary lies in [lo, hi) */
    int budget = 64;
    while (hi - lo > 16 && budget-- > 0) {
        int64_t mid = lo + (hi - lo) / 2;
        if (ranks_before(&v[mid], &v[lo])) swap_ranked(&v[mid], &v[lo]);
        if (ranks_before(&v[hi - 1], &v[lo])) swap_ranked(&v[hi - 1], &v[lo]);
        if (ranks_before(&v[hi - 1], &v[mid])) swap_ranked(&v[hi - 1], &v[mid]);
        ranked pivot = v[mid];
        /* Hoare partition around the pivot value */
        int64_t i = lo - 1, j = hi;
        for (;;) {
            do i++; while (ranks_before(&v[i], &pivot));
            do j--; while (ranks_before(&pivot, &v[j]));
            if (i >= j) break;
            swap_ranked(&v[i], &v[j]);
        }
        /* [lo, j] ranks before-or-equal the pivot, [j+1, hi) after-or-equal */
        if (k <= j + 1) {
            if (k == j + 1) return;
            hi = j + 1;
        } else {
            lo = j + 1;
        }
    }
    if (hi - lo > 1) qsort(v + lo, (size_t)(hi - lo), sizeof(ranked), cmp_ranked);
}

int rpc_cpu_select(const rpc_select_params *p, char *err)
{
    if (!p || (!p->scores && p->rows * p->N > 0) || (!p->indices && p->rows * p->keep > 0))
        return rpc_fail(err, RPC_ERR_VALUE, "select: null pointer");
    if (p->rows < 0 || p->N < 0 || p->keep < 0 || p->keep > p->N)
        return rpc_fail(err, RPC_ERR_VALUE, "select: need 0 <= keep <= N");
    const int64_t rows = p->rows, N = p->N, keep = p->keep;
    if (keep == 0 || rows == 0) return RPC_OK;
    int failed = 0;
    RPC_PRAGMA(omp parallel for schedule(dynamic, 1) if (rows > 1 && N * rows > 65536))
    for (int64_t r = 0; r < rows; r++) {
        int64_t *out = p->indices + r * keep;
        if (keep == N) {
            for (int64_t i = 0; i < N; i++) out[i] = i;
            continue;
        }
        ranked *v = (ranked *)malloc((size_t)N * sizeof(ranked));
        if (!v) {
            RPC_PRAGMA(omp atomic write)
            failed = 1;
            continue;
        }
        const float *s = p->scores + r * N;
        for (int64_t i = 0; i < N; i++) {
            v[i].nan = isnan(s[i]) ? 1 : 0;
            v[i].s = v[i].nan ? 0.0f : s[i];
            v[i].i = i;
        }
        select_first_k(v, N, keep);
        for (int64_t i = 0; i < keep; i++) out[i] = v[i].i;
        qsort(out, (size_t)keep, sizeof(int64_t), cmp_i64);
        free(v);
    }
    if (failed) return rpc_fail(err, RPC_ERR_NOMEM, "select: out of memory");
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------- compact */

int rpc_cpu_compact(const rpc_compact_params *p, char *err)
{
    if (!p || !p->k || !p->v || (!p->indices && p->keep > 0))
        return rpc_fail(err, RPC_ERR_VALUE, "compact: null pointer");
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16)
        return rpc_fail(err, RPC_ERR_VALUE, "compact: dtype must be float32, float16 or bfloat16");
    if (p->start < 0 || p->end < p->start || p->end > p->L || p->keep < 0 || p->keep > p->end - p->start)
        return rpc_fail(err, RPC_ERR_VALUE, "compact: need 0 <= start <= end <= L and keep <= end - start");
    if (p->A != 1 && p->A != p->H) return rpc_fail(err, RPC_ERR_VALUE, "compact: A must be 1 or H");
    if (p->D > 1 && (p->k_stride[3] != 1 || p->v_stride[3] != 1))
        return rpc_fail(err, RPC_ERR_VALUE, "compact: the D stride must be 1");
    const int64_t B = p->B, H = p->H, A = p->A, keep = p->keep, N = p->end - p->start;
    /* Re-check the index rows here too: a bad row would move memory backwards over live tokens. */
    for (int64_t b = 0; b < B; b++)
        for (int64_t a = 0; a < A; a++) {
            const int64_t *row = p->indices + b * p->idx_stride_b + a * p->idx_stride_a;
            for (int64_t i = 0; i < keep; i++)
                if (row[i] < 0 || row[i] >= N || (i > 0 && row[i] <= row[i - 1]))
                    return rpc_fail(err, RPC_ERR_VALUE,
                                "compact: indices must be strictly ascending and in [0, end - start)");
        }
    const size_t es = rpc_dtype_size(p->dtype);
    const size_t tok = (size_t)p->D * es;
    const int64_t window = p->L - p->end;
    RPC_PRAGMA(omp parallel for schedule(static) if (B * H > 1 && keep * p->D > 4096))
    for (int64_t bh = 0; bh < 2 * B * H; bh++) {
        const int which = (int)(bh % 2); /* 0: keys, 1: values */
        const int64_t b = (bh / 2) / H, h = (bh / 2) % H;
        const int64_t *st = which ? p->v_stride : p->k_stride;
        char *base = (char *)(which ? p->v : p->k) + (size_t)(b * st[0] + h * st[1]) * es;
        const int64_t *row = p->indices + b * p->idx_stride_b + (A == 1 ? 0 : h) * p->idx_stride_a;
        for (int64_t i = 0; i < keep; i++) {
            int64_t src = p->start + row[i], dst = p->start + i;
            if (src != dst) memmove(base + (size_t)(dst * st[2]) * es, base + (size_t)(src * st[2]) * es, tok);
        }
        if (p->start + keep != p->end)
            for (int64_t t = 0; t < window; t++)
                memmove(base + (size_t)((p->start + keep + t) * st[2]) * es,
                        base + (size_t)((p->end + t) * st[2]) * es, tok);
    }
    return RPC_OK;
}
