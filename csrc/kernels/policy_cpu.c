/* policy_cpu.c: CPU kernels of the selection policies other than RPC (rpc_py/policy_reference.py is
 * their float64 oracle; rpc.h, "selection policies", their contracts).
 *
 * Window attention (rpc_cpu_attn_scores) generalizes RPC's scoring: which keys share a query's softmax
 * denominator (candidates, everything older than the window, or causal up to the query's own key),
 * how the G query heads of a KV head combine (mean of probabilities, or max of logits before one
 * softmax), sum or mean over the queries, per-sequence left padding. Work items are (sequence, KV head,
 * range of query rows). An item converts the keys it needs (the union of its rows' denominator
 * ranges, its "span") to float32 once, packed into NR-wide panels; its query rows are packed
 * (pre-scaled) into MR-wide panels, and a register-blocked MR x NR micro-kernel writes float32 logits
 * for a block of rows into scratch sized to stay in cache. Each row then gets its own max over its
 * range, a float32 exp (NaN-safe: a row holding a NaN or +inf logit, or an empty range, is skipped,
 * which is what the oracle's nan_to_num of a NaN softmax amounts to) and a double sum, and its
 * probabilities over the candidates are added to the item's double accumulator. Items are reduced in a
 * fixed order, divided and pooled exactly like RPC's scores. H2O's per-step accumulation is the same
 * core with one query per head and the range [pad, length).
 *
 * Redundancy (R-KV) is an n x n cosine-similarity problem per (sequence, KV head): keys are normalized
 * once (norm in double), the similarity matrix is produced in row blocks by the same micro-kernel and
 * consumed at once (newest near-duplicate per row zeroed, the rest added to column sums), so no n x n
 * matrix exists. Column sums are formed block by block in a fixed order whatever the thread count.
 *
 * Every kernel has a plain loop-nest reference (`*_scalar`) that the tests compare against. The micro-
 * kernel has a plain C version and, on x86, an AVX2+FMA version chosen at run time. No Python API in
 * this file: errors are a negative rpc_status plus a message in `err`.
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
#define POLICY_X86 1
#endif

#if defined(__GNUC__) || defined(__clang__)
#define POLICY_RESTRICT __restrict__
#else
#define POLICY_RESTRICT
#endif

/* ------------------------------------------------------------------------------------------ util */

static inline int64_t round_up(int64_t x, int64_t m) {
    return (x + m - 1) / m * m;
}

static inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
    return x < lo ? lo : (x > hi ? hi : x);
}

static int float_dtype(rpc_dtype dt) {
    return dt == RPC_F32 || dt == RPC_F16 || dt == RPC_BF16;
}

/* max that propagates NaN from either side (torch.amax semantics). */
static inline float max_nan(float a, float b) {
    return (a != a || a > b) ? a : b;
}

/* e^x for x <= 0 (softmax after max subtraction), float32: 2^n * p(r), |r| <= ln2 / 2, Cephes
 * polynomial, about 1 ulp. Below -87 the result is flushed to 0 (e^-87 ~ 1.6e-38 is far below the
 * row maximum's 1). Written so that the compiler vectorizes loops over it. The caller never passes NaN. */
static inline float exp_le0(float x) {
    const float lo = -87.0f;
    float xc = x < lo ? lo : x;
    /* truncation of y - 0.5 toward zero is round-to-nearest for y <= 0 */
    int32_t n = (int32_t)(xc * 1.44269504088896341f - 0.5f);
    float fn = (float)n;
    float r = xc - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + (r + 1.0f);
    uint32_t bits = (uint32_t)(n + 127) << 23; /* n in [-126, 0]: a normal power of two */
    float two_n;
    memcpy(&two_n, &bits, 4);
    return x < lo ? 0.0f : y * two_n;
}

/* In place x[i] <- exp(x[i] - max) over x[0..n); *w = 1 / sum (sum in double). Returns 0, leaving x
 * unchanged, when the row has no usable softmax: n == 0, a NaN, a +inf, or every entry -inf. */
static int softmax_row(float *POLICY_RESTRICT x, int64_t n, double *w) {
    float m = -INFINITY;
    int bad = 0;
    RPC_PRAGMA(omp simd reduction(max : m) reduction(| : bad))
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        m = v > m ? v : m;
        bad |= v != v;
    }
    if (n <= 0 || bad || !(m > -INFINITY) || m == INFINITY) return 0;
    double s = 0.0;
    RPC_PRAGMA(omp simd reduction(+ : s))
    for (int64_t i = 0; i < n; i++) {
        float e = exp_le0(x[i] - m);
        x[i] = e;
        s += (double)e;
    }
    *w = 1.0 / s;
    return 1;
}

/* The same decision for the scalar references, with libm's expf. */
static int softmax_row_plain(float *x, int64_t n, double *w) {
    if (n <= 0) return 0;
    float m = -INFINITY;
    for (int64_t i = 0; i < n; i++) {
        if (isnan(x[i])) return 0;
        if (x[i] > m) m = x[i];
    }
    if (!(m > -INFINITY) || m == INFINITY) return 0;
    double s = 0.0;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf(x[i] - m);
        s += x[i];
    }
    *w = 1.0 / s;
    return 1;
}

/* ------------------------------------------------------------------------- packing, micro-kernel */

#define PMR 4  /* rows of a micro tile */
#define PNR 16 /* columns of a micro tile */

/* Row i of a panel set of width w: dst[(i / w) * D * w + d * w + i % w] = scale * src[off + d * ds]. */
static void pack_row(float *dst, int64_t w, int64_t i, int64_t D, const void *src, rpc_dtype dt, int64_t off,
                     int64_t ds, float scale) {
    float *p = dst + (i / w) * D * w + (i % w);
    if (dt == RPC_F32 && ds == 1) {
        const float *s = (const float *)src + off;
        for (int64_t d = 0; d < D; d++) p[d * w] = s[d] * scale;
    } else {
        for (int64_t d = 0; d < D; d++) p[d * w] = rpc_load_elem(src, off + d * ds, dt) * scale;
    }
}

