/* decode_cpu.c: CPU kernels of the capture-friendly decode step (see rpc.h, "decode").
 *
 * Three operations, each defined by the positions it reads from `lengths` ({length, seen}) rather
 * than from the host: decode attention of one query token over the live part of a fixed-capacity
 * cache, the append of a step's K/V at position lengths[0], and the query-ring write at slot
 * (seen + offset) mod window. The CUDA versions in decode_cuda.cu follow the same contracts; these
 * are their CPU counterparts and their references.
 *
 * Decode attention comes twice. rpc_cpu_decode_attention_scalar is the plain reference: per query
 * head, scores in double, two passes (max, then exp-sum), nothing shared between heads.
 * rpc_cpu_decode_attention is the working CPU path: one task per (sequence, KV head) converts each key
 * and value row to float once and serves all G = Hq / Hkv query heads from it, with an online
 * (running-max) softmax so that memory stays O(G * D) whatever the length. Accumulation is float32.
 *
 * Semantics shared by every backend: keys [0, padding[b]) are left padding and are masked; keys at
 * or past the live length are ignored; a sequence with no live key gets zeros (SDPA would give NaN).
 */
#include "cpu_common.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------ element conversion */

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN, keep the sign */
    }
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline uint16_t float_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) {
        return (uint16_t)(sign | 0x7e00u);
    }
    if (a >= 0x477ff000u) { /* rounds to >= 65520: infinity */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (a < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (a < 0x33000000u) {
            return (uint16_t)sign;
        }
        uint32_t e = a >> 23;
        uint32_t man = (a & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - e; /* 14..24 */
        uint32_t half = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) {
            half++;
        }
        return (uint16_t)(sign | half);
    }
    uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - ((127u - 15u) << 23);
    return (uint16_t)(sign | (r >> 13));
}

static inline void store_elem(void *base, int64_t i, rpc_dtype dt, float x) {
    switch (dt) {
    case RPC_BF16: ((uint16_t *)base)[i] = float_to_bf16(x); break;
    case RPC_F16: ((uint16_t *)base)[i] = float_to_f16(x); break;
    default: ((float *)base)[i] = x; break;
    }
}

/* Converts a D-long row with unit stride into floats. */
static inline void load_row(const void *base, int64_t off, int64_t D, rpc_dtype dt, float *out) {
    if (dt == RPC_F32) {
        memcpy(out, (const float *)base + off, (size_t)D * sizeof(float));
        return;
    }
    const uint16_t *h = (const uint16_t *)base + off;
    if (dt == RPC_BF16) {
        for (int64_t d = 0; d < D; d++) out[d] = rpc_bf16_to_float(h[d]);
    } else {
        for (int64_t d = 0; d < D; d++) out[d] = rpc_half_to_float(h[d]);
    }
}

/* ------------------------------------------------------------------ checks */

static int check_decode(const rpc_decode_params *p, char *err) {
    if (p->dtype != RPC_F32 && p->dtype != RPC_F16 && p->dtype != RPC_BF16) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: dtype must be float32, float16 or bfloat16");
        return RPC_ERR_VALUE;
    }
    if (p->B < 0 || p->Hq < 1 || p->Hkv < 1 || p->D < 1 || p->cap < 0 || p->Hq % p->Hkv != 0) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: bad sizes B=%lld Hq=%lld Hkv=%lld D=%lld cap=%lld",
                 (long long)p->B, (long long)p->Hq, (long long)p->Hkv, (long long)p->D, (long long)p->cap);
        return RPC_ERR_VALUE;
    }
    if (p->lengths == NULL) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: lengths is NULL");
        return RPC_ERR_VALUE;
    }
    if (p->k_stride[3] != 1 || p->v_stride[3] != 1) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: keys and values need unit stride along head_dim");
        return RPC_ERR_VALUE;
    }
    return RPC_OK;
}

static int64_t live_length(const rpc_decode_params *p) {
    int64_t L = p->lengths[0];
    return L < 0 ? 0 : (L > p->cap ? p->cap : L);
}

static int64_t pad_of(const rpc_decode_params *p, int64_t b, int64_t L) {
    int64_t pad = p->padding != NULL ? p->padding[b] : 0;
    return pad < 0 ? 0 : (pad > L ? L : pad);
}

/* ------------------------------------------------------------------ decode attention: reference */

