/* ops_binding.c: the standalone operator functions of rpc_py._C (score, select, compact).
 *
 * Binding only: every argument is parsed through DLPack, validated (dtype, device, shapes, strides,
 * ranges, writability) and turned into the plain parameter structs of rpc.h before any memory is
 * touched; the kernels run with the GIL released. Results are counted Storage blocks (NumPy arrays
 * over them on the CPU, Views on CUDA) written on the caller's stream, or the caller's `out=` tensor
 * (binding_util.c).
 *
 * On CUDA, compact checks the shape and dtype of `indices` but not their values (reading them would
 * need a device->host copy and a sync); the CUDA kernel relies on them being what select produced.
 * Private helpers for tests: _score_scalar (the plain C reference kernel) and _cpu_isa.
 */
#include "pyrpc.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* -------------------------------------------------------------------------------------- helpers */

/* Raise unless every dimension of size > 1 has a non-zero stride (in-place writes must not alias). */
static int check_no_aliasing(const rpc_tensor *t, const char *argname)
{
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] > 1 && t->strides[i] == 0) {
            PyErr_Format(PyExc_ValueError,
                         "%s: expected a tensor without zero strides (it is written in place), got stride 0 in "
                         "dimension %d",
                         argname, i);
            return -1;
        }
    }
    return 0;
}

/* Byte range [lo, hi) spanned by a tensor with non-negative strides. */
static void byte_span(const rpc_tensor *t, uintptr_t *lo, uintptr_t *hi)
{
    size_t last = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 0) {
            *lo = *hi = (uintptr_t)t->data;
            return;
        }
        last += (size_t)(t->shape[i] - 1) * (size_t)t->strides[i];
    }
    *lo = (uintptr_t)t->data;
    *hi = *lo + (last + 1) * rpc_dtype_size(t->dtype);
}

/* ---------------------------------------------------------------------------------------- score */

