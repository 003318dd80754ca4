/* rpc.h: the one header shared by every file of the rpc_py._C extension.
 *
 * Layering (see README "Design"):
 *   module.c        module init, backend_features, the standalone operator functions (binding only)
 *   dlpack_bridge.c DLPack consumer (any producer -> rpc_tensor) and producer (Storage/View objects)
 *   kvcache.c       the KVCache heap type (bookkeeping, validation, calls into kernels)
 *   compress_cpu.c  CPU kernels (scalar reference + fast path); no Python API in there
 *   *.cu            CUDA kernels and launchers; no Python API in there (cuda_common.cuh: errors and
 *                   device guard; mma_common.cuh: cp.async / ldmatrix / mma.sync building blocks)
 *   cuda_stub.c     stand-ins for the rpc_cuda_* functions when CUDA is not built
 *
 * Kernels see only the plain structs below: raw pointers, sizes and strides counted in elements.
 * Every kernel/launcher returns 0 on success or a negative rpc_status and writes a message into
 * the caller-provided `err` buffer (RPC_ERR_LEN bytes); the binding turns it into a Python exception.
 */
#ifndef RPC_PY_RPC_H
#define RPC_PY_RPC_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define RPC_ERR_LEN 256
#define RPC_MAX_NDIM 8

typedef enum {
    RPC_OK = 0,
    RPC_ERR_VALUE = -1,   /* bad argument -> ValueError */
    RPC_ERR_NOMEM = -2,   /* allocation failed -> MemoryError */
    RPC_ERR_CUDA = -3,    /* CUDA runtime error -> RuntimeError carrying the CUDA message */
    RPC_ERR_NOT_BUILT = -4 /* backend not compiled in -> RuntimeError */
} rpc_status;

typedef enum { RPC_F32 = 0, RPC_F16 = 1, RPC_BF16 = 2, RPC_I64 = 3, RPC_I32 = 4 } rpc_dtype;
typedef enum { RPC_DEV_CPU = 1, RPC_DEV_CUDA = 2 } rpc_device_type; /* = DLPack's kDLCPU/kDLCUDA */
typedef enum { RPC_AGG_ALL = 0, RPC_AGG_GROUP = 1 } rpc_aggregation;
typedef enum { RPC_POOL_AVG = 0, RPC_POOL_MAX = 1 } rpc_pooling;

static inline size_t rpc_dtype_size(rpc_dtype t) {
    switch (t) {
    case RPC_F32: return 4;
    case RPC_F16: return 2;
    case RPC_BF16: return 2;
    case RPC_I64: return 8;
    case RPC_I32: return 4;
    }
    return 0;
}

/* A borrowed view of someone else's memory, as described by a DLPack tensor (byte_offset applied). */
typedef struct {
    void *data;                       /* first element; owned by the producer */
    rpc_device_type device_type;
    int device_id;
    rpc_dtype dtype;
    int ndim;
    int64_t shape[RPC_MAX_NDIM];
    int64_t strides[RPC_MAX_NDIM];    /* in elements, always filled (C-contiguous when producer gave NULL) */
    int readonly;                     /* DLPack READ_ONLY flag (numpy read-only arrays) */
} rpc_tensor;

/* ---------------------------------------------------------------- scoring (steps 1-7) */
typedef struct {
    const void *q;          /* selector queries [B, Hq, R, D] */
    const void *k;          /* keys [B, Hkv, L, D] */
    rpc_dtype dtype;        /* shared by q and k: F32, F16 or BF16 */
    int64_t B, Hq, Hkv, R, D;
    int64_t q_stride[4];    /* elements */
    int64_t k_stride[4];    /* elements */
    int64_t start, end;     /* candidates are key positions [start, end); N = end - start >= 1 */
    rpc_aggregation agg;    /* A = 1 (ALL) or Hkv (GROUP) */
    rpc_pooling pool;
    int kernel_size;        /* odd, >= 1 */
    float scale;            /* logit scale, 1/sqrt(D) */
    float *out;             /* pooled scores [B, A, N], contiguous, float32; written */
    float *raw;             /* optional: aggregated scores before pooling [B, A, N]; may be NULL */
    void *workspace;        /* CUDA: scratch of rpc_cuda_score_workspace() bytes, 256-byte aligned, owned by
                               the caller (the launcher allocates nothing, so it never syncs); CPU: unused */
    size_t workspace_bytes;
    int version;            /* CUDA kernels: 0 automatic, 1 (WMMA / fp32) or 2 (mma.sync, fp16/bf16) */
} rpc_score_params;