static void pack_row_f32(float *dst, int64_t w, int64_t i, int64_t D, const float *src) {
    float *p = dst + (i / w) * D * w + (i % w);
    for (int64_t d = 0; d < D; d++) p[d * w] = src[d];
}

static void pack_zero_row(float *dst, int64_t w, int64_t i, int64_t D) {
    float *p = dst + (i / w) * D * w + (i % w);
    for (int64_t d = 0; d < D; d++) p[d * w] = 0.0f;
}

/* out[i * ldo + j] = sum_d a[d * PMR + i] * b[d * PNR + j] for a PMR x PNR tile. */
typedef void (*micro_fn)(const float *a, const float *b, int64_t D, float *out, int64_t ldo);

static void micro_generic(const float *POLICY_RESTRICT a, const float *POLICY_RESTRICT b, int64_t D,
                          float *POLICY_RESTRICT out, int64_t ldo) {
    float acc[PMR][PNR];
    memset(acc, 0, sizeof acc);
    for (int64_t d = 0; d < D; d++) {
        const float *ad = a + d * PMR, *bd = b + d * PNR;
        for (int i = 0; i < PMR; i++) {
            const float ai = ad[i];
            RPC_PRAGMA(omp simd)
            for (int j = 0; j < PNR; j++) acc[i][j] += ai * bd[j];
        }
    }
    for (int i = 0; i < PMR; i++)
        for (int j = 0; j < PNR; j++) out[i * ldo + j] = acc[i][j];
}

#ifdef POLICY_X86
/* The same loop compiled for AVX2 + FMA (fmaf becomes vfmadd once vectorized for this target). */
__attribute__((target("avx2,fma"))) static void micro_avx2(const float *POLICY_RESTRICT a,
                                                          const float *POLICY_RESTRICT b, int64_t D,
                                                          float *POLICY_RESTRICT out, int64_t ldo) {
    float acc[PMR][PNR];
    memset(acc, 0, sizeof acc);
    for (int64_t d = 0; d < D; d++) {
        const float *ad = a + d * PMR, *bd = b + d * PNR;
        for (int i = 0; i < PMR; i++) {
            const float ai = ad[i];
            RPC_PRAGMA(omp simd)
            for (int j = 0; j < PNR; j++) acc[i][j] = fmaf(ai, bd[j], acc[i][j]);
        }
    }
    for (int i = 0; i < PMR; i++)
        for (int j = 0; j < PNR; j++) out[i * ldo + j] = acc[i][j];
}
#endif

/* The ISA from rpc_cpu_isa (cpu_isa.c), the dispatcher every CPU kernel shares, so rpc_cpu_set_isa caps
 * these kernels too (the tests run them on their generic path that way). */
static micro_fn pick_micro(void) {
#ifdef POLICY_X86
    if (rpc_cpu_isa() >= RPC_CPU_ISA_AVX2) return micro_avx2;
#endif
    return micro_generic;
}

/* out [rpad, npad] (leading dim npad) = row panels ap [rpad / PMR][D][PMR] x key panels bp. */
static void panel_product(micro_fn micro, const float *ap, int64_t rpad, const float *bp, int64_t npad, int64_t D,
                          float *out) {
    for (int64_t pn = 0; pn < npad / PNR; pn++) {
        const float *bpp = bp + pn * D * PNR;
        for (int64_t rp = 0; rp < rpad / PMR; rp++) micro(ap + rp * D * PMR, bpp, D, out + rp * PMR * npad + pn * PNR, npad);
    }
}

/* ------------------------------------------------------------------------------ attention core */

#define LOGIT_BLOCK_BYTES ((int64_t)1 << 20) /* logits of one row block per thread; stays in L2 */

/* Everything the shared attention core needs: one query set against one key set, candidates
 * [start, end), denominator ranges from norm / query positions / padding. */
typedef struct {
    const void *q, *k;
    rpc_dtype dtype;
    int64_t B, Hq, Hkv, G, R, D, L;
    const int64_t *qs, *ks;  /* strides, 4 each */
    int64_t start, end, N;
    rpc_attn_norm norm;
    const int64_t *qpos;     /* [R] (causal) */
    const int64_t *padding;  /* [B] or NULL */
    const float *qw;         /* [R] query weights or NULL (all 1) */
    int max_logits;
    float scale;
    int64_t M;               /* logical rows per KV head: G * R (mean of probabilities) or R (max logits) */
} attn_core;

/* The weight of query r's probabilities in the sum over queries. */
static inline double query_weight(const attn_core *c, int64_t r) {
    return c->qw ? (double)c->qw[r] : 1.0;
}

/* The denominator range [lo, hi) of query r in sequence b, clamped to [0, L] (empty when hi <= lo). */
static void denom_range(const attn_core *c, int64_t b, int64_t r, int64_t *lo, int64_t *hi) {
    const int64_t L = c->L;
    const int64_t pad = c->padding ? clamp64(c->padding[b], 0, L) : 0;
    int64_t a, e;
    if (c->norm == RPC_NORM_CANDIDATES) {
        a = c->start;
        e = c->end;
    } else if (c->norm == RPC_NORM_PAST) {
        a = pad;
        e = c->end;
    } else {
        const int64_t qp = c->qpos[r];
        a = pad;
        e = qp >= L ? L : (qp < 0 ? 0 : qp + 1); /* qp + 1 cannot overflow here */
    }
    *lo = clamp64(a, 0, L);
    *hi = clamp64(e, *lo, L);
}

/* logical row l -> (query head offset g within the KV head, query index r) */
static inline int64_t row_query(const attn_core *c, int64_t l) {
    return c->max_logits ? l : l % c->R;
}

