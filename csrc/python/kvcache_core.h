/* kvcache_core.h: the KVCache type's internals, shared by its four files (never by other bindings).
 *
 *   kvcache_core.c      what every method builds on: entering/leaving (the busy flag), layer and
 *                       argument checks, storage growth and placement, the device lengths and padding,
 *                       the H2O accumulator's storage
 *   kvcache.c           the type: construction, append/allocate, views, the query ring, padding,
 *                       reset/close, attributes, the method table
 *   kvcache_compress.c  RPC's fused compression and its reused per-device scratch
 *   kvcache_policy.c    what the other policies need: H2O's accumulate, compaction with caller-chosen
 *                       indices, set_length after a compaction done outside (the torch kernels)
 * Calls go kvcache.c -> {kvcache_compress.c, kvcache_policy.c} -> kvcache_core.c, never back up.
 */
#ifndef RPC_PY_KVCACHE_CORE_H
#define RPC_PY_KVCACHE_CORE_H

#include "pyrpc.h"

/* Host copies smaller than this keep the GIL: releasing it costs more than the copy. */
#define RPC_GIL_RELEASE_BYTES ((size_t)1 << 16)
#define RPC_MIN_GROWTH 256

typedef struct {
    int placed;                  /* device fixed (by append, record_query or allocate) */
    rpc_device_type dev_type;
    int dev_id;
    PyObject *storage;           /* owned Storage: K [B,H,cap,D] then V; NULL until first use */
    int64_t cap;                 /* tokens per sequence the storage holds */
    int64_t length;              /* physical tokens */
    int64_t seen;                /* logical tokens appended (compression does not lower it) */
    int64_t generation;          /* bumps on every (re)allocation of storage */
    PyObject *qstorage;          /* owned Storage: query ring [B, Hq, window, D]; NULL until first record */
    int64_t q_recorded;          /* queries recorded since the last reset */
    int64_t q_pos;               /* next ring slot to write */
    PyObject *lenbuf;            /* owned Storage: int64[2 + B] {length, seen, padding[B]} on the layer's
                                    device; the first two follow every length change (kv_sync_lengths),
                                    the padding is written when a kernel needs it (pad_dirty) */
    int pad_dirty;               /* the padding in lenbuf is stale (set_padding / reset since the last write) */
    PyObject *accstorage;        /* owned Storage: float32 H2O accumulator [B, H, cap] (accumulators=True),
                                    allocated, grown and compacted with K/V; zero past `length`; else NULL */
} rpc_layer;

/* Compression scratch of one device (slot 0: host, slot d + 1: cuda:d), shared by every layer placed
 * there: scores, kept indices and the CUDA scoring workspace of one compression. Sized on the first
 * compression for the largest one the layer's capacity allows (a cache preallocated for the schedule's
 * peak never regrows it) and reused, so compressing allocates and frees nothing: on CUDA no
 * cudaMalloc/cudaFree, hence no device sync with the GIL held. Reuse across streams is ordered by
 * `event` (recorded after each use), never by the host. */
typedef struct {
    PyObject *storage;           /* owned Storage, or NULL */
    size_t nbytes;               /* usable bytes of storage */
    void *event;                 /* owned cudaEvent_t (CUDA slots), created with the first block */
    intptr_t stream;             /* stream of the last use */
    int used;                    /* event recorded at least once */
} rpc_scratch;

typedef struct {
    PyObject_HEAD
    int64_t num_layers, B, H, D;
    rpc_dtype dtype;
    int64_t capacity0;           /* constructor capacity (0 = grow from 256) */
    int fixed;                   /* fixed_capacity: never grow */
    int64_t window;              /* query ring length R (0 = no ring) */
    int64_t Hq;                  /* query heads; 0 until fixed by the constructor or first record_query */
    rpc_layer *layers;           /* owned array of num_layers */
    int64_t *padding;            /* owned array of B left-padding counts */
    int closed;
    int busy;                    /* a method is running (possibly without the GIL) */
    int64_t nbytes, peak_nbytes; /* bytes in blocks this cache allocated and still references */
    rpc_scratch *scratch;        /* owned array of n_scratch per-device compression scratch slots */
    int n_scratch;
    int accumulators;            /* each layer keeps an H2O accumulator (constructor accumulators=True) */
} KVCacheObject;

