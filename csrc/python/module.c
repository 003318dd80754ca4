/* module.c: the rpc_py._C module object.
 *
 * Multi-phase initialisation: the exec slot initialises common.c (the NumPy C API, the module
 * definition), then asks each binding file to add its types or functions (dlpack_bridge.c: Storage and
 * View; kvcache.c: KVCache; ops_binding.c, decode_binding.c, policy_binding.c: the standalone
 * functions). The heap types live in per-module state, so nothing here is a process-wide global except
 * the module definition itself. This file calls into the others and nothing calls into it.
 */
#include "pyrpc.h"

static struct PyModuleDef rpc_module_def;

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
    if (rpc_common_init(&rpc_module_def) < 0) {
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