/* Runs the core: returns part [B * Hkv * splits, N] (double, malloc'd) where item (b, kvh, s) holds the sum,
 * over its query rows, of each candidate's probability. */
static int core_run(const attn_core *c, double **part_out, int64_t *splits_out, char *err) {
    const micro_fn micro = pick_micro();
    const int64_t B = c->B, Hkv = c->Hkv, G = c->G, R = c->R, D = c->D, N = c->N, M = c->M;
    const int64_t units = B * Hkv;
    const int64_t nthreads = rpc_max_threads();
    int64_t splits = 1;
    if (units < 2 * nthreads) splits = (2 * nthreads + units - 1) / units;
    int64_t rows_per_item = (M + splits - 1) / splits;
    if (!c->max_logits) rows_per_item = round_up(rows_per_item, PMR);
    splits = (M + rows_per_item - 1) / rows_per_item;
    const int64_t items = units * splits;

    /* The largest span any item can have: the union of every query's range of one sequence. */
    int64_t span_max = 0;
    for (int64_t b = 0; b < B; b++) {
        int64_t lo = c->L, hi = 0;
        for (int64_t r = 0; r < R; r++) {
            int64_t a, e;
            denom_range(c, b, r, &a, &e);
            if (e > a) {
                lo = a < lo ? a : lo;
                hi = e > hi ? e : hi;
            }
        }
        if (hi > lo && hi - lo > span_max) span_max = hi - lo;
    }
    const int64_t npad_max = round_up(span_max > 0 ? span_max : 1, PNR);
    int64_t chunk = LOGIT_BLOCK_BYTES / (npad_max * (int64_t)sizeof(float)) / PMR * PMR;
    if (chunk < PMR) chunk = PMR;
    if (chunk > round_up(rows_per_item, PMR)) chunk = round_up(rows_per_item, PMR);

    double *part = (double *)calloc((size_t)(items * N) + 1, sizeof(double));
    if (!part) return rpc_fail(err, RPC_ERR_NOMEM, "attention scores: out of memory");
    int failed = 0;
    const int parallel = items > 1 && (double)items * (double)rows_per_item * (double)npad_max * (double)D > 1e5;

    RPC_PRAGMA(omp parallel if (parallel))
    {
        float *kp = (float *)malloc((size_t)(npad_max * D) * sizeof(float));
        float *qp = (float *)malloc((size_t)(chunk * D) * sizeof(float));
        float *lg = (float *)malloc((size_t)(chunk * npad_max) * sizeof(float));
        float *lg2 = c->max_logits && G > 1 ? (float *)malloc((size_t)(chunk * npad_max) * sizeof(float)) : NULL;
        int ok = kp && qp && lg && (lg2 || !(c->max_logits && G > 1));
        if (!ok) {
            RPC_PRAGMA(omp atomic write)
            failed = 1;
        }
        RPC_PRAGMA(omp for schedule(dynamic, 1))
        for (int64_t it = 0; it < items; it++) {
            if (!ok) continue;
            const int64_t u = it / splits, s = it % splits;
            const int64_t b = u / Hkv, kvh = u % Hkv;
            const int64_t l0 = s * rows_per_item, l1 = l0 + rows_per_item < M ? l0 + rows_per_item : M;
            double *acc = part + it * N;
            /* span of this item's rows */
            int64_t klo = c->L, khi = 0;
            for (int64_t l = l0; l < l1; l++) {
                int64_t a, e;
                denom_range(c, b, row_query(c, l), &a, &e);
                if (e > a) {
                    klo = a < klo ? a : klo;
                    khi = e > khi ? e : khi;
                }
            }
            if (khi <= klo) continue;
            const int64_t n = khi - klo, npad = round_up(n, PNR);
            const int64_t kbase = b * c->ks[0] + kvh * c->ks[1];
            for (int64_t j = 0; j < npad; j++) {
                if (j < n)
                    pack_row(kp, PNR, j, D, c->k, c->dtype, kbase + (klo + j) * c->ks[2], c->ks[3], 1.0f);
                else
                    pack_zero_row(kp, PNR, j, D);
            }
            for (int64_t c0 = l0; c0 < l1; c0 += chunk) {
                const int64_t c1 = c0 + chunk < l1 ? c0 + chunk : l1;
                const int64_t rows = c1 - c0, rpad = round_up(rows, PMR);
                const int64_t ng = c->max_logits ? G : 1;
                for (int64_t g = 0; g < ng; g++) {
                    for (int64_t i = 0; i < rpad; i++) {
                        if (i >= rows) {
                            pack_zero_row(qp, PMR, i, D);
                            continue;
                        }
                        const int64_t l = c0 + i;
                        const int64_t head = kvh * G + (c->max_logits ? g : l / R);
                        const int64_t r = row_query(c, l);
                        const int64_t qo = b * c->qs[0] + head * c->qs[1] + r * c->qs[2];
                        pack_row(qp, PMR, i, D, c->q, c->dtype, qo, c->qs[3], c->scale);
                    }
                    float *dst = g == 0 ? lg : lg2;
                    panel_product(micro, qp, rpad, kp, npad, D, dst);
                    if (g > 0) {
                        for (int64_t i = 0; i < rows; i++) {
                            float *x = lg + i * npad;
                            const float *y = lg2 + i * npad;
                            for (int64_t j = 0; j < n; j++) x[j] = max_nan(x[j], y[j]);
                        }
                    }
                }
                for (int64_t i = 0; i < rows; i++) {
                    int64_t lo, hi;
                    denom_range(c, b, row_query(c, c0 + i), &lo, &hi);
                    if (hi <= lo) continue;
                    float *x = lg + i * npad;
                    double w;
                    if (!softmax_row(x + (lo - klo), hi - lo, &w)) continue;
                    w *= query_weight(c, row_query(c, c0 + i));
                    const int64_t j0 = lo > c->start ? lo : c->start, j1 = hi < c->end ? hi : c->end;
                    double *accr = acc - c->start;
                    const float *xr = x - klo;
                    RPC_PRAGMA(omp simd)
                    for (int64_t j = j0; j < j1; j++) accr[j] += w * (double)xr[j];
                }
            }
        }
        free(kp);
        free(qp);
        free(lg);
        free(lg2);
    }
    if (failed) {
        free(part);
        return rpc_fail(err, RPC_ERR_NOMEM, "attention scores: out of memory (per-thread scratch)");
    }
    *part_out = part;
    *splits_out = splits;
    return RPC_OK;
}