/* Enter a method: refuses an uninitialised, closed or busy cache (returns NULL from the caller). */
#define ENTER(self)                                                                                  \
    do {                                                                                             \
        if (kv_require_init(self) < 0 || kv_enter(self) < 0)                                        \
            return NULL;                                                                             \
    } while (0)

/* ---- kvcache_core.c (0 / a pointer on success; -1 / NULL with a Python exception otherwise) */
size_t kv_elem_size(KVCacheObject *self);
rpc_module_state *kv_state(KVCacheObject *self);
void kv_account(KVCacheObject *self, int64_t delta);
void kv_drop_storage(KVCacheObject *self, PyObject **slot);
int kv_enter(KVCacheObject *self);
void kv_leave(KVCacheObject *self);
int kv_parse_layer(KVCacheObject *self, PyObject *obj, int64_t *out);
int kv_check_4d(KVCacheObject *self, const rpc_tensor *t, const char *argname, int64_t heads);
int kv_check_device(rpc_layer *ly, int64_t layer, const rpc_tensor *t, const char *argname);
int kv_check_cuda_usable(rpc_device_type dt, int dev_id, const char *argname);
int kv_copy4d(rpc_device_type dt, int dev_id, void *dst, const int64_t dst_stride[4], const void *src, const int64_t src_stride[4], const int64_t shape[4], size_t esize, intptr_t stream);
char *kv_layer_k(KVCacheObject *self, rpc_layer *ly);
char *kv_layer_v(KVCacheObject *self, rpc_layer *ly);
void kv_strides(KVCacheObject *self, int64_t cap, int64_t s[4]);
int kv_sync_lengths(KVCacheObject *self, rpc_layer *ly, intptr_t stream);
const int64_t *kv_device_padding(KVCacheObject *self, rpc_layer *ly, intptr_t stream);
void kv_place_layer(rpc_layer *ly, rpc_device_type dt, int dev_id);
int kv_ensure_capacity(KVCacheObject *self, int64_t layer, int64_t needed, int64_t requested, intptr_t stream, const char *what);
int kv_require_init(KVCacheObject *self);
int64_t kv_acc_strides(KVCacheObject *self, int64_t cap, int64_t s[3]);
int kv_acc_grow(KVCacheObject *self, rpc_layer *ly, int64_t newcap, intptr_t stream, PyObject **out);
int kv_acc_params(KVCacheObject *self, rpc_layer *ly, const rpc_compact_params *cp, rpc_acc_compact_params *ap);
int kv_acc_zero(KVCacheObject *self, rpc_layer *ly, intptr_t stream);
int kv_require_accumulators(KVCacheObject *self);
/* The compaction of layer ly's live K/V: candidates [start, end) keep `indices` ([B, A, keep] with the
 * given strides), the window [end, length) follows. */
void kv_compact_params(KVCacheObject *self, rpc_layer *ly, int64_t start, int64_t end, int64_t keep,
                       const int64_t *indices, int64_t A, int64_t idx_stride_b, int64_t idx_stride_a,
                       rpc_compact_params *cp);

/* ---- the methods and helpers the type's table takes from the other files */
void kv_release_scratch(KVCacheObject *self);
PyObject *kv_compress(PyObject *op, PyObject *args, PyObject *kwargs);
PyObject *kv_accumulate(PyObject *op, PyObject *args, PyObject *kwargs);
PyObject *kv_accumulator(PyObject *op, PyObject *layer_obj);
PyObject *kv_compact(PyObject *op, PyObject *args, PyObject *kwargs);
PyObject *kv_set_length(PyObject *op, PyObject *args, PyObject *kwargs);

#endif /* RPC_PY_KVCACHE_CORE_H */
