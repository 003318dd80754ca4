/* policy_binding.c: module functions of the selection-policy kernels (rpc_py._C).
 *
 *   attn_scores(queries, keys, start, end, *, query_positions=None, padding=None, norm="candidates",
 *               gqa="mean_probs", query_reduce="sum", aggregation="all", pooling="avg", kernel_size=1,
 *               scale=None, stream=None, raw=False)
 *   redundancy(keys, *, padding=None, threshold=0.5, stream=None)
 *   fill_scores(kind, batch, rows, n, *, seed=0, layer=0, compression=0, device="cpu", stream=None)
 * and, for tests, _attn_scores_scalar / _redundancy_scalar (the plain C references, CPU only) and
 * _accumulate(q, keys, acc, ...) (H2O's step kernel on raw tensors; KVCache.accumulate is the real API).
 *
 * Binding only, in the manner of ops_binding.c: every argument goes through DLPack, is validated
 * (dtype, device, shapes, strides, ranges, option names) and becomes a plain rpc.h struct before any
 * memory is touched; kernels run with the GIL released. CPU results are NumPy arrays over a counted
 * Storage block, CUDA results Views over one, written on the caller's stream; `out=` replaces both.
 *
 * query_positions and padding are int64 vectors given as Python sequences or 1-D int64 DLPack tensors.
 * Host values are checked (padding >= 0). A tensor where the kernel runs (a contiguous CPU tensor for
 * a CPU kernel, a tensor on the inputs' CUDA device) is used in place; on CUDA it is not read on the
 * host (no sync), so its values are not checked: the kernels clamp every range into [0, L], so bad
 * values give wrong scores, never bad memory accesses. Anything else is copied into a counted block
 * on the kernel's device (on CUDA through kernel arguments: no copy from pageable memory).
 * Every result is a counted block (binding_util.c) or the caller's `out=` tensor.
 */
#include "pyrpc.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* -------------------------------------------------------------------------------------- helpers */

/* scale=None -> 1/sqrt(D); otherwise a finite float32 value. */
static int pol_scale(PyObject *obj, int64_t D, float *out) {
    double scale = 1.0 / sqrt((double)D);
    if (obj != Py_None) {
        if (rpc_parse_float(obj, "scale", &scale) < 0) return -1;
        if (!isfinite(scale) || fabs(scale) > FLT_MAX) {
            PyErr_Format(PyExc_ValueError, "scale: expected a finite float32 value, got %R", obj);
            return -1;
        }
    }
    *out = (float)scale;
    return 0;
}