/* ------------------------------------------------------------------------- window attention scores */

static int check_attn_params(const rpc_attn_params *p, char *err) {
    if (!p || !p->q || !p->k || !p->out) return rpc_fail(err, RPC_ERR_VALUE, "attention scores: null pointer");
    if (!float_dtype(p->dtype))
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->R < 1 || p->D < 1 || p->Hq % p->Hkv != 0)
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: bad sizes (need Hq % Hkv == 0, R >= 1, D >= 1)");
    if (p->start < 0 || p->end <= p->start || p->end > p->L)
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: need 0 <= start < end <= L");
    if (p->kernel_size < 1 || p->kernel_size % 2 == 0)
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: kernel_size must be odd and >= 1");
    if ((unsigned)p->norm > RPC_NORM_CAUSAL || (unsigned)p->gqa > RPC_GQA_MAX_LOGITS ||
        (unsigned)p->reduce > RPC_REDUCE_MEAN || (p->agg != RPC_AGG_ALL && p->agg != RPC_AGG_GROUP) ||
        (p->pool != RPC_POOL_AVG && p->pool != RPC_POOL_MAX))
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: unknown option value");
    if (p->norm == RPC_NORM_CAUSAL && !p->query_positions)
        return rpc_fail(err, RPC_ERR_VALUE, "attention scores: norm causal needs query_positions");
    return RPC_OK;
}

static void core_from_params(const rpc_attn_params *p, attn_core *c) {
    memset(c, 0, sizeof *c);
    c->q = p->q;
    c->k = p->k;
    c->dtype = p->dtype;
    c->B = p->B;
    c->Hq = p->Hq;
    c->Hkv = p->Hkv;
    c->G = p->Hq / p->Hkv;
    c->R = p->R;
    c->D = p->D;
    c->L = p->L;
    c->qs = p->q_stride;
    c->ks = p->k_stride;
    c->start = p->start;
    c->end = p->end;
    c->N = p->end - p->start;
    c->norm = p->norm;
    c->qpos = p->query_positions;
    c->padding = p->padding;
    c->qw = p->query_weights;
    c->max_logits = p->gqa == RPC_GQA_MAX_LOGITS;
    c->scale = p->scale;
    c->M = c->max_logits ? c->R : c->G * c->R;
}

/* What the per-KV-head sums are divided by: heads averaged, times R for a mean over the queries. */
static double attn_divisor(const rpc_attn_params *p) {
    const int64_t G = p->Hq / p->Hkv;
    double d;
    if (p->gqa == RPC_GQA_MEAN_PROBS)
        d = (double)(p->agg == RPC_AGG_ALL ? p->Hq : G);
    else
        d = (double)(p->agg == RPC_AGG_ALL ? p->Hkv : 1);
    if (p->reduce == RPC_REDUCE_MEAN) d *= (double)p->R;
    return d;
}

int rpc_cpu_attn_scores(const rpc_attn_params *p, char *err) {
    int st = check_attn_params(p, err);
    if (st) return st;
    if (p->B == 0) return RPC_OK;
    attn_core c;
    core_from_params(p, &c);
    double *part = NULL;
    int64_t splits = 0;
    st = core_run(&c, &part, &splits, err);
    if (st) return st;
    const int64_t B = p->B, Hkv = p->Hkv, N = c.N;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    double *agg = (double *)malloc((size_t)N * sizeof(double));
    if (!agg) {
        free(part);
        return rpc_fail(err, RPC_ERR_NOMEM, "attention scores: out of memory");
    }
    const double div = attn_divisor(p);
    for (int64_t b = 0; b < B; b++) {
        for (int64_t a = 0; a < A; a++) {
            memset(agg, 0, (size_t)N * sizeof(double));
            const int64_t h0 = A == 1 ? 0 : a, h1 = A == 1 ? Hkv : a + 1;
            for (int64_t h = h0; h < h1; h++)
                for (int64_t s = 0; s < splits; s++) {
                    const double *src = part + ((b * Hkv + h) * splits + s) * N;
                    for (int64_t n = 0; n < N; n++) agg[n] += src[n];
                }
            for (int64_t n = 0; n < N; n++) agg[n] /= div;
            const int64_t o = (b * A + a) * N;
            rpc_pool_row_f64(agg, N, p->pool, p->kernel_size, p->out + o, p->raw ? p->raw + o : NULL);
        }
    }
    free(agg);
    free(part);
    return RPC_OK;
}