/* ---------------------------------------------------------------- selection (step 8) */
typedef struct {
    const float *scores;    /* [rows, N] contiguous (rows = B * A) */
    int64_t rows, N, keep;  /* 0 <= keep <= N */
    int64_t *indices;       /* [rows, keep] contiguous, written: top-`keep` by score (ties -> lower index),
                               then sorted ascending. NaN ranks below every number. */
} rpc_select_params;

/* ---------------------------------------------------------------- compaction (step 9) */
typedef struct {
    void *k;                /* [B, H, L, D], modified in place */
    void *v;                /* [B, H, L, D], modified in place */
    rpc_dtype dtype;        /* shared by k and v */
    int64_t B, H, L, D;
    int64_t k_stride[4], v_stride[4];    /* elements; the D stride must be 1 */
    const int64_t *indices; /* [B, A, keep]: candidate offsets (0-based from `start`), strictly ascending */
    int64_t A;              /* 1: every head uses row [b, 0]; H: head h uses row [b, h] */
    int64_t idx_stride_b, idx_stride_a;  /* elements */
    int64_t start;          /* protected prefix [0, start) stays */
    int64_t end;            /* recent window [end, L) moves to [start + keep, start + keep + L - end) */
    int64_t keep;
} rpc_compact_params;

/* ---------------------------------------------------------------- CPU kernels (compress_cpu.c) */
int rpc_cpu_score(const rpc_score_params *p, char *err);
int rpc_cpu_score_scalar(const rpc_score_params *p, char *err); /* plain reference, for tests */
int rpc_cpu_select(const rpc_select_params *p, char *err);
int rpc_cpu_compact(const rpc_compact_params *p, char *err);

/* Instruction sets of the fast CPU scoring path, chosen at run time (compress_cpu.c).
 * rpc_cpu_isa: the one rpc_cpu_score uses now. rpc_cpu_set_isa: cap the choice (tests use it to run
 * every path on one machine); returns -1 when the CPU lacks that ISA. Not thread-safe: set it while
 * no scoring runs. */
enum { RPC_CPU_ISA_GENERIC = 0, RPC_CPU_ISA_AVX2 = 1, RPC_CPU_ISA_AVX512 = 2 };
int rpc_cpu_isa(void);
int rpc_cpu_set_isa(int isa);
const char *rpc_cpu_isa_name(int isa);

/* Strided copy of a 4-D tensor (used by append / record_query): dst[i] = src[i], both on the host. */
int rpc_cpu_copy4d(void *dst, const int64_t dst_stride[4], const void *src, const int64_t src_stride[4],
                   const int64_t shape[4], size_t elem_size, char *err);

/* ---------------------------------------------------------------- CUDA (the .cu files in csrc, or cuda_stub.c)
 * `stream` is a cudaStream_t passed as void* (NULL = legacy default stream) so that C files need
 * no CUDA headers. All work is enqueued on that stream; nothing synchronizes unless stated. */
int rpc_cuda_built(void);                        /* 1 when compiled with nvcc */
int rpc_cuda_device_count(int *count, char *err);/* 0 devices is not an error */
int rpc_cuda_malloc(int device, size_t nbytes, void **ptr, char *err);
int rpc_cuda_free(int device, void *ptr, char *err);
int rpc_cuda_memset_async(int device, void *ptr, int value, size_t nbytes, void *stream, char *err);
int rpc_cuda_memcpy_h2d_async(int device, void *dst, const void *src, size_t nbytes, void *stream, char *err);
int rpc_cuda_memcpy_d2h(int device, void *dst, const void *src, size_t nbytes, void *stream, char *err); /* syncs stream */
int rpc_cuda_copy4d(int device, void *dst, const int64_t dst_stride[4], const void *src,
                    const int64_t src_stride[4], const int64_t shape[4], size_t elem_size, void *stream,
                    char *err);
