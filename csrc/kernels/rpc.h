/* rpc.h: the contract between the kernels and everything that calls them.
 *
 * csrc/ holds three layers; each file belongs to one, and calls go downwards only:
 *   python/   the module and its types (CPython + NumPy C API): module.c (module init and its functions),
 *             common.c (status -> exception, names, NumPy results), dlpack_bridge.c (DLPack consumer,
 *             Storage and View), binding_util.c (argument checks, option vocabulary, results and out=),
 *             kvcache*.c (the KVCache type: kvcache_core.c storage, lengths, ring and accumulator;
 *             kvcache.c the type; kvcache_compress.c RPC's compression; kvcache_policy.c the policies'
 *             accumulate/compact), ops_binding.c / policy_binding.c / decode_binding.c (the standalone
 *             functions). Binding code holds no math.
 *   kernels/  pure C and CUDA, no Python API: this header, cpu_isa.c (the one ISA dispatcher),
 *             compress_cpu.c (RPC's scoring, selection, compaction), policy_cpu.c (the other policies'
 *             scores, H2O, pooling alone), decode_cpu.c, copy_cpu.c, and their CUDA twins score_cuda.cu,
 *             select_cuda.cu, compact_cuda.cu, policy_cuda.cu, decode_cuda.cu (cuda_common.cuh: errors
 *             and device guard; mma_common.cuh: cp.async / ldmatrix / mma.sync building blocks).
 *   runtime/  the CUDA runtime shim (cuda_runtime.cu: devices, memory, copies, events) and, in builds
 *             without CUDA, cuda_stub.c, which stands in for every rpc_cuda_* function.
 *
 * Kernels see only the plain structs below: raw pointers, sizes and strides counted in elements.
 * Every kernel/launcher returns 0 on success or a negative rpc_status and writes a message into
 * the caller-provided `err` buffer (RPC_ERR_LEN bytes); the binding turns it into a Python exception.
 * Each kernel has a scalar C reference beside it and a float64 torch oracle in rpc_py/ (reference.py,
 * policy_reference.py, decode_reference.py).
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

/* ---------------------------------------------------------------- CPU kernels (compress_cpu.c, cpu_isa.c) */
int rpc_cpu_score(const rpc_score_params *p, char *err);
int rpc_cpu_score_scalar(const rpc_score_params *p, char *err); /* plain reference, for tests */
int rpc_cpu_select(const rpc_select_params *p, char *err);
int rpc_cpu_compact(const rpc_compact_params *p, char *err);

/* Instruction sets of the CPU kernels' fast paths, chosen at run time by one dispatcher (cpu_isa.c)
 * that every CPU kernel asks. rpc_cpu_isa: the one in use now. rpc_cpu_set_isa: cap the choice (tests
 * use it to run every path on one machine); returns -1 when the CPU lacks that ISA. Not thread-safe:
 * set it while no kernel runs. */
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
/* 2-D memset: `height` rows of `width` bytes, `pitch` bytes apart. */
int rpc_cuda_memset2d_async(int device, void *ptr, size_t pitch, int value, size_t width, size_t height,
                            void *stream, char *err);
/* Writes n <= RPC_SET_INT64S_MAX host values to dst on the stream; the values travel as kernel
 * arguments, so the call neither waits nor needs the host array afterwards. */
#define RPC_SET_INT64S_MAX 32
int rpc_cuda_set_int64s(int device, int64_t *dst, const int64_t *values, int n, void *stream, char *err);
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

/* RPC's 1-D pooling of one row x[0, N) at position n, stride 1, padding k / 2: the one definition
 * every kernel uses (CPU and CUDA; step 7 of docs/algorithm.md). Average pooling divides by the full
 * kernel size (the zero padding counts, as torch's avg_pool1d with count_include_pad=True); max pooling
 * ignores the padding and propagates NaN. T is the row's element type, ACC the type the average sums
 * in; the result is rounded to float32 once. */
#define RPC_DEFINE_POOL_AT(NAME, T, ACC)                                                                    \
    static inline RPC_HOST_DEVICE float NAME(const T *x, int64_t N, int64_t n, int k, int is_max) {        \
        const int64_t h = k / 2;                                                                           \
        const int64_t lo = n - h < 0 ? 0 : n - h;                                                          \
        const int64_t hi = n + h >= N ? N - 1 : n + h;                                                     \
        if (is_max) {                                                                                      \
            T m = x[lo];                                                                                   \
            for (int64_t j = lo + 1; j <= hi; j++) {                                                       \
                if (x[j] > m || x[j] != x[j]) m = x[j]; /* x != x: NaN wins */                             \
            }                                                                                              \
            return (float)m;                                                                               \
        }                                                                                                  \
        ACC s = 0;                                                                                         \
        for (int64_t j = lo; j <= hi; j++) s += (ACC)x[j];                                                  \
        return (float)(s / (ACC)k);                                                                        \
    }
