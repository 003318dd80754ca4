/* kvcache.c: the KVCache heap type: per-layer key/value storage, query rings and compression calls.
 *
 * Bookkeeping and validation only; the arithmetic lives in the kernels (copy4d, score, select,
 * compact) that this file calls with plain structs. Each layer owns one Storage block holding K then
 * V, each [B, H, capacity, D] C-contiguous, so the physical layout is what attention kernels expect
 * and a single reallocation moves both. Views hold the Storage they came from, so growth never
 * invalidates memory anybody still points at (the old block becomes a snapshot).
 *
 * A layer is placed on a device (CPU or one CUDA device) by its first append, record_query or
 * allocate; afterwards every input must live there. CUDA work goes on the caller's stream.
 *
 * Concurrency: methods that copy or compute release the GIL, so a `busy` flag (set and cleared while
 * holding the GIL) makes a second thread fail fast instead of racing on the same buffers.
 */
#include "pyrpc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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
                                    device; the first two follow every length change (sync_lengths),
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

/* Accumulator helpers (section "policy support" below). */
static int acc_grow(KVCacheObject *self, rpc_layer *ly, int64_t newcap, intptr_t stream, PyObject **out);
static int acc_params(KVCacheObject *self, rpc_layer *ly, const rpc_compact_params *cp, rpc_acc_compact_params *ap);
static int acc_zero(KVCacheObject *self, rpc_layer *ly, intptr_t stream);

/* ------------------------------------------------------------------ small helpers */

static size_t elem_size(KVCacheObject *self) {
    return rpc_dtype_size(self->dtype);
}

static rpc_module_state *cache_state(KVCacheObject *self) {
    return rpc_get_state_from_type(Py_TYPE(self));
}

static void account(KVCacheObject *self, int64_t delta) {
    self->nbytes += delta;
    if (self->nbytes > self->peak_nbytes) {
        self->peak_nbytes = self->nbytes;
    }
}

static void drop_storage(KVCacheObject *self, PyObject **slot) {
    if (*slot != NULL) {
        account(self, -(int64_t)rpc_storage_nbytes(*slot));
        Py_CLEAR(*slot);
    }
}

/* Enter/leave a method: refuses closed or busy caches. */
static int cache_enter(KVCacheObject *self) {
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache is in use by another thread");
        return -1;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is closed");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void cache_leave(KVCacheObject *self) {
    self->busy = 0;
}

static int parse_layer(KVCacheObject *self, PyObject *obj, int64_t *out) {
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "layer: expected an int, got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
            return -1;
        }
        PyErr_Clear();
        v = -1;
    }
    if (v < 0 || v >= self->num_layers) {
        PyErr_Format(PyExc_IndexError, "layer: index %lld out of range for a cache of %lld layers", v,
                     (long long)self->num_layers);
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

/* Checks a [B, heads, t, D] input in the cache dtype; heads < 0 means "any". */
static int check_4d(KVCacheObject *self, const rpc_tensor *t, const char *argname, int64_t heads) {
    if (t->ndim != 4) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 4-D tensor [batch, heads, tokens, head_dim], got %d-D",
                     argname, t->ndim);
        return -1;
    }
    if (t->shape[0] != self->B || (heads >= 0 && t->shape[1] != heads) || t->shape[3] != self->D) {
        char got[160];
        rpc_format_dims(got, sizeof got, t->shape, 4);
        if (heads >= 0) {
            PyErr_Format(PyExc_ValueError, "%s: expected shape [%lld, %lld, *, %lld], got %s", argname,
                         (long long)self->B, (long long)heads, (long long)self->D, got);
        } else {
            PyErr_Format(PyExc_ValueError, "%s: expected shape [%lld, *, *, %lld], got %s", argname,
                         (long long)self->B, (long long)self->D, got);
        }
        return -1;
    }
    if (t->dtype != self->dtype) {
        PyErr_Format(PyExc_ValueError, "%s: expected dtype %s (the cache dtype), got %s", argname,
                     rpc_dtype_name(self->dtype), rpc_dtype_name(t->dtype));
        return -1;
    }
    if (rpc_check_no_negative_strides(t, argname) < 0) {
        return -1;
    }
    if (t->data == NULL && t->shape[0] * t->shape[1] * t->shape[2] * t->shape[3] > 0) {
        PyErr_Format(PyExc_ValueError, "%s: tensor has a NULL data pointer", argname);
        return -1;
    }
    return 0;
}

static int check_device(rpc_layer *ly, int64_t layer, const rpc_tensor *t, const char *argname) {
    if (!ly->placed) {
        return 0;
    }
    if (t->device_type != ly->dev_type || (t->device_type == RPC_DEV_CUDA && t->device_id != ly->dev_id)) {
        char want[48], got[48];
        rpc_format_device(want, sizeof want, ly->dev_type, ly->dev_id);
        rpc_format_device(got, sizeof got, t->device_type, t->device_id);
        PyErr_Format(PyExc_ValueError, "%s: expected a tensor on %s (the device of layer %lld), got %s", argname,
                     want, (long long)layer, got);
        return -1;
    }
    return 0;
}

static int check_cuda_usable(rpc_device_type dt, int dev_id, const char *argname) {
    if (dt != RPC_DEV_CUDA) {
        return 0;
    }
    if (!rpc_cuda_built()) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s: CUDA requested but rpc_py was built without CUDA (reinstall with nvcc, RPC_PY_CUDA=1)",
                     argname);
        return -1;
    }
    if (dev_id < 0) {
        PyErr_Format(PyExc_ValueError, "%s: bad CUDA device id %d", argname, dev_id);
        return -1;
    }
    char err[RPC_ERR_LEN] = {0};
    int count = 0;
    int rc = rpc_cuda_device_count(&count, err);
    if (rc != RPC_OK) {
        return rpc_raise_status_int(rc, err);
    }
    if (dev_id >= count) {
        PyErr_Format(PyExc_RuntimeError, "%s: cuda:%d requested but %d CUDA device(s) are usable", argname, dev_id,
                     count);
        return -1;
    }
    return 0;
}

/* Strided copy on the layer's device; releases the GIL for anything nontrivial. */
static int copy4d(rpc_device_type dt, int dev_id, void *dst, const int64_t dst_stride[4], const void *src,
                  const int64_t src_stride[4], const int64_t shape[4], size_t esize, intptr_t stream) {
    char err[RPC_ERR_LEN] = {0};
    int rc;
    size_t bytes = (size_t)(shape[0] * shape[1] * shape[2] * shape[3]) * esize;
    if (dt == RPC_DEV_CUDA || bytes >= RPC_GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        if (dt == RPC_DEV_CUDA) {
            rc = rpc_cuda_copy4d(dev_id, dst, dst_stride, src, src_stride, shape, esize, (void *)stream, err);
        } else {
            rc = rpc_cpu_copy4d(dst, dst_stride, src, src_stride, shape, esize, err);
        }
        Py_END_ALLOW_THREADS
    } else {
        rc = rpc_cpu_copy4d(dst, dst_stride, src, src_stride, shape, esize, err);
    }
    if (rc != RPC_OK) {
        return rpc_raise_status_int(rc, err);
    }
    return 0;
}

static char *layer_k(KVCacheObject *self, rpc_layer *ly) {
    (void)self;
    return (char *)rpc_storage_data(ly->storage);
}

static char *layer_v(KVCacheObject *self, rpc_layer *ly) {
    return (char *)rpc_storage_data(ly->storage) + (size_t)(self->B * self->H * ly->cap * self->D) * elem_size(self);
}

static void kv_strides(KVCacheObject *self, int64_t cap, int64_t s[4]) {
    s[0] = self->H * cap * self->D;
    s[1] = cap * self->D;
    s[2] = self->D;
    s[3] = 1;
}

/* Pushes {length, seen} into the layer's lenbuf (host: direct store; CUDA: a one-thread kernel with the
 * values as arguments, ordered on the stream: no copy from pageable memory, no wait). */
static int sync_lengths(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
    (void)self;
    if (ly->lenbuf == NULL) {
        return 0;
    }
    const int64_t values[2] = {ly->length, ly->seen};
    if (ly->dev_type == RPC_DEV_CPU) {
        memcpy(rpc_storage_data(ly->lenbuf), values, sizeof values);
        return 0;
    }
    char err[RPC_ERR_LEN] = {0};
    int rc = rpc_cuda_set_int64s(ly->dev_id, (int64_t *)rpc_storage_data(ly->lenbuf), values, 2, (void *)stream, err);
    if (rc != RPC_OK) {
        return rpc_raise_status_int(rc, err);
    }
    return 0;
}

/* The left-padding counts on the layer's device (after {length, seen} in lenbuf), written on the stream
 * when stale: once per set_padding/reset, not once per kernel call. NULL with an exception on failure. */