static int pol_cuda_usable(int dev_id, const char *argname) {
    if (!rpc_cuda_built()) {
        PyErr_Format(PyExc_RuntimeError,
                     "%s: CUDA requested but rpc_py was built without CUDA (reinstall with nvcc, RPC_PY_CUDA=1)",
                     argname);
        return -1;
    }
    char err[RPC_ERR_LEN] = {0};
    int count = 0;
    int rc = rpc_cuda_device_count(&count, err);
    if (rc != RPC_OK) return rpc_raise_status_int(rc, err);
    if (dev_id < 0 || dev_id >= count) {
        PyErr_Format(PyExc_RuntimeError, "%s: cuda:%d requested but %d CUDA device(s) are usable", argname, dev_id,
                     count);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ int64 vector arguments */

/* An int64 vector argument (query_positions, padding) as the kernel reads it. A tensor already where
 * the kernel runs (a contiguous CPU tensor for a CPU kernel, a tensor on the kernel's CUDA device) is
 * used in place; anything else (a Python sequence, a strided or CPU tensor for a CUDA kernel) becomes a
 * counted Storage block on the kernel's device, filled on the stream from kernel arguments (no copy
 * from pageable memory). */
typedef struct {
    const int64_t *kernel; /* what the kernel reads; NULL = None */
    PyObject *keep;        /* DLPack keepalive of a tensor used in place */
    PyObject *store;       /* Storage holding a copy */
} int_vec;

/* 1 / 0, or -1 with the exception of a failing attribute lookup (other than AttributeError). */
static int pol_has_attr(PyObject *obj, const char *name) {
    PyObject *v = PyObject_GetAttrString(obj, name);
    if (v) {
        Py_DECREF(v);
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
}

static void int_vec_free(int_vec *v) {
    Py_XDECREF(v->keep);
    Py_XDECREF(v->store);
    memset(v, 0, sizeof *v);
}

/* values[0..len) >= 0, else ValueError naming argname. */
static int check_nonneg(const int64_t *values, int64_t stride, int64_t len, const char *argname) {
    for (int64_t i = 0; i < len; i++) {
        if (values[i * stride] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: expected values >= 0, got %lld at position %lld", argname,
                         (long long)values[i * stride], (long long)i);
            return -1;
        }
    }
    return 0;
}

/* Parses `obj` (None, a sequence of ints, or a 1-D int64 DLPack tensor) as `len` int64 values for a
 * kernel on (dt, dev_id). nonneg: values must be >= 0 (checked wherever they are on the host). */
static int int_vec_parse(PyObject *obj, const char *argname, int64_t len, int nonneg, rpc_module_state *st,
                         rpc_device_type dt, int dev_id, intptr_t stream, int_vec *v) {
    memset(v, 0, sizeof *v);
    if (obj == Py_None) return 0;
    int is_dl = PyCapsule_CheckExact(obj);
    if (!is_dl) {
        is_dl = pol_has_attr(obj, "__dlpack__");
        if (is_dl < 0) return -1;
    }
    int64_t *host = NULL; /* values on the host when they must be copied; freed before returning */
    const size_t nbytes = (size_t)(len > 0 ? len : 1) * sizeof(int64_t);
    if (is_dl) {
        rpc_tensor t;
        if (rpc_from_dlpack(obj, argname, stream, &t, &v->keep) < 0) goto fail;
        if (t.ndim != 1 || t.dtype != RPC_I64 || t.shape[0] != len) {
            char got[96];
            rpc_format_shape(got, sizeof got, &t);
            PyErr_Format(PyExc_ValueError, "%s: expected a 1-D int64 tensor of %lld elements, got %s %s", argname,
                         (long long)len, rpc_dtype_name(t.dtype), got);
            goto fail;
        }
        if (rpc_check_no_negative_strides(&t, argname) < 0) goto fail;
        const int64_t stride = len > 1 ? t.strides[0] : 1;
        if (t.device_type == RPC_DEV_CPU) {
            if (nonneg && check_nonneg((const int64_t *)t.data, stride, len, argname) < 0) goto fail;
            if (dt == RPC_DEV_CPU && stride == 1) {
                v->kernel = (const int64_t *)t.data; /* in place */
                return 0;
            }
            host = (int64_t *)malloc(nbytes);
            if (!host) {
                PyErr_NoMemory();
                goto fail;
            }
            for (int64_t i = 0; i < len; i++) host[i] = ((const int64_t *)t.data)[i * stride];
            Py_CLEAR(v->keep);
        } else {
            if (t.device_type != dt || t.device_id != dev_id) {
                char want[32], got[32];
                rpc_format_device(want, sizeof want, dt, dev_id);
                rpc_format_device(got, sizeof got, t.device_type, t.device_id);
                PyErr_Format(PyExc_ValueError, "%s: expected a sequence or a tensor on cpu or %s, got a tensor on %s",
                             argname, want, got);
                goto fail;
            }
            if (stride != 1) {
                PyErr_Format(PyExc_ValueError, "%s: expected a contiguous tensor on %s, got stride %lld", argname,
                             "cuda", (long long)t.strides[0]);
                goto fail;
            }
            v->kernel = (const int64_t *)t.data; /* unchecked device values: the kernels clamp */
            return 0;
        }
    } else {
        if (PyUnicode_Check(obj) || PyBytes_Check(obj)) {
            PyErr_Format(PyExc_TypeError, "%s: expected a sequence of ints or an int64 tensor, got %s", argname,
                         Py_TYPE(obj)->tp_name);
            goto fail;
        }
        PyObject *seq = PySequence_Fast(obj, "expected a sequence of ints or an int64 tensor");
        if (!seq) {
            PyErr_Format(PyExc_TypeError, "%s: expected a sequence of ints or an int64 tensor, got %s", argname,
                         Py_TYPE(obj)->tp_name);
            goto fail;
        }
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if ((int64_t)n != len) {
            PyErr_Format(PyExc_ValueError, "%s: expected %lld entries, got %zd", argname, (long long)len, n);
            Py_DECREF(seq);
            goto fail;
        }
        host = (int64_t *)malloc(nbytes);
        if (!host) {
            PyErr_NoMemory();
            Py_DECREF(seq);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
            PyObject *idx = PyNumber_Index(item);
            long long x = -1;
            int overflow = 0;
            if (idx) x = PyLong_AsLongLongAndOverflow(idx, &overflow);
            Py_XDECREF(idx);
            if (!idx || (x == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s: expected ints, got %s at position %zd", argname,
                             Py_TYPE(item)->tp_name, i);
                Py_DECREF(seq);
                goto fail;
            }
            if (overflow) {
                PyErr_Format(PyExc_ValueError, "%s: value at position %zd does not fit in int64", argname, i);
                Py_DECREF(seq);
                goto fail;
            }
            host[i] = (int64_t)x;
        }
        Py_DECREF(seq);
        if (nonneg && check_nonneg(host, 1, len, argname) < 0) goto fail;
    }
    /* A copy on the kernel's device, counted like every block a call allocates. */
    v->store = rpc_storage_new(st, dt, dev_id, nbytes, stream);
    if (!v->store) goto fail;
    if (dt == RPC_DEV_CPU) {
        memcpy(rpc_storage_data(v->store), host, (size_t)len * sizeof(int64_t));
    } else {
        char err[RPC_ERR_LEN] = {0};
        int rc = rpc_upload_int64s(dev_id, (int64_t *)rpc_storage_data(v->store), host, len, stream, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            goto fail;
        }
    }
    free(host);
    v->kernel = (const int64_t *)rpc_storage_data(v->store);
    return 0;
fail:
    free(host);
    int_vec_free(v);
    return -1;
}

/* A float32 vector argument (query_weights): None, a sequence of numbers (host kernels only), or a 1-D
 * float32 DLPack tensor where the kernel runs (used in place). `host` is an owned copy of a sequence. */
typedef struct {
    const float *kernel;
    float *host;
    PyObject *keep;
} float_vec;

static void float_vec_free(float_vec *v) {
    free(v->host);
    Py_XDECREF(v->keep);
    memset(v, 0, sizeof *v);
}

static int float_vec_parse(PyObject *obj, const char *argname, int64_t len, rpc_device_type dt, int dev_id,
                           intptr_t stream, float_vec *v) {
    memset(v, 0, sizeof *v);
    if (obj == Py_None) return 0;
    int is_dl = PyCapsule_CheckExact(obj);
    if (!is_dl) {
        is_dl = pol_has_attr(obj, "__dlpack__");
        if (is_dl < 0) return -1;
    }
    char want[32];
    rpc_format_device(want, sizeof want, dt, dev_id);
    if (is_dl) {
        rpc_tensor t;
        if (rpc_from_dlpack(obj, argname, stream, &t, &v->keep) < 0) goto fail;
        if (t.ndim != 1 || t.dtype != RPC_F32 || t.shape[0] != len || t.device_type != dt || t.device_id != dev_id ||
            (len > 1 && t.strides[0] != 1)) {
            char got[96], gdev[32];
            rpc_format_shape(got, sizeof got, &t);
            rpc_format_device(gdev, sizeof gdev, t.device_type, t.device_id);
            PyErr_Format(PyExc_ValueError, "%s: expected a contiguous float32 tensor of %lld elements on %s, got %s %s "
                         "on %s", argname, (long long)len, want, rpc_dtype_name(t.dtype), got, gdev);
            goto fail;
        }
        v->kernel = (const float *)t.data;
        return 0;
    }
    if (dt != RPC_DEV_CPU) {
        PyErr_Format(PyExc_ValueError, "%s: for a kernel on %s pass a float32 tensor on that device", argname, want);
        goto fail;
    }
    PyObject *seq = PySequence_Fast(obj, "expected a sequence of numbers or a float32 tensor");
    if (!seq) {
        PyErr_Format(PyExc_TypeError, "%s: expected a sequence of numbers or a float32 tensor, got %s", argname,
                     Py_TYPE(obj)->tp_name);
        goto fail;
    }
    if ((int64_t)PySequence_Fast_GET_SIZE(seq) != len) {
        PyErr_Format(PyExc_ValueError, "%s: expected %lld entries, got %zd", argname, (long long)len,
                     PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        goto fail;
    }
    v->host = (float *)malloc((size_t)(len > 0 ? len : 1) * sizeof(float));
    if (!v->host) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        goto fail;
    }
    for (int64_t i = 0; i < len; i++) {
        double x;
        if (rpc_parse_float(PySequence_Fast_GET_ITEM(seq, i), argname, &x) < 0) {
            Py_DECREF(seq);
            goto fail;
        }
        if (!isfinite(x)) {
            PyErr_Format(PyExc_ValueError, "%s: expected finite weights, got %R at position %lld", argname,
                         PySequence_Fast_GET_ITEM(seq, i), (long long)i);
            Py_DECREF(seq);
            goto fail;
        }
        v->host[i] = (float)x;
    }
    Py_DECREF(seq);
    v->kernel = v->host;
    return 0;
fail:
    float_vec_free(v);
    return -1;
}

/* ------------------------------------------------------------------------------------ attn_scores */

static const char *const NORM_NAMES[] = {"candidates", "past", "causal"};
static const char *const GQA_NAMES[] = {"mean_probs", "max_logits"};
static const char *const REDUCE_NAMES[] = {"sum", "mean"};

/* Queries [B, Hq, R, D] and keys [B, Hkv, L, D]: same dtype (float) and device, Hkv | Hq, R, D >= 1. */
static int check_qk(const rpc_tensor *q, const rpc_tensor *k) {
    char shp[2][128];
    if (rpc_check_ndim_dtype(q, "queries", 4, -1) < 0 || rpc_check_float(q, "queries") < 0) return -1;
    if (rpc_check_ndim_dtype(k, "keys", 4, (int)q->dtype) < 0) return -1;
    if (rpc_check_same_device(q, "queries", k, "keys") < 0) return -1;
    if (rpc_check_no_negative_strides(q, "queries") < 0 || rpc_check_no_negative_strides(k, "keys") < 0) return -1;
    rpc_format_shape(shp[0], sizeof shp[0], q);
    rpc_format_shape(shp[1], sizeof shp[1], k);
    if (q->shape[0] != k->shape[0] || q->shape[3] != k->shape[3]) {
        PyErr_Format(PyExc_ValueError,
                     "keys: expected shape [B, Hkv, L, D] with B and D of queries %s [B, Hq, R, D], got %s", shp[0],
                     shp[1]);
        return -1;
    }
    if (q->shape[1] < 1 || k->shape[1] < 1 || q->shape[1] % k->shape[1] != 0) {
        PyErr_Format(PyExc_ValueError,
                     "keys: expected a number of KV heads >= 1 dividing the query heads of queries %s, got %s", shp[0],
                     shp[1]);
        return -1;
    }
    if (q->shape[2] < 1 || q->shape[3] < 1) {
        PyErr_Format(PyExc_ValueError, "queries: expected at least one query and head_dim >= 1, got shape %s", shp[0]);
        return -1;
    }
    if (rpc_sizes_fit(q->shape, 4, "queries") < 0 || rpc_sizes_fit(k->shape, 4, "keys") < 0) return -1;
    return 0;
}

static PyObject *attn_impl(PyObject *module, PyObject *args, PyObject *kwargs, int scalar) {
    static char *kwlist[] = {"queries", "keys", "start", "end", "query_positions", "padding", "norm", "gqa",
                             "query_reduce", "aggregation", "pooling", "kernel_size", "scale", "stream", "raw",
                             "out", "query_weights", NULL};
    PyObject *q_obj, *k_obj, *qpos_obj = Py_None, *pad_obj = Py_None, *scale_obj = Py_None, *stream_obj = Py_None,
             *out_obj = Py_None, *qw_obj = Py_None;
    long long start, end;
    const char *norm_name = "candidates", *gqa_name = "mean_probs", *reduce_name = "sum", *agg_name = "all",
               *pool_name = "avg";
    int kernel_size = 1, want_raw = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOLL|$OOsssssiOOpOO:attn_scores", kwlist, &q_obj, &k_obj, &start,
                                     &end, &qpos_obj, &pad_obj, &norm_name, &gqa_name, &reduce_name, &agg_name,
                                     &pool_name, &kernel_size, &scale_obj, &stream_obj, &want_raw, &out_obj, &qw_obj))
        return NULL;
    if (want_raw && out_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError, "out: not supported with raw=True (the raw scores need a block of their own)");
        return NULL;
    }
    int norm, gqa, reduce;
    rpc_aggregation agg;
    rpc_pooling pool;
    intptr_t stream;
    if (rpc_parse_choice(norm_name, "norm", NORM_NAMES, 3, &norm) < 0 ||
        rpc_parse_choice(gqa_name, "gqa", GQA_NAMES, 2, &gqa) < 0 ||
        rpc_parse_choice(reduce_name, "query_reduce", REDUCE_NAMES, 2, &reduce) < 0 ||
        rpc_parse_aggregation(agg_name, &agg) < 0 || rpc_parse_pooling(pool_name, &pool) < 0 ||
        rpc_check_kernel_size(kernel_size) < 0)
        return NULL;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;

    PyObject *q_keep = NULL, *k_keep = NULL, *result = NULL;
    int_vec qpos, pad;
    memset(&qpos, 0, sizeof qpos);
    memset(&pad, 0, sizeof pad);
    float_vec qw;
    memset(&qw, 0, sizeof qw);
    rpc_result o;
    memset(&o, 0, sizeof o);
    rpc_tensor q, k;
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_from_dlpack(q_obj, "queries", stream, &q, &q_keep) < 0) goto done;
    if (rpc_from_dlpack(k_obj, "keys", stream, &k, &k_keep) < 0) goto done;
    if (check_qk(&q, &k) < 0) goto done;
    const int64_t L = k.shape[2];
    if (start < 0 || end <= start || end > L) {
        PyErr_Format(PyExc_ValueError,
                     "start, end: expected 0 <= start < end <= %lld (the keys length), got start=%lld end=%lld",
                     (long long)L, start, end);
        goto done;
    }
    if (scalar && q.device_type != RPC_DEV_CPU) {
        PyErr_SetString(PyExc_ValueError, "queries: the scalar reference kernel runs on cpu only");
        goto done;
    }
    if (q.device_type == RPC_DEV_CUDA && pol_cuda_usable(q.device_id, "queries") < 0) goto done;
    if (norm == RPC_NORM_CAUSAL && qpos_obj == Py_None) {
        PyErr_SetString(PyExc_ValueError, "query_positions: required with norm='causal' (the key position of each "
                                          "query)");
        goto done;
    }
    if (int_vec_parse(qpos_obj, "query_positions", q.shape[2], 0, st, q.device_type, q.device_id, stream, &qpos) < 0)
        goto done;
    if (int_vec_parse(pad_obj, "padding", q.shape[0], 1, st, q.device_type, q.device_id, stream, &pad) < 0) goto done;
    if (float_vec_parse(qw_obj, "query_weights", q.shape[2], q.device_type, q.device_id, stream, &qw) < 0) goto done;

    rpc_attn_params p;
    memset(&p, 0, sizeof p);
    p.q = q.data;
    p.k = k.data;
    p.dtype = q.dtype;
    p.B = q.shape[0];
    p.Hq = q.shape[1];
    p.Hkv = k.shape[1];
    p.R = q.shape[2];
    p.D = q.shape[3];
    p.L = L;
    memcpy(p.q_stride, q.strides, sizeof p.q_stride);
    memcpy(p.k_stride, k.strides, sizeof p.k_stride);
    p.start = start;
    p.end = end;
    p.query_positions = qpos.kernel;
    p.padding = pad.kernel;
    p.norm = (rpc_attn_norm)norm;
    p.gqa = (rpc_attn_gqa)gqa;
    p.reduce = (rpc_query_reduce)reduce;
    p.query_weights = qw.kernel;
    p.agg = agg;
    p.pool = pool;
    p.kernel_size = kernel_size;
    if (pol_scale(scale_obj, p.D, &p.scale) < 0) goto done;
    const int64_t A = agg == RPC_AGG_GROUP ? p.Hkv : 1, N = end - start;
    const int64_t oshape[3] = {p.B, A, N};
    const size_t count = (size_t)(p.B * A * N);
    if (rpc_result_init(&o, q.device_type, q.device_id, RPC_F32, 3, oshape) < 0 ||
        rpc_result_use_out(&o, out_obj, "out", stream) < 0 || rpc_result_alloc(&o, st, want_raw ? count : 0, stream) < 0)
        goto done;
    p.out = (float *)o.data;
    p.raw = want_raw ? p.out + count : NULL;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    const int dev = q.device_id;
    if (q.device_type == RPC_DEV_CPU) {
        Py_BEGIN_ALLOW_THREADS
        rc = scalar ? rpc_cpu_attn_scores_scalar(&p, err) : rpc_cpu_attn_scores(&p, err);
        Py_END_ALLOW_THREADS
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_attn_scores(dev, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    PyObject *pooled = rpc_result_take(&o, st, 0);
    if (!pooled || !want_raw) {
        result = pooled;
        goto done;
    }
    PyObject *rawres = rpc_result_take(&o, st, count);
    if (!rawres) {
        Py_DECREF(pooled);
        goto done;
    }
    result = PyTuple_Pack(2, pooled, rawres);
    Py_DECREF(pooled);
    Py_DECREF(rawres);
done:
    rpc_result_release(&o);
    float_vec_free(&qw);
    int_vec_free(&qpos);
    int_vec_free(&pad);
    Py_XDECREF(q_keep);
    Py_XDECREF(k_keep);
    return result;
}

static PyObject *pol_attn_scores(PyObject *module, PyObject *args, PyObject *kwargs) {
    return attn_impl(module, args, kwargs, 0);
}

static PyObject *pol_attn_scores_scalar(PyObject *module, PyObject *args, PyObject *kwargs) {
    return attn_impl(module, args, kwargs, 1);
}

/* ------------------------------------------------------------------------------------- redundancy */

static PyObject *redundancy_impl(PyObject *module, PyObject *args, PyObject *kwargs, int scalar) {
    static char *kwlist[] = {"keys", "padding", "threshold", "stream", "out", NULL};
    PyObject *k_obj, *pad_obj = Py_None, *thr_obj = NULL, *stream_obj = Py_None, *out_obj = Py_None;
    double threshold = 0.5;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|$OOOO:redundancy", kwlist, &k_obj, &pad_obj, &thr_obj,
                                     &stream_obj, &out_obj))
        return NULL;
    if (thr_obj && rpc_parse_float(thr_obj, "threshold", &threshold) < 0) return NULL;
    if (isnan(threshold)) {
        PyErr_SetString(PyExc_ValueError, "threshold: expected a number, got nan");
        return NULL;
    }
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;
    PyObject *k_keep = NULL, *result = NULL;
    int_vec pad;
    memset(&pad, 0, sizeof pad);
    rpc_result o;
    memset(&o, 0, sizeof o);
    rpc_tensor k;
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_from_dlpack(k_obj, "keys", stream, &k, &k_keep) < 0) goto done;
    if (rpc_check_ndim_dtype(&k, "keys", 4, -1) < 0 || rpc_check_float(&k, "keys") < 0 ||
        rpc_check_no_negative_strides(&k, "keys") < 0 || rpc_sizes_fit(k.shape, 4, "keys") < 0)
        goto done;
    if (k.shape[3] < 1) {
        char shp[128];
        rpc_format_shape(shp, sizeof shp, &k);
        PyErr_Format(PyExc_ValueError, "keys: expected head_dim >= 1, got shape %s", shp);
        goto done;
    }
    if (scalar && k.device_type != RPC_DEV_CPU) {
        PyErr_SetString(PyExc_ValueError, "keys: the scalar reference kernel runs on cpu only");
        goto done;
    }
    if (k.device_type == RPC_DEV_CUDA && pol_cuda_usable(k.device_id, "keys") < 0) goto done;
    if (int_vec_parse(pad_obj, "padding", k.shape[0], 1, st, k.device_type, k.device_id, stream, &pad) < 0) goto done;
    rpc_redundancy_params p;
    memset(&p, 0, sizeof p);
    p.k = k.data;
    p.dtype = k.dtype;
    p.B = k.shape[0];
    p.Hkv = k.shape[1];
    p.L = k.shape[2];
    p.D = k.shape[3];
    memcpy(p.k_stride, k.strides, sizeof p.k_stride);
    p.padding = pad.kernel;
    p.threshold = threshold;
    const int64_t oshape[3] = {p.B, p.Hkv, p.L};
    if (rpc_result_init(&o, k.device_type, k.device_id, RPC_F32, 3, oshape) < 0 ||
        rpc_result_use_out(&o, out_obj, "out", stream) < 0 || rpc_result_alloc(&o, st, 0, stream) < 0)
        goto done;
    p.out = (float *)o.data;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    const int dev = k.device_id;
    if (k.device_type == RPC_DEV_CPU) {
        Py_BEGIN_ALLOW_THREADS
        rc = scalar ? rpc_cpu_redundancy_scalar(&p, err) : rpc_cpu_redundancy(&p, err);
        Py_END_ALLOW_THREADS
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_redundancy(dev, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = rpc_result_take(&o, st, 0);
done:
    rpc_result_release(&o);
    int_vec_free(&pad);
    Py_XDECREF(k_keep);
    return result;
}

static PyObject *pol_redundancy(PyObject *module, PyObject *args, PyObject *kwargs) {
    return redundancy_impl(module, args, kwargs, 0);
}

static PyObject *pol_redundancy_scalar(PyObject *module, PyObject *args, PyObject *kwargs) {
    return redundancy_impl(module, args, kwargs, 1);
}

/* ------------------------------------------------------------------------------------ fill_scores */

/* Any Python int, reduced mod 2^64 (the oracle's `& (2**64 - 1)`). */
static int pol_u64(PyObject *obj, const char *argname, uint64_t *out) {
    if (PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got bool", argname);
        return -1;
    }
    PyObject *idx = PyNumber_Index(obj);
    if (!idx) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected an int, got %s", argname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLongMask(idx);
    Py_DECREF(idx);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

/* "cpu", "cuda" (device 0) or "cuda:N". */
static int pol_parse_device(PyObject *obj, rpc_device_type *dt, int *dev_id) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "device: expected 'cpu', 'cuda' or 'cuda:N', got %s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *s = PyUnicode_AsUTF8(obj);
    if (!s) return -1;
    if (strcmp(s, "cpu") == 0) {
        *dt = RPC_DEV_CPU;
        *dev_id = 0;
        return 0;
    }
    if (strcmp(s, "cuda") == 0) {
        *dt = RPC_DEV_CUDA;
        *dev_id = 0;
        return 0;
    }
    if (strncmp(s, "cuda:", 5) == 0 && s[5] >= '0' && s[5] <= '9' && strlen(s) <= 9) {
        char *endp = NULL;
        long id = strtol(s + 5, &endp, 10);
        if (endp && *endp == '\0') {
            *dt = RPC_DEV_CUDA;
            *dev_id = (int)id;
            return 0;
        }
    }
    PyErr_Format(PyExc_ValueError, "device: expected 'cpu', 'cuda' or 'cuda:N', got '%s'", s);
    return -1;
}

static PyObject *pol_fill_scores(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"kind", "batch", "rows", "n", "seed", "layer", "compression", "device", "stream", "out",
                             NULL};
    const char *kind_name;
    long long batch, rows, n;
    PyObject *seed_obj = NULL, *layer_obj = NULL, *comp_obj = NULL, *device_obj = NULL, *stream_obj = Py_None,
             *out_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "sLLL|$OOOOOO:fill_scores", kwlist, &kind_name, &batch, &rows, &n,
                                     &seed_obj, &layer_obj, &comp_obj, &device_obj, &stream_obj, &out_obj))
        return NULL;
    static const char *const KIND_NAMES[] = {"recent", "random"};
    int kind;
    if (rpc_parse_choice(kind_name, "kind", KIND_NAMES, 2, &kind) < 0) return NULL;
    rpc_fill_params p;
    memset(&p, 0, sizeof p);
    if ((seed_obj && pol_u64(seed_obj, "seed", &p.seed) < 0) || (layer_obj && pol_u64(layer_obj, "layer", &p.layer) < 0) ||
        (comp_obj && pol_u64(comp_obj, "compression", &p.compression) < 0))
        return NULL;
    rpc_device_type dt = RPC_DEV_CPU;
    int dev_id = 0;
    if (device_obj && pol_parse_device(device_obj, &dt, &dev_id) < 0) return NULL;
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;
    if (batch < 0 || rows < 0 || n < 0) {
        PyErr_Format(PyExc_ValueError, "batch, rows, n: expected ints >= 0, got %lld, %lld, %lld", batch, rows, n);
        return NULL;
    }
    const int64_t shape[3] = {batch, rows, n};
    if (rpc_sizes_fit(shape, 3, "batch, rows, n") < 0) return NULL;
    if (kind == RPC_FILL_RECENT && n > ((int64_t)1 << 24)) {
        PyErr_Format(PyExc_ValueError, "n: expected <= 16777216 for kind='recent' (offsets exact in float32), got %lld",
                     n);
        return NULL;
    }
    if (dt == RPC_DEV_CUDA && pol_cuda_usable(dev_id, "device") < 0) return NULL;
    p.kind = (rpc_fill_kind)kind;
    p.batch = batch;
    p.rows = rows;
    p.n = n;
    rpc_module_state *st = rpc_get_state(module);
    rpc_result o;
    PyObject *result = NULL;
    if (rpc_result_init(&o, dt, dev_id, RPC_F32, 3, shape) < 0) return NULL;
    if (rpc_result_use_out(&o, out_obj, "out", stream) < 0 || rpc_result_alloc(&o, st, 0, stream) < 0) {
        rpc_result_release(&o);
        return NULL;
    }
    p.out = (float *)o.data;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = dt == RPC_DEV_CPU ? rpc_cpu_fill_scores(&p, err) : rpc_cuda_fill_scores(dev_id, &p, (void *)stream, err);
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK)
        rpc_raise_status(rc, err);
    else
        result = rpc_result_take(&o, st, 0);
    rpc_result_release(&o);
    return result;
}

