/* kvcache.c: the KVCache heap type: per-layer key/value storage, query rings, and the method table that
 * also takes compression (kvcache_compress.c) and the policies' methods (kvcache_policy.c); the
 * helpers they all use are in kvcache_core.c (kvcache_core.h lists the files and their order).
 *
 * Bookkeeping and validation only; the arithmetic lives in the kernels (copy4d, score, select,
 * compact) that these files call with plain structs. Each layer owns one Storage block holding K then
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
#include "kvcache_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

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
    kv_release_scratch(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (rpc_from_dlpack(keys, "keys", stream, &k, &kkeep) < 0 || kv_check_4d(self, &k, "keys", self->H) < 0 ||
        kv_check_device(ly, layer, &k, "keys") < 0 ||
        (!ly->placed && kv_check_cuda_usable(k.device_type, k.device_id, "keys") < 0)) {
        goto done;
    }
    if (rpc_from_dlpack(values, "values", stream, &v, &vkeep) < 0 ||
        kv_check_4d(self, &v, "values", self->H) < 0) {
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
    kv_place_layer(ly, k.device_type, k.device_id);
    if (kv_ensure_capacity(self, layer, ly->length + t, 0, stream, "keys") < 0) {
        goto done;
    }
    if (t > 0) {
        int64_t ds[4], shape[4] = {self->B, self->H, t, self->D};
        kv_strides(self, ly->cap, ds);
        size_t es = kv_elem_size(self);
        size_t off = (size_t)(ly->length * self->D) * es;
        if (kv_copy4d(ly->dev_type, ly->dev_id, kv_layer_k(self, ly) + off, ds, k.data, k.strides, shape, es, stream) < 0 ||
            kv_copy4d(ly->dev_type, ly->dev_id, kv_layer_v(self, ly) + off, ds, v.data, v.strides, shape, es, stream) < 0) {
            goto done;
        }
    }
    ly->length += t;
    ly->seen += t;
    if (kv_sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->length);
done:
    Py_XDECREF(kkeep);
    Py_XDECREF(vkeep);
    kv_leave(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || parse_device_type(dt_obj, &dt) < 0 ||
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
    if (dt == RPC_DEV_CUDA && kv_check_cuda_usable(dt, dev_id, "device_id") < 0) {
        goto done;
    }
    kv_place_layer(ly, dt, dev_id);
    if (kv_ensure_capacity(self, layer, ly->length, (int64_t)capacity, stream, "capacity") < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->cap);
done:
    kv_leave(self);
    return result;
}

/* ------------------------------------------------------------------ views */

static PyObject *empty_view(KVCacheObject *self, int64_t heads, int64_t len) {
    int64_t shape[4] = {self->B, heads, len, self->D};
    int64_t strides[4] = {heads * len * self->D, len * self->D, self->D, 1};
    return rpc_view_new(kv_state(self), Py_None, NULL, RPC_DEV_CPU, 0, self->dtype, 4, shape, strides);
}

/* which: 0 keys, 1 values; full: capacity instead of length */
static PyObject *kv_view(KVCacheObject *self, PyObject *layer_obj, int which, int full) {
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (kv_parse_layer(self, layer_obj, &layer) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage == NULL) {
        result = empty_view(self, self->H, 0);
        goto done;
    }
    int64_t shape[4] = {self->B, self->H, full ? ly->cap : ly->length, self->D}, strides[4];
    kv_strides(self, ly->cap, strides);
    result = rpc_view_new(kv_state(self), ly->storage, which ? kv_layer_v(self, ly) : kv_layer_k(self, ly), ly->dev_type,
                          ly->dev_id, self->dtype, 4, shape, strides);
done:
    kv_leave(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) == 0) {
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
    kv_leave(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (!ly->placed) {
            result = Py_NewRef(Py_None);
        } else {
            char buf[48];
            rpc_format_device(buf, sizeof buf, ly->dev_type, ly->dev_id);
            result = PyUnicode_FromString(buf);
        }
    }
    kv_leave(self);
    return result;
}