static const int64_t *device_padding(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
    if (ly->lenbuf == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache: layer has no device lengths block");
        return NULL;
    }
    int64_t *pad = (int64_t *)rpc_storage_data(ly->lenbuf) + 2;
    if (!ly->pad_dirty) {
        return pad;
    }
    if (ly->dev_type == RPC_DEV_CPU) {
        memcpy(pad, self->padding, (size_t)self->B * sizeof(int64_t));
    } else {
        char err[RPC_ERR_LEN] = {0};
        for (int64_t i = 0; i < self->B; i += RPC_SET_INT64S_MAX) {
            const int64_t n = self->B - i < RPC_SET_INT64S_MAX ? self->B - i : RPC_SET_INT64S_MAX;
            int rc = rpc_cuda_set_int64s(ly->dev_id, pad + i, self->padding + i, (int)n, (void *)stream, err);
            if (rc != RPC_OK) {
                rpc_raise_status(rc, err);
                return NULL;
            }
        }
    }
    ly->pad_dirty = 0;
    return pad;
}

static void place_layer(rpc_layer *ly, rpc_device_type dt, int dev_id) {
    if (!ly->placed) {
        ly->placed = 1;
        ly->dev_type = dt;
        ly->dev_id = dt == RPC_DEV_CPU ? 0 : dev_id;
    }
}

/* Makes sure the layer's K/V block holds at least `needed` tokens; `what` names the caller's argument. */
static int ensure_capacity(KVCacheObject *self, int64_t layer, int64_t needed, int64_t requested,
                           intptr_t stream, const char *what) {
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage != NULL && needed <= ly->cap && requested <= ly->cap) {
        return 0;
    }
    int64_t newcap;
    if (self->fixed && requested <= 0) {
        /* A fixed cache never grows by itself: allocate exactly its capacity, refuse to overflow it. */
        int64_t limit = ly->storage != NULL ? ly->cap : self->capacity0;
        if (needed > limit) {
            PyErr_Format(PyExc_ValueError,
                         "%s: layer %lld needs %lld tokens, over the fixed capacity %lld (fixed_capacity=True)",
                         what, (long long)layer, (long long)needed, (long long)limit);
            return -1;
        }
        newcap = limit;
    } else if (ly->storage == NULL) {
        if (requested > 0) {
            newcap = requested > needed ? requested : needed;
        } else if (self->capacity0 > 0) {
            newcap = self->capacity0 > needed ? self->capacity0 : needed;
        } else {
            newcap = needed > RPC_MIN_GROWTH ? needed : RPC_MIN_GROWTH;
        }
    } else if (requested > ly->cap && requested >= needed) {
        newcap = requested;
    } else {
        newcap = 2 * ly->cap;
        if (newcap < needed) {
            newcap = needed;
        }
        if (newcap < RPC_MIN_GROWTH) {
            newcap = RPC_MIN_GROWTH;
        }
    }
    size_t es = elem_size(self);
    /* Overflow guard: B*H*cap*D*2 elements must fit in size_t. */
    double total = 2.0 * (double)self->B * (double)self->H * (double)newcap * (double)self->D * (double)es;
    if (total > 9.0e18) {
        PyErr_Format(PyExc_ValueError, "%s: capacity %lld is too large", what, (long long)newcap);
        return -1;
    }
    size_t nbytes = (size_t)(2 * self->B * self->H * newcap * self->D) * es;
    PyObject *storage = rpc_storage_new(cache_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
    if (storage == NULL) {
        return -1;
    }
    account(self, (int64_t)nbytes);
    if (ly->storage != NULL && ly->length > 0) {
        int64_t ds[4], ss[4];
        kv_strides(self, newcap, ds);
        kv_strides(self, ly->cap, ss);
        int64_t shape[4] = {self->B, self->H, ly->length, self->D};
        char *nk = (char *)rpc_storage_data(storage);
        char *nv = nk + (size_t)(self->B * self->H * newcap * self->D) * es;
        if (copy4d(ly->dev_type, ly->dev_id, nk, ds, layer_k(self, ly), ss, shape, es, stream) < 0 ||
            copy4d(ly->dev_type, ly->dev_id, nv, ds, layer_v(self, ly), ss, shape, es, stream) < 0) {
            account(self, -(int64_t)nbytes);
            Py_DECREF(storage);
            return -1;
        }
    }
    PyObject *acc = NULL; /* grown (and copied) before the swap, so a failure leaves the layer as it was */
    if (self->accumulators && acc_grow(self, ly, newcap, stream, &acc) < 0) {
        account(self, -(int64_t)nbytes);
        Py_DECREF(storage);
        return -1;
    }
    drop_storage(self, &ly->storage);
    ly->storage = storage;
    if (acc != NULL) {
        drop_storage(self, &ly->accstorage);
        ly->accstorage = acc;
    }
    ly->cap = newcap;
    ly->generation += 1;
    if (ly->lenbuf == NULL) {
        PyObject *lb = rpc_storage_new(cache_state(self), ly->dev_type, ly->dev_id,
                                       (size_t)(2 + self->B) * sizeof(int64_t), stream);
        if (lb == NULL) {
            return -1;
        }
        ly->lenbuf = lb;
        ly->pad_dirty = 1;
        if (sync_lengths(self, ly, stream) < 0) {
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ construction */

static int kvcache_init(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"num_layers", "batch", "kv_heads", "head_dim", "dtype", "capacity",
                             "fixed_capacity", "window", "q_heads", "accumulators", NULL};
    long long num_layers, batch, kv_heads, head_dim, capacity = 0, window = 0, q_heads = 0;
    const char *dtype = "float32";
    int fixed = 0, accumulators = 0;
    if (self->layers != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache.__init__ cannot be called twice");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLLL|s$LpLLp:KVCache", kwlist, &num_layers, &batch, &kv_heads,
                                     &head_dim, &dtype, &capacity, &fixed, &window, &q_heads, &accumulators)) {
        return -1;
    }
    struct {
        const char *name;
        long long v;
        long long min;
    } checks[] = {{"num_layers", num_layers, 1}, {"batch", batch, 1},    {"kv_heads", kv_heads, 1},
                  {"head_dim", head_dim, 1},     {"capacity", capacity, 0}, {"window", window, 0},
                  {"q_heads", q_heads, 0}};
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        if (checks[i].v < checks[i].min) {
            PyErr_Format(PyExc_ValueError, "%s: expected an int >= %lld, got %lld", checks[i].name, checks[i].min,
                         checks[i].v);
            return -1;
        }
    }
    if (num_layers > 100000 || batch > (1LL << 24) || kv_heads > (1LL << 16) || head_dim > (1LL << 16)) {
        PyErr_SetString(PyExc_ValueError, "KVCache: num_layers/batch/kv_heads/head_dim unreasonably large");
        return -1;
    }
    if (fixed && capacity < 1) {
        PyErr_SetString(PyExc_ValueError, "capacity: fixed_capacity=True needs capacity >= 1, got 0");
        return -1;
    }
    if (q_heads > 0 && q_heads % kv_heads != 0) {
        PyErr_Format(PyExc_ValueError, "q_heads: expected a multiple of kv_heads (%lld), got %lld", kv_heads, q_heads);
        return -1;
    }
    rpc_dtype dt;
    if (rpc_dtype_from_name(dtype, &dt) < 0) {
        return -1;
    }
    if (dt != RPC_F32 && dt != RPC_F16 && dt != RPC_BF16) {
        PyErr_Format(PyExc_ValueError, "dtype: expected float32, float16 or bfloat16, got %s", rpc_dtype_name(dt));
        return -1;
    }
    self->layers = PyMem_Calloc((size_t)num_layers, sizeof(rpc_layer));
    self->padding = PyMem_Calloc((size_t)batch, sizeof(int64_t));
    if (self->layers == NULL || self->padding == NULL) {
        PyMem_Free(self->layers);
        PyMem_Free(self->padding);
        self->layers = NULL;
        self->padding = NULL;
        PyErr_NoMemory();
        return -1;
    }
    self->num_layers = num_layers;
    self->B = batch;
    self->H = kv_heads;
    self->D = head_dim;
    self->dtype = dt;
    self->capacity0 = capacity;
    self->fixed = fixed;
    self->window = window;
    self->Hq = q_heads;
    self->accumulators = accumulators;
    return 0;
}

static void release_scratch(KVCacheObject *self) {
    for (int i = 0; i < self->n_scratch; i++) {
        rpc_scratch *sc = &self->scratch[i];
        Py_CLEAR(sc->storage);
        sc->nbytes = 0;
        if (sc->event != NULL) {
            char err[RPC_ERR_LEN] = {0};
            (void)rpc_cuda_event_destroy(i - 1, sc->event, err); /* nothing to report it to */
            sc->event = NULL;
        }
        sc->used = 0;
    }
}

static void release_all(KVCacheObject *self) {
    if (self->layers != NULL) {
        for (int64_t i = 0; i < self->num_layers; i++) {
            rpc_layer *ly = &self->layers[i];
            Py_CLEAR(ly->storage);
            Py_CLEAR(ly->qstorage);
            Py_CLEAR(ly->lenbuf);
            Py_CLEAR(ly->accstorage);
        }
    }
    release_scratch(self);
}