RPC_DEFINE_POOL_AT(rpc_pool_at_f64, double, double) /* the CPU kernels: rows aggregated in double */
RPC_DEFINE_POOL_AT(rpc_pool_at_f32, float, float)   /* the CUDA kernels: rows in float32 */
RPC_DEFINE_POOL_AT(rpc_pool_at_f32_d, float, double) /* rpc_*_pool: float32 rows, summed in double */

#ifndef __CUDACC__
/* Step 7 on one aggregated row (double, N) -> the float32 pooled row (and raw[n] = (float)agg[n] when
 * raw is not NULL): the CPU kernels' loop over rpc_pool_at_f64. */
static inline void rpc_pool_row_f64(const double *agg, int64_t N, rpc_pooling pool, int k, float *out, float *raw) {
    for (int64_t n = 0; n < N; n++) {
        out[n] = rpc_pool_at_f64(agg, N, n, k, pool == RPC_POOL_MAX);
        if (raw) raw[n] = (float)agg[n];
    }
}
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

/* ---------------------------------------------------------------- selection policies (policy_cpu.c,
 * policy_cuda.cu; the float64 oracle is rpc_py/policy_reference.py, docs/design.md "Policy kernels").
 * The score functions of the non-RPC policies: a general window-attention score, R-KV's key
 * redundancy, H2O's accumulated attention, and the data-free recent/random fills. Selection and
 * compaction stay RPC's own (rpc_*_select, rpc_*_compact). */

typedef enum {
    RPC_NORM_CANDIDATES = 0, /* softmax over the candidates [start, end) (RPC) */
    RPC_NORM_PAST = 1,       /* over [padding[b], end): every key older than the window (R-KV) */
    RPC_NORM_CAUSAL = 2      /* over [padding[b], query_positions[r] + 1): what the model computed */
} rpc_attn_norm;
typedef enum {
    RPC_GQA_MEAN_PROBS = 0, /* softmax per query head, then averaged */
    RPC_GQA_MAX_LOGITS = 1  /* the G logits of a KV head max-pooled before one softmax */
} rpc_attn_gqa;
typedef enum { RPC_REDUCE_SUM = 0, RPC_REDUCE_MEAN = 1 } rpc_query_reduce;

/* Window-attention scores of the candidates [start, end) (window_attention_reference). A query whose
 * denominator range is empty, or whose logits in that range hold a NaN or +inf (the oracle's softmax
 * is NaN there), contributes zero. Float32 logits and exp, double accumulation, float32 results. */
typedef struct {
    const void *q;          /* selector queries [B, Hq, R, D], strides q_stride; borrowed */
    const void *k;          /* keys [B, Hkv, L, D], strides k_stride; borrowed */
    rpc_dtype dtype;        /* shared by q and k: F32, F16 or BF16 */
    int64_t B, Hq, Hkv, R, D, L;
    int64_t q_stride[4];    /* elements, >= 0 */
    int64_t k_stride[4];    /* elements, >= 0 */
    int64_t start, end;     /* candidates [start, end), 0 <= start < end <= L; N = end - start */
    const int64_t *query_positions; /* [R] key position of each query (needed by RPC_NORM_CAUSAL, else
                                       may be NULL), on the kernel's device; any value (the range is
                                       clamped to [0, L]) */
    const int64_t *padding; /* [B] left-padding counts or NULL (none), on the kernel's device; the
                               kernels clamp them to [0, L] (CPU callers validate them first) */
    rpc_attn_norm norm;
    rpc_attn_gqa gqa;
    rpc_query_reduce reduce;
    const float *query_weights; /* [R] weight of each query's probabilities before the sum over queries, on
                               the kernel's device, or NULL (every weight 1): how queries are weighted */
    rpc_aggregation agg;    /* A = 1 (ALL) or Hkv (GROUP) */
    rpc_pooling pool;
    int kernel_size;        /* odd, >= 1 (1 = no pooling) */
    float scale;            /* logit scale, usually 1/sqrt(D) */
    float *out;             /* pooled scores [B, A, N], contiguous; written */
    float *raw;             /* optional: the scores before pooling [B, A, N]; may be NULL */
} rpc_attn_params;

/* R-KV key redundancy (redundancy_reference): per (b, kv head), over the valid keys [pad_b, L). */
typedef struct {
    const void *k;          /* keys [B, Hkv, L, D], strides k_stride; borrowed */
    rpc_dtype dtype;
    int64_t B, Hkv, L, D;
    int64_t k_stride[4];    /* elements, >= 0 */
    const int64_t *padding; /* [B] or NULL, on the kernel's device; clamped to [0, L] */
    double threshold;       /* similarity above which a key counts as a near-duplicate (not NaN) */
    float *out;             /* [B, Hkv, L] contiguous; written (0 at padded positions) */
} rpc_redundancy_params;