/* mode 0: score; 1: the plain C reference (CPU); 2: only the CUDA workspace bytes score would need. */
static PyObject *score_impl(PyObject *module, PyObject *args, PyObject *kwargs, int mode)
{
    const int scalar = mode == 1;
    static char *kwlist[] = {"queries", "keys", "start", "end", "aggregation", "pooling", "kernel_size",
                             "stream", "raw", "version", "out", "workspace", NULL};
    PyObject *q_obj, *k_obj, *stream_obj = Py_None, *out_obj = Py_None, *ws_obj = Py_None;
    long long start, end;
    const char *agg_name = "all", *pool_name = "avg";
    int kernel_size = 7, want_raw = 0, version = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOLL|$ssiOpiOO:score", kwlist, &q_obj, &k_obj, &start, &end,
                                     &agg_name, &pool_name, &kernel_size, &stream_obj, &want_raw, &version, &out_obj,
                                     &ws_obj))
        return NULL;
    if (want_raw && out_obj != Py_None) {
        PyErr_SetString(PyExc_ValueError, "out: not supported with raw=True (the raw scores need a block of their own)");
        return NULL;
    }
    if (version < 0 || version > 2) {
        PyErr_Format(PyExc_ValueError, "version: expected 0 (automatic), 1 or 2 (CUDA scoring kernel), got %d", version);
        return NULL;
    }
    rpc_aggregation agg;
    rpc_pooling pool;
    intptr_t stream;
    if (rpc_parse_aggregation(agg_name, &agg) < 0 || rpc_parse_pooling(pool_name, &pool) < 0 ||
        rpc_check_kernel_size(kernel_size) < 0)
        return NULL;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;

    PyObject *q_keep = NULL, *k_keep = NULL, *ws_keep = NULL, *result = NULL, *ws_store = NULL;
    rpc_result res;
    memset(&res, 0, sizeof res);
    rpc_tensor q, k;
    char shp[2][128];
    if (rpc_from_dlpack(q_obj, "queries", stream, &q, &q_keep) < 0) goto done;
    if (rpc_from_dlpack(k_obj, "keys", stream, &k, &k_keep) < 0) goto done;
    if (rpc_check_ndim_dtype(&q, "queries", 4, -1) < 0 || rpc_check_float(&q, "queries") < 0) goto done;
    if (rpc_check_ndim_dtype(&k, "keys", 4, (int)q.dtype) < 0) goto done;
    if (rpc_check_same_device(&q, "queries", &k, "keys") < 0) goto done;
    if (rpc_check_no_negative_strides(&q, "queries") < 0 || rpc_check_no_negative_strides(&k, "keys") < 0)
        goto done;
    rpc_format_shape(shp[0], sizeof(shp[0]), &q);
    rpc_format_shape(shp[1], sizeof(shp[1]), &k);
    if (q.shape[0] != k.shape[0] || q.shape[3] != k.shape[3]) {
        PyErr_Format(PyExc_ValueError,
                     "keys: expected shape [B, Hkv, L, D] with B and D of queries %s [B, Hq, R, D], got %s", shp[0],
                     shp[1]);
        goto done;
    }
    if (q.shape[1] < 1 || k.shape[1] < 1 || q.shape[1] % k.shape[1] != 0) {
        PyErr_Format(PyExc_ValueError,
                     "keys: expected a number of KV heads >= 1 dividing the query heads of queries %s, got %s", shp[0],
                     shp[1]);
        goto done;
    }
    if (q.shape[2] < 1 || q.shape[3] < 1) {
        PyErr_Format(PyExc_ValueError, "queries: expected at least one query and head_dim >= 1, got shape %s",
                     shp[0]);
        goto done;
    }
    const int64_t L = k.shape[2];
    if (start < 0 || end <= start || end > L) {
        PyErr_Format(PyExc_ValueError,
                     "start, end: expected 0 <= start < end <= %lld (the keys length), got start=%lld end=%lld",
                     (long long)L, start, end);
        goto done;
    }
    if (rpc_sizes_fit(q.shape, 4, "queries") < 0 || rpc_sizes_fit(k.shape, 4, "keys") < 0) goto done;
    if (scalar && q.device_type != RPC_DEV_CPU) {
        PyErr_SetString(PyExc_ValueError, "queries: the scalar reference kernel runs on cpu only");
        goto done;
    }

    rpc_score_params p;
    memset(&p, 0, sizeof(p));
    p.q = q.data;
    p.k = k.data;
    p.dtype = q.dtype;
    p.B = q.shape[0];
    p.Hq = q.shape[1];
    p.Hkv = k.shape[1];
    p.R = q.shape[2];
    p.D = q.shape[3];
    memcpy(p.q_stride, q.strides, sizeof(p.q_stride));
    memcpy(p.k_stride, k.strides, sizeof(p.k_stride));
    p.start = start;
    p.end = end;
    p.agg = agg;
    p.pool = pool;
    p.kernel_size = kernel_size;
    p.scale = (float)(1.0 / sqrt((double)p.D));
    const int64_t A = agg == RPC_AGG_GROUP ? p.Hkv : 1, N = end - start;
    const int64_t oshape[3] = {p.B, A, N};
    const size_t count = (size_t)(p.B * A * N);
    rpc_module_state *st = rpc_get_state(module);
    char err[RPC_ERR_LEN] = {0};
    int rc;
    if (mode == 2) {
        size_t ws_bytes = 0;
        if (q.device_type != RPC_DEV_CPU) {
            p.version = version;
            rc = rpc_cuda_score_workspace(q.device_id, &p, &ws_bytes, err);
            if (rc != RPC_OK) {
                rpc_raise_status(rc, err);
                goto done;
            }
        }
        result = PyLong_FromSize_t(ws_bytes);
        goto done;
    }
    /* pooled scores (and the raw ones after them with raw=True) in one counted block, or in out= */
    if (rpc_result_init(&res, q.device_type, q.device_id, RPC_F32, 3, oshape) < 0 ||
        rpc_result_use_out(&res, out_obj, "out", stream) < 0 ||
        rpc_result_alloc(&res, st, want_raw ? count : 0, stream) < 0)
        goto done;
    p.out = (float *)res.data;
    p.raw = want_raw ? (float *)res.data + count : NULL;
    if (q.device_type == RPC_DEV_CPU) {
        if (ws_obj != Py_None) {
            PyErr_SetString(PyExc_ValueError, "workspace: only CUDA scoring takes a workspace; pass None on the cpu");
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = scalar ? rpc_cpu_score_scalar(&p, err) : rpc_cpu_score(&p, err);
        Py_END_ALLOW_THREADS
    } else {
        p.version = version;
        size_t ws_bytes = 0;
        rc = rpc_cuda_score_workspace(q.device_id, &p, &ws_bytes, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            goto done;
        }
        if (ws_obj != Py_None) {
            rpc_tensor w;
            if (rpc_from_dlpack(ws_obj, "workspace", stream, &w, &ws_keep) < 0) goto done;
            if (rpc_check_same_device(&q, "queries", &w, "workspace") < 0 || rpc_check_writable(&w, "workspace") < 0)
                goto done;
            size_t have = rpc_dtype_size(w.dtype);
            int contiguous = 1;
            int64_t expect = 1;
            for (int i = w.ndim - 1; i >= 0; i--) {
                have *= (size_t)(w.shape[i] > 0 ? w.shape[i] : 0);
                if (w.shape[i] > 1 && w.strides[i] != expect) contiguous = 0;
                expect *= w.shape[i];
            }
            if (!contiguous || have < ws_bytes || ((uintptr_t)w.data % 256) != 0) {
                PyErr_Format(PyExc_ValueError,
                             "workspace: expected a contiguous, 256-byte aligned tensor of at least %zu bytes "
                             "(score_workspace_size), got %zu bytes%s",
                             ws_bytes, have, contiguous ? "" : ", not contiguous");
                goto done;
            }
            p.workspace = w.data;
        } else {
            ws_store = rpc_storage_new(st, q.device_type, q.device_id, ws_bytes, stream);
            if (!ws_store) goto done;
            p.workspace = rpc_storage_data(ws_store);
        }
        p.workspace_bytes = ws_bytes;
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_score(q.device_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    PyObject *pooled = rpc_result_take(&res, st, 0);
    if (!pooled) goto done;
    if (!want_raw) {
        result = pooled;
        goto done;
    }
    PyObject *rawres = rpc_result_take(&res, st, count);
    if (!rawres) {
        Py_DECREF(pooled);
        goto done;
    }
    result = PyTuple_Pack(2, pooled, rawres);
    Py_DECREF(pooled);
    Py_DECREF(rawres);
done:
    rpc_result_release(&res);
    Py_XDECREF(ws_store); /* cudaFree waits for the device, so the launches above are done with it */
    Py_XDECREF(ws_keep);
    Py_XDECREF(q_keep);
    Py_XDECREF(k_keep);
    return result;
}

static PyObject *ops_score(PyObject *module, PyObject *args, PyObject *kwargs)
{
    return score_impl(module, args, kwargs, 0);
}

static PyObject *ops_score_scalar(PyObject *module, PyObject *args, PyObject *kwargs)
{
    return score_impl(module, args, kwargs, 1);
}

static PyObject *ops_score_workspace_size(PyObject *module, PyObject *args, PyObject *kwargs)
{
    return score_impl(module, args, kwargs, 2);
}

/* --------------------------------------------------------------------------------------- select */

static PyObject *ops_select(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"scores", "keep", "stream", "out", NULL};
    PyObject *s_obj, *stream_obj = Py_None, *out_obj = Py_None;
    long long keep;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OL|O$O:select", kwlist, &s_obj, &keep, &stream_obj, &out_obj))
        return NULL;
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;
    PyObject *s_keep = NULL, *result = NULL;
    float *contig = NULL; /* CPU only: a contiguous copy of strided scores, freed before returning */
    rpc_result res;
    memset(&res, 0, sizeof res);
    rpc_tensor s;
    char shp[128];
    if (rpc_from_dlpack(s_obj, "scores", stream, &s, &s_keep) < 0) goto done;
    if (rpc_check_ndim_dtype(&s, "scores", 3, RPC_F32) < 0) goto done;
    if (rpc_check_no_negative_strides(&s, "scores") < 0) goto done;
    if (rpc_sizes_fit(s.shape, 3, "scores") < 0) goto done;
    rpc_format_shape(shp, sizeof(shp), &s);
    const int64_t B = s.shape[0], A = s.shape[1], N = s.shape[2];
    if (keep < 0 || keep > N) {
        PyErr_Format(PyExc_ValueError,
                     "keep: expected 0 <= keep <= %lld (the number of candidates, scores.shape[2]), got %lld",
                     (long long)N, keep);
        goto done;
    }
    const int contiguous = (N <= 1 || s.strides[2] == 1) && (A <= 1 || s.strides[1] == N) &&
                           (B <= 1 || s.strides[0] == A * N);
    const int64_t oshape[3] = {B, A, keep};
    rpc_select_params p;
    memset(&p, 0, sizeof(p));
    p.rows = B * A;
    p.N = N;
    p.keep = keep;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_result_init(&res, s.device_type, s.device_id, RPC_I64, 3, oshape) < 0 ||
        rpc_result_use_out(&res, out_obj, "out", stream) < 0 || rpc_result_alloc(&res, st, 0, stream) < 0)
        goto done;
    p.indices = (int64_t *)res.data;
    if (s.device_type == RPC_DEV_CPU) {
        p.scores = (const float *)s.data;
        if (!contiguous) { /* the kernel reads rows contiguously: gather a copy first */
            contig = (float *)malloc((size_t)(B * A * N + 1) * sizeof(float));
            if (!contig) {
                PyErr_NoMemory();
                goto done;
            }
            const int64_t dst_stride[4] = {0, A * N, N, 1}, src_stride[4] = {0, s.strides[0], s.strides[1],
                                                                            s.strides[2]};
            const int64_t shape4[4] = {1, B, A, N};
            rc = rpc_cpu_copy4d(contig, dst_stride, s.data, src_stride, shape4, sizeof(float), err);
            if (rc != RPC_OK) {
                rpc_raise_status(rc, err);
                goto done;
            }
            p.scores = contig;
        }
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cpu_select(&p, err);
        Py_END_ALLOW_THREADS
    } else {
        if (!contiguous) {
            PyErr_Format(PyExc_ValueError, "scores: expected a C-contiguous tensor on %s, got shape %s with strides "
                         "[%lld, %lld, %lld]", "cuda", shp, (long long)s.strides[0], (long long)s.strides[1],
                         (long long)s.strides[2]);
            goto done;
        }
        p.scores = (const float *)s.data;
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_select(s.device_id, &p, (void *)stream, err);
        Py_END_ALLOW_THREADS
    }
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = rpc_result_take(&res, st, 0);
done:
    free(contig);
    rpc_result_release(&res);
    Py_XDECREF(s_keep);
    return result;
}

