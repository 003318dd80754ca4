/* copy_cpu.c: strided 4-D copy on the host, used by KVCache.append/record_query and growth.
 *
 * Inputs come from arbitrary producers (transposed, sliced, broadcast with zero strides), so the
 * copy walks the three outer dimensions and moves the innermost one either as one memcpy (both
 * sides contiguous there) or element by element with a fixed-size load/store. The outer loops run
 * in parallel with OpenMP when the copy is large enough to pay for the threads. No Python API here.
 */
#include "rpc.h"

#include <stdio.h>
#include <string.h>

#define RPC_COPY_PARALLEL_BYTES ((int64_t)1 << 20)

#define RPC_COPY_ROW(T)                                                                              \
    do {                                                                                             \
        const T *s_ = (const T *)srow;                                                               \
        T *d_ = (T *)drow;                                                                           \
        for (int64_t i3 = 0; i3 < n3; i3++) {                                                        \
            d_[i3 * ds3] = s_[i3 * ss3];                                                             \
        }                                                                                            \
    } while (0)

int rpc_cpu_copy4d(void *dst, const int64_t dst_stride[4], const void *src, const int64_t src_stride[4],
                   const int64_t shape[4], size_t elem_size, char *err) {
    for (int i = 0; i < 4; i++) {
        if (shape[i] < 0) {
            snprintf(err, RPC_ERR_LEN, "copy4d: negative size %lld in dimension %d", (long long)shape[i], i);
            return RPC_ERR_VALUE;
        }
    }
    if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) {
        snprintf(err, RPC_ERR_LEN, "copy4d: unsupported element size %zu", elem_size);
        return RPC_ERR_VALUE;
    }
    const int64_t n0 = shape[0], n1 = shape[1], n2 = shape[2], n3 = shape[3];
    if (n0 == 0 || n1 == 0 || n2 == 0 || n3 == 0) {
        return RPC_OK;
    }
    const int64_t ds3 = dst_stride[3], ss3 = src_stride[3];
    const int contiguous_rows = ds3 == 1 && ss3 == 1;
    const int64_t total_bytes = n0 * n1 * n2 * n3 * (int64_t)elem_size;
    const int64_t rows = n0 * n1 * n2;
    (void)total_bytes;
#ifdef RPC_PY_WITH_OPENMP
#pragma omp parallel for schedule(static) if (total_bytes >= RPC_COPY_PARALLEL_BYTES)
#endif
    for (int64_t r = 0; r < rows; r++) {
        const int64_t i2 = r % n2;
        const int64_t i1 = (r / n2) % n1;
        const int64_t i0 = r / (n2 * n1);
        const char *srow = (const char *)src +
                           (i0 * src_stride[0] + i1 * src_stride[1] + i2 * src_stride[2]) * (int64_t)elem_size;
        char *drow = (char *)dst +
                     (i0 * dst_stride[0] + i1 * dst_stride[1] + i2 * dst_stride[2]) * (int64_t)elem_size;
        if (contiguous_rows) {
            memcpy(drow, srow, (size_t)n3 * elem_size);
        } else if (elem_size == 2) {
            RPC_COPY_ROW(uint16_t);
        } else if (elem_size == 4) {
            RPC_COPY_ROW(uint32_t);
        } else if (elem_size == 8) {
            RPC_COPY_ROW(uint64_t);
        } else {
            RPC_COPY_ROW(uint8_t);
        }
    }
    return RPC_OK;
}
