/* module.c: the rpc_py._C module object.
 *
 * Multi-phase initialisation: the exec slot imports the NumPy C API, then asks each binding file to
 * add its types or functions (dlpack_bridge.c: Storage and View; kvcache.c: KVCache; ops_binding.c:
 * score/select/compact). The heap types live in per-module state, so nothing here is a process-wide
 * global except the module definition itself. This is also the only file that uses the NumPy C API
 * (rpc_numpy_from_host), which keeps the NumPy import table private to one translation unit.
 *
 * Small shared helpers live here too: status -> exception mapping and dtype/device names.
 */
#include "pyrpc.h"

#include <string.h>

#include <numpy/arrayobject.h>

static struct PyModuleDef rpc_module_def;

rpc_module_state *rpc_get_state(PyObject *module) {
    return (rpc_module_state *)PyModule_GetState(module);
}

rpc_module_state *rpc_get_state_from_type(PyTypeObject *tp) {
    /* By definition rather than PyType_GetModuleState so that Python subclasses of our types work. */
    PyObject *module = PyType_GetModuleByDef(tp, &rpc_module_def);
    if (module == NULL) {
        return NULL;
    }
    return rpc_get_state(module);
}

/* ------------------------------------------------------------------ errors */

PyObject *rpc_raise_status(int status, const char *err) {
    const char *msg = (err != NULL && err[0] != '\0') ? err : NULL;
    switch (status) {
    case RPC_ERR_VALUE:
        PyErr_SetString(PyExc_ValueError, msg ? msg : "invalid argument");
        break;
    case RPC_ERR_NOMEM:
        if (msg) {
            PyErr_SetString(PyExc_MemoryError, msg);
        } else {
            PyErr_NoMemory();
        }
        break;
    case RPC_ERR_CUDA:
        PyErr_Format(PyExc_RuntimeError, "CUDA error: %s", msg ? msg : "(no message)");
        break;
    case RPC_ERR_NOT_BUILT:
        PyErr_SetString(PyExc_RuntimeError, msg ? msg : "this backend was not compiled into rpc_py._C");
        break;
    default:
        PyErr_Format(PyExc_SystemError, "rpc_py: unexpected status %d: %s", status, msg ? msg : "");
        break;
    }
    return NULL;
}

int rpc_raise_status_int(int status, const char *err) {
    rpc_raise_status(status, err);
    return -1;
}

/* ------------------------------------------------------------------ names */

const char *rpc_dtype_name(rpc_dtype t) {
    switch (t) {
    case RPC_F32: return "float32";
    case RPC_F16: return "float16";
    case RPC_BF16: return "bfloat16";
    case RPC_I64: return "int64";
    case RPC_I32: return "int32";
    }
    return "unknown";
}

int rpc_dtype_from_name(const char *name, rpc_dtype *out) {
    static const struct {
        const char *name;
        rpc_dtype dtype;
    } table[] = {
        {"float32", RPC_F32}, {"float", RPC_F32},     {"float16", RPC_F16}, {"half", RPC_F16},
        {"bfloat16", RPC_BF16}, {"int64", RPC_I64},   {"int32", RPC_I32},
    };
    if (name != NULL) {
        /* Accept "torch.bfloat16" and friends: the part after the last dot decides. */
        const char *dot = strrchr(name, '.');
        const char *base = dot ? dot + 1 : name;
        for (size_t i = 0; i < sizeof(table) / sizeof(table[0]); i++) {
            if (strcmp(base, table[i].name) == 0) {
                *out = table[i].dtype;
                return 0;
            }
        }
    }
    PyErr_Format(PyExc_ValueError,
                 "dtype: expected one of float32, float16, bfloat16, int64, int32, got '%s'",
                 name ? name : "(null)");
    return -1;
}

void rpc_format_device(char *buf, size_t n, rpc_device_type dt, int id) {
    if (dt == RPC_DEV_CPU) {
        snprintf(buf, n, "cpu");
    } else if (dt == RPC_DEV_CUDA) {
        snprintf(buf, n, "cuda:%d", id);
    } else {
        snprintf(buf, n, "device(type=%d, id=%d)", (int)dt, id);
    }
}

/* ------------------------------------------------------------------ NumPy results */

PyObject *rpc_numpy_from_host(const void *data, rpc_dtype dtype, int ndim, const int64_t *shape) {
    int typenum;
    switch (dtype) {
    case RPC_F32: typenum = NPY_FLOAT32; break;
    case RPC_F16: typenum = NPY_FLOAT16; break;
    case RPC_I64: typenum = NPY_INT64; break;
    case RPC_I32: typenum = NPY_INT32; break;
    default:
        PyErr_Format(PyExc_ValueError, "NumPy has no %s dtype; use DLPack (torch) for this result",
                     rpc_dtype_name(dtype));
        return NULL;
    }
    if (ndim < 0 || ndim > RPC_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "rpc_numpy_from_host: bad ndim %d", ndim);
        return NULL;
    }
    npy_intp dims[RPC_MAX_NDIM];
    size_t count = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "rpc_numpy_from_host: negative dimension");
            return NULL;
        }
        dims[i] = (npy_intp)shape[i];
        count *= (size_t)shape[i];
    }
    PyObject *arr = PyArray_SimpleNew(ndim, dims, typenum);
    if (arr == NULL) {
        return NULL;
    }
    if (count > 0 && data != NULL) {
        memcpy(PyArray_DATA((PyArrayObject *)arr), data, count * rpc_dtype_size(dtype));
    }
    return arr;
}

