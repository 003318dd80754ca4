/* binding_util.c: the argument checks and result buffers every binding file shares.
 *
 * One home for what the bindings (kvcache.c, ops_binding.c, policy_binding.c, decode_binding.c) used
 * to copy under their own prefixes: shape formatting for messages, the float-dtype and same-device
 * checks, the int64 overflow guard on sizes, the option vocabulary ("all"/"group", "avg"/"max", ...),
 * `out=` arguments and freshly allocated results.
 *
 * Results: every buffer a binding allocates for a call's data is a Storage block (counted by
 * _C._alloc_counts on either device), returned as a NumPy array over the block on the CPU and as a View
 * on CUDA. The CPU and CUDA branches therefore allocate the same number of blocks, so a CPU test that
 * counts allocations stands for the cudaMalloc/cudaFree calls of the same code on a GPU. An `out=`
 * tensor (writable, C-contiguous, exact shape and dtype, on the inputs' device) replaces the allocation.
 */
#include "pyrpc.h"

#include <stdio.h>
#include <string.h>

void rpc_format_dims(char *buf, size_t n, const int64_t *shape, int ndim) {
    size_t used = (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && used < n; i++) {
        used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    }
    if (used < n) {
        snprintf(buf + used, n - used, "]");
    }
}

void rpc_format_shape(char *buf, size_t n, const rpc_tensor *t) {
    rpc_format_dims(buf, n, t->shape, t->ndim);
}