/* The oracle's structure, one loop per step: logits over the query's range, softmax, candidates. */
int rpc_cpu_attn_scores_scalar(const rpc_attn_params *p, char *err) {
    int st = check_attn_params(p, err);
    if (st) return st;
    attn_core c;
    core_from_params(p, &c);
    const int64_t B = p->B, Hkv = p->Hkv, G = c.G, R = p->R, D = p->D, L = p->L, N = c.N;
    const int64_t A = p->agg == RPC_AGG_ALL ? 1 : Hkv;
    double *acc = (double *)calloc((size_t)(B * A * N) + 1, sizeof(double));
    float *logit = (float *)malloc((size_t)L * sizeof(float));
    if (!acc || !logit) {
        free(acc);
        free(logit);
        return rpc_fail(err, RPC_ERR_NOMEM, "attention scores: out of memory");
    }
    const int64_t *qs = p->q_stride, *ks = p->k_stride;
    for (int64_t b = 0; b < B; b++) {
        for (int64_t kvh = 0; kvh < Hkv; kvh++) {
            double *row = acc + (b * A + (A == 1 ? 0 : kvh)) * N;
            for (int64_t l = 0; l < c.M; l++) {
                const int64_t r = row_query(&c, l);
                int64_t lo, hi;
                denom_range(&c, b, r, &lo, &hi);
                for (int64_t j = lo; j < hi; j++) {
                    const int64_t ko = b * ks[0] + kvh * ks[1] + j * ks[2];
                    float best = 0.0f;
                    const int64_t g0 = c.max_logits ? 0 : l / R, g1 = c.max_logits ? G : g0 + 1;
                    for (int64_t g = g0; g < g1; g++) {
                        const int64_t qo = b * qs[0] + (kvh * G + g) * qs[1] + r * qs[2];
                        float dot = 0.0f;
                        for (int64_t d = 0; d < D; d++)
                            dot += rpc_load_elem(p->q, qo + d * qs[3], p->dtype) * rpc_load_elem(p->k, ko + d * ks[3], p->dtype);
                        dot *= p->scale;
                        best = g == g0 ? dot : max_nan(best, dot);
                    }
                    logit[j] = best;
                }
                double w;
                if (!softmax_row_plain(logit + lo, hi - lo, &w)) continue;
                w *= query_weight(&c, r);
                for (int64_t j = lo; j < hi; j++)
                    if (j >= p->start && j < p->end) row[j - p->start] += (double)logit[j] * w;
            }
        }
    }
    const double div = attn_divisor(p);
    for (int64_t i = 0; i < B * A; i++) {
        double *row = acc + i * N;
        for (int64_t n = 0; n < N; n++) row[n] /= div;
        rpc_pool_row_f64(row, N, p->pool, p->kernel_size, p->out + i * N, p->raw ? p->raw + i * N : NULL);
    }
    free(acc);
    free(logit);
    return RPC_OK;
}

/* ------------------------------------------------------------------------------ H2O accumulation */