static int kvcache_traverse(PyObject *op, visitproc visit, void *arg) {
    KVCacheObject *self = (KVCacheObject *)op;
    Py_VISIT(Py_TYPE(op));
    if (self->layers != NULL) {
        for (int64_t i = 0; i < self->num_layers; i++) {
            Py_VISIT(self->layers[i].storage);
            Py_VISIT(self->layers[i].qstorage);
            Py_VISIT(self->layers[i].lenbuf);
            Py_VISIT(self->layers[i].accstorage);
        }
    }
    for (int i = 0; i < self->n_scratch; i++) {
        Py_VISIT(self->scratch[i].storage);
    }
    return 0;
}

static int kvcache_clear(PyObject *op) {
    release_all((KVCacheObject *)op);
    return 0;
}

static void kvcache_dealloc(PyObject *op) {
    KVCacheObject *self = (KVCacheObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    release_all(self);
    PyMem_Free(self->layers);
    PyMem_Free(self->padding);
    PyMem_Free(self->scratch);
    self->layers = NULL;
    self->padding = NULL;
    self->scratch = NULL;
    self->n_scratch = 0;
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* A cache whose __init__ failed or was never run is unusable: treat it as closed. */
static int require_init(KVCacheObject *self) {
    if (self->layers == NULL && !self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is not initialised");
        return -1;
    }
    return 0;
}

#define ENTER(self)                                                                                  \
    do {                                                                                             \
        if (require_init(self) < 0 || cache_enter(self) < 0)                                        \
            return NULL;                                                                             \
    } while (0)

/* ------------------------------------------------------------------ append / allocate */

static PyObject *kvcache_append(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "keys", "values", "stream", NULL};
    PyObject *layer_obj, *keys, *values, *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|O:append", kwlist, &layer_obj, &keys, &values,
                                     &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL, *kkeep = NULL, *vkeep = NULL;
    int64_t layer;
    intptr_t stream;
    rpc_tensor k, v;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (rpc_from_dlpack(keys, "keys", stream, &k, &kkeep) < 0 || check_4d(self, &k, "keys", self->H) < 0 ||
        check_device(ly, layer, &k, "keys") < 0 ||
        (!ly->placed && check_cuda_usable(k.device_type, k.device_id, "keys") < 0)) {
        goto done;
    }
    if (rpc_from_dlpack(values, "values", stream, &v, &vkeep) < 0 ||
        check_4d(self, &v, "values", self->H) < 0) {
        goto done;
    }
    if (v.shape[2] != k.shape[2]) {
        PyErr_Format(PyExc_ValueError, "values: expected the same number of tokens as keys (%lld), got %lld",
                     (long long)k.shape[2], (long long)v.shape[2]);
        goto done;
    }
    if (v.device_type != k.device_type || v.device_id != k.device_id) {
        char a[48], b[48];
        rpc_format_device(a, sizeof a, k.device_type, k.device_id);
        rpc_format_device(b, sizeof b, v.device_type, v.device_id);
        PyErr_Format(PyExc_ValueError, "values: expected a tensor on %s (the device of keys), got %s", a, b);
        goto done;
    }
    int64_t t = k.shape[2];
    place_layer(ly, k.device_type, k.device_id);
    if (ensure_capacity(self, layer, ly->length + t, 0, stream, "keys") < 0) {
        goto done;
    }
    if (t > 0) {
        int64_t ds[4], shape[4] = {self->B, self->H, t, self->D};
        kv_strides(self, ly->cap, ds);
        size_t es = elem_size(self);
        size_t off = (size_t)(ly->length * self->D) * es;
        if (copy4d(ly->dev_type, ly->dev_id, layer_k(self, ly) + off, ds, k.data, k.strides, shape, es, stream) < 0 ||
            copy4d(ly->dev_type, ly->dev_id, layer_v(self, ly) + off, ds, v.data, v.strides, shape, es, stream) < 0) {
            goto done;
        }
    }
    ly->length += t;
    ly->seen += t;
    if (sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->length);
done:
    Py_XDECREF(kkeep);
    Py_XDECREF(vkeep);
    cache_leave(self);
    return result;
}

static int parse_device_type(PyObject *obj, rpc_device_type *out) {
    if (PyUnicode_Check(obj)) {
        const char *s = PyUnicode_AsUTF8(obj);
        if (s == NULL) {
            return -1;
        }
        if (strcmp(s, "cpu") == 0) {
            *out = RPC_DEV_CPU;
            return 0;
        }
        if (strcmp(s, "cuda") == 0) {
            *out = RPC_DEV_CUDA;
            return 0;
        }
        PyErr_Format(PyExc_ValueError, "device_type: expected 'cpu' or 'cuda', got '%s'", s);
        return -1;
    }
    if (PyLong_Check(obj) && !PyBool_Check(obj)) {
        long v = PyLong_AsLong(obj);
        if (v == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (v == RPC_DEV_CPU || v == RPC_DEV_CUDA) {
            *out = (rpc_device_type)v;
            return 0;
        }
        PyErr_Format(PyExc_ValueError, "device_type: expected 1 (kDLCPU) or 2 (kDLCUDA), got %ld", v);
        return -1;
    }
    PyErr_Format(PyExc_TypeError, "device_type: expected 'cpu', 'cuda' or a DLPack device code, got %s",
                 Py_TYPE(obj)->tp_name);
    return -1;
}

static PyObject *kvcache_allocate(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "device_type", "device_id", "capacity", "stream", NULL};
    PyObject *layer_obj, *dt_obj, *stream_obj = Py_None;
    int dev_id = 0;
    long long capacity = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|iLO:allocate", kwlist, &layer_obj, &dt_obj, &dev_id,
                                     &capacity, &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    intptr_t stream;
    rpc_device_type dt;
    if (parse_layer(self, layer_obj, &layer) < 0 || parse_device_type(dt_obj, &dt) < 0 ||
        rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    if (capacity < 0) {
        PyErr_Format(PyExc_ValueError, "capacity: expected an int >= 0, got %lld", capacity);
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->placed && (ly->dev_type != dt || (dt == RPC_DEV_CUDA && ly->dev_id != dev_id))) {
        char want[48], got[48];
        rpc_format_device(want, sizeof want, ly->dev_type, ly->dev_id);
        rpc_format_device(got, sizeof got, dt, dev_id);
        PyErr_Format(PyExc_ValueError, "device_type: layer %lld is already on %s, got %s", (long long)layer, want,
                     got);
        goto done;
    }
    if (dt == RPC_DEV_CUDA && check_cuda_usable(dt, dev_id, "device_id") < 0) {
        goto done;
    }
    place_layer(ly, dt, dev_id);
    if (ensure_capacity(self, layer, ly->length, (int64_t)capacity, stream, "capacity") < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->cap);
done:
    cache_leave(self);
    return result;
}

/* ------------------------------------------------------------------ views */

static PyObject *empty_view(KVCacheObject *self, int64_t heads, int64_t len) {
    int64_t shape[4] = {self->B, heads, len, self->D};
    int64_t strides[4] = {heads * len * self->D, len * self->D, self->D, 1};
    return rpc_view_new(cache_state(self), Py_None, NULL, RPC_DEV_CPU, 0, self->dtype, 4, shape, strides);
}

/* which: 0 keys, 1 values; full: capacity instead of length */
static PyObject *kv_view(KVCacheObject *self, PyObject *layer_obj, int which, int full) {
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage == NULL) {
        result = empty_view(self, self->H, 0);
        goto done;
    }
    int64_t shape[4] = {self->B, self->H, full ? ly->cap : ly->length, self->D}, strides[4];
    kv_strides(self, ly->cap, strides);
    result = rpc_view_new(cache_state(self), ly->storage, which ? layer_v(self, ly) : layer_k(self, ly), ly->dev_type,
                          ly->dev_id, self->dtype, 4, shape, strides);
done:
    cache_leave(self);
    return result;
}

static PyObject *kvcache_keys(PyObject *op, PyObject *layer) {
    return kv_view((KVCacheObject *)op, layer, 0, 0);
}
static PyObject *kvcache_values(PyObject *op, PyObject *layer) {
    return kv_view((KVCacheObject *)op, layer, 1, 0);
}
static PyObject *kvcache_storage_keys(PyObject *op, PyObject *layer) {
    return kv_view((KVCacheObject *)op, layer, 0, 1);
}
static PyObject *kvcache_storage_values(PyObject *op, PyObject *layer) {
    return kv_view((KVCacheObject *)op, layer, 1, 1);
}

/* which: 0 length, 1 seen, 2 capacity, 3 generation, 4 num_queries */
static PyObject *layer_int(KVCacheObject *self, PyObject *layer_obj, int which) {
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        int64_t v = 0;
        switch (which) {
        case 0: v = ly->length; break;
        case 1: v = ly->seen; break;
        case 2: v = ly->cap; break;
        case 3: v = ly->generation; break;
        default: v = ly->q_recorded < self->window ? ly->q_recorded : self->window; break;
        }
        result = PyLong_FromLongLong((long long)v);
    }
    cache_leave(self);
    return result;
}