int rpc_check_float(const rpc_tensor *t, const char *argname) {
    if (t->dtype != RPC_F32 && t->dtype != RPC_F16 && t->dtype != RPC_BF16) {
        PyErr_Format(PyExc_ValueError, "%s: expected dtype float32, float16 or bfloat16, got %s", argname,
                     rpc_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int rpc_check_same_device(const rpc_tensor *ref, const char *refname, const rpc_tensor *t, const char *argname) {
    if (t->device_type != ref->device_type || t->device_id != ref->device_id) {
        char a[32], b[32];
        rpc_format_device(a, sizeof a, ref->device_type, ref->device_id);
        rpc_format_device(b, sizeof b, t->device_type, t->device_id);
        PyErr_Format(PyExc_ValueError, "%s: expected a tensor on %s (the device of %s), got %s", argname, a, refname,
                     b);
        return -1;
    }
    return 0;
}

int rpc_sizes_fit(const int64_t *dims, int n, const char *what) {
    int64_t total = 1;
    for (int i = 0; i < n; i++) {
        if (dims[i] != 0 && total > (INT64_MAX / 16) / dims[i]) {
            PyErr_Format(PyExc_ValueError, "%s: sizes too large", what);
            return -1;
        }
        total *= dims[i];
    }
    return 0;
}

int rpc_parse_float(PyObject *obj, const char *argname, double *out) {
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a float, got %s", argname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ option vocabulary */

int rpc_parse_choice(const char *value, const char *argname, const char *const *names, int count, int *out) {
    for (int i = 0; i < count; i++) {
        if (strcmp(value, names[i]) == 0) {
            *out = i;
            return 0;
        }
    }
    char list[160];
    size_t used = 0;
    list[0] = '\0';
    for (int i = 0; i < count && used < sizeof list; i++) {
        used += (size_t)snprintf(list + used, sizeof list - used, "%s'%s'", i ? ", " : "", names[i]);
    }
    if (count == 2) {
        PyErr_Format(PyExc_ValueError, "%s: expected '%s' or '%s', got '%s'", argname, names[0], names[1], value);
    } else {
        PyErr_Format(PyExc_ValueError, "%s: expected one of %s, got '%s'", argname, list, value);
    }
    return -1;
}

/* The names are listed in the order of the enums of rpc.h. */
static const char *const AGGREGATIONS[] = {"all", "group"};
static const char *const POOLINGS[] = {"avg", "max"};

int rpc_parse_aggregation(const char *value, rpc_aggregation *out) {
    int i = 0;
    if (rpc_parse_choice(value, "aggregation", AGGREGATIONS, 2, &i) < 0) {
        return -1;
    }
    *out = i == 0 ? RPC_AGG_ALL : RPC_AGG_GROUP;
    return 0;
}

int rpc_parse_pooling(const char *value, rpc_pooling *out) {
    int i = 0;
    if (rpc_parse_choice(value, "pooling", POOLINGS, 2, &i) < 0) {
        return -1;
    }
    *out = i == 0 ? RPC_POOL_AVG : RPC_POOL_MAX;
    return 0;
}

int rpc_check_kernel_size(int kernel_size) {
    if (kernel_size < 1 || kernel_size % 2 == 0) {
        PyErr_Format(PyExc_ValueError, "kernel_size: expected an odd int >= 1, got %d", kernel_size);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ results and out= tensors */

static void contiguous_strides(int ndim, const int64_t *shape, int64_t *strides) {
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; i--) {
        strides[i] = s;
        s *= shape[i] > 0 ? shape[i] : 1;
    }
}

int rpc_result_init(rpc_result *r, rpc_device_type dt, int device_id, rpc_dtype dtype, int ndim,
                    const int64_t *shape) {
    memset(r, 0, sizeof *r);
    if (ndim < 0 || ndim > RPC_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "result: bad ndim %d", ndim);
        return -1;
    }
    r->dt = dt;
    r->device_id = dt == RPC_DEV_CPU ? 0 : device_id;
    r->dtype = dtype;
    r->ndim = ndim;
    r->count = 1;
    for (int i = 0; i < ndim; i++) {
        r->shape[i] = shape[i];
        r->count *= (size_t)(shape[i] > 0 ? shape[i] : 0);
    }
    return 0;
}

int rpc_result_use_out(rpc_result *r, PyObject *out, const char *argname, intptr_t stream) {
    if (out == NULL || out == Py_None) {
        return 0;
    }
    rpc_tensor t;
    PyObject *keep = NULL;
    if (rpc_from_dlpack(out, argname, stream, &t, &keep) < 0) {
        return -1;
    }
    char want[128], got[128], wdev[32], gdev[32];
    rpc_format_dims(want, sizeof want, r->shape, r->ndim);
    rpc_format_shape(got, sizeof got, &t);
    rpc_format_device(wdev, sizeof wdev, r->dt, r->device_id);
    rpc_format_device(gdev, sizeof gdev, t.device_type, t.device_id);
    int ok = t.ndim == r->ndim && t.dtype == r->dtype && t.device_type == r->dt && t.device_id == r->device_id;
    for (int i = 0; ok && i < r->ndim; i++) {
        ok = t.shape[i] == r->shape[i];
    }
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %s tensor of shape %s on %s, got %s %s on %s", argname,
                     rpc_dtype_name(r->dtype), want, wdev, rpc_dtype_name(t.dtype), got, gdev);
        Py_DECREF(keep);
        return -1;
    }
    int64_t strides[RPC_MAX_NDIM];
    contiguous_strides(r->ndim, r->shape, strides);
    for (int i = 0; i < r->ndim; i++) {
        if (t.shape[i] > 1 && t.strides[i] != strides[i]) {
            PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous tensor (it is written whole), got stride %lld "
                         "in dimension %d", argname, (long long)t.strides[i], i);
            Py_DECREF(keep);
            return -1;
        }
    }
    if (rpc_check_writable(&t, argname) < 0) {
        Py_DECREF(keep);
        return -1;
    }
    r->data = t.data;
    r->out = out;
    r->keep = keep;
    return 0;
}

int rpc_result_alloc(rpc_result *r, rpc_module_state *st, size_t extra_elements, intptr_t stream) {
    if (r->data != NULL) {
        return 0;
    }
    const size_t es = rpc_dtype_size(r->dtype);
    r->storage = rpc_storage_new(st, r->dt, r->device_id, (r->count + extra_elements) * es, stream);
    if (r->storage == NULL) {
        return -1;
    }
    r->data = rpc_storage_data(r->storage);
    return 0;
}

PyObject *rpc_result_take(rpc_result *r, rpc_module_state *st, size_t offset) {
    if (r->out != NULL) {
        return Py_NewRef(r->out);
    }
    char *data = (char *)r->data + offset * rpc_dtype_size(r->dtype);
    if (r->dt == RPC_DEV_CPU) {
        return rpc_numpy_from_storage(r->storage, data, r->dtype, r->ndim, r->shape);
    }
    int64_t strides[RPC_MAX_NDIM];
    contiguous_strides(r->ndim, r->shape, strides);
    return rpc_view_new(st, r->storage, data, r->dt, r->device_id, r->dtype, r->ndim, r->shape, strides);
}

void rpc_result_release(rpc_result *r) {
    Py_CLEAR(r->storage);
    Py_CLEAR(r->keep);
    r->data = NULL;
    r->out = NULL;
}

/* ------------------------------------------------------------------ int64 vectors for kernels */

int rpc_upload_int64s(int device, int64_t *dst, const int64_t *values, int64_t n, intptr_t stream, char *err) {
    for (int64_t i = 0; i < n; i += RPC_SET_INT64S_MAX) {
        const int64_t m = n - i < RPC_SET_INT64S_MAX ? n - i : RPC_SET_INT64S_MAX;
        int rc = rpc_cuda_set_int64s(device, dst + i, values + i, (int)m, (void *)stream, err);
        if (rc != RPC_OK) {
            return rc;
        }
    }
    return RPC_OK;
}
