/* decode_binding.c: module functions of the capture-friendly decode step (rpc_py._C).
 *
 *   decode_attention(q, keys, values, out, lengths, *, padding=None, scale=None, workspace=None,
 *                    splits=0, stream=None, reference=False)
 *   decode_workspace_size(batch, q_heads, kv_heads, head_dim, capacity, splits=0) -> (splits, floats)
 *   append_at_length(key_storage, value_storage, keys, values, lengths, *, stream=None)
 *   ring_write(ring, q, lengths, *, offset=0, stream=None)
 *
 * Binding only: arguments arrive through DLPack, are checked (dtype, device, shape, strides,
 * writability) and become the plain structs of rpc.h; the kernels in decode_cpu.c / decode_cuda.cu do
 * the work. `lengths` is an int64 tensor on the data's device (normally KVCache.device_lengths(layer))
 * whose values are read by the kernels when they run, not here: on CUDA nothing in these functions
 * reads device memory or synchronizes, so they can be recorded in a CUDA graph. For the same reason
 * decode_attention takes its CUDA scratch memory as the `workspace` argument (sized by
 * decode_workspace_size); without one it allocates, which is fine eagerly but not during capture.
 */
#include "pyrpc.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* Work below this many multiply-adds keeps the GIL on the CPU: releasing it costs more. */
#define DEC_GIL_RELEASE_WORK ((int64_t)1 << 16)

static int dec_check_dtype(const rpc_tensor *t, const char *argname, rpc_dtype want, const char *why) {
    if (t->dtype != want) {
        PyErr_Format(PyExc_ValueError, "%s: expected dtype %s (%s), got %s", argname, rpc_dtype_name(want), why,
                     rpc_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

/* 4-D with the given sizes (-1 = any). */
static int dec_check_shape4(const rpc_tensor *t, const char *argname, int64_t s0, int64_t s1, int64_t s2, int64_t s3,
                            const char *expect) {
    const int64_t want[4] = {s0, s1, s2, s3};
    int ok = t->ndim == 4;
    for (int i = 0; ok && i < 4; i++) ok = want[i] < 0 || t->shape[i] == want[i];
    if (!ok) {
        char got[160];
        rpc_format_shape(got, sizeof got, t);
        PyErr_Format(PyExc_ValueError, "%s: expected shape %s, got %s", argname, expect, got);
        return -1;
    }
    return 0;
}

static int dec_check_written(const rpc_tensor *t, const char *argname) {
    if (rpc_check_writable(t, argname) < 0) return -1;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] > 1 && t->strides[i] == 0) {
            PyErr_Format(PyExc_ValueError, "%s: expected a tensor without zero strides (it is written), got stride 0 "
                         "in dimension %d", argname, i);
            return -1;
        }
    }
    return 0;
}

/* An int64 vector of at least `min_len` elements with unit stride, on `ref`'s device. */
static int dec_check_lengths(const rpc_tensor *t, const char *argname, int64_t min_len, const rpc_tensor *ref,
                             const char *refname, int written) {
    if (t->ndim != 1 || t->dtype != RPC_I64 || t->shape[0] < min_len || (t->shape[0] > 1 && t->strides[0] != 1)) {
        char got[160];
        rpc_format_shape(got, sizeof got, t);
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a contiguous 1-D int64 tensor of at least %lld elements "
                     "(KVCache.device_lengths(layer)), got %s %s",
                     argname, (long long)min_len, rpc_dtype_name(t->dtype), got);
        return -1;
    }
    if (rpc_check_same_device(ref, refname, t, argname) < 0) return -1;
    if (written && rpc_check_writable(t, argname) < 0) return -1;
    return 0;
}

static int dec_stream_of(PyObject *obj, intptr_t *stream) {
    return rpc_parse_stream(obj, stream);
}

/* rpc_decode_workspace_floats, or -1 with ValueError when the count does not fit int64 (sizes come from
 * the caller: decode_workspace_size takes plain ints). */
static int64_t dec_workspace_floats(int64_t B, int64_t Hq, int64_t D, int64_t splits) {
    if ((double)B * (double)Hq * (double)splits * ((double)D + 2.0) > 4.0e18) {
        PyErr_Format(PyExc_ValueError,
                     "decode_workspace_size: a workspace of batch=%lld x q_heads=%lld x splits=%lld x (head_dim=%lld "
                     "+ 2) floats does not fit a tensor",
                     (long long)B, (long long)Hq, (long long)splits, (long long)D);
        return -1;
    }
    return rpc_decode_workspace_floats(B, Hq, D, splits);
}