static PyObject *kvcache_length(PyObject *op, PyObject *layer) {
    return layer_int((KVCacheObject *)op, layer, 0);
}
static PyObject *kvcache_seen(PyObject *op, PyObject *layer) {
    return layer_int((KVCacheObject *)op, layer, 1);
}
static PyObject *kvcache_capacity(PyObject *op, PyObject *layer) {
    return layer_int((KVCacheObject *)op, layer, 2);
}
static PyObject *kvcache_generation(PyObject *op, PyObject *layer) {
    return layer_int((KVCacheObject *)op, layer, 3);
}
static PyObject *kvcache_num_queries(PyObject *op, PyObject *layer) {
    return layer_int((KVCacheObject *)op, layer, 4);
}

static PyObject *kvcache_device(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (!ly->placed) {
            result = Py_NewRef(Py_None);
        } else {
            char buf[48];
            rpc_format_device(buf, sizeof buf, ly->dev_type, ly->dev_id);
            result = PyUnicode_FromString(buf);
        }
    }
    cache_leave(self);
    return result;
}

static PyObject *kvcache_device_lengths(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (ly->lenbuf == NULL) {
            PyErr_Format(PyExc_ValueError,
                         "layer: layer %lld has no storage yet (append or allocate first)", (long long)layer);
        } else {
            int64_t shape[1] = {2}, strides[1] = {1};
            result = rpc_view_new(cache_state(self), ly->lenbuf, rpc_storage_data(ly->lenbuf), ly->dev_type,
                                  ly->dev_id, RPC_I64, 1, shape, strides);
        }
    }
    cache_leave(self);
    return result;
}

/* Host bookkeeping for tokens and queries that kernels wrote on their own (decode_binding.c's
 * append_at_length and ring_write, e.g. replayed from a CUDA graph): those already advanced the device
 * lengths and filled the storage, so this only moves the host counters; no copy, no device update. */
static PyObject *kvcache_advance(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "tokens", "queries", NULL};
    PyObject *layer_obj;
    long long tokens, queries = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL|L:advance", kwlist, &layer_obj, &tokens, &queries)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (tokens < 0 || queries < 0) {
        PyErr_Format(PyExc_ValueError, "tokens, queries: expected ints >= 0, got %lld, %lld", tokens, queries);
        goto done;
    }
    if (ly->storage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld has no storage yet (append or allocate first)",
                     (long long)layer);
        goto done;
    }
    if (tokens > ly->cap - ly->length) {
        PyErr_Format(PyExc_ValueError, "tokens: layer %lld holds %lld of %lld tokens, cannot advance by %lld",
                     (long long)layer, (long long)ly->length, (long long)ly->cap, tokens);
        goto done;
    }
    if (queries > 0 && (self->window <= 0 || ly->qstorage == NULL)) {
        PyErr_Format(PyExc_ValueError, "queries: layer %lld has no query ring (window=%lld; record_query first)",
                     (long long)layer, (long long)self->window);
        goto done;
    }
    ly->length += tokens;
    ly->seen += tokens;
    if (queries > 0) {
        ly->q_recorded += queries;
        ly->q_pos = (ly->q_pos + queries) % self->window;
    }
    result = Py_BuildValue("(LL)", (long long)ly->length, (long long)ly->q_pos);
done:
    cache_leave(self);
    return result;
}

/* set_length: host bookkeeping after the caller rewrote the layer's storage itself (a compaction done
 * with torch ops, rpc_py.torch_kernels): the live length drops to `length`; seen and the query ring stay.
 * The device lengths follow, and the accumulator's vacated positions are zeroed (its invariant). */
static PyObject *kvcache_set_length(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "length", "stream", NULL};
    PyObject *layer_obj, *stream_obj = Py_None;
    long long length;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL|$O:set_length", kwlist, &layer_obj, &length, &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    intptr_t stream;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (length < 0 || length > ly->length) {
        PyErr_Format(PyExc_ValueError, "length: expected 0 <= length <= %lld (the layer's length), got %lld",
                     (long long)ly->length, length);
        goto done;
    }
    const int64_t old = ly->length;
    ly->length = length;
    if (sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    if (ly->accstorage != NULL && length < old) {
        float *acc = (float *)rpc_storage_data(ly->accstorage);
        const size_t width = (size_t)(old - length) * sizeof(float), rows = (size_t)(self->B * self->H);
        if (ly->dev_type == RPC_DEV_CPU) {
            for (size_t r = 0; r < rows; r++) {
                memset(acc + r * (size_t)ly->cap + length, 0, width);
            }
        } else {
            char err[RPC_ERR_LEN] = {0};
            int rc = rpc_cuda_memset2d_async(ly->dev_id, acc + length, (size_t)ly->cap * sizeof(float), 0, width, rows,
                                             (void *)stream, err);
            if (rc != RPC_OK) {
                rpc_raise_status(rc, err);
                goto done;
            }
        }
    }
    result = PyLong_FromLongLong((long long)ly->length);
done:
    cache_leave(self);
    return result;
}

/* ------------------------------------------------------------------ padding */

static PyObject *kvcache_set_padding(PyObject *op, PyObject *counts) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    PyObject *seq = PySequence_Fast(counts, "counts: expected a sequence of ints (one per sequence in the batch)");
    if (seq == NULL) {
        goto done;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != self->B) {
        PyErr_Format(PyExc_ValueError, "counts: expected %lld padding counts (the batch size), got %zd",
                     (long long)self->B, n);
        goto done;
    }
    int64_t *tmp = PyMem_Calloc((size_t)n + 1, sizeof(int64_t));
    if (tmp == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *idx = PyNumber_Index(item);
        long long c = idx ? PyLong_AsLongLong(idx) : -1;
        Py_XDECREF(idx);
        if (c == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "counts: expected ints, got %s at position %zd", Py_TYPE(item)->tp_name, i);
            PyMem_Free(tmp);
            goto done;
        }
        if (c < 0) {
            PyErr_Format(PyExc_ValueError, "counts: expected counts >= 0, got %lld at position %zd", c, i);
            PyMem_Free(tmp);
            goto done;
        }
        tmp[i] = (int64_t)c;
    }
    memcpy(self->padding, tmp, (size_t)n * sizeof(int64_t));
    PyMem_Free(tmp);
    for (int64_t i = 0; i < self->num_layers; i++) {
        self->layers[i].pad_dirty = 1;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(seq);
    cache_leave(self);
    return result;
}

static PyObject *kvcache_get_padding(PyObject *op, void *closure) {
    (void)closure;
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *t = PyTuple_New((Py_ssize_t)self->B);
    for (int64_t i = 0; t != NULL && i < self->B; i++) {
        PyObject *x = PyLong_FromLongLong((long long)self->padding[i]);
        if (x == NULL) {
            Py_CLEAR(t);
            break;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, x);
    }
    cache_leave(self);
    return t;
}

/* ------------------------------------------------------------------ query ring */

static PyObject *kvcache_record_query(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "q", "stream", NULL};
    PyObject *layer_obj, *q_obj, *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O:record_query", kwlist, &layer_obj, &q_obj, &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL, *keep = NULL;
    int64_t layer;
    intptr_t stream;
    rpc_tensor q;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    if (self->window <= 0) {
        PyErr_SetString(PyExc_ValueError, "window: record_query needs a cache built with window > 0, got window=0");
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (rpc_from_dlpack(q_obj, "q", stream, &q, &keep) < 0 || check_4d(self, &q, "q", self->Hq > 0 ? self->Hq : -1) < 0 ||
        check_device(ly, layer, &q, "q") < 0 ||
        (!ly->placed && check_cuda_usable(q.device_type, q.device_id, "q") < 0)) {
        goto done;
    }
    if (self->Hq == 0) {
        if (q.shape[1] < 1 || q.shape[1] % self->H != 0) {
            PyErr_Format(PyExc_ValueError, "q: expected a number of query heads that is a multiple of kv_heads (%lld), got %lld",
                         (long long)self->H, (long long)q.shape[1]);
            goto done;
        }
        self->Hq = q.shape[1];
    }
    place_layer(ly, q.device_type, q.device_id);
    size_t es = elem_size(self);
    const int64_t W = self->window, Hq = self->Hq, D = self->D;
    if (ly->qstorage == NULL) {
        size_t nbytes = (size_t)(self->B * Hq * W * D) * es;
        ly->qstorage = rpc_storage_new(cache_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
        if (ly->qstorage == NULL) {
            goto done;
        }
        account(self, (int64_t)nbytes);
        ly->q_pos = 0;
    }
    int64_t t = q.shape[2];
    int64_t ds[4] = {Hq * W * D, W * D, D, 1};
    char *ring = (char *)rpc_storage_data(ly->qstorage);
    if (t >= W) {
        /* Only the last W queries matter; they fill the ring from slot 0. */
        const char *src = (const char *)q.data + (size_t)((t - W) * q.strides[2]) * es;
        int64_t shape[4] = {self->B, Hq, W, D};
        if (copy4d(ly->dev_type, ly->dev_id, ring, ds, src, q.strides, shape, es, stream) < 0) {
            goto done;
        }
        ly->q_pos = 0;
    } else if (t > 0) {
        int64_t first = W - ly->q_pos < t ? W - ly->q_pos : t;
        int64_t shape1[4] = {self->B, Hq, first, D};
        if (copy4d(ly->dev_type, ly->dev_id, ring + (size_t)(ly->q_pos * D) * es, ds, q.data, q.strides, shape1, es,
                   stream) < 0) {
            goto done;
        }
        if (t > first) {
            int64_t shape2[4] = {self->B, Hq, t - first, D};
            const char *src = (const char *)q.data + (size_t)(first * q.strides[2]) * es;
            if (copy4d(ly->dev_type, ly->dev_id, ring, ds, src, q.strides, shape2, es, stream) < 0) {
                goto done;
            }
        }
        ly->q_pos = (ly->q_pos + t) % W;
    }
    ly->q_recorded += t;
    result = PyLong_FromLongLong((long long)(ly->q_recorded < W ? ly->q_recorded : W));
done:
    Py_XDECREF(keep);
    cache_leave(self);
    return result;
}

static PyObject *kvcache_queries(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (ly->qstorage == NULL) {
            PyErr_Format(PyExc_ValueError, "layer: layer %lld has no recorded queries (call record_query first)",
                         (long long)layer);
        } else {
            const int64_t W = self->window, Hq = self->Hq, D = self->D;
            int64_t shape[4] = {self->B, Hq, W, D}, strides[4] = {Hq * W * D, W * D, D, 1};
            result = rpc_view_new(cache_state(self), ly->qstorage, rpc_storage_data(ly->qstorage), ly->dev_type,
                                  ly->dev_id, self->dtype, 4, shape, strides);
        }
    }
    cache_leave(self);
    return result;
}