PyObject *rpc_numpy_from_storage(PyObject *storage, void *data, rpc_dtype dtype, int ndim, const int64_t *shape) {
    int typenum;
    switch (dtype) {
    case RPC_F32: typenum = NPY_FLOAT32; break;
    case RPC_F16: typenum = NPY_FLOAT16; break;
    case RPC_I64: typenum = NPY_INT64; break;
    case RPC_I32: typenum = NPY_INT32; break;
    default:
        PyErr_Format(PyExc_ValueError, "NumPy has no %s dtype; use DLPack (torch) for this result",
                     rpc_dtype_name(dtype));
        return NULL;
    }
    if (ndim < 0 || ndim > RPC_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "rpc_numpy_from_storage: bad ndim %d", ndim);
        return NULL;
    }
    npy_intp dims[RPC_MAX_NDIM];
    for (int i = 0; i < ndim; i++) {
        dims[i] = (npy_intp)shape[i];
    }
    PyObject *arr = PyArray_New(&PyArray_Type, ndim, dims, typenum, NULL, data, 0, NPY_ARRAY_CARRAY, NULL);
    if (arr == NULL) {
        return NULL;
    }
    if (PyArray_SetBaseObject((PyArrayObject *)arr, Py_NewRef(storage)) < 0) { /* steals the reference */
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* ------------------------------------------------------------------ module functions */

static PyObject *rpc_mod_cuda_built(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return PyBool_FromLong(rpc_cuda_built());
}

static PyObject *rpc_mod_cuda_device_count(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    char err[RPC_ERR_LEN] = {0};
    int count = 0;
    int rc = rpc_cuda_device_count(&count, err);
    if (rc != RPC_OK) {
        return rpc_raise_status(rc, err);
    }
    return PyLong_FromLong(count);
}

static PyObject *rpc_mod_openmp_built(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
#ifdef RPC_PY_WITH_OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyObject *rpc_mod_alloc_counts(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    int64_t c[4];
    rpc_alloc_counts(c);
    return Py_BuildValue("{sLsLsLsL}", "host_allocs", (long long)c[0], "device_allocs", (long long)c[1],
                         "host_frees", (long long)c[2], "device_frees", (long long)c[3]);
}

static PyMethodDef rpc_module_methods[] = {
    {"cuda_built", rpc_mod_cuda_built, METH_NOARGS, "True when the CUDA backend was compiled in."},
    {"cuda_device_count", rpc_mod_cuda_device_count, METH_NOARGS,
     "Number of CUDA devices usable now (0 without a driver or device; 0 when CUDA is not built)."},
    {"openmp_built", rpc_mod_openmp_built, METH_NOARGS, "True when the CPU code was built with OpenMP."},
    {"_alloc_counts", rpc_mod_alloc_counts, METH_NOARGS,
     "_alloc_counts() -> dict: Storage blocks allocated and freed since import, host and device (every\n"
     "cudaMalloc/cudaFree rpc_py makes goes through one Storage). For tests of the no-sync policy."},
    {NULL, NULL, 0, NULL},
};

/* ------------------------------------------------------------------ module lifecycle */

static int rpc_module_exec(PyObject *module) {
    if (_import_array() < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ImportError, "rpc_py._C: cannot import the NumPy C API");
        }
        return -1;
    }
    rpc_module_state *st = rpc_get_state(module);
    if (rpc_bridge_register(module, st) < 0) {
        return -1;
    }
    if (rpc_kvcache_register(module, st) < 0) {
        return -1;
    }
    if (rpc_ops_register(module) < 0) {
        return -1;
    }
    if (rpc_decode_register(module) < 0) {
        return -1;
    }
    if (rpc_policy_register(module) < 0) {
        return -1;
    }
    return 0;
}

static int rpc_module_traverse(PyObject *module, visitproc visit, void *arg) {
    rpc_module_state *st = rpc_get_state(module);
    Py_VISIT(st->KVCacheType);
    Py_VISIT(st->StorageType);
    Py_VISIT(st->ViewType);
    return 0;
}

static int rpc_module_clear(PyObject *module) {
    rpc_module_state *st = rpc_get_state(module);
    Py_CLEAR(st->KVCacheType);
    Py_CLEAR(st->StorageType);
    Py_CLEAR(st->ViewType);
    return 0;
}

static void rpc_module_free(void *module) {
    rpc_module_clear((PyObject *)module);
}

static PyModuleDef_Slot rpc_module_slots[] = {
    {Py_mod_exec, (void *)rpc_module_exec},
#if PY_VERSION_HEX >= 0x030C0000
    /* The NumPy C API table is process-global and NumPy itself refuses sub-interpreters. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#if PY_VERSION_HEX >= 0x030D0000
    /* The KVCache busy flag relies on the GIL to be set atomically. */
    {Py_mod_gil, Py_MOD_GIL_USED},
#endif
    {0, NULL},
};

static struct PyModuleDef rpc_module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "rpc_py._C",
    .m_doc = "rpc_py native core: KV cache storage, DLPack bridge and RPC compression kernels.",
    .m_size = sizeof(rpc_module_state),
    .m_methods = rpc_module_methods,
    .m_slots = rpc_module_slots,
    .m_traverse = rpc_module_traverse,
    .m_clear = rpc_module_clear,
    .m_free = rpc_module_free,
};

PyMODINIT_FUNC PyInit__C(void) {
    return PyModuleDef_Init(&rpc_module_def);
}