int rpc_cpu_decode_attention_scalar(const rpc_decode_params *p, char *err) {
    int rc = check_decode(p, err);
    if (rc != RPC_OK) return rc;
    const int64_t L = live_length(p), G = p->Hq / p->Hkv, D = p->D;
    double *s = malloc((size_t)(L > 0 ? L : 1) * sizeof(double));
    if (s == NULL) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: out of memory for %lld scores", (long long)L);
        return RPC_ERR_NOMEM;
    }
    for (int64_t b = 0; b < p->B; b++) {
        const int64_t pad = pad_of(p, b, L);
        for (int64_t h = 0; h < p->Hq; h++) {
            const int64_t kh = h / G;
            const int64_t qo = b * p->q_stride[0] + h * p->q_stride[1];
            const int64_t oo = b * p->out_stride[0] + h * p->out_stride[1];
            double mx = -INFINITY;
            for (int64_t j = pad; j < L; j++) {
                const int64_t ko = b * p->k_stride[0] + kh * p->k_stride[1] + j * p->k_stride[2];
                double dot = 0.0;
                for (int64_t d = 0; d < D; d++) {
                    dot += (double)rpc_load_elem(p->q, qo + d * p->q_stride[2], p->dtype) *
                           (double)rpc_load_elem(p->k, ko + d, p->dtype);
                }
                s[j] = dot * (double)p->scale;
                if (s[j] > mx) mx = s[j];
            }
            double sum = 0.0;
            for (int64_t j = pad; j < L; j++) {
                s[j] = exp(s[j] - mx);
                sum += s[j];
            }
            for (int64_t d = 0; d < D; d++) {
                double acc = 0.0;
                for (int64_t j = pad; j < L; j++) {
                    const int64_t vo = b * p->v_stride[0] + kh * p->v_stride[1] + j * p->v_stride[2];
                    acc += s[j] * (double)rpc_load_elem(p->v, vo + d, p->dtype);
                }
                store_elem(p->out, oo + d * p->out_stride[2], p->dtype, sum > 0.0 ? (float)(acc / sum) : 0.0f);
            }
        }
    }
    free(s);
    return RPC_OK;
}

/* ------------------------------------------------------------------ decode attention: CPU path */

/* One (sequence, KV head): G query heads share each converted K and V row. `buf` holds
 * q[G*D] + acc[G*D] + krow[D] + vrow[D] + m[G] + l[G] floats. */
static void decode_one(const rpc_decode_params *p, int64_t b, int64_t kh, int64_t L, float *buf) {
    const int64_t G = p->Hq / p->Hkv, D = p->D;
    float *q = buf, *acc = q + G * D, *krow = acc + G * D, *vrow = krow + D, *m = vrow + D, *l = m + G;
    for (int64_t g = 0; g < G; g++) {
        const int64_t qo = b * p->q_stride[0] + (kh * G + g) * p->q_stride[1];
        for (int64_t d = 0; d < D; d++) {
            q[g * D + d] = rpc_load_elem(p->q, qo + d * p->q_stride[2], p->dtype) * p->scale;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    memset(acc, 0, (size_t)(G * D) * sizeof(float));
    const int64_t pad = pad_of(p, b, L);
    const int64_t kbase = b * p->k_stride[0] + kh * p->k_stride[1];
    const int64_t vbase = b * p->v_stride[0] + kh * p->v_stride[1];
    for (int64_t j = pad; j < L; j++) {
        load_row(p->k, kbase + j * p->k_stride[2], D, p->dtype, krow);
        load_row(p->v, vbase + j * p->v_stride[2], D, p->dtype, vrow);
        for (int64_t g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float s = 0.0f;
            for (int64_t d = 0; d < D; d++) s += qg[d] * krow[d];
            float *ag = acc + g * D;
            if (s > m[g]) {
                /* New running max: rescale what was accumulated (exp(-inf) = 0 on the first key). */
                const float c = expf(m[g] - s);
                l[g] = l[g] * c + 1.0f;
                for (int64_t d = 0; d < D; d++) ag[d] = ag[d] * c + vrow[d];
                m[g] = s;
            } else {
                const float w = expf(s - m[g]);
                l[g] += w;
                for (int64_t d = 0; d < D; d++) ag[d] += w * vrow[d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t oo = b * p->out_stride[0] + (kh * G + g) * p->out_stride[1];
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < D; d++) {
            store_elem(p->out, oo + d * p->out_stride[2], p->dtype, acc[g * D + d] * inv);
        }
    }
}

int rpc_cpu_decode_attention(const rpc_decode_params *p, char *err) {
    int rc = check_decode(p, err);
    if (rc != RPC_OK) return rc;
    const int64_t L = live_length(p), G = p->Hq / p->Hkv, D = p->D;
    const int64_t tasks = p->B * p->Hkv;
    if (tasks == 0) return RPC_OK; /* nothing to write; G and D may be huge on zero-size tensors */
    if (G > ((int64_t)1 << 30) || D > ((int64_t)1 << 30) || G * D > ((int64_t)1 << 40)) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: %lld query heads per KV head x head_dim %lld is too large",
                 (long long)G, (long long)D);
        return RPC_ERR_NOMEM;
    }
    const size_t per_task = (size_t)(2 * G * D + 2 * D + 2 * G);
    int failed = 0;
#ifdef RPC_PY_WITH_OPENMP
    /* Threads only pay off with enough keys per task. */
#pragma omp parallel if (tasks > 1 && L * tasks >= 4096)
#endif
    {
        float *buf = malloc(per_task * sizeof(float));
        if (buf == NULL) {
#ifdef RPC_PY_WITH_OPENMP
#pragma omp atomic write
#endif
            failed = 1;
        }
#ifdef RPC_PY_WITH_OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t task = 0; task < tasks; task++) {
            if (buf != NULL) decode_one(p, task / p->Hkv, task % p->Hkv, L, buf);
        }
        free(buf);
    }
    if (failed) {
        snprintf(err, RPC_ERR_LEN, "decode_attention: out of memory for the per-thread buffers");
        return RPC_ERR_NOMEM;
    }
    return RPC_OK;
}

/* ------------------------------------------------------------------ append at lengths[0] */

static void copy_rows(void *dst, const int64_t ds[4], const void *src, const int64_t ss[4], int64_t B, int64_t H,
                      int64_t t, int64_t D, int64_t dst_pos, size_t es) {
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            for (int64_t i = 0; i < t; i++) {
                char *drow = (char *)dst + (size_t)(b * ds[0] + h * ds[1] + (dst_pos + i) * ds[2]) * es;
                const char *srow = (const char *)src + (size_t)(b * ss[0] + h * ss[1] + i * ss[2]) * es;
                if (ss[3] == 1 && ds[3] == 1) {
                    memcpy(drow, srow, (size_t)D * es);
                } else {
                    for (int64_t d = 0; d < D; d++) {
                        memcpy(drow + (size_t)(d * ds[3]) * es, srow + (size_t)(d * ss[3]) * es, es);
                    }
                }
            }
        }
    }
}

