/* cpu_common.h: the small helpers every CPU kernel file uses, in one place: error messages, element
 * loads from float32/float16/bfloat16 storage, and the thread count. Header-only (static inline), for
 * the kernels/ layer only; no Python API.
 */
#ifndef RPC_PY_CPU_COMMON_H
#define RPC_PY_CPU_COMMON_H

#include "rpc.h"

#include <stdio.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Writes msg into err (RPC_ERR_LEN bytes, may be NULL) and returns status. */
static inline int rpc_fail(char *err, int status, const char *msg) {
    if (err) snprintf(err, RPC_ERR_LEN, "%s", msg);
    return status;
}

/* IEEE half -> float32, exact (subnormals included). */
static inline float rpc_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t u;
    float f;
    if (exp == 0) {
        f = (float)mant * 5.9604644775390625e-8f; /* zero or subnormal: mant * 2^-24, exact in float32 */
        memcpy(&u, &f, 4);
        u |= sign;
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (mant << 13);
    } else {
        u = sign | ((exp + 112u) << 23) | (mant << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

/* bfloat16 -> float32, exact. */
static inline float rpc_bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element `off` of a float32 / float16 / bfloat16 array, as float32. */
static inline float rpc_load_elem(const void *base, int64_t off, rpc_dtype dt) {
    switch (dt) {
    case RPC_F16: return rpc_half_to_float(((const uint16_t *)base)[off]);
    case RPC_BF16: return rpc_bf16_to_float(((const uint16_t *)base)[off]);
    default: return ((const float *)base)[off];
    }
}

static inline int rpc_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

#endif /* RPC_PY_CPU_COMMON_H */