/* ------------------------------------------------------------------ compress */

static size_t scratch_align(size_t n) {
    return (n + 255) / 256 * 256;
}

/* The device's scratch slot with at least `need` bytes. A (re)allocation sizes it for the largest
 * compression of this layer's capacity (candidates [start, cap - window)), so a cache preallocated for
 * the schedule's peak allocates once per device and generation. NULL with an exception on failure. */
static rpc_scratch *reserve_scratch(KVCacheObject *self, rpc_layer *ly, const rpc_score_params *sp, int64_t A,
                                    size_t need, intptr_t stream) {
    const int slot = ly->dev_type == RPC_DEV_CUDA ? ly->dev_id + 1 : 0;
    if (slot >= self->n_scratch) {
        rpc_scratch *grown = PyMem_Realloc(self->scratch, (size_t)(slot + 1) * sizeof(rpc_scratch));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(grown + self->n_scratch, 0, (size_t)(slot + 1 - self->n_scratch) * sizeof(rpc_scratch));
        self->scratch = grown;
        self->n_scratch = slot + 1;
    }
    rpc_scratch *sc = &self->scratch[slot];
    if (sc->storage != NULL && sc->nbytes >= need) {
        return sc;
    }
    char err[RPC_ERR_LEN] = {0};
    int64_t nmax = ly->cap - self->window - sp->start;
    if (nmax < sp->end - sp->start) {
        nmax = sp->end - sp->start;
    }
    rpc_score_params big = *sp;
    big.end = sp->start + nmax;
    size_t ws = 0;
    if (ly->dev_type == RPC_DEV_CUDA) {
        int rc = rpc_cuda_score_workspace(ly->dev_id, &big, &ws, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            return NULL;
        }
    }
    size_t want = ws + scratch_align((size_t)(self->B * A * nmax) * sizeof(float)) +
                  scratch_align((size_t)(self->B * A * nmax) * sizeof(int64_t));
    if (want < need) {
        want = need;
    }
    if (ly->dev_type == RPC_DEV_CUDA && sc->event == NULL) {
        int rc = rpc_cuda_event_create(ly->dev_id, &sc->event, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            return NULL;
        }
    }
    /* Dropping the old block frees it; on CUDA cudaFree waits for the work that still uses it. */
    Py_CLEAR(sc->storage);
    sc->nbytes = 0;
    sc->storage = rpc_storage_new(cache_state(self), ly->dev_type, ly->dev_id, want, stream);
    if (sc->storage == NULL) {
        return NULL;
    }
    sc->nbytes = want;
    return sc;
}