/* -------------------------------------------------------------------------------------- compact */

static PyObject *ops_compact(PyObject *module, PyObject *args, PyObject *kwargs)
{
    (void)module;
    static char *kwlist[] = {"keys", "values", "indices", "start", "end", "stream", NULL};
    PyObject *k_obj, *v_obj, *i_obj, *stream_obj = Py_None;
    long long start, end;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOLL|O:compact", kwlist, &k_obj, &v_obj, &i_obj, &start, &end,
                                     &stream_obj))
        return NULL;
    intptr_t stream;
    if (rpc_parse_stream(stream_obj, &stream) < 0) return NULL;
    PyObject *k_keep = NULL, *v_keep = NULL, *i_keep = NULL, *result = NULL;
    rpc_tensor k, v, ix;
    char shp[2][128];
    if (rpc_from_dlpack(k_obj, "keys", stream, &k, &k_keep) < 0) goto done;
    if (rpc_from_dlpack(v_obj, "values", stream, &v, &v_keep) < 0) goto done;
    if (rpc_from_dlpack(i_obj, "indices", stream, &ix, &i_keep) < 0) goto done;
    if (rpc_check_ndim_dtype(&k, "keys", 4, -1) < 0 || rpc_check_float(&k, "keys") < 0) goto done;
    if (rpc_check_ndim_dtype(&v, "values", 4, (int)k.dtype) < 0) goto done;
    if (rpc_check_ndim_dtype(&ix, "indices", 3, RPC_I64) < 0) goto done;
    if (rpc_check_same_device(&k, "keys", &v, "values") < 0 || rpc_check_same_device(&k, "keys", &ix, "indices") < 0)
        goto done;
    rpc_format_shape(shp[0], sizeof(shp[0]), &k);
    rpc_format_shape(shp[1], sizeof(shp[1]), &v);
    for (int i = 0; i < 4; i++) {
        if (k.shape[i] != v.shape[i]) {
            PyErr_Format(PyExc_ValueError, "values: expected the shape of keys %s, got %s", shp[0], shp[1]);
            goto done;
        }
    }
    if (rpc_check_no_negative_strides(&k, "keys") < 0 || rpc_check_no_negative_strides(&v, "values") < 0 ||
        rpc_check_no_negative_strides(&ix, "indices") < 0)
        goto done;
    if (check_no_aliasing(&k, "keys") < 0 || check_no_aliasing(&v, "values") < 0) goto done;
    if (rpc_check_writable(&k, "keys") < 0 || rpc_check_writable(&v, "values") < 0) goto done;
    if (k.shape[3] > 1 && (k.strides[3] != 1 || v.strides[3] != 1)) {
        PyErr_Format(PyExc_ValueError, "%s: expected stride 1 in the head_dim dimension, got %lld",
                     k.strides[3] != 1 ? "keys" : "values",
                     (long long)(k.strides[3] != 1 ? k.strides[3] : v.strides[3]));
        goto done;
    }
    if (rpc_sizes_fit(k.shape, 4, "keys") < 0 || rpc_sizes_fit(ix.shape, 3, "indices") < 0) goto done;
    {
        uintptr_t klo, khi, vlo, vhi;
        byte_span(&k, &klo, &khi);
        byte_span(&v, &vlo, &vhi);
        if (klo < vhi && vlo < khi) {
            PyErr_SetString(PyExc_ValueError, "values: expected memory separate from keys, got overlapping tensors");
            goto done;
        }
    }
    const int64_t B = k.shape[0], H = k.shape[1], L = k.shape[2];
    if (start < 0 || end <= start || end > L) {
        PyErr_Format(PyExc_ValueError,
                     "start, end: expected 0 <= start < end <= %lld (the keys length), got start=%lld end=%lld",
                     (long long)L, start, end);
        goto done;
    }
    const int64_t keep = ix.shape[2], N = end - start;
    char ishp[128];
    rpc_format_shape(ishp, sizeof(ishp), &ix);
    if (ix.shape[0] != B || (ix.shape[1] != 1 && ix.shape[1] != H) || keep > N) {
        PyErr_Format(PyExc_ValueError,
                     "indices: expected shape [%lld, 1 or %lld, keep] with keep <= end - start = %lld, got %s",
                     (long long)B, (long long)H, (long long)N, ishp);
        goto done;
    }
    if (keep > 1 && ix.strides[2] != 1) {
        PyErr_Format(PyExc_ValueError, "indices: expected stride 1 in the last dimension, got %lld",
                     (long long)ix.strides[2]);
        goto done;
    }
    if (k.device_type == RPC_DEV_CPU) {
        const int64_t *base = (const int64_t *)ix.data;
        for (int64_t b = 0; b < B; b++)
            for (int64_t a = 0; a < ix.shape[1]; a++) {
                const int64_t *row = base + b * ix.strides[0] + a * ix.strides[1];
                for (int64_t i = 0; i < keep; i++) {
                    if (row[i] < 0 || row[i] >= N) {
                        PyErr_Format(PyExc_ValueError,
                                     "indices: expected values in [0, %lld) (end - start), got %lld at [%lld, %lld, "
                                     "%lld]",
                                     (long long)N, (long long)row[i], (long long)b, (long long)a, (long long)i);
                        goto done;
                    }
                    if (i > 0 && row[i] <= row[i - 1]) {
                        PyErr_Format(PyExc_ValueError,
                                     "indices: expected strictly ascending rows, got %lld after %lld at [%lld, %lld, "
                                     "%lld]",
                                     (long long)row[i], (long long)row[i - 1], (long long)b, (long long)a,
                                     (long long)i);
                        goto done;
                    }
                }
            }
    }

    rpc_compact_params p;
    memset(&p, 0, sizeof(p));
    p.k = k.data;
    p.v = v.data;
    p.dtype = k.dtype;
    p.B = B;
    p.H = H;
    p.L = L;
    p.D = k.shape[3];
    memcpy(p.k_stride, k.strides, sizeof(p.k_stride));
    memcpy(p.v_stride, v.strides, sizeof(p.v_stride));
    p.indices = (const int64_t *)ix.data;
    p.A = ix.shape[1];
    p.idx_stride_b = ix.strides[0];
    p.idx_stride_a = ix.strides[1];
    p.start = start;
    p.end = end;
    p.keep = keep;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    if (k.device_type == RPC_DEV_CPU)
        rc = rpc_cpu_compact(&p, err);
    else
        rc = rpc_cuda_compact(k.device_id, &p, (void *)stream, err);
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    result = PyLong_FromLongLong(start + keep + (L - end));
done:
    Py_XDECREF(k_keep);
    Py_XDECREF(v_keep);
    Py_XDECREF(i_keep);
    return result;
}