int rpc_cuda_score(int device, const rpc_score_params *p, void *stream, char *err);
/* Workspace bytes rpc_cuda_score needs for these sizes on `device` (reads device attributes only; no
 * allocation, no sync). Non-decreasing in the number of candidates N, so a workspace sized for the
 * largest N a cache can hold serves every smaller compression. */
int rpc_cuda_score_workspace(int device, const rpc_score_params *p, size_t *bytes, char *err);
int rpc_cuda_select(int device, const rpc_select_params *p, void *stream, char *err);
int rpc_cuda_compact(int device, const rpc_compact_params *p, void *stream, char *err);
int rpc_cuda_stream_synchronize(int device, void *stream, char *err);
/* Events (cudaEvent_t as void*, timing disabled) order the reuse of a scratch buffer across streams
 * without a host sync: record after the last use, make the next stream wait on it. */
int rpc_cuda_event_create(int device, void **event, char *err);
int rpc_cuda_event_destroy(int device, void *event, char *err);
int rpc_cuda_event_record(int device, void *event, void *stream, char *err);
int rpc_cuda_stream_wait_event(int device, void *stream, void *event, char *err);


/* ---------------------------------------------------------------- decode (decode_cpu.c, decode_cuda.cu)
 * Capture-friendly decode step: every position these kernels use is read from a `lengths` array
 * (a KVCache layer's device_lengths: int64 {length, seen}) in the memory of the kernel's device, never
 * passed from the host, so one launch sequence recorded in a CUDA graph stays right while the cache
 * grows and is compacted in place between replays. */

/* Decode attention: one query token per sequence against the live keys [pad_b, lengths[0]) of each
 * sequence b (left padding masked, the rest of the capacity ignored). GQA: query head h reads KV head
 * h / (Hq / Hkv). A sequence with no live key gets a zero output. */
typedef struct {
    const void *q;            /* [B, Hq, D] (the q_len = 1 token), strides q_stride */
    const void *k, *v;        /* [B, Hkv, cap, D], strides k_stride / v_stride; D stride 1 */
    void *out;                /* [B, Hq, D], strides out_stride; written */
    rpc_dtype dtype;          /* shared by q, k, v and out: F32, F16 or BF16 */
    int64_t B, Hq, Hkv, D, cap;
    int64_t q_stride[3], out_stride[3], k_stride[4], v_stride[4]; /* elements */
    const int64_t *lengths;   /* lengths[0] = live length (clamped to cap); on the kernel's device */
    const int64_t *padding;   /* [B] left-padding counts on the kernel's device, or NULL (none) */
    float scale;              /* logit scale, usually 1/sqrt(D) */
    int64_t splits;           /* CUDA: sequence splits per (b, kv head); from rpc_decode_splits. CPU: unused */
    float *workspace;         /* CUDA: rpc_decode_workspace_floats(...) floats; CPU: unused (may be NULL) */
    int version;              /* CUDA kernel: 0 automatic (v2 for fp16/bf16, v1 for fp32), 1 or 2. CPU: unused */
} rpc_decode_params;

/* Default number of sequence splits for the CUDA decode kernels: about 2048 CTAs per launch (the v2
 * kernel runs two per SM, so ~8 waves on 132 SMs: the last, partial wave costs little) without
 * splitting below 256 tokens of capacity (a CTA streams at least 16 of its 16-key tiles per warp pair,
 * which keeps its pipeline prologue and its partial write small next to the K/V it reads). A pure
 * function of the shape so that Python can size the workspace once, before capture. */