/* ------------------------------------------------------------------------------------ _accumulate */

static PyObject *pol_accumulate(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "keys", "acc", "padding", "scale", "stream", "reference", NULL};
    PyObject *q_obj, *k_obj, *a_obj, *pad_obj = Py_None, *scale_obj = Py_None, *stream_obj = Py_None;
    int reference = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOOp:_accumulate", kwlist, &q_obj, &k_obj, &a_obj, &pad_obj,
                                     &scale_obj, &stream_obj, &reference))
        return NULL;
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;
    PyObject *q_keep = NULL, *k_keep = NULL, *a_keep = NULL, *result = NULL;
    int_vec pad;
    memset(&pad, 0, sizeof pad);
    rpc_tensor q, k, a;
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_from_dlpack(q_obj, "queries", stream, &q, &q_keep) < 0 || rpc_from_dlpack(k_obj, "keys", stream, &k, &k_keep) < 0 ||
        rpc_from_dlpack(a_obj, "acc", stream, &a, &a_keep) < 0)
        goto done;
    if (check_qk(&q, &k) < 0) goto done;
    if (q.shape[2] != 1) {
        PyErr_Format(PyExc_ValueError, "queries: expected one query per head (shape [B, Hq, 1, D]), got %lld queries",
                     (long long)q.shape[2]);
        goto done;
    }
    if (rpc_check_ndim_dtype(&a, "acc", 3, RPC_F32) < 0 || rpc_check_same_device(&q, "queries", &a, "acc") < 0 ||
        rpc_check_no_negative_strides(&a, "acc") < 0 || rpc_check_writable(&a, "acc") < 0)
        goto done;
    if (a.shape[0] != k.shape[0] || a.shape[1] != k.shape[1] || a.shape[2] != k.shape[2]) {
        char got[96];
        rpc_format_shape(got, sizeof got, &a);
        PyErr_Format(PyExc_ValueError, "acc: expected shape [%lld, %lld, %lld] (B, Hkv, L of keys), got %s",
                     (long long)k.shape[0], (long long)k.shape[1], (long long)k.shape[2], got);
        goto done;
    }
    /* An empty accumulator is never written, and producers report arbitrary strides (torch: 0) for it. */
    for (int i = 0; i < 3 && a.shape[0] * a.shape[1] * a.shape[2] > 0; i++) {
        if (a.shape[i] > 1 && a.strides[i] == 0) {
            PyErr_Format(PyExc_ValueError, "acc: expected a tensor without zero strides (it is written), got stride 0 "
                         "in dimension %d", i);
            goto done;
        }
    }
    if (reference && q.device_type != RPC_DEV_CPU) {
        PyErr_SetString(PyExc_ValueError, "reference: the scalar reference runs on cpu only");
        goto done;
    }
    if (q.device_type == RPC_DEV_CUDA && pol_cuda_usable(q.device_id, "queries") < 0) goto done;
    if (int_vec_parse(pad_obj, "padding", q.shape[0], 1, st, q.device_type, q.device_id, stream, &pad) < 0) goto done;
    rpc_accumulate_params p;
    memset(&p, 0, sizeof p);
    p.q = q.data;
    p.k = k.data;
    p.dtype = q.dtype;
    p.B = q.shape[0];
    p.Hq = q.shape[1];
    p.Hkv = k.shape[1];
    p.D = q.shape[3];
    p.length = k.shape[2];
    memcpy(p.q_stride, q.strides, sizeof p.q_stride);
    memcpy(p.k_stride, k.strides, sizeof p.k_stride);
    p.padding = pad.kernel;
    if (pol_scale(scale_obj, p.D, &p.scale) < 0) goto done;
    p.acc = (float *)a.data;
    memcpy(p.acc_stride, a.strides, sizeof p.acc_stride);
    char err[RPC_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (q.device_type == RPC_DEV_CPU)
        rc = reference ? rpc_cpu_accumulate_scalar(&p, err) : rpc_cpu_accumulate(&p, err);
    else
        rc = rpc_cuda_accumulate(q.device_id, &p, (void *)stream, err);
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    int_vec_free(&pad);
    Py_XDECREF(q_keep);
    Py_XDECREF(k_keep);
    Py_XDECREF(a_keep);
    return result;
}