/* ----------------------------------------------------------------------------- private helpers */

static PyObject *ops_cpu_isa(PyObject *module, PyObject *args)
{
    (void)module;
    const char *name = NULL;
    if (!PyArg_ParseTuple(args, "|z:_cpu_isa", &name)) return NULL;
    if (name) {
        int isa = -1;
        for (int i = RPC_CPU_ISA_GENERIC; i <= RPC_CPU_ISA_AVX512; i++)
            if (strcmp(name, rpc_cpu_isa_name(i)) == 0) isa = i;
        if (isa < 0) {
            PyErr_Format(PyExc_ValueError, "isa: expected 'generic', 'avx2' or 'avx512', got '%s'", name);
            return NULL;
        }
        if (rpc_cpu_set_isa(isa) < 0) {
            PyErr_Format(PyExc_ValueError, "isa: '%s' is not supported by this CPU", name);
            return NULL;
        }
    }
    return PyUnicode_FromString(rpc_cpu_isa_name(rpc_cpu_isa()));
}

static PyMethodDef ops_methods[] = {
    {"score", (PyCFunction)(void (*)(void))ops_score, METH_VARARGS | METH_KEYWORDS,
     "score(queries, keys, start, end, *, aggregation='all', pooling='avg', kernel_size=7, stream=None, raw=False,\n"
     "      version=0, out=None, workspace=None)\n"
     "--\n\n"
     "RPC importance scores of the candidate keys [start, end) (steps 3-7 of the method).\n"
     "queries [B, Hq, R, D], keys [B, Hkv, L, D] (same dtype and device). Returns float32 pooled scores\n"
     "[B, A, N] (A = 1 for 'all', Hkv for 'group'); with raw=True a tuple (pooled, unpooled).\n"
     "version (CUDA): 0 automatic, 1 the WMMA/fp32 kernels, 2 the mma.sync kernels (float16/bfloat16).\n"
     "out: a writable C-contiguous float32 [B, A, N] tensor on the inputs' device to write (and return)\n"
     "instead of allocating. workspace (CUDA): a contiguous, 256-byte aligned tensor of at least\n"
     "score_workspace_size(...) bytes; without it each call allocates (and frees) one."},
    {"score_workspace_size", (PyCFunction)(void (*)(void))ops_score_workspace_size, METH_VARARGS | METH_KEYWORDS,
     "score_workspace_size(queries, keys, start, end, *, aggregation='all', pooling='avg', kernel_size=7,\n"
     "                     stream=None, raw=False, version=0) -> int\n"
     "--\n\n"
     "Bytes of CUDA workspace score() needs for these arguments (0 on the cpu)."},
    {"_score_scalar", (PyCFunction)(void (*)(void))ops_score_scalar, METH_VARARGS | METH_KEYWORDS,
     "Same as score, computed by the plain C reference kernel (CPU only; for tests)."},
    {"select", (PyCFunction)(void (*)(void))ops_select, METH_VARARGS | METH_KEYWORDS,
     "select(scores, keep, stream=None, *, out=None)\n--\n\n"
     "Top-`keep` candidate offsets per row of float32 scores [B, A, N], ties to the lower index, NaN last;\n"
     "returned as int64 [B, A, keep] in ascending order (written into out when given: a writable\n"
     "C-contiguous int64 [B, A, keep] tensor on the scores' device)."},
    {"compact", (PyCFunction)(void (*)(void))ops_compact, METH_VARARGS | METH_KEYWORDS,
     "compact(keys, values, indices, start, end, stream=None)\n--\n\n"
     "In place on writable keys/values [B, H, L, D]: keeps [0, start), the candidates start + indices\n"
     "(int64 [B, 1 or H, keep], strictly ascending) and the window [end, L). Returns the new length."},
    {"_cpu_isa", (PyCFunction)ops_cpu_isa, METH_VARARGS,
     "_cpu_isa(name=None): the instruction set of the fast CPU scoring path; with a name, cap it (tests)."},
    {NULL, NULL, 0, NULL},
};

int rpc_ops_register(PyObject *module)
{
    return PyModule_AddFunctions(module, ops_methods);
}