int rpc_cpu_append_at_length(const rpc_append_params *p, char *err) {
    if (p->lengths == NULL || p->B < 0 || p->H < 0 || p->t < 0 || p->D < 0 || p->cap < 0) {
        snprintf(err, RPC_ERR_LEN, "append_at_length: bad sizes or NULL lengths");
        return RPC_ERR_VALUE;
    }
    const int64_t pos = p->lengths[0];
    if (!rpc_append_fits(pos, p->t, p->cap)) {
        return RPC_OK; /* the documented no-op: nothing written, lengths unchanged */
    }
    const size_t es = rpc_dtype_size(p->dtype);
    if (p->B > 0 && p->H > 0 && p->t > 0 && p->D > 0) { /* empty tensors may carry NULL data pointers */
        copy_rows(p->k_dst, p->dst_stride, p->k_src, p->k_src_stride, p->B, p->H, p->t, p->D, pos, es);
        copy_rows(p->v_dst, p->dst_stride, p->v_src, p->v_src_stride, p->B, p->H, p->t, p->D, pos, es);
    }
    p->lengths[0] = pos + p->t;
    p->lengths[1] = rpc_wrapping_add(p->lengths[1], p->t);
    return RPC_OK;
}

/* ------------------------------------------------------------------ query ring write */

int rpc_cpu_ring_write(const rpc_ring_params *p, char *err) {
    if (p->lengths == NULL || p->window < 1 || p->t < 0 || p->t > p->window) {
        snprintf(err, RPC_ERR_LEN, "ring_write: bad window/tokens or NULL lengths");
        return RPC_ERR_VALUE;
    }
    const size_t es = rpc_dtype_size(p->dtype);
    const int64_t W = p->window;
    const int64_t base = rpc_ring_slot(p->lengths[1], p->offset, W);
    for (int64_t i = 0; i < p->t; i++) {
        const int64_t slot = (base + i) % W;
        for (int64_t b = 0; b < p->B; b++) {
            for (int64_t h = 0; h < p->Hq; h++) {
                char *drow = (char *)p->ring + (size_t)(b * p->ring_stride[0] + h * p->ring_stride[1] +
                                                        slot * p->ring_stride[2]) * es;
                const char *srow = (const char *)p->q + (size_t)(b * p->q_stride[0] + h * p->q_stride[1] +
                                                                 i * p->q_stride[2]) * es;
                for (int64_t d = 0; d < p->D; d++) {
                    memcpy(drow + (size_t)(d * p->ring_stride[3]) * es, srow + (size_t)(d * p->q_stride[3]) * es, es);
                }
            }
        }
    }
    return RPC_OK;
}