static int check_accumulate_params(const rpc_accumulate_params *p, char *err) {
    if (!p || ((!p->q || !p->k || !p->acc) && p->B > 0 && p->length > 0))
        return rpc_fail(err, RPC_ERR_VALUE, "accumulate: null pointer");
    if (!float_dtype(p->dtype)) return rpc_fail(err, RPC_ERR_VALUE, "accumulate: dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->D < 1 || p->Hq % p->Hkv != 0 || p->length < 0)
        return rpc_fail(err, RPC_ERR_VALUE, "accumulate: bad sizes (need Hq % Hkv == 0, D >= 1, length >= 0)");
    return RPC_OK;
}

/* One query per head, range [pad, length), candidates [0, length): the attention core with R = 1. */
static void core_from_accumulate(const rpc_accumulate_params *p, attn_core *c) {
    memset(c, 0, sizeof *c);
    c->q = p->q;
    c->k = p->k;
    c->dtype = p->dtype;
    c->B = p->B;
    c->Hq = p->Hq;
    c->Hkv = p->Hkv;
    c->G = p->Hq / p->Hkv;
    c->R = 1;
    c->D = p->D;
    c->L = p->length;
    c->qs = p->q_stride;
    c->ks = p->k_stride;
    c->start = 0;
    c->end = p->length;
    c->N = p->length;
    c->norm = RPC_NORM_PAST;
    c->padding = p->padding;
    c->scale = p->scale;
    c->M = c->G;
}

static void add_into_acc(const rpc_accumulate_params *p, int64_t b, int64_t h, const double *sum) {
    const int64_t pad = p->padding ? clamp64(p->padding[b], 0, p->length) : 0;
    float *a = p->acc + b * p->acc_stride[0] + h * p->acc_stride[1];
    for (int64_t j = pad; j < p->length; j++) {
        float *x = a + j * p->acc_stride[2];
        *x = (float)((double)*x + sum[j]);
    }
}

int rpc_cpu_accumulate(const rpc_accumulate_params *p, char *err) {
    int st = check_accumulate_params(p, err);
    if (st) return st;
    if (p->B == 0 || p->length == 0) return RPC_OK;
    attn_core c;
    core_from_accumulate(p, &c);
    double *part = NULL;
    int64_t splits = 0;
    st = core_run(&c, &part, &splits, err);
    if (st) return st;
    const int64_t N = p->length;
    for (int64_t u = 0; u < p->B * p->Hkv; u++) {
        double *sum = part + u * splits * N; /* splits of one unit are adjacent: fold them into the first */
        for (int64_t s = 1; s < splits; s++) {
            const double *src = sum + s * N;
            for (int64_t j = 0; j < N; j++) sum[j] += src[j];
        }
        add_into_acc(p, u / p->Hkv, u % p->Hkv, sum);
    }
    free(part);
    return RPC_OK;
}

int rpc_cpu_accumulate_scalar(const rpc_accumulate_params *p, char *err) {
    int st = check_accumulate_params(p, err);
    if (st) return st;
    const int64_t B = p->B, Hkv = p->Hkv, G = p->Hq / p->Hkv, D = p->D, L = p->length;
    if (B == 0 || L == 0) return RPC_OK;
    double *sum = (double *)malloc((size_t)L * sizeof(double));
    float *logit = (float *)malloc((size_t)L * sizeof(float));
    if (!sum || !logit) {
        free(sum);
        free(logit);
        return rpc_fail(err, RPC_ERR_NOMEM, "accumulate: out of memory");
    }
    const int64_t *qs = p->q_stride, *ks = p->k_stride;
    for (int64_t b = 0; b < B; b++) {
        const int64_t pad = p->padding ? clamp64(p->padding[b], 0, L) : 0;
        for (int64_t h = 0; h < Hkv; h++) {
            memset(sum, 0, (size_t)L * sizeof(double));
            for (int64_t g = 0; g < G; g++) {
                const int64_t qo = b * qs[0] + (h * G + g) * qs[1];
                for (int64_t j = pad; j < L; j++) {
                    const int64_t ko = b * ks[0] + h * ks[1] + j * ks[2];
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++)
                        dot += rpc_load_elem(p->q, qo + d * qs[3], p->dtype) * rpc_load_elem(p->k, ko + d * ks[3], p->dtype);
                    logit[j] = dot * p->scale;
                }
                double w;
                if (!softmax_row_plain(logit + pad, L - pad, &w)) continue;
                for (int64_t j = pad; j < L; j++) sum[j] += (double)logit[j] * w;
            }
            add_into_acc(p, b, h, sum);
        }
    }
    free(sum);
    free(logit);
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------ redundancy */

#define RED_ROWS 32 /* similarity rows per block (multiple of PMR) */

static int check_redundancy_params(const rpc_redundancy_params *p, char *err) {
    if (!p || ((!p->k || !p->out) && p->B * p->Hkv * p->L > 0)) return rpc_fail(err, RPC_ERR_VALUE, "redundancy: null pointer");
    if (!float_dtype(p->dtype)) return rpc_fail(err, RPC_ERR_VALUE, "redundancy: dtype must be float32, float16 or bfloat16");
    if (p->B < 0 || p->Hkv < 0 || p->L < 0 || p->D < 1) return rpc_fail(err, RPC_ERR_VALUE, "redundancy: bad sizes");
    if (isnan(p->threshold)) return rpc_fail(err, RPC_ERR_VALUE, "redundancy: threshold is NaN");
    return RPC_OK;
}

/* kn[i * D + d] = k_i / (|k_i| + 1e-8), the norm in double, for the n keys from position pad. */
static void normalize_keys(const rpc_redundancy_params *p, int64_t b, int64_t h, int64_t pad, int64_t i0, int64_t i1,
                           float *kn) {
    const int64_t D = p->D;
    const int64_t *ks = p->k_stride;
    for (int64_t i = i0; i < i1; i++) {
        const int64_t ko = b * ks[0] + h * ks[1] + (pad + i) * ks[2];
        double ss = 0.0;
        for (int64_t d = 0; d < D; d++) {
            const double v = rpc_load_elem(p->k, ko + d * ks[3], p->dtype);
            ss += v * v;
        }
        const double inv = 1.0 / (sqrt(ss) + 1e-8);
        for (int64_t d = 0; d < D; d++) kn[i * D + d] = (float)(rpc_load_elem(p->k, ko + d * ks[3], p->dtype) * inv);
    }
}

/* Softmax over j of col[j] / n into out[0..n) (double math); a NaN anywhere makes the row NaN, as torch. */
static void redundancy_softmax(const double *col, int64_t n, float *out) {
    double m = -INFINITY;
    int bad = 0;
    for (int64_t j = 0; j < n; j++) {
        const double v = col[j] / (double)n;
        if (isnan(v)) bad = 1;
        if (v > m) m = v;
    }
    if (bad || !isfinite(m)) {
        for (int64_t j = 0; j < n; j++) out[j] = NAN;
        return;
    }
    double s = 0.0;
    for (int64_t j = 0; j < n; j++) s += exp(col[j] / (double)n - m);
    for (int64_t j = 0; j < n; j++) out[j] = (float)(exp(col[j] / (double)n - m) / s);
}

/* Rows [i0, i1) of one head: similarities against all n keys (panels kp), newest above-threshold column
 * per row and the diagonal zeroed, the rows summed into pcol[0..n) (double, overwritten). */
static void redundancy_block(micro_fn micro, const float *kn, const float *kp, int64_t n, int64_t D, int64_t i0,
                             int64_t i1, double thr, float *rp, float *S, double *pcol) {
    const int64_t rows = i1 - i0, rpad = round_up(rows, PMR), npad = round_up(n, PNR);
    for (int64_t i = 0; i < rpad; i++) {
        if (i < rows)
            pack_row_f32(rp, PMR, i, D, kn + (i0 + i) * D);
        else
            pack_zero_row(rp, PMR, i, D);
    }
    panel_product(micro, rp, rpad, kp, npad, D, S);
    memset(pcol, 0, (size_t)n * sizeof(double));
    for (int64_t i = 0; i < rows; i++) {
        float *x = S + i * npad;
        x[i0 + i] = 0.0f; /* the diagonal counts as 0, also for the threshold test */
        int64_t newest = 0;
        for (int64_t j = n - 1; j > 0; j--)
            if ((double)x[j] > thr) {
                newest = j;
                break;
            }
        x[newest] = 0.0f;
        RPC_PRAGMA(omp simd)
        for (int64_t j = 0; j < n; j++) pcol[j] += (double)x[j];
    }
}

int rpc_cpu_redundancy(const rpc_redundancy_params *p, char *err) {
    int st = check_redundancy_params(p, err);
    if (st) return st;
    const int64_t B = p->B, H = p->Hkv, L = p->L, D = p->D;
    if (B * H * L == 0) return RPC_OK;
    memset(p->out, 0, (size_t)(B * H * L) * sizeof(float));
    const micro_fn micro = pick_micro();
    const int64_t units = B * H, nthreads = rpc_max_threads();
    int64_t nmax = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t n = L - (p->padding ? clamp64(p->padding[b], 0, L) : 0);
        nmax = n > nmax ? n : nmax;
    }
    if (nmax == 0) return RPC_OK;
    const int64_t npmax = round_up(nmax, PNR);
    int failed = 0;

    if (units >= nthreads || nthreads == 1) {
        /* One thread per head: everything in per-thread scratch. */
        RPC_PRAGMA(omp parallel if (units > 1 && (double)nmax * (double)nmax * (double)D > 1e5))
        {
            float *kn = (float *)malloc((size_t)(nmax * D) * sizeof(float));
            float *kp = (float *)malloc((size_t)(npmax * D) * sizeof(float));
            float *rp = (float *)malloc((size_t)(RED_ROWS * D) * sizeof(float));
            float *S = (float *)malloc((size_t)(RED_ROWS * npmax) * sizeof(float));
            double *pcol = (double *)malloc((size_t)nmax * sizeof(double));
            double *col = (double *)malloc((size_t)nmax * sizeof(double));
            const int ok = kn && kp && rp && S && pcol && col;
            if (!ok) {
                RPC_PRAGMA(omp atomic write)
                failed = 1;
            }
            RPC_PRAGMA(omp for schedule(dynamic, 1))
            for (int64_t u = 0; u < units; u++) {
                if (!ok) continue;
                const int64_t b = u / H, h = u % H;
                const int64_t pad = p->padding ? clamp64(p->padding[b], 0, L) : 0, n = L - pad;
                if (n == 0) continue;
                normalize_keys(p, b, h, pad, 0, n, kn);
                const int64_t npad = round_up(n, PNR);
                for (int64_t j = 0; j < npad; j++) {
                    if (j < n)
                        pack_row_f32(kp, PNR, j, D, kn + j * D);
                    else
                        pack_zero_row(kp, PNR, j, D);
                }
                memset(col, 0, (size_t)n * sizeof(double));
                for (int64_t i0 = 0; i0 < n; i0 += RED_ROWS) {
                    const int64_t i1 = i0 + RED_ROWS < n ? i0 + RED_ROWS : n;
                    redundancy_block(micro, kn, kp, n, D, i0, i1, p->threshold, rp, S, pcol);
                    for (int64_t j = 0; j < n; j++) col[j] += pcol[j];
                }
                redundancy_softmax(col, n, p->out + u * L + pad);
            }
            free(kn);
            free(kp);
            free(rp);
            free(S);
            free(pcol);
            free(col);
        }
    } else {
        /* Few heads: one head at a time, its row blocks in parallel, block partials summed in order
         * (the same additions as above, so the result does not depend on the thread count). */
        const int64_t nblk_max = (nmax + RED_ROWS - 1) / RED_ROWS;
        float *kn = (float *)malloc((size_t)(nmax * D) * sizeof(float));
        float *kp = (float *)malloc((size_t)(npmax * D) * sizeof(float));
        double *partial = (double *)malloc((size_t)(nblk_max * nmax) * sizeof(double));
        double *col = (double *)malloc((size_t)nmax * sizeof(double));
        if (!kn || !kp || !partial || !col) {
            free(kn);
            free(kp);
            free(partial);
            free(col);
            return rpc_fail(err, RPC_ERR_NOMEM, "redundancy: out of memory");
        }
        for (int64_t u = 0; u < units && !failed; u++) {
            const int64_t b = u / H, h = u % H;
            const int64_t pad = p->padding ? clamp64(p->padding[b], 0, L) : 0, n = L - pad;
            if (n == 0) continue;
            const int64_t npad = round_up(n, PNR), nblk = (n + RED_ROWS - 1) / RED_ROWS;
            RPC_PRAGMA(omp parallel for schedule(static))
            for (int64_t i = 0; i < n; i += 64) normalize_keys(p, b, h, pad, i, i + 64 < n ? i + 64 : n, kn);
            for (int64_t j = 0; j < npad; j++) {
                if (j < n)
                    pack_row_f32(kp, PNR, j, D, kn + j * D);
                else
                    pack_zero_row(kp, PNR, j, D);
            }
            RPC_PRAGMA(omp parallel)
            {
                float *rp = (float *)malloc((size_t)(RED_ROWS * D) * sizeof(float));
                float *S = (float *)malloc((size_t)(RED_ROWS * npad) * sizeof(float));
                const int ok = rp && S;
                if (!ok) {
                    RPC_PRAGMA(omp atomic write)
                    failed = 1;
                }
                RPC_PRAGMA(omp for schedule(dynamic, 1))
                for (int64_t blk = 0; blk < nblk; blk++) {
                    if (!ok) continue;
                    const int64_t i0 = blk * RED_ROWS, i1 = i0 + RED_ROWS < n ? i0 + RED_ROWS : n;
                    redundancy_block(micro, kn, kp, n, D, i0, i1, p->threshold, rp, S, partial + blk * n);
                }
                free(rp);
                free(S);
            }
            if (failed) break;
            RPC_PRAGMA(omp parallel for schedule(static))
            for (int64_t j = 0; j < n; j++) {
                double s = 0.0;
                for (int64_t blk = 0; blk < nblk; blk++) s += partial[blk * n + j];
                col[j] = s;
            }
            redundancy_softmax(col, n, p->out + u * L + pad);
        }
        free(kn);
        free(kp);
        free(partial);
        free(col);
    }
    if (failed) return rpc_fail(err, RPC_ERR_NOMEM, "redundancy: out of memory (per-thread scratch)");
    return RPC_OK;
}