static PyObject *kvcache_device_lengths(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (kv_parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (ly->lenbuf == NULL) {
            PyErr_Format(PyExc_ValueError,
                         "layer: layer %lld has no storage yet (append or allocate first)", (long long)layer);
        } else {
            int64_t shape[1] = {2}, strides[1] = {1};
            result = rpc_view_new(kv_state(self), ly->lenbuf, rpc_storage_data(ly->lenbuf), ly->dev_type,
                                  ly->dev_id, RPC_I64, 1, shape, strides);
        }
    }
    kv_leave(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0) {
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
    kv_leave(self);
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
    kv_leave(self);
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
    kv_leave(self);
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    if (self->window <= 0) {
        PyErr_SetString(PyExc_ValueError, "window: record_query needs a cache built with window > 0, got window=0");
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (rpc_from_dlpack(q_obj, "q", stream, &q, &keep) < 0 || kv_check_4d(self, &q, "q", self->Hq > 0 ? self->Hq : -1) < 0 ||
        kv_check_device(ly, layer, &q, "q") < 0 ||
        (!ly->placed && kv_check_cuda_usable(q.device_type, q.device_id, "q") < 0)) {
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
    kv_place_layer(ly, q.device_type, q.device_id);
    size_t es = kv_elem_size(self);
    const int64_t W = self->window, Hq = self->Hq, D = self->D;
    if (ly->qstorage == NULL) {
        size_t nbytes = (size_t)(self->B * Hq * W * D) * es;
        ly->qstorage = rpc_storage_new(kv_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
        if (ly->qstorage == NULL) {
            goto done;
        }
        kv_account(self, (int64_t)nbytes);
        ly->q_pos = 0;
    }
    int64_t t = q.shape[2];
    int64_t ds[4] = {Hq * W * D, W * D, D, 1};
    char *ring = (char *)rpc_storage_data(ly->qstorage);
    if (t >= W) {
        /* Only the last W queries matter; they fill the ring from slot 0. */
        const char *src = (const char *)q.data + (size_t)((t - W) * q.strides[2]) * es;
        int64_t shape[4] = {self->B, Hq, W, D};
        if (kv_copy4d(ly->dev_type, ly->dev_id, ring, ds, src, q.strides, shape, es, stream) < 0) {
            goto done;
        }
        ly->q_pos = 0;
    } else if (t > 0) {
        int64_t first = W - ly->q_pos < t ? W - ly->q_pos : t;
        int64_t shape1[4] = {self->B, Hq, first, D};
        if (kv_copy4d(ly->dev_type, ly->dev_id, ring + (size_t)(ly->q_pos * D) * es, ds, q.data, q.strides, shape1, es,
                   stream) < 0) {
            goto done;
        }
        if (t > first) {
            int64_t shape2[4] = {self->B, Hq, t - first, D};
            const char *src = (const char *)q.data + (size_t)(first * q.strides[2]) * es;
            if (kv_copy4d(ly->dev_type, ly->dev_id, ring, ds, src, q.strides, shape2, es, stream) < 0) {
                goto done;
            }
        }
        ly->q_pos = (ly->q_pos + t) % W;
    }
    ly->q_recorded += t;
    result = PyLong_FromLongLong((long long)(ly->q_recorded < W ? ly->q_recorded : W));
done:
    Py_XDECREF(keep);
    kv_leave(self);
    return result;
}

static PyObject *kvcache_queries(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (kv_parse_layer(self, layer_obj, &layer) == 0) {
        rpc_layer *ly = &self->layers[layer];
        if (ly->qstorage == NULL) {
            PyErr_Format(PyExc_ValueError, "layer: layer %lld has no recorded queries (call record_query first)",
                         (long long)layer);
        } else {
            const int64_t W = self->window, Hq = self->Hq, D = self->D;
            int64_t shape[4] = {self->B, Hq, W, D}, strides[4] = {Hq * W * D, W * D, D, 1};
            result = rpc_view_new(kv_state(self), ly->qstorage, rpc_storage_data(ly->qstorage), ly->dev_type,
                                  ly->dev_id, self->dtype, 4, shape, strides);
        }
    }
    kv_leave(self);
    return result;
}

/* ------------------------------------------------------------------ compress */

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
        if (kv_sync_lengths(self, ly, stream) < 0) {
            goto done;
        }
        if (ly->accstorage != NULL && kv_acc_zero(self, ly, stream) < 0) {
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    kv_leave(self);
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
    if (kv_require_init(self) < 0) {
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

static PyObject *kvcache_ring_position(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (kv_parse_layer(self, layer_obj, &layer) == 0) {
        result = PyLong_FromLongLong((long long)self->layers[layer].q_pos);
    }
    kv_leave(self);
    return result;
}

static PyObject *get_accumulators(PyObject *op, void *closure) {
    (void)closure;
    KVCacheObject *self = (KVCacheObject *)op;
    if (kv_require_init(self) < 0) {
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
    if (kv_require_init(self) < 0) {
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
    {"set_length", KW kv_set_length, METH_VARARGS | METH_KEYWORDS,
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
    {"compress", KW kv_compress, METH_VARARGS | METH_KEYWORDS,
     "compress(layer, start, keep, *, aggregation='all', pooling='avg', kernel_size=7, stream=None,\n"
     "         return_details=False, scores_out=None, indices_out=None) -> new length, or\n"
     "         (new_length, scores, indices) with return_details. scores_out (float32 [B, A, N]) and\n"
     "         indices_out (int64 [B, A, keep]): writable C-contiguous tensors on the layer's device that\n"
     "         receive the scores / kept indices; without them (and without return_details) both stay in\n"
     "         the cache's reused scratch, so a compression allocates nothing."},
    {"reset", KW kvcache_reset, METH_VARARGS | METH_KEYWORDS,
     "reset(stream=None): lengths, seen, rings and padding to zero; keeps allocations."},
    {"close", kvcache_close, METH_NOARGS, "close(): free everything; later calls raise ValueError."},
    {"accumulate", KW kv_accumulate, METH_VARARGS | METH_KEYWORDS,
     "accumulate(layer, q, *, scale=None, stream=None): H2O step: add the attention of this step's query\n"
     "q [B, Hq, 1, D] over the live keys [padding[b], length), summed over each KV head's query heads."},
    {"accumulator", kv_accumulator, METH_O,
     "accumulator(layer) -> View float32 [B, H, length] of the layer's H2O accumulator (zero-copy)."},
    {"compact", KW kv_compact, METH_VARARGS | METH_KEYWORDS,
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