static inline int64_t rpc_decode_splits(int64_t B, int64_t Hq, int64_t Hkv, int64_t cap) {
    int64_t groups = (Hq / (Hkv > 0 ? Hkv : 1) + 15) / 16; /* CTAs per KV head (16 query heads each) */
    int64_t blocks = B * Hkv * (groups > 0 ? groups : 1);
    int64_t s = (2048 + blocks - 1) / (blocks > 0 ? blocks : 1);
    int64_t most = (cap + 255) / 256;
    if (s > most) s = most;
    if (s > 1024) s = 1024;
    return s < 1 ? 1 : s;
}

/* Floats of workspace the CUDA decode kernel needs: per (b, query head, split) D partial sums, max, sum. */
static inline int64_t rpc_decode_workspace_floats(int64_t B, int64_t Hq, int64_t D, int64_t splits) {
    return B * Hq * splits * (D + 2);
}

/* Append t tokens at the position lengths[0], then lengths[0] += t and lengths[1] += t (on the device).
 * Tokens that would land at or past `cap` are not written and the lengths stay unchanged: the
 * caller (which knows the schedule) must keep the cache within capacity. */
typedef struct {
    void *k_dst, *v_dst;          /* [B, H, cap, D] storage, strides dst_stride (shared by K and V) */
    const void *k_src, *v_src;    /* [B, H, t, D], strides k_src_stride / v_src_stride */
    rpc_dtype dtype;
    int64_t B, H, t, D, cap;
    int64_t dst_stride[4], k_src_stride[4], v_src_stride[4]; /* elements */
    int64_t *lengths;             /* {length, seen}, read and updated */
} rpc_append_params;

/* Query ring write: token i of q (i < t <= window) goes to slot (lengths[1] + offset + i) mod window.
 * lengths is only read. `offset` lets the caller continue the ring where the host left it. */
typedef struct {
    void *ring;                   /* [B, Hq, window, D], strides ring_stride */
    const void *q;                /* [B, Hq, t, D], strides q_stride */
    rpc_dtype dtype;
    int64_t B, Hq, t, D, window, offset;
    int64_t ring_stride[4], q_stride[4];
    const int64_t *lengths;
} rpc_ring_params;

int rpc_cpu_decode_attention(const rpc_decode_params *p, char *err);
int rpc_cpu_decode_attention_scalar(const rpc_decode_params *p, char *err); /* plain reference, for tests */
int rpc_cpu_append_at_length(const rpc_append_params *p, char *err);
int rpc_cpu_ring_write(const rpc_ring_params *p, char *err);
int rpc_cuda_decode_attention(int device, const rpc_decode_params *p, void *stream, char *err);
int rpc_cuda_append_at_length(int device, const rpc_append_params *p, void *stream, char *err);
int rpc_cuda_ring_write(int device, const rpc_ring_params *p, void *stream, char *err);

/* ---------------------------------------------------------------- position arithmetic shared by the
 * CPU and CUDA decode kernels, so both treat corrupt or extreme device lengths the same way. */
#ifdef __CUDACC__
#define RPC_HOST_DEVICE __host__ __device__
#else
#define RPC_HOST_DEVICE
#endif

/* 1 when `t` tokens fit at position `pos` of a buffer of `cap` tokens. Written as pos <= cap - t,
 * not pos + t <= cap: a corrupt pos near INT64_MAX must not wrap into range. */
static inline RPC_HOST_DEVICE int rpc_append_fits(int64_t pos, int64_t t, int64_t cap) {
    return pos >= 0 && pos <= cap - t;
}

/* a + b with int64 wrap-around (as torch's int64 arithmetic), without signed-overflow UB. */
static inline RPC_HOST_DEVICE int64_t rpc_wrapping_add(int64_t a, int64_t b) {
    return (int64_t)((uint64_t)a + (uint64_t)b);
}

/* (seen + offset) mod window in [0, window), without overflow: each term is reduced first. */
static inline RPC_HOST_DEVICE int64_t rpc_ring_slot(int64_t seen, int64_t offset, int64_t window) {
    int64_t a = seen % window, b = offset % window;
    if (a < 0) a += window;
    if (b < 0) b += window;
    return (a + b) % window;
}

#ifdef __cplusplus
}
#endif
#endif /* RPC_PY_RPC_H */