/* rpc_decode_splits with the capacity clamped: the split count saturates long before 2^40 slots, and a
 * zero-stride cache may claim up to INT64_MAX of them. */
static int64_t dec_splits(int64_t B, int64_t Hq, int64_t Hkv, int64_t cap) {
    return rpc_decode_splits(B, Hq, Hkv, cap < ((int64_t)1 << 40) ? cap : ((int64_t)1 << 40));
}

/* ------------------------------------------------------------------ decode_attention */

static PyObject *dec_decode_attention(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "keys", "values", "out", "lengths", "padding", "scale", "workspace", "splits",
                             "stream", "reference", "version", NULL};
    PyObject *q_obj, *k_obj, *v_obj, *o_obj, *len_obj, *pad_obj = Py_None, *scale_obj = Py_None,
                                                            *ws_obj = Py_None, *stream_obj = Py_None;
    long long splits = 0;
    int reference = 0, version = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$OOOLOpi:decode_attention", kwlist, &q_obj, &k_obj, &v_obj,
                                     &o_obj, &len_obj, &pad_obj, &scale_obj, &ws_obj, &splits, &stream_obj,
                                     &reference, &version)) {
        return NULL;
    }
    PyObject *result = NULL, *kq = NULL, *kk = NULL, *kv = NULL, *ko = NULL, *kl = NULL, *kp = NULL, *kw = NULL,
             *ws_store = NULL;
    rpc_tensor q, k, v, o, len, pad, ws;
    intptr_t stream;
    if (dec_stream_of(stream_obj, &stream) < 0) goto done;
    if (rpc_from_dlpack(q_obj, "q", stream, &q, &kq) < 0 || rpc_from_dlpack(k_obj, "keys", stream, &k, &kk) < 0 ||
        rpc_from_dlpack(v_obj, "values", stream, &v, &kv) < 0 || rpc_from_dlpack(o_obj, "out", stream, &o, &ko) < 0 ||
        rpc_from_dlpack(len_obj, "lengths", stream, &len, &kl) < 0) {
        goto done;
    }
    if (rpc_check_float(&q, "q") < 0 || dec_check_shape4(&q, "q", -1, -1, 1, -1, "[batch, q_heads, 1, head_dim]") < 0 ||
        rpc_check_no_negative_strides(&q, "q") < 0) {
        goto done;
    }
    const int64_t B = q.shape[0], Hq = q.shape[1], D = q.shape[3];
    char expect[160];
    snprintf(expect, sizeof expect, "[%lld, kv_heads, capacity, %lld]", (long long)B, (long long)D);
    if (dec_check_shape4(&k, "keys", B, -1, -1, D, expect) < 0 ||
        dec_check_dtype(&k, "keys", q.dtype, "the dtype of q") < 0 || rpc_check_no_negative_strides(&k, "keys") < 0 ||
        rpc_check_same_device(&q, "q", &k, "keys") < 0) {
        goto done;
    }
    const int64_t Hkv = k.shape[1], cap = k.shape[2];
    if (D < 1 || Hkv < 1 || Hq < 1 || Hq % Hkv != 0) {
        PyErr_Format(PyExc_ValueError,
                     "keys: expected kv_heads >= 1 dividing the %lld query heads and head_dim >= 1, got kv_heads=%lld, "
                     "head_dim=%lld",
                     (long long)Hq, (long long)Hkv, (long long)D);
        goto done;
    }
    snprintf(expect, sizeof expect, "[%lld, %lld, %lld, %lld] (the shape of keys)", (long long)B, (long long)Hkv,
             (long long)cap, (long long)D);
    if (dec_check_shape4(&v, "values", B, Hkv, cap, D, expect) < 0 ||
        dec_check_dtype(&v, "values", q.dtype, "the dtype of q") < 0 ||
        rpc_check_no_negative_strides(&v, "values") < 0 || rpc_check_same_device(&q, "q", &v, "values") < 0) {
        goto done;
    }
    /* An empty cache is never read, and DLPack producers report arbitrary strides (torch: 0) for it. */
    const int kv_read = D > 1 && B > 0 && cap > 0;
    if ((kv_read && k.strides[3] != 1) || (kv_read && v.strides[3] != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: expected unit stride along head_dim, got %lld",
                     k.strides[3] != 1 ? "keys" : "values", (long long)(k.strides[3] != 1 ? k.strides[3] : v.strides[3]));
        goto done;
    }
    snprintf(expect, sizeof expect, "[%lld, %lld, 1, %lld] (the shape of q)", (long long)B, (long long)Hq, (long long)D);
    if (dec_check_shape4(&o, "out", B, Hq, 1, D, expect) < 0 ||
        dec_check_dtype(&o, "out", q.dtype, "the dtype of q") < 0 || rpc_check_no_negative_strides(&o, "out") < 0 ||
        dec_check_written(&o, "out") < 0 || rpc_check_same_device(&q, "q", &o, "out") < 0) {
        goto done;
    }
    if (dec_check_lengths(&len, "lengths", 1, &q, "q", 0) < 0) goto done;
    const int64_t *padding = NULL;
    if (pad_obj != Py_None) {
        if (rpc_from_dlpack(pad_obj, "padding", stream, &pad, &kp) < 0) goto done;
        if (pad.ndim != 1 || pad.dtype != RPC_I64 || pad.shape[0] != B || (B > 1 && pad.strides[0] != 1)) {
            char got[160];
            rpc_format_shape(got, sizeof got, &pad);
            PyErr_Format(PyExc_ValueError, "padding: expected a contiguous int64 tensor of shape [%lld], got %s %s",
                         (long long)B, rpc_dtype_name(pad.dtype), got);
            goto done;
        }
        if (rpc_check_same_device(&q, "q", &pad, "padding") < 0) goto done;
        padding = (const int64_t *)pad.data;
    }
    double scale = 1.0 / sqrt((double)D);
    if (scale_obj != Py_None) {
        scale = PyFloat_AsDouble(scale_obj);
        if (scale == -1.0 && PyErr_Occurred()) goto done;
        if (!isfinite(scale) || fabs(scale) > FLT_MAX) { /* the kernels use it as a float32 */
            PyErr_Format(PyExc_ValueError, "scale: expected a finite float32 value, got %R", scale_obj);
            goto done;
        }
    }
    const int on_cuda = q.device_type == RPC_DEV_CUDA;
    if (reference && on_cuda) {
        PyErr_SetString(PyExc_ValueError, "reference: the scalar reference runs on CPU tensors only");
        goto done;
    }
    if (splits < 0 || splits > 65535) {
        PyErr_Format(PyExc_ValueError, "splits: expected 0 (automatic) or 1..65535, got %lld", splits);
        goto done;
    }
    if (version < 0 || version > 2 || (version == 2 && q.dtype == RPC_F32)) {
        PyErr_Format(PyExc_ValueError,
                     "version: expected 0 (automatic), 1 (v1 kernel) or 2 (v2 kernel, float16/bfloat16 only), got %d "
                     "for %s",
                     version, rpc_dtype_name(q.dtype));
        goto done;
    }
    if (splits == 0) splits = dec_splits(B, Hq, Hkv, cap);
    float *workspace = NULL;
    if (on_cuda) {
        const int64_t need = dec_workspace_floats(B, Hq, D, splits);
        if (need < 0) goto done;
        if (ws_obj != Py_None) {
            if (rpc_from_dlpack(ws_obj, "workspace", stream, &ws, &kw) < 0) goto done;
            if (ws.ndim != 1 || ws.dtype != RPC_F32 || ws.shape[0] < need || (ws.shape[0] > 1 && ws.strides[0] != 1)) {
                char got[160];
                rpc_format_shape(got, sizeof got, &ws);
                PyErr_Format(PyExc_ValueError,
                             "workspace: expected a contiguous 1-D float32 tensor of at least %lld elements "
                             "(decode_workspace_size), got %s %s",
                             (long long)need, rpc_dtype_name(ws.dtype), got);
                goto done;
            }
            if (rpc_check_same_device(&q, "q", &ws, "workspace") < 0 || rpc_check_writable(&ws, "workspace") < 0) goto done;
            workspace = (float *)ws.data;
        } else {
            ws_store = rpc_storage_new(rpc_get_state(module), q.device_type, q.device_id,
                                       (size_t)(need > 0 ? need : 1) * sizeof(float), stream);
            if (ws_store == NULL) goto done;
            workspace = (float *)rpc_storage_data(ws_store);
        }
    }

    rpc_decode_params p;
    memset(&p, 0, sizeof p);
    p.q = q.data;
    p.k = k.data;
    p.v = v.data;
    p.out = o.data;
    p.dtype = q.dtype;
    p.B = B;
    p.Hq = Hq;
    p.Hkv = Hkv;
    p.D = D;
    p.cap = cap;
    p.q_stride[0] = q.strides[0];
    p.q_stride[1] = q.strides[1];
    p.q_stride[2] = q.strides[3];
    p.out_stride[0] = o.strides[0];
    p.out_stride[1] = o.strides[1];
    p.out_stride[2] = o.strides[3];
    memcpy(p.k_stride, k.strides, sizeof p.k_stride);
    memcpy(p.v_stride, v.strides, sizeof p.v_stride);
    p.k_stride[3] = p.v_stride[3] = 1; /* D == 1 may report any stride */
    p.lengths = (const int64_t *)len.data;
    p.padding = padding;
    p.scale = (float)scale;
    p.splits = splits;
    p.workspace = workspace;
    p.version = version;

    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (on_cuda) {
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_decode_attention(q.device_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    } else if ((double)B * (double)Hq * (double)D * (double)cap >= (double)DEC_GIL_RELEASE_WORK) { /* no overflow */
        Py_BEGIN_ALLOW_THREADS
        rc = reference ? rpc_cpu_decode_attention_scalar(&p, err) : rpc_cpu_decode_attention(&p, err);
        Py_END_ALLOW_THREADS
    } else {
        rc = reference ? rpc_cpu_decode_attention_scalar(&p, err) : rpc_cpu_decode_attention(&p, err);
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(kq);
    Py_XDECREF(kk);
    Py_XDECREF(kv);
    Py_XDECREF(ko);
    Py_XDECREF(kl);
    Py_XDECREF(kp);
    Py_XDECREF(kw);
    Py_XDECREF(ws_store); /* cudaFree waits for the device, so the launch above is done with it */
    return result;
}

/* ------------------------------------------------------------------ decode_workspace_size */

static PyObject *dec_workspace_size(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"batch", "q_heads", "kv_heads", "head_dim", "capacity", "splits", NULL};
    long long B, Hq, Hkv, D, cap, splits = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLL|L:decode_workspace_size", kwlist, &B, &Hq, &Hkv, &D, &cap,
                                     &splits)) {
        return NULL;
    }
    if (B < 0 || Hq < 1 || Hkv < 1 || Hq % Hkv != 0 || D < 1 || cap < 0 || B > (1LL << 24) || Hq > (1LL << 24) ||
        D > (1LL << 16) || cap > (1LL << 40)) {
        PyErr_Format(PyExc_ValueError,
                     "decode_workspace_size: expected batch >= 0, kv_heads >= 1 dividing q_heads, head_dim >= 1, "
                     "capacity >= 0, got batch=%lld q_heads=%lld kv_heads=%lld head_dim=%lld capacity=%lld",
                     B, Hq, Hkv, D, cap);
        return NULL;
    }
    if (splits < 0 || splits > 65535) {
        PyErr_Format(PyExc_ValueError, "splits: expected 0 (automatic) or 1..65535, got %lld", splits);
        return NULL;
    }
    if (splits == 0) splits = dec_splits(B, Hq, Hkv, cap);
    const int64_t floats = dec_workspace_floats(B, Hq, D, splits);
    if (floats < 0) return NULL;
    return Py_BuildValue("(LL)", splits, (long long)floats);
}

