/* kvcache_policy.c: what the selection policies other than RPC need from the cache: H2O's per-step
 * accumulation, the accumulator view, compaction with indices the caller chose (their scores went
 * through select), and set_length after a compaction done outside the cache (the torch kernels).
 */
#include "kvcache_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

PyObject *kv_accumulate(PyObject *op, PyObject *args, PyObject *kwargs) {
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0 ||
        kv_require_accumulators(self) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->storage == NULL || ly->accstorage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds no tokens (append first)", (long long)layer);
        goto done;
    }
    if (rpc_from_dlpack(q_obj, "q", stream, &q, &qkeep) < 0 || kv_check_4d(self, &q, "q", self->Hq > 0 ? self->Hq : -1) < 0 ||
        kv_check_device(ly, layer, &q, "q") < 0) {
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
    p.k = kv_layer_k(self, ly);
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
    kv_acc_strides(self, ly->cap, p.acc_stride);
    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (ly->dev_type == RPC_DEV_CUDA) {
        /* The padding counts on the device, kept with the layer's lengths: no allocation or copy per step. */
        if ((p.padding = kv_device_padding(self, ly, stream)) == NULL) {
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
    kv_leave(self);
    return result;
}

PyObject *kv_accumulator(PyObject *op, PyObject *layer_obj) {
    KVCacheObject *self = (KVCacheObject *)op;
    ENTER(self);
    PyObject *result = NULL;
    int64_t layer;
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || kv_require_accumulators(self) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    if (ly->accstorage == NULL) {
        int64_t shape[3] = {self->B, self->H, 0}, strides[3] = {0, 0, 1};
        result = rpc_view_new(kv_state(self), Py_None, NULL, RPC_DEV_CPU, 0, RPC_F32, 3, shape, strides);
        goto done;
    }
    int64_t shape[3] = {self->B, self->H, ly->length}, strides[3];
    kv_acc_strides(self, ly->cap, strides);
    result = rpc_view_new(kv_state(self), ly->accstorage, rpc_storage_data(ly->accstorage), ly->dev_type, ly->dev_id,
                          RPC_F32, 3, shape, strides);
done:
    kv_leave(self);
    return result;
}

PyObject *kv_compact(PyObject *op, PyObject *args, PyObject *kwargs) {
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
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
        rpc_check_ndim_dtype(&ix, "indices", 3, RPC_I64) < 0 || kv_check_device(ly, layer, &ix, "indices") < 0 ||
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
    kv_compact_params(self, ly, start, end, keep, (const int64_t *)ix.data, ix.shape[1], ix.strides[0], ix.strides[1],
                      &cp);
    rpc_acc_compact_params ap;
    const int has_acc = kv_acc_params(self, ly, &cp, &ap);
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
    if (kv_sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    result = PyLong_FromLongLong((long long)ly->length);
done:
    Py_XDECREF(ikeep);
    kv_leave(self);
    return result;
}

/* set_length: host bookkeeping after the caller rewrote the layer's storage itself (a compaction done
 * with torch ops, rpc_py.torch_kernels): the live length drops to `length`; seen and the query ring stay.
 * The device lengths follow, and the accumulator's vacated positions are zeroed (its invariant). */
PyObject *kv_set_length(PyObject *op, PyObject *args, PyObject *kwargs) {
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
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
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
    if (kv_sync_lengths(self, ly, stream) < 0) {
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
    kv_leave(self);
    return result;
}