/* Data-free scores [batch, rows, n] (contiguous float32): RECENT writes j, RANDOM the counter hash
 * rpc_random_uniform(seed, layer, compression, b * rows + a, j). */
typedef enum { RPC_FILL_RECENT = 0, RPC_FILL_RANDOM = 1 } rpc_fill_kind;
typedef struct {
    rpc_fill_kind kind;
    int64_t batch, rows, n; /* >= 0; RECENT needs n <= 2^24 (offsets exact in float32) */
    uint64_t seed, layer, compression;
    float *out;             /* written */
} rpc_fill_params;

/* One decode step of H2O (h2o_accumulate_reference): acc[b, h, j] += sum over the G query heads of KV
 * head h of softmax_j(q . k_j * scale), j in [pad_b, length); acc elsewhere is not written. */
typedef struct {
    const void *q;          /* [B, Hq, 1, D], strides q_stride; borrowed */
    const void *k;          /* [B, Hkv, >= length, D], strides k_stride; borrowed */
    rpc_dtype dtype;        /* shared by q and k */
    int64_t B, Hq, Hkv, D, length;  /* length >= 0 live keys */
    int64_t q_stride[4], k_stride[4];
    const int64_t *padding; /* [B] or NULL, on the kernel's device; clamped to [0, length] */
    float scale;
    float *acc;             /* float32 [B, Hkv, >= length], strides acc_stride; read and written */
    int64_t acc_stride[3];
} rpc_accumulate_params;

/* In-place compaction of a float32 [B, H, L] accumulator with the indices of rpc_compact_params
 * (positions [0, start) stay, start + indices[i] -> start + i, the window [end, L) follows), then
 * positions [start + keep + L - end, L) are zeroed so that tokens appended later start from 0. */
typedef struct {
    float *acc;             /* [B, H, >= L], strides acc_stride; modified in place */
    int64_t B, H, L;
    int64_t acc_stride[3];
    const int64_t *indices; /* [B, A, keep], strictly ascending offsets from start; the CPU kernel checks
                               them, the CUDA kernel skips (never follows) out-of-order ones */
    int64_t A, idx_stride_b, idx_stride_a;
    int64_t start, end, keep;
} rpc_acc_compact_params;

int rpc_cpu_attn_scores(const rpc_attn_params *p, char *err);
int rpc_cpu_attn_scores_scalar(const rpc_attn_params *p, char *err); /* plain reference, for tests */
int rpc_cpu_redundancy(const rpc_redundancy_params *p, char *err);
int rpc_cpu_redundancy_scalar(const rpc_redundancy_params *p, char *err); /* plain reference */
int rpc_cpu_fill_scores(const rpc_fill_params *p, char *err);
/* Pooling alone, of float32 scores [rows, N] (contiguous) into out (may not alias): rpc_pool_at_f32_d
 * per element. Used where scores are pooled after a reduction (tensor parallelism). */
int rpc_cpu_pool(const float *scores, int64_t rows, int64_t N, rpc_pooling pool, int kernel_size, float *out,
                 char *err);
int rpc_cpu_accumulate(const rpc_accumulate_params *p, char *err);
int rpc_cpu_accumulate_scalar(const rpc_accumulate_params *p, char *err); /* plain reference */
int rpc_cpu_compact_acc(const rpc_acc_compact_params *p, char *err);
int rpc_cuda_attn_scores(int device, const rpc_attn_params *p, void *stream, char *err);
int rpc_cuda_redundancy(int device, const rpc_redundancy_params *p, void *stream, char *err);
int rpc_cuda_fill_scores(int device, const rpc_fill_params *p, void *stream, char *err);
int rpc_cuda_pool(int device, const float *scores, int64_t rows, int64_t N, rpc_pooling pool, int kernel_size,
                  float *out, void *stream, char *err);
int rpc_cuda_accumulate(int device, const rpc_accumulate_params *p, void *stream, char *err);
int rpc_cuda_compact_acc(int device, const rpc_acc_compact_params *p, void *stream, char *err);

/* The random policy's counter hash (random_uniform_reference), shared by the CPU and CUDA kernels so
 * both give the same bits: splitmix64's finalizer chained over (seed, layer, compression, row, j);
 * the top 24 bits scaled by 2^-24 are exact in float32. */
static inline RPC_HOST_DEVICE uint64_t rpc_mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static inline RPC_HOST_DEVICE float rpc_random_uniform(uint64_t seed, uint64_t layer, uint64_t compression,
                                                       uint64_t row, uint64_t j) {
    uint64_t h = rpc_mix64(seed);
    h = rpc_mix64(h ^ layer);
    h = rpc_mix64(h ^ compression);
    h = rpc_mix64(h ^ row);
    return (float)(rpc_mix64(h ^ j) >> 40) * (1.0f / 16777216.0f);
}

#ifdef __cplusplus
}
#endif
#endif /* RPC_PY_RPC_H */