/* ---------------------------------------------------------------------------------- registration */

#define KWFN(f) (PyCFunction)(void (*)(void))(f)

/* -------------------------------------------------------------------------------------------- pool */

static PyObject *pol_pool(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"scores", "pooling", "kernel_size", "stream", "out", NULL};
    PyObject *s_obj, *stream_obj = Py_None, *out_obj = Py_None;
    const char *pool_name;
    int kernel_size;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Osi|$OO:pool", kwlist, &s_obj, &pool_name, &kernel_size,
                                     &stream_obj, &out_obj))
        return NULL;
    rpc_pooling pool;
    intptr_t stream;
    if (rpc_parse_pooling(pool_name, &pool) < 0 || rpc_check_kernel_size(kernel_size) < 0 ||
        rpc_parse_stream(stream_obj, &stream) < 0)
        return NULL;
    PyObject *s_keep = NULL, *result = NULL;
    rpc_result o;
    memset(&o, 0, sizeof o);
    rpc_tensor t;
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_from_dlpack(s_obj, "scores", stream, &t, &s_keep) < 0) goto done;
    if (rpc_check_ndim_dtype(&t, "scores", 3, RPC_F32) < 0 || rpc_sizes_fit(t.shape, 3, "scores") < 0) goto done;
    const int64_t B = t.shape[0], A = t.shape[1], N = t.shape[2];
    if ((N > 1 && t.strides[2] != 1) || (A > 1 && t.strides[1] != N) || (B > 1 && t.strides[0] != A * N)) {
        PyErr_SetString(PyExc_ValueError, "scores: expected a C-contiguous float32 tensor [B, A, N]");
        goto done;
    }
    if (t.device_type == RPC_DEV_CUDA && pol_cuda_usable(t.device_id, "scores") < 0) goto done;
    if (rpc_result_init(&o, t.device_type, t.device_id, RPC_F32, 3, t.shape) < 0 ||
        rpc_result_use_out(&o, out_obj, "out", stream) < 0 || rpc_result_alloc(&o, st, 0, stream) < 0)
        goto done;
    if (o.data == t.data && B * A * N > 0) {
        PyErr_SetString(PyExc_ValueError, "out: must not be the scores tensor itself (pooling reads neighbours)");
        goto done;
    }
    char err[RPC_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = t.device_type == RPC_DEV_CPU
             ? rpc_cpu_pool((const float *)t.data, B * A, N, pool, kernel_size, (float *)o.data, err)
             : rpc_cuda_pool(t.device_id, (const float *)t.data, B * A, N, pool, kernel_size, (float *)o.data,
                             (void *)stream, err);
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = rpc_result_take(&o, st, 0);
done:
    rpc_result_release(&o);
    Py_XDECREF(s_keep);
    return result;
}