/* ------------------------------------------------------------------ append_at_length */

static PyObject *dec_append_at_length(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"key_storage", "value_storage", "keys", "values", "lengths", "stream", NULL};
    PyObject *kd_obj, *vd_obj, *ks_obj, *vs_obj, *len_obj, *stream_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$O:append_at_length", kwlist, &kd_obj, &vd_obj, &ks_obj,
                                     &vs_obj, &len_obj, &stream_obj)) {
        return NULL;
    }
    PyObject *result = NULL, *a = NULL, *b = NULL, *c = NULL, *d = NULL, *e = NULL;
    rpc_tensor kd, vd, ks, vs, len;
    intptr_t stream;
    if (dec_stream_of(stream_obj, &stream) < 0) goto done;
    if (rpc_from_dlpack(kd_obj, "key_storage", stream, &kd, &a) < 0 ||
        rpc_from_dlpack(vd_obj, "value_storage", stream, &vd, &b) < 0 ||
        rpc_from_dlpack(ks_obj, "keys", stream, &ks, &c) < 0 || rpc_from_dlpack(vs_obj, "values", stream, &vs, &d) < 0 ||
        rpc_from_dlpack(len_obj, "lengths", stream, &len, &e) < 0) {
        goto done;
    }
    if (rpc_check_float(&kd, "key_storage") < 0 ||
        dec_check_shape4(&kd, "key_storage", -1, -1, -1, -1, "[batch, kv_heads, capacity, head_dim]") < 0 ||
        rpc_check_no_negative_strides(&kd, "key_storage") < 0 || dec_check_written(&kd, "key_storage") < 0) {
        goto done;
    }
    const int64_t B = kd.shape[0], H = kd.shape[1], cap = kd.shape[2], D = kd.shape[3];
    char expect[160];
    snprintf(expect, sizeof expect, "[%lld, %lld, %lld, %lld] (the shape of key_storage)", (long long)B, (long long)H,
             (long long)cap, (long long)D);
    if (dec_check_shape4(&vd, "value_storage", B, H, cap, D, expect) < 0 ||
        dec_check_dtype(&vd, "value_storage", kd.dtype, "the dtype of key_storage") < 0 ||
        rpc_check_no_negative_strides(&vd, "value_storage") < 0 || dec_check_written(&vd, "value_storage") < 0 ||
        rpc_check_same_device(&kd, "key_storage", &vd, "value_storage") < 0) {
        goto done;
    }
    if (memcmp(kd.strides, vd.strides, sizeof kd.strides) != 0) {
        PyErr_SetString(PyExc_ValueError, "value_storage: expected the strides of key_storage (one cache layout)");
        goto done;
    }
    snprintf(expect, sizeof expect, "[%lld, %lld, tokens, %lld]", (long long)B, (long long)H, (long long)D);
    if (dec_check_shape4(&ks, "keys", B, H, -1, D, expect) < 0 ||
        dec_check_dtype(&ks, "keys", kd.dtype, "the dtype of key_storage") < 0 ||
        rpc_check_no_negative_strides(&ks, "keys") < 0 || rpc_check_same_device(&kd, "key_storage", &ks, "keys") < 0) {
        goto done;
    }
    const int64_t t = ks.shape[2];
    snprintf(expect, sizeof expect, "[%lld, %lld, %lld, %lld] (the shape of keys)", (long long)B, (long long)H,
             (long long)t, (long long)D);
    if (dec_check_shape4(&vs, "values", B, H, t, D, expect) < 0 ||
        dec_check_dtype(&vs, "values", kd.dtype, "the dtype of key_storage") < 0 ||
        rpc_check_no_negative_strides(&vs, "values") < 0 || rpc_check_same_device(&kd, "key_storage", &vs, "values") < 0) {
        goto done;
    }
    if (dec_check_lengths(&len, "lengths", 2, &kd, "key_storage", 1) < 0) goto done;

    rpc_append_params p;
    memset(&p, 0, sizeof p);
    p.k_dst = kd.data;
    p.v_dst = vd.data;
    p.k_src = ks.data;
    p.v_src = vs.data;
    p.dtype = kd.dtype;
    p.B = B;
    p.H = H;
    p.t = t;
    p.D = D;
    p.cap = cap;
    memcpy(p.dst_stride, kd.strides, sizeof p.dst_stride);
    memcpy(p.k_src_stride, ks.strides, sizeof p.k_src_stride);
    memcpy(p.v_src_stride, vs.strides, sizeof p.v_src_stride);
    p.lengths = (int64_t *)len.data;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (kd.device_type == RPC_DEV_CUDA) {
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_append_at_length(kd.device_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    } else {
        rc = rpc_cpu_append_at_length(&p, err);
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    Py_XDECREF(d);
    Py_XDECREF(e);
    return result;
}

/* ------------------------------------------------------------------ ring_write */

static PyObject *dec_ring_write(PyObject *module, PyObject *args, PyObject *kwargs) {
    (void)module;
    static char *kwlist[] = {"ring", "q", "lengths", "offset", "stream", NULL};
    PyObject *ring_obj, *q_obj, *len_obj, *stream_obj = Py_None;
    long long offset = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$LO:ring_write", kwlist, &ring_obj, &q_obj, &len_obj, &offset,
                                     &stream_obj)) {
        return NULL;
    }
    PyObject *result = NULL, *a = NULL, *b = NULL, *c = NULL;
    rpc_tensor ring, q, len;
    intptr_t stream;
    if (dec_stream_of(stream_obj, &stream) < 0) goto done;
    if (rpc_from_dlpack(ring_obj, "ring", stream, &ring, &a) < 0 || rpc_from_dlpack(q_obj, "q", stream, &q, &b) < 0 ||
        rpc_from_dlpack(len_obj, "lengths", stream, &len, &c) < 0) {
        goto done;
    }
    if (rpc_check_float(&ring, "ring") < 0 ||
        dec_check_shape4(&ring, "ring", -1, -1, -1, -1, "[batch, q_heads, window, head_dim]") < 0 ||
        rpc_check_no_negative_strides(&ring, "ring") < 0 || dec_check_written(&ring, "ring") < 0) {
        goto done;
    }
    const int64_t B = ring.shape[0], Hq = ring.shape[1], W = ring.shape[2], D = ring.shape[3];
    if (W < 1) {
        PyErr_SetString(PyExc_ValueError, "ring: expected a window of at least one slot, got 0");
        goto done;
    }
    char expect[160];
    snprintf(expect, sizeof expect, "[%lld, %lld, tokens <= %lld, %lld]", (long long)B, (long long)Hq, (long long)W,
             (long long)D);
    if (dec_check_shape4(&q, "q", B, Hq, -1, D, expect) < 0 || q.shape[2] > W) {
        if (!PyErr_Occurred()) {
            PyErr_Format(PyExc_ValueError, "q: expected at most %lld tokens (the ring window), got %lld", (long long)W,
                         (long long)q.shape[2]);
        }
        goto done;
    }
    if (dec_check_dtype(&q, "q", ring.dtype, "the dtype of ring") < 0 || rpc_check_no_negative_strides(&q, "q") < 0 ||
        rpc_check_same_device(&ring, "ring", &q, "q") < 0 || dec_check_lengths(&len, "lengths", 2, &ring, "ring", 0) < 0) {
        goto done;
    }
    rpc_ring_params p;
    memset(&p, 0, sizeof p);
    p.ring = ring.data;
    p.q = q.data;
    p.dtype = ring.dtype;
    p.B = B;
    p.Hq = Hq;
    p.t = q.shape[2];
    p.D = D;
    p.window = W;
    p.offset = (int64_t)(offset % W); /* keeps (seen + offset) far from overflow */
    memcpy(p.ring_stride, ring.strides, sizeof p.ring_stride);
    memcpy(p.q_stride, q.strides, sizeof p.q_stride);
    p.lengths = (const int64_t *)len.data;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (ring.device_type == RPC_DEV_CUDA) {
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_ring_write(ring.device_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    } else {
        rc = rpc_cpu_ring_write(&p, err);
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(a);
    Py_XDECREF(b);
    Py_XDECREF(c);
    return result;
}

/* ------------------------------------------------------------------ registration */

#define DEC_KW (PyCFunction)(void (*)(void))
static PyMethodDef dec_methods[] = {
    {"decode_attention", DEC_KW dec_decode_attention, METH_VARARGS | METH_KEYWORDS,
     "decode_attention(q, keys, values, out, lengths, *, padding=None, scale=None, workspace=None, splits=0,\n"
     "                 stream=None, reference=False, version=0)\n\n"
     "Attention of one query token per sequence (q [B, Hq, 1, D]) over keys/values [B, Hkv, capacity, D],\n"
     "restricted to the live positions [padding[b], lengths[0]); writes out [B, Hq, 1, D]. lengths is read\n"
     "by the kernel on its device (capture-friendly). reference=True runs the scalar C reference (CPU).\n"
     "version (CUDA): 0 picks the v2 tensor-core kernel for float16/bfloat16 and v1 for float32; 1 or 2 force one."},
    {"decode_workspace_size", DEC_KW dec_workspace_size, METH_VARARGS | METH_KEYWORDS,
     "decode_workspace_size(batch, q_heads, kv_heads, head_dim, capacity, splits=0) -> (splits, floats):\n"
     "the split count decode_attention uses and the float32 workspace it needs on CUDA."},
    {"append_at_length", DEC_KW dec_append_at_length, METH_VARARGS | METH_KEYWORDS,
     "append_at_length(key_storage, value_storage, keys, values, lengths, *, stream=None)\n\n"
     "Write keys/values [B, H, t, D] at position lengths[0] of the storage, then lengths[0] += t and\n"
     "lengths[1] += t, all on the device. Past capacity nothing is written and lengths stay unchanged."},
    {"ring_write", DEC_KW dec_ring_write, METH_VARARGS | METH_KEYWORDS,
     "ring_write(ring, q, lengths, *, offset=0, stream=None)\n\n"
     "Write query token i of q [B, Hq, t, D] into ring slot (lengths[1] + offset + i) mod window."},
    {NULL, NULL, 0, NULL},
};

int rpc_decode_register(PyObject *module) {
    return PyModule_AddFunctions(module, dec_methods);
}