int rpc_cpu_redundancy_scalar(const rpc_redundancy_params *p, char *err) {
    int st = check_redundancy_params(p, err);
    if (st) return st;
    const int64_t B = p->B, H = p->Hkv, L = p->L, D = p->D;
    if (B * H * L == 0) return RPC_OK;
    memset(p->out, 0, (size_t)(B * H * L) * sizeof(float));
    float *kn = (float *)malloc((size_t)(L * D) * sizeof(float));
    float *sim = (float *)malloc((size_t)L * sizeof(float));
    double *col = (double *)malloc((size_t)L * sizeof(double));
    if (!kn || !sim || !col) {
        free(kn);
        free(sim);
        free(col);
        return rpc_fail(err, RPC_ERR_NOMEM, "redundancy: out of memory");
    }
    for (int64_t b = 0; b < B; b++) {
        const int64_t pad = p->padding ? clamp64(p->padding[b], 0, L) : 0, n = L - pad;
        if (n == 0) continue;
        for (int64_t h = 0; h < H; h++) {
            normalize_keys(p, b, h, pad, 0, n, kn);
            memset(col, 0, (size_t)n * sizeof(double));
            for (int64_t i = 0; i < n; i++) {
                int64_t newest = 0;
                for (int64_t j = 0; j < n; j++) {
                    float dot = 0.0f;
                    for (int64_t d = 0; d < D; d++) dot += kn[i * D + d] * kn[j * D + d];
                    sim[j] = j == i ? 0.0f : dot;
                    if ((double)sim[j] > p->threshold) newest = j;
                }
                for (int64_t j = 0; j < n; j++)
                    if (j != i && j != newest) col[j] += sim[j];
            }
            redundancy_softmax(col, n, p->out + (b * H + h) * L + pad);
        }
    }
    free(kn);
    free(sim);
    free(col);
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------ fill scores */

int rpc_cpu_fill_scores(const rpc_fill_params *p, char *err) {
    if (!p) return rpc_fail(err, RPC_ERR_VALUE, "fill_scores: null pointer");
    if (p->kind != RPC_FILL_RECENT && p->kind != RPC_FILL_RANDOM)
        return rpc_fail(err, RPC_ERR_VALUE, "fill_scores: unknown kind");
    if (p->batch < 0 || p->rows < 0 || p->n < 0 || (p->kind == RPC_FILL_RECENT && p->n > ((int64_t)1 << 24)))
        return rpc_fail(err, RPC_ERR_VALUE, "fill_scores: bad sizes");
    const int64_t total_rows = p->batch * p->rows, n = p->n;
    if (total_rows * n == 0) return RPC_OK;
    if (!p->out) return rpc_fail(err, RPC_ERR_VALUE, "fill_scores: null pointer");
    RPC_PRAGMA(omp parallel for schedule(static) if (total_rows > 1 && total_rows * n > 65536))
    for (int64_t row = 0; row < total_rows; row++) {
        float *o = p->out + row * n;
        if (p->kind == RPC_FILL_RECENT) {
            for (int64_t j = 0; j < n; j++) o[j] = (float)j;
        } else {
            for (int64_t j = 0; j < n; j++)
                o[j] = rpc_random_uniform(p->seed, p->layer, p->compression, (uint64_t)row, (uint64_t)j);
        }
    }
    return RPC_OK;
}

/* -------------------------------------------------------------------------- accumulator compaction */

int rpc_cpu_compact_acc(const rpc_acc_compact_params *p, char *err) {
    if (!p || (!p->acc && p->B * p->H * p->L > 0) || (!p->indices && p->keep > 0))
        return rpc_fail(err, RPC_ERR_VALUE, "compact accumulator: null pointer");
    if (p->B < 0 || p->H < 0 || p->start < 0 || p->end < p->start || p->end > p->L || p->keep < 0 ||
        p->keep > p->end - p->start)
        return rpc_fail(err, RPC_ERR_VALUE, "compact accumulator: need 0 <= start <= end <= L and keep <= end - start");
    if (p->A != 1 && p->A != p->H) return rpc_fail(err, RPC_ERR_VALUE, "compact accumulator: A must be 1 or H");
    const int64_t N = p->end - p->start, keep = p->keep, W = p->L - p->end;
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t a = 0; a < p->A; a++) {
            const int64_t *row = p->indices + b * p->idx_stride_b + a * p->idx_stride_a;
            for (int64_t i = 0; i < keep; i++)
                if (row[i] < 0 || row[i] >= N || (i > 0 && row[i] <= row[i - 1]))
                    return rpc_fail(err, RPC_ERR_VALUE,
                                "compact accumulator: indices must be strictly ascending and in [0, end - start)");
        }
    const int64_t *s = p->acc_stride;
    for (int64_t b = 0; b < p->B; b++)
        for (int64_t h = 0; h < p->H; h++) {
            float *x = p->acc + b * s[0] + h * s[1];
            const int64_t *row = p->indices + b * p->idx_stride_b + (p->A == 1 ? 0 : h) * p->idx_stride_a;
            for (int64_t i = 0; i < keep; i++) x[(p->start + i) * s[2]] = x[(p->start + row[i]) * s[2]];
            for (int64_t t = 0; t < W; t++) x[(p->start + keep + t) * s[2]] = x[(p->end + t) * s[2]];
            for (int64_t t = p->start + keep + W; t < p->L; t++) x[t * s[2]] = 0.0f;
        }
    return RPC_OK;
}

/* ------------------------------------------------------------------------------------------- pool */

int rpc_cpu_pool(const float *scores, int64_t rows, int64_t N, rpc_pooling pool, int kernel_size, float *out,
                 char *err) {
    if (rows < 0 || N < 0 || kernel_size < 1 || kernel_size % 2 == 0 || (pool != RPC_POOL_AVG && pool != RPC_POOL_MAX))
        return rpc_fail(err, RPC_ERR_VALUE, "pool: need rows, N >= 0, an odd kernel_size and a known pooling");
    if (rows * N == 0) return RPC_OK;
    if (!scores || !out) return rpc_fail(err, RPC_ERR_VALUE, "pool: NULL pointer");
    for (int64_t r = 0; r < rows; r++)
        for (int64_t n = 0; n < N; n++)
            out[r * N + n] = rpc_pool_at_f32_d(scores + r * N, N, n, kernel_size, pool == RPC_POOL_MAX);
    return RPC_OK;
}
