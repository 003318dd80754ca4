/* common.c: what every binding file needs from the interpreter side, and nothing that calls them back:
 * the module state lookup, status -> exception mapping, dtype and device names, NumPy results.
 *
 * This is the only file that uses the NumPy C API (rpc_numpy_*), which keeps the NumPy import table
 * private to one translation unit; module.c's exec slot calls rpc_common_init first, which imports it
 * and records the module definition (rpc_get_state_from_type finds the module by it).
 */
#include "pyrpc.h"

#include <string.h>

#include <numpy/arrayobject.h>

static PyModuleDef *module_def; /* borrowed: module.c's static definition, set once by rpc_common_init */

int rpc_common_init(PyModuleDef *def) {
    module_def = def;
    if (_import_array() < 0) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_ImportError, "rpc_py._C: cannot import the NumPy C API");
        }
        return -1;
    }
    return 0;
}

rpc_module_state *rpc_get_state(PyObject *module) {
    return (rpc_module_state *)PyModule_GetState(module);
}

rpc_module_state *rpc_get_state_from_type(PyTypeObject *tp) {
    /* By definition rather than PyType_GetModuleState so that Python subclasses of our types work. */
    PyObject *module = PyType_GetModuleByDef(tp, module_def);
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