static PyMethodDef policy_methods[] = {
    {"pool", KWFN(pol_pool), METH_VARARGS | METH_KEYWORDS,
     "pool(scores, pooling, kernel_size, *, stream=None, out=None)\n--\n\n"
     "RPC's pooling alone (the definition every kernel shares, rpc_pool_at in rpc.h): C-contiguous float32\n"
     "scores [B, A, N] pooled along N, stride 1, padding kernel_size // 2 ('avg' counts the padding, 'max'\n"
     "ignores it), summed in double and rounded once. For scores reduced across processes before pooling."},
    {"attn_scores", KWFN(pol_attn_scores), METH_VARARGS | METH_KEYWORDS,
     "attn_scores(queries, keys, start, end, *, query_positions=None, padding=None, norm='candidates',\n"
     "            gqa='mean_probs', query_reduce='sum', aggregation='all', pooling='avg', kernel_size=1,\n"
     "            scale=None, stream=None, raw=False, out=None, query_weights=None)\n--\n\n"
     "Window-attention scores of the candidates keys[:, :, start:end] (rpc_py.policy_reference.\n"
     "window_attention_reference): float32 [B, A, N], A = 1 ('all') or Hkv ('group'); with raw=True a tuple\n"
     "(pooled, unpooled). norm: 'candidates' | 'past' | 'causal' (needs query_positions, one key position\n"
     "per query); gqa: 'mean_probs' | 'max_logits'; query_reduce: 'sum' | 'mean'. padding: left-padding count\n"
     "per sequence. query_positions / padding: sequences of ints or int64 tensors."},
    {"_attn_scores_scalar", KWFN(pol_attn_scores_scalar), METH_VARARGS | METH_KEYWORDS,
     "Same as attn_scores, computed by the plain C reference kernel (CPU only; for tests)."},
    {"redundancy", KWFN(pol_redundancy), METH_VARARGS | METH_KEYWORDS,
     "redundancy(keys, *, padding=None, threshold=0.5, stream=None)\n--\n\n"
     "R-KV key redundancy [B, Hkv, L] float32 (rpc_py.policy_reference.redundancy_reference): per sequence\n"
     "and KV head, over the valid keys [padding[b], L); 0 at padded positions."},
    {"_redundancy_scalar", KWFN(pol_redundancy_scalar), METH_VARARGS | METH_KEYWORDS,
     "Same as redundancy, computed by the plain C reference kernel (CPU only; for tests)."},
    {"fill_scores", KWFN(pol_fill_scores), METH_VARARGS | METH_KEYWORDS,
     "fill_scores(kind, batch, rows, n, *, seed=0, layer=0, compression=0, device='cpu', stream=None)\n--\n\n"
     "Data-free scores [batch, rows, n] float32: kind 'recent' (score j: the newest win) or 'random' (the\n"
     "counter hash of rpc_py.policy_reference.random_uniform_reference, row = b * rows + a; identical on\n"
     "every device). NumPy on 'cpu', a View on 'cuda' / 'cuda:N'."},
    {"_accumulate", KWFN(pol_accumulate), METH_VARARGS | METH_KEYWORDS,
     "_accumulate(q, keys, acc, *, padding=None, scale=None, stream=None, reference=False)\n--\n\n"
     "H2O's step kernel on raw tensors (tests; KVCache.accumulate is the API): acc [B, Hkv, L] float32 +=\n"
     "the attention of q [B, Hq, 1, D] over keys [padding[b], L), summed over each KV head's query heads."},
    {NULL, NULL, 0, NULL},
};

int rpc_policy_register(PyObject *module) {
    return PyModule_AddFunctions(module, policy_methods);
}