static PyObject *kvcache_compress(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "start", "keep", "aggregation", "pooling", "kernel_size", "stream",
                             "return_details", "scores_out", "indices_out", NULL};
    PyObject *layer_obj, *stream_obj = Py_None, *scores_out = Py_None, *indices_out = Py_None;
    long long start, keep;
    const char *aggregation = "all", *pooling = "avg";
    int kernel_size = 7, details = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLL|$ssiOpOO:compress", kwlist, &layer_obj, &start, &keep,
                                     &aggregation, &pooling, &kernel_size, &stream_obj, &details, &scores_out,
                                     &indices_out)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    rpc_result rs, ri; /* scores [B, A, N] and kept indices [B, A, keep]: out= tensors, details, or scratch */
    memset(&rs, 0, sizeof rs);
    memset(&ri, 0, sizeof ri);
    int64_t layer;
    intptr_t stream;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    const int64_t W = self->window;
    if (W <= 0) {
        PyErr_SetString(PyExc_ValueError, "window: compress needs a cache built with window > 0, got window=0");
        goto done;
    }
    if (ly->storage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds no tokens", (long long)layer);
        goto done;
    }
    int64_t nq = ly->q_recorded < W ? ly->q_recorded : W;
    if (nq != W) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds %lld recorded queries, compress needs window=%lld",
                     (long long)layer, (long long)nq, (long long)W);
        goto done;
    }
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "start: expected an int >= 0, got %lld", start);
        goto done;
    }
    const int64_t end = ly->length - W;
    const int64_t N = end - start;
    if (N < 1) {
        PyErr_Format(PyExc_ValueError,
                     "start: expected start < length - window = %lld (at least one candidate), got start=%lld",
                     (long long)end, start);
        goto done;
    }
    if (keep < 0 || keep > N) {
        PyErr_Format(PyExc_ValueError, "keep: expected 0 <= keep <= %lld (the number of candidates), got %lld",
                     (long long)N, keep);
        goto done;
    }
    rpc_aggregation agg;
    rpc_pooling pool;
    if (rpc_parse_aggregation(aggregation, &agg) < 0 || rpc_parse_pooling(pooling, &pool) < 0 ||
        rpc_check_kernel_size(kernel_size) < 0) {
        goto done;
    }
    const int64_t A = agg == RPC_AGG_ALL ? 1 : self->H;
    const size_t n_scores = (size_t)(self->B * A * N), n_idx = (size_t)(self->B * A * keep);
    const int dev = ly->dev_id;
    const int on_cuda = ly->dev_type == RPC_DEV_CUDA;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    rpc_score_params sp;
    memset(&sp, 0, sizeof sp);
    sp.q = rpc_storage_data(ly->qstorage);
    sp.k = layer_k(self, ly);
    sp.dtype = self->dtype;
    sp.B = self->B;
    sp.Hq = self->Hq;
    sp.Hkv = self->H;
    sp.R = W;
    sp.D = self->D;
    sp.q_stride[0] = self->Hq * W * self->D;
    sp.q_stride[1] = W * self->D;
    sp.q_stride[2] = self->D;
    sp.q_stride[3] = 1;
    kv_strides(self, ly->cap, sp.k_stride);
    sp.start = start;
    sp.end = end;
    sp.agg = agg;
    sp.pool = pool;
    sp.kernel_size = kernel_size;
    sp.scale = (float)(1.0 / sqrt((double)self->D));
    sp.raw = NULL;

    /* Scores and indices go to the caller's out= tensors when given, to fresh counted blocks with
     * return_details, and otherwise to the device's scratch block: [scores | indices | CUDA score
     * workspace], sized once for the largest compression the capacity allows and reused. */
    const int64_t sshape[3] = {self->B, A, N}, ishape[3] = {self->B, A, keep};
    if (rpc_result_init(&rs, ly->dev_type, dev, RPC_F32, 3, sshape) < 0 ||
        rpc_result_init(&ri, ly->dev_type, dev, RPC_I64, 3, ishape) < 0 ||
        rpc_result_use_out(&rs, scores_out, "scores_out", stream) < 0 ||
        rpc_result_use_out(&ri, indices_out, "indices_out", stream) < 0) {
        goto done;
    }
    if (details && (rpc_result_alloc(&rs, cache_state(self), 0, stream) < 0 ||
                    rpc_result_alloc(&ri, cache_state(self), 0, stream) < 0)) {
        goto done;
    }
    const size_t b_scores = scratch_align(n_scores * sizeof(float)), b_idx = scratch_align(n_idx * sizeof(int64_t));
    size_t b_ws = 0;
    if (on_cuda && (rc = rpc_cuda_score_workspace(dev, &sp, &b_ws, err)) != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    rpc_scratch *sc = reserve_scratch(self, ly, &sp, A, b_ws + b_scores + b_idx, stream);
    if (sc == NULL) {
        goto done;
    }
    unsigned char *sbase = (unsigned char *)rpc_storage_data(sc->storage);
    float *scores = rs.data != NULL ? (float *)rs.data : (float *)sbase;
    int64_t *indices = ri.data != NULL ? (int64_t *)ri.data : (int64_t *)(sbase + b_scores);
    if (on_cuda) {
        sp.workspace = sbase + b_scores + b_idx;
        sp.workspace_bytes = b_ws;
    } else {
        sp.workspace = NULL;
    }
    sp.out = scores;

    rpc_select_params sel;
    memset(&sel, 0, sizeof sel);
    sel.scores = scores;
    sel.rows = self->B * A;
    sel.N = N;
    sel.keep = keep;
    sel.indices = indices;

    rpc_compact_params cp;
    memset(&cp, 0, sizeof cp);
    cp.k = layer_k(self, ly);
    cp.v = layer_v(self, ly);
    cp.dtype = self->dtype;
    cp.B = self->B;
    cp.H = self->H;
    cp.L = ly->length;
    cp.D = self->D;
    kv_strides(self, ly->cap, cp.k_stride);
    kv_strides(self, ly->cap, cp.v_stride);
    cp.indices = indices;
    cp.A = A;
    cp.idx_stride_b = A * keep;
    cp.idx_stride_a = keep;
    cp.start = start;
    cp.end = end;
    cp.keep = keep;
    rpc_acc_compact_params ap; /* the H2O accumulator follows the same indices, before the event is recorded */
    const int has_acc = acc_params(self, ly, &cp, &ap);

    Py_BEGIN_ALLOW_THREADS
    if (on_cuda) {
        /* The scratch may still be in use by work queued on another stream: order, don't wait. */
        rc = (sc->used && sc->stream != stream) ? rpc_cuda_stream_wait_event(dev, (void *)stream, sc->event, err)
                                                : RPC_OK;
        if (rc == RPC_OK) {
            rc = rpc_cuda_score(dev, &sp, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_select(dev, &sel, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_compact(dev, &cp, (void *)stream, err);
        }
        if (rc == RPC_OK && has_acc) {
            rc = rpc_cuda_compact_acc(dev, &ap, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_event_record(dev, sc->event, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            sc->stream = stream;
            sc->used = 1;
        }
    } else {
        rc = rpc_cpu_score(&sp, err);
        if (rc == RPC_OK) {
            rc = rpc_cpu_select(&sel, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cpu_compact(&cp, err);
        }
        if (rc == RPC_OK && has_acc) {
            rc = rpc_cpu_compact_acc(&ap, err);
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    ly->length = start + keep + W;
    if (sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    if (!details) {
        result = PyLong_FromLongLong((long long)ly->length);
        goto done;
    }
    {
        PyObject *s_obj = rpc_result_take(&rs, cache_state(self), 0);
        PyObject *i_obj = s_obj ? rpc_result_take(&ri, cache_state(self), 0) : NULL;
        if (i_obj == NULL) {
            Py_XDECREF(s_obj);
            goto done;
        }
        result = Py_BuildValue("(LNN)", (long long)ly->length, s_obj, i_obj);
    }
done:
    rpc_result_release(&rs);
    rpc_result_release(&ri);
    cache_leave(self);
    return result;
}

/* ------------------------------------------------------------------ reset / close */

static PyObject *kvcache_reset(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"stream", NULL};
    PyObject *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:reset", kwlist, &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    memset(self->padding, 0, (size_t)self->B * sizeof(int64_t));
    for (int64_t i = 0; i < self->num_layers; i++) {
        rpc_layer *ly = &self->layers[i];
        ly->pad_dirty = 1;
        ly->length = 0;
        ly->seen = 0;
        ly->q_recorded = 0;
        ly->q_pos = 0;
        if (sync_lengths(self, ly, stream) < 0) {
            goto done;
        }
        if (ly->accstorage != NULL && acc_zero(self, ly, stream) < 0) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    cache_leave(self);
    return result;
}

static PyObject *kvcache_close(PyObject *op, PyObject *unused) {
    (void)unused;
    KVCacheObject *self = (KVCacheObject *)op;
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache is in use by another thread");
        return NULL;
    }
    if (!self->closed) {
        self->busy = 1;
        release_all(self);
        self->closed = 1;
        self->nbytes = 0;
        self->busy = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *kvcache_enter_ctx(PyObject *op, PyObject *unused) {
    (void)unused;
    KVCacheObject *self = (KVCacheObject *)op;
    if (require_init(self) < 0) {
        return NULL;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is closed");
        return NULL;
    }
    return Py_NewRef(op);
}

static PyObject *kvcache_exit_ctx(PyObject *op, PyObject *args) {
    (void)args;
    PyObject *r = kvcache_close(op, NULL);
    if (r == NULL) {
        return NULL;
    }
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

/* ------------------------------------------------------------------ policy support
 * For the selection policies other than RPC (policy_cpu.c / policy_cuda.cu do the arithmetic): H2O's
 * per-layer accumulator, compaction with caller-chosen indices, and the ring position that lets Python
 * map ring slots to query positions. The accumulator keeps one invariant: positions at or past
 * `length` are zero (new blocks are zeroed, growth copies [0, length), every compaction zeroes what it
 * vacates, reset zeroes all), so tokens written by any path, including device-side appends, start
 * from 0 without this file having to know about them. */

static int64_t acc_strides_of(KVCacheObject *self, int64_t cap, int64_t s[3]) {
    s[0] = self->H * cap;
    s[1] = cap;
    s[2] = 1;
    return s[0];
}

/* New zeroed accumulator block of `newcap` tokens holding a copy of [0, length) of the current one. */
static int acc_grow(KVCacheObject *self, rpc_layer *ly, int64_t newcap, intptr_t stream, PyObject **out) {
    *out = NULL;
    /* B * H * newcap * D * element size already fits (ensure_capacity checked it), so this does too. */
    const size_t nbytes = (size_t)(self->B * self->H * newcap) * sizeof(float);
    PyObject *storage = rpc_storage_new(cache_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
    if (storage == NULL) {
        return -1;
    }
    account(self, (int64_t)nbytes);
    if (ly->accstorage != NULL && ly->length > 0) {
        int64_t ds[4] = {self->H * newcap, newcap, 1, 1}, ss[4] = {self->H * ly->cap, ly->cap, 1, 1};
        int64_t shape[4] = {self->B, self->H, ly->length, 1};
        if (copy4d(ly->dev_type, ly->dev_id, rpc_storage_data(storage), ds, rpc_storage_data(ly->accstorage), ss,
                   shape, sizeof(float), stream) < 0) {
            account(self, -(int64_t)nbytes);
            Py_DECREF(storage);
            return -1;
        }
    }
    *out = storage;
    return 0;
}

/* Parameters of the accumulator compaction that follows the K/V compaction `cp` (same indices, in host or
 * device memory as the layer); 0 when the layer has no accumulator. */
static int acc_params(KVCacheObject *self, rpc_layer *ly, const rpc_compact_params *cp, rpc_acc_compact_params *ap) {
    memset(ap, 0, sizeof *ap);
    if (ly->accstorage == NULL) {
        return 0;
    }
    ap->acc = (float *)rpc_storage_data(ly->accstorage);
    ap->B = self->B;
    ap->H = self->H;
    ap->L = cp->L;
    acc_strides_of(self, ly->cap, ap->acc_stride);
    ap->indices = cp->indices;
    ap->A = cp->A;
    ap->idx_stride_b = cp->idx_stride_b;
    ap->idx_stride_a = cp->idx_stride_a;
    ap->start = cp->start;
    ap->end = cp->end;
    ap->keep = cp->keep;
    return 1;
}

static int acc_zero(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
    const size_t nbytes = rpc_storage_nbytes(ly->accstorage);
    if (ly->dev_type == RPC_DEV_CPU) {
        memset(rpc_storage_data(ly->accstorage), 0, nbytes);
        return 0;
    }
    (void)self;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = rpc_cuda_memset_async(ly->dev_id, rpc_storage_data(ly->accstorage), 0, nbytes, (void *)stream, err);
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        return rpc_raise_status_int(rc, err);
    }
    return 0;
}

static int require_accumulators(KVCacheObject *self) {
    if (!self->accumulators) {
        PyErr_SetString(PyExc_ValueError,
                        "accumulators: this KVCache was built without accumulators (pass accumulators=True)");
        return -1;
    }
    return 0;
}

static PyObject *kvcache_accumulate(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "q", "scale", "stream", NULL};
    PyObject *layer_obj, *q_obj, *scale_obj = Py_None, *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OO:accumulate", kwlist, &layer_obj, &q_obj, &scale_obj,
                                     &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL, *qkeep = NULL;
    int64_t layer;
    intptr_t stream;
    rpc_tensor q;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0 ||
        require_accumulators(self) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage == NULL || ly->accstorage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds no tokens (append first)", (long long)layer);
        goto done;
    }
    if (rpc_from_dlpack(q_obj, "q", stream, &q, &qkeep) < 0 || check_4d(self, &q, "q", self->Hq > 0 ? self->Hq : -1) < 0 ||
        check_device(ly, layer, &q, "q") < 0) {
        goto done;
    }
    if (q.shape[2] != 1 || q.shape[1] < 1 || q.shape[1] % self->H != 0) {
        char got[160];
        rpc_format_dims(got, sizeof got, q.shape, 4);
        PyErr_Format(PyExc_ValueError,
                     "q: expected shape [%lld, q_heads, 1, %lld] (this step's query; q_heads a multiple of %lld), got %s",
                     (long long)self->B, (long long)self->D, (long long)self->H, got);
        goto done;
    }
    double scale = 1.0 / sqrt((double)self->D);
    if (scale_obj != Py_None) {
        scale = PyFloat_AsDouble(scale_obj);
        if (scale == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "scale: expected a float, got %s", Py_TYPE(scale_obj)->tp_name);
            goto done;
        }
        if (!isfinite(scale) || fabs(scale) > 3.4e38) {
            PyErr_Format(PyExc_ValueError, "scale: expected a finite float32 value, got %R", scale_obj);
            goto done;
        }
    }
    rpc_accumulate_params p;
    memset(&p, 0, sizeof p);
    p.q = q.data;
    p.k = layer_k(self, ly);
    p.dtype = self->dtype;
    p.B = self->B;
    p.Hq = q.shape[1];
    p.Hkv = self->H;
    p.D = self->D;
    p.length = ly->length;
    memcpy(p.q_stride, q.strides, sizeof p.q_stride);
    kv_strides(self, ly->cap, p.k_stride);
    p.scale = (float)scale;
    p.acc = (float *)rpc_storage_data(ly->accstorage);
    acc_strides_of(self, ly->cap, p.acc_stride);
    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (ly->dev_type == RPC_DEV_CUDA) {
        /* The padding counts on the device, kept with the layer's lengths: no allocation or copy per step. */
        if ((p.padding = device_padding(self, ly, stream)) == NULL) {
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_accumulate(ly->dev_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    } else {
        p.padding = self->padding;
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cpu_accumulate(&p, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(qkeep);
    cache_leave(self);
    return result;
}

static PyObject *kvcache_accumulator(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) < 0 || require_accumulators(self) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->accstorage == NULL) {
        int64_t shape[3] = {self->B, self->H, 0}, strides[3] = {0, 0, 1};
        result = rpc_view_new(cache_state(self), Py_None, NULL, RPC_DEV_CPU, 0, RPC_F32, 3, shape, strides);
        goto done;
    }
    int64_t shape[3] = {self->B, self->H, ly->length}, strides[3];
    acc_strides_of(self, ly->cap, strides);
    result = rpc_view_new(cache_state(self), ly->accstorage, rpc_storage_data(ly->accstorage), ly->dev_type, ly->dev_id,
                          RPC_F32, 3, shape, strides);
done:
    cache_leave(self);
    return result;
}

static PyObject *kvcache_compact(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "start", "indices", "stream", NULL};
    PyObject *layer_obj, *idx_obj, *stream_obj = Py_None;
    long long start;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLO|$O:compact", kwlist, &layer_obj, &start, &idx_obj,
                                     &stream_obj)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL, *ikeep = NULL;
    int64_t layer;
    intptr_t stream;
    rpc_tensor ix;
    if (parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds no tokens", (long long)layer);
        goto done;
    }
    const int64_t W = self->window, end = ly->length - W;
    if (start < 0 || start > end) {
        PyErr_Format(PyExc_ValueError,
                     "start: expected 0 <= start <= length - window = %lld - %lld = %lld, got %lld",
                     (long long)ly->length, (long long)W, (long long)end, start);
        goto done;
    }
    const int64_t N = end - start;
    if (rpc_from_dlpack(idx_obj, "indices", stream, &ix, &ikeep) < 0 ||
        rpc_check_ndim_dtype(&ix, "indices", 3, RPC_I64) < 0 || check_device(ly, layer, &ix, "indices") < 0 ||
        rpc_check_no_negative_strides(&ix, "indices") < 0) {
        goto done;
    }
    const int64_t keep = ix.shape[2];
    if (ix.shape[0] != self->B || (ix.shape[1] != 1 && ix.shape[1] != self->H) || keep > N) {
        char got[160];
        rpc_format_dims(got, sizeof got, ix.shape, 3);
        PyErr_Format(PyExc_ValueError,
                     "indices: expected shape [%lld, 1 or %lld, keep] with keep <= length - window - start = %lld, got %s",
                     (long long)self->B, (long long)self->H, (long long)N, got);
        goto done;
    }
    if (keep > 1 && ix.strides[2] != 1) {
        PyErr_Format(PyExc_ValueError, "indices: expected stride 1 in the last dimension, got %lld",
                     (long long)ix.strides[2]);
        goto done;
    }
    if (ly->dev_type == RPC_DEV_CPU) {
        const int64_t *base = (const int64_t *)ix.data;
        for (int64_t b = 0; b < ix.shape[0]; b++) {
            for (int64_t a = 0; a < ix.shape[1]; a++) {
                const int64_t *row = base + b * ix.strides[0] + a * ix.strides[1];
                for (int64_t i = 0; i < keep; i++) {
                    if (row[i] < 0 || row[i] >= N || (i > 0 && row[i] <= row[i - 1])) {
                        PyErr_Format(PyExc_ValueError,
                                     "indices: expected strictly ascending offsets in [0, %lld) (length - window - "
                                     "start), got %lld at [%lld, %lld, %lld]",
                                     (long long)N, (long long)row[i], (long long)b, (long long)a, (long long)i);
                        goto done;
                    }
                }
            }
        }
    }
    rpc_compact_params cp;
    memset(&cp, 0, sizeof cp);
    cp.k = layer_k(self, ly);
    cp.v = layer_v(self, ly);
    cp.dtype = self->dtype;
    cp.B = self->B;
    cp.H = self->H;
    cp.L = ly->length;
    cp.D = self->D;
    kv_strides(self, ly->cap, cp.k_stride);
    kv_strides(self, ly->cap, cp.v_stride);
    cp.indices = (const int64_t *)ix.data;
    cp.A = ix.shape[1];
    cp.idx_stride_b = ix.strides[0];
    cp.idx_stride_a = ix.strides[1];
    cp.start = start;
    cp.end = end;
    cp.keep = keep;
    rpc_acc_compact_params ap;
    const int has_acc = acc_params(self, ly, &cp, &ap);
    char err[RPC_ERR_LEN] = {0};
    int rc;
    const int dev = ly->dev_id;
    const int on_cuda = ly->dev_type == RPC_DEV_CUDA;
    Py_BEGIN_ALLOW_THREADS
    rc = on_cuda ? rpc_cuda_compact(dev, &cp, (void *)stream, err) : rpc_cpu_compact(&cp, err);
    if (rc == RPC_OK && has_acc) {
        rc = on_cuda ? rpc_cuda_compact_acc(dev, &ap, (void *)stream, err) : rpc_cpu_compact_acc(&ap, err);
    }
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    ly->length = start + keep + W;
    if (sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->length);
done:
    Py_XDECREF(ikeep);
    cache_leave(self);
    return result;
}

static PyObject *kvcache_ring_position(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (parse_layer(self, layer_obj, &layer) == 0) {
        result = PyLong_FromLongLong((long long)self->layers[layer].q_pos);
    }
    cache_leave(self);
    return result;
}

static PyObject *get_accumulators(PyObject *op, void *closure) {
    (void)closure;
    KVCacheObject *self = (KVCacheObject *)op;
    if (require_init(self) < 0) {
        return NULL;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is closed");
        return NULL;
    }
    return PyBool_FromLong(self->accumulators);
}

/* ------------------------------------------------------------------ attributes */

static PyObject *get_closed(PyObject *op, void *closure) {
    (void)closure;
    return PyBool_FromLong(((KVCacheObject *)op)->closed);
}

/* Plain configuration values; readable unless closed. */
static PyObject *get_config(PyObject *op, void *closure) {
    KVCacheObject *self = (KVCacheObject *)op;
    if (require_init(self) < 0) {
        return NULL;
    }
    if (self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is closed");
        return NULL;
    }
    const char *which = (const char *)closure;
    if (strcmp(which, "num_layers") == 0) return PyLong_FromLongLong((long long)self->num_layers);
    if (strcmp(which, "batch") == 0) return PyLong_FromLongLong((long long)self->B);
    if (strcmp(which, "kv_heads") == 0) return PyLong_FromLongLong((long long)self->H);
    if (strcmp(which, "head_dim") == 0) return PyLong_FromLongLong((long long)self->D);
    if (strcmp(which, "window") == 0) return PyLong_FromLongLong((long long)self->window);
    if (strcmp(which, "q_heads") == 0) return PyLong_FromLongLong((long long)self->Hq);
    if (strcmp(which, "dtype") == 0) return PyUnicode_FromString(rpc_dtype_name(self->dtype));
    if (strcmp(which, "fixed_capacity") == 0) return PyBool_FromLong(self->fixed);
    if (strcmp(which, "nbytes") == 0) return PyLong_FromLongLong((long long)self->nbytes);
    if (strcmp(which, "peak_nbytes") == 0) return PyLong_FromLongLong((long long)self->peak_nbytes);
    if (strcmp(which, "busy") == 0) return PyBool_FromLong(self->busy);
    if (strcmp(which, "scratch_nbytes") == 0) {
        long long total = 0;
        for (int i = 0; i < self->n_scratch; i++) total += (long long)self->scratch[i].nbytes;
        return PyLong_FromLongLong(total);
    }
    PyErr_SetString(PyExc_AttributeError, which);
    return NULL;
}

static PyGetSetDef kvcache_getset[] = {
    {"closed", get_closed, NULL, "True after close().", NULL},
    {"num_layers", get_config, NULL, "Number of layers.", "num_layers"},
    {"batch", get_config, NULL, "Batch size B.", "batch"},
    {"kv_heads", get_config, NULL, "Key/value heads H.", "kv_heads"},
    {"head_dim", get_config, NULL, "Head dimension D.", "head_dim"},
    {"window", get_config, NULL, "Query ring length R (0 = no ring).", "window"},
    {"q_heads", get_config, NULL, "Query heads (0 until known).", "q_heads"},
    {"dtype", get_config, NULL, "Element type name.", "dtype"},
    {"fixed_capacity", get_config, NULL, "True when layers never grow.", "fixed_capacity"},
    {"nbytes", get_config, NULL, "Bytes of K/V, ring and length blocks this cache holds now.", "nbytes"},
    {"peak_nbytes", get_config, NULL, "Largest value nbytes has had.", "peak_nbytes"},
    {"busy", get_config, NULL, "True while a method runs (another thread would get RuntimeError).", "busy"},
    {"scratch_nbytes", get_config, NULL,
     "Bytes of compression scratch held (one block per device, reused by every compression; not in nbytes).",
     "scratch_nbytes"},
    {"padding", kvcache_get_padding, NULL, "Left-padding count per sequence (tuple).", NULL},
    {"accumulators", get_accumulators, NULL, "True when layers keep an H2O accumulator.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef kvcache_methods[] = {
    {"append", KW kvcache_append, METH_VARARGS | METH_KEYWORDS,
     "append(layer, keys, values, stream=None) -> int: copy [B, H, t, D] keys/values in; returns the new length."},
    {"allocate", KW kvcache_allocate, METH_VARARGS | METH_KEYWORDS,
     "allocate(layer, device_type, device_id=0, capacity=0, stream=None) -> int: place a layer; returns capacity."},
    {"keys", kvcache_keys, METH_O, "keys(layer) -> View [B, H, length, D]."},
    {"values", kvcache_values, METH_O, "values(layer) -> View [B, H, length, D]."},
    {"storage_keys", kvcache_storage_keys, METH_O, "storage_keys(layer) -> View [B, H, capacity, D]."},
    {"storage_values", kvcache_storage_values, METH_O, "storage_values(layer) -> View [B, H, capacity, D]."},
    {"length", kvcache_length, METH_O, "length(layer) -> physical tokens."},
    {"seen", kvcache_seen, METH_O, "seen(layer) -> tokens appended since the last reset."},
    {"capacity", kvcache_capacity, METH_O, "capacity(layer) -> tokens the layer can hold without growing."},
    {"generation", kvcache_generation, METH_O, "generation(layer) -> count of (re)allocations."},
    {"device", kvcache_device, METH_O, "device(layer) -> 'cpu', 'cuda:N' or None if not placed yet."},
    {"advance", KW kvcache_advance, METH_VARARGS | METH_KEYWORDS,
     "advance(layer, tokens, queries=0) -> (length, ring_position): host bookkeeping for tokens/queries that\n"
     "kernels already wrote (append_at_length, ring_write); no copy and no device update."},
    {"set_length", KW kvcache_set_length, METH_VARARGS | METH_KEYWORDS,
     "set_length(layer, length, *, stream=None) -> length: host bookkeeping after the caller compacted the\n"
     "layer's storage itself (0 <= length <= length now; seen and the ring stay; the accumulator is zeroed\n"
     "past the new length)."},
    {"device_lengths", kvcache_device_lengths, METH_O,
     "device_lengths(layer) -> View int64[2] {length, seen} on the layer's device."},
    {"set_padding", kvcache_set_padding, METH_O, "set_padding(counts): left-padding tokens per sequence."},
    {"record_query", KW kvcache_record_query, METH_VARARGS | METH_KEYWORDS,
     "record_query(layer, q, stream=None) -> int: keep the last `window` queries; returns num_queries."},
    {"num_queries", kvcache_num_queries, METH_O, "num_queries(layer) -> min(recorded, window)."},
    {"queries", kvcache_queries, METH_O, "queries(layer) -> View [B, Hq, window, D] of the ring."},
    {"compress", KW kvcache_compress, METH_VARARGS | METH_KEYWORDS,
     "compress(layer, start, keep, *, aggregation='all', pooling='avg', kernel_size=7, stream=None,\n"
     "         return_details=False, scores_out=None, indices_out=None) -> new length, or\n"
     "         (new_length, scores, indices) with return_details. scores_out (float32 [B, A, N]) and\n"
     "         indices_out (int64 [B, A, keep]): writable C-contiguous tensors on the layer's device that\n"
     "         receive the scores / kept indices; without them (and without return_details) both stay in\n"
     "         the cache's reused scratch, so a compression allocates nothing."},
    {"reset", KW kvcache_reset, METH_VARARGS | METH_KEYWORDS,
     "reset(stream=None): lengths, seen, rings and padding to zero; keeps allocations."},
    {"close", kvcache_close, METH_NOARGS, "close(): free everything; later calls raise ValueError."},
    {"accumulate", KW kvcache_accumulate, METH_VARARGS | METH_KEYWORDS,
     "accumulate(layer, q, *, scale=None, stream=None): H2O step: add the attention of this step's query\n"
     "q [B, Hq, 1, D] over the live keys [padding[b], length), summed over each KV head's query heads."},
    {"accumulator", kvcache_accumulator, METH_O,
     "accumulator(layer) -> View float32 [B, H, length] of the layer's H2O accumulator (zero-copy)."},
    {"compact", KW kvcache_compact, METH_VARARGS | METH_KEYWORDS,
     "compact(layer, start, indices, *, stream=None) -> new length: keep [0, start), start + indices\n"
     "(int64 [B, 1 or H, keep], strictly ascending, < length - window - start) and the window; in place\n"
     "on K, V and the accumulator."},
    {"ring_position", kvcache_ring_position, METH_O,
     "ring_position(layer) -> int: the next ring slot record_query writes; slot (pos - 1 - i) % window\n"
     "holds the i-th newest query."},
    {"__enter__", kvcache_enter_ctx, METH_NOARGS, NULL},
    {"__exit__", kvcache_exit_ctx, METH_VARARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *kvcache_repr(PyObject *op) {
    KVCacheObject *self = (KVCacheObject *)op;
    if (self->closed || self->layers == NULL) {
        return PyUnicode_FromString("<rpc_py._C.KVCache (closed)>");
    }
    return PyUnicode_FromFormat("<rpc_py._C.KVCache layers=%lld batch=%lld kv_heads=%lld head_dim=%lld dtype=%s "
                                "window=%lld>",
                                (long long)self->num_layers, (long long)self->B, (long long)self->H,
                                (long long)self->D, rpc_dtype_name(self->dtype), (long long)self->window);
}

static PyType_Slot kvcache_slots[] = {
    {Py_tp_init, kvcache_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, kvcache_dealloc},
    {Py_tp_traverse, kvcache_traverse},
    {Py_tp_clear, kvcache_clear},
    {Py_tp_repr, kvcache_repr},
    {Py_tp_methods, kvcache_methods},
    {Py_tp_getset, kvcache_getset},
    {Py_tp_doc, "KVCache(num_layers, batch, kv_heads, head_dim, dtype='float32', *, capacity=0,\n"
                "        fixed_capacity=False, window=0, q_heads=0, accumulators=False)\n\n"
                "Per-layer key/value storage with query rings for Reasoning Path Compression."},
    {0, NULL},
};

static PyType_Spec kvcache_spec = {
    .name = "rpc_py._C.KVCache",
    .basicsize = sizeof(KVCacheObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = kvcache_slots,
};

int rpc_kvcache_register(PyObject *module, rpc_module_state *st) {
    st->KVCacheType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &kvcache_spec, NULL);
    if (st->KVCacheType == NULL) {
        return -1;
    }
    return PyModule_AddType(module, st->KVCacheType);
}
