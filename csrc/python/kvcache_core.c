/* kvcache_core.c: what every KVCache method builds on (kvcache_core.h): the busy flag, layer and argument
 * checks, storage growth and placement (K/V and the H2O accumulator move together), the device copies
 * of the lengths and padding that capture-friendly kernels read.
 */
#include "kvcache_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

size_t kv_elem_size(KVCacheObject *self) {
    return rpc_dtype_size(self->dtype);
}

rpc_module_state *kv_state(KVCacheObject *self) {
    return rpc_get_state_from_type(Py_TYPE(self));
}

void kv_account(KVCacheObject *self, int64_t delta) {
    self->nbytes += delta;
    if (self->nbytes > self->peak_nbytes) {
        self->peak_nbytes = self->nbytes;
    }
}

void kv_drop_storage(KVCacheObject *self, PyObject **slot) {
    if (*slot != NULL) {
        kv_account(self, -(int64_t)rpc_storage_nbytes(*slot));
        Py_CLEAR(*slot);
    }
}

/* Enter/leave a method: refuses closed or busy caches. */
int kv_enter(KVCacheObject *self) {
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

void kv_leave(KVCacheObject *self) {
    self->busy = 0;
}

int kv_parse_layer(KVCacheObject *self, PyObject *obj, int64_t *out) {
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
int kv_check_4d(KVCacheObject *self, const rpc_tensor *t, const char *argname, int64_t heads) {
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

int kv_check_device(rpc_layer *ly, int64_t layer, const rpc_tensor *t, const char *argname) {
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

int kv_check_cuda_usable(rpc_device_type dt, int dev_id, const char *argname) {
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
int kv_copy4d(rpc_device_type dt, int dev_id, void *dst, const int64_t dst_stride[4], const void *src,
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

char *kv_layer_k(KVCacheObject *self, rpc_layer *ly) {
    (void)self;
    return (char *)rpc_storage_data(ly->storage);
}

char *kv_layer_v(KVCacheObject *self, rpc_layer *ly) {
    return (char *)rpc_storage_data(ly->storage) + (size_t)(self->B * self->H * ly->cap * self->D) * kv_elem_size(self);
}

void kv_strides(KVCacheObject *self, int64_t cap, int64_t s[4]) {
    s[0] = self->H * cap * self->D;
    s[1] = cap * self->D;
    s[2] = self->D;
    s[3] = 1;
}

/* Pushes {length, seen} into the layer's lenbuf (host: direct store; CUDA: a one-thread kernel with the
 * values as arguments, ordered on the stream: no copy from pageable memory, no wait). */
int kv_sync_lengths(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
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
const int64_t *kv_device_padding(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
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

void kv_place_layer(rpc_layer *ly, rpc_device_type dt, int dev_id) {
    if (!ly->placed) {
        ly->placed = 1;
        ly->dev_type = dt;
        ly->dev_id = dt == RPC_DEV_CPU ? 0 : dev_id;
    }
}

/* Makes sure the layer's K/V block holds at least `needed` tokens; `what` names the caller's argument. */
int kv_ensure_capacity(KVCacheObject *self, int64_t layer, int64_t needed, int64_t requested,
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
    size_t es = kv_elem_size(self);
    /* Overflow guard: B*H*cap*D*2 elements must fit in size_t. */
    double total = 2.0 * (double)self->B * (double)self->H * (double)newcap * (double)self->D * (double)es;
    if (total > 9.0e18) {
        PyErr_Format(PyExc_ValueError, "%s: capacity %lld is too large", what, (long long)newcap);
        return -1;
    }
    size_t nbytes = (size_t)(2 * self->B * self->H * newcap * self->D) * es;
    PyObject *storage = rpc_storage_new(kv_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
    if (storage == NULL) {
        return -1;
    }
    kv_account(self, (int64_t)nbytes);
    if (ly->storage != NULL && ly->length > 0) {
        int64_t ds[4], ss[4];
        kv_strides(self, newcap, ds);
        kv_strides(self, ly->cap, ss);
        int64_t shape[4] = {self->B, self->H, ly->length, self->D};
        char *nk = (char *)rpc_storage_data(storage);
        char *nv = nk + (size_t)(self->B * self->H * newcap * self->D) * es;
        if (kv_copy4d(ly->dev_type, ly->dev_id, nk, ds, kv_layer_k(self, ly), ss, shape, es, stream) < 0 ||
            kv_copy4d(ly->dev_type, ly->dev_id, nv, ds, kv_layer_v(self, ly), ss, shape, es, stream) < 0) {
            kv_account(self, -(int64_t)nbytes);
            Py_DECREF(storage);
            return -1;
        }
    }
    PyObject *acc = NULL; /* grown (and copied) before the swap, so a failure leaves the layer as it was */
    if (self->accumulators && kv_acc_grow(self, ly, newcap, stream, &acc) < 0) {
        kv_account(self, -(int64_t)nbytes);
        Py_DECREF(storage);
        return -1;
    }
    kv_drop_storage(self, &ly->storage);
    ly->storage = storage;
    if (acc != NULL) {
        kv_drop_storage(self, &ly->accstorage);
        ly->accstorage = acc;
    }
    ly->cap = newcap;
    ly->generation += 1;
    if (ly->lenbuf == NULL) {
        PyObject *lb = rpc_storage_new(kv_state(self), ly->dev_type, ly->dev_id,
                                       (size_t)(2 + self->B) * sizeof(int64_t), stream);
        if (lb == NULL) {
            return -1;
        }
        ly->lenbuf = lb;
        ly->pad_dirty = 1;
        if (kv_sync_lengths(self, ly, stream) < 0) {
            return -1;
        }
    }
    return 0;
}

/* A cache whose __init__ failed or was never run is unusable: treat it as closed. */
int kv_require_init(KVCacheObject *self) {
    if (self->layers == NULL && !self->closed) {
        PyErr_SetString(PyExc_ValueError, "KVCache is not initialised");
        return -1;
    }
    return 0;
}

int64_t kv_acc_strides(KVCacheObject *self, int64_t cap, int64_t s[3]) {
    s[0] = self->H * cap;
    s[1] = cap;
    s[2] = 1;
    return s[0];
}

/* New zeroed accumulator block of `newcap` tokens holding a copy of [0, length) of the current one. */
int kv_acc_grow(KVCacheObject *self, rpc_layer *ly, int64_t newcap, intptr_t stream, PyObject **out) {
    *out = NULL;
    /* B * H * newcap * D * element size already fits (kv_ensure_capacity checked it), so this does too. */
    const size_t nbytes = (size_t)(self->B * self->H * newcap) * sizeof(float);
    PyObject *storage = rpc_storage_new(kv_state(self), ly->dev_type, ly->dev_id, nbytes, stream);
    if (storage == NULL) {
        return -1;
    }
    kv_account(self, (int64_t)nbytes);
    if (ly->accstorage != NULL && ly->length > 0) {
        int64_t ds[4] = {self->H * newcap, newcap, 1, 1}, ss[4] = {self->H * ly->cap, ly->cap, 1, 1};
        int64_t shape[4] = {self->B, self->H, ly->length, 1};
        if (kv_copy4d(ly->dev_type, ly->dev_id, rpc_storage_data(storage), ds, rpc_storage_data(ly->accstorage), ss,
                   shape, sizeof(float), stream) < 0) {
            kv_account(self, -(int64_t)nbytes);
            Py_DECREF(storage);
            return -1;
        }
    }
    *out = storage;
    return 0;
}

/* Parameters of the accumulator compaction that follows the K/V compaction `cp` (same indices, in host or
 * device memory as the layer); 0 when the layer has no accumulator. */
int kv_acc_params(KVCacheObject *self, rpc_layer *ly, const rpc_compact_params *cp, rpc_acc_compact_params *ap) {
    memset(ap, 0, sizeof *ap);
    if (ly->accstorage == NULL) {
        return 0;
    }
    ap->acc = (float *)rpc_storage_data(ly->accstorage);
    ap->B = self->B;
    ap->H = self->H;
    ap->L = cp->L;
    kv_acc_strides(self, ly->cap, ap->acc_stride);
    ap->indices = cp->indices;
    ap->A = cp->A;
    ap->idx_stride_b = cp->idx_stride_b;
    ap->idx_stride_a = cp->idx_stride_a;
    ap->start = cp->start;
    ap->end = cp->end;
    ap->keep = cp->keep;
    return 1;
}

int kv_acc_zero(KVCacheObject *self, rpc_layer *ly, intptr_t stream) {
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

int kv_require_accumulators(KVCacheObject *self) {
    if (!self->accumulators) {
        PyErr_SetString(PyExc_ValueError,
                        "accumulators: this KVCache was built without accumulators (pass accumulators=True)");
        return -1;
    }
    return 0;
}

void kv_compact_params(KVCacheObject *self, rpc_layer *ly, int64_t start, int64_t end, int64_t keep,
                       const int64_t *indices, int64_t A, int64_t idx_stride_b, int64_t idx_stride_a,
                       rpc_compact_params *cp) {
    memset(cp, 0, sizeof *cp);
    cp->k = kv_layer_k(self, ly);
    cp->v = kv_layer_v(self, ly);
    cp->dtype = self->dtype;
    cp->B = self->B;
    cp->H = self->H;
    cp->L = ly->length;
    cp->D = self->D;
    kv_strides(self, ly->cap, cp->k_stride);
    kv_strides(self, ly->cap, cp->v_stride);
    cp->indices = indices;
    cp->A = A;
    cp->idx_stride_b = idx_stride_b;
    cp->idx_stride_a = idx_stride_a;
    cp->start = start;
    cp->end = end;
    cp->keep = keep;
}
