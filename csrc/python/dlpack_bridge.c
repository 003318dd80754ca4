/* dlpack_bridge.c: how tensors cross the Python/C boundary, in both directions.
 *
 * Consumer (rpc_from_dlpack): any object with __dlpack__ (torch, NumPy, CuPy, our own View) or a raw
 * DLPack capsule becomes a borrowed rpc_tensor. The capsule is renamed "used_*" (we now own the
 * managed tensor) and wrapped in a small keepalive capsule whose destructor calls the producer's
 * deleter, so the producer's memory lives exactly as long as the caller holds the keepalive.
 *
 * Producer (View): a View describes part of a Storage block (shape, strides, dtype, device) and hands
 * it out via __dlpack__. Each export allocates one managed tensor holding a strong reference to the
 * View; the deleter drops it, taking the GIL first because consumers may delete from any thread.
 *
 * Storage: one host (64-byte aligned, zeroed) or CUDA (rpc_cuda_malloc, zeroed on a stream)
 * allocation, freed when the last View or cache that references it goes away.
 */
#include "pyrpc.h"
#include "dlpack.h"

#include <stdlib.h>
#include <string.h>

/* ================================================================== consumer */

/* PyObject_GetOptionalAttrString is 3.13+: 1 found, 0 absent, -1 error (same contract). */
static int get_optional_attr(PyObject *obj, const char *name, PyObject **out) {
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttrString(obj, name, out);
#else
    *out = PyObject_GetAttrString(obj, name);
    if (*out != NULL) {
        return 1;
    }
    if (PyErr_ExceptionMatches(PyExc_AttributeError)) {
        PyErr_Clear();
        return 0;
    }
    return -1;
#endif
}

static const char KEEPALIVE_NAME[] = "rpc_py._C.dlpack_keepalive";

/* Keepalive capsule: pointer = the managed tensor, context = non-NULL for a versioned one. */
static void keepalive_destructor(PyObject *cap) {
    void *mt = PyCapsule_GetPointer(cap, KEEPALIVE_NAME);
    if (mt == NULL) {
        PyErr_Clear();
        return;
    }
    if (PyCapsule_GetContext(cap) != NULL) {
        DLManagedTensorVersioned *v = (DLManagedTensorVersioned *)mt;
        if (v->deleter) {
            v->deleter(v);
        }
    } else {
        DLManagedTensor *l = (DLManagedTensor *)mt;
        if (l->deleter) {
            l->deleter(l);
        }
    }
}

static int dl_dtype_to_rpc(DLDataType dt, rpc_dtype *out) {
    if (dt.lanes != 1) {
        return -1;
    }
    if (dt.code == kDLFloat && dt.bits == 32) {
        *out = RPC_F32;
    } else if (dt.code == kDLFloat && dt.bits == 16) {
        *out = RPC_F16;
    } else if (dt.code == kDLBfloat && dt.bits == 16) {
        *out = RPC_BF16;
    } else if (dt.code == kDLInt && dt.bits == 64) {
        *out = RPC_I64;
    } else if (dt.code == kDLInt && dt.bits == 32) {
        *out = RPC_I32;
    } else {
        return -1;
    }
    return 0;
}

static const char *dl_code_name(uint8_t code) {
    switch (code) {
    case kDLInt: return "int";
    case kDLUInt: return "uint";
    case kDLFloat: return "float";
    case kDLOpaqueHandle: return "opaque";
    case kDLBfloat: return "bfloat";
    case kDLComplex: return "complex";
    case kDLBool: return "bool";
    }
    return "unknown";
}

/* Checks a DLTensor and fills *t. Raises ValueError naming argname. */
static int fill_tensor(const DLTensor *dl, const char *argname, int readonly, rpc_tensor *t) {
    if (dl->device.device_type != kDLCPU && dl->device.device_type != kDLCUDA) {
        PyErr_Format(PyExc_ValueError, "%s: expected a CPU or CUDA tensor, got DLPack device type %d",
                     argname, (int)dl->device.device_type);
        return -1;
    }
    if (dl->dtype.lanes != 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a scalar dtype (lanes == 1), got %d lanes", argname,
                     (int)dl->dtype.lanes);
        return -1;
    }
    rpc_dtype dtype;
    if (dl_dtype_to_rpc(dl->dtype, &dtype) < 0) {
        if (dl->dtype.code == kDLBool) {
            PyErr_Format(PyExc_ValueError,
                         "%s: unsupported dtype bool; expected float32, float16, bfloat16, int64 or int32",
                         argname);
        } else {
            PyErr_Format(PyExc_ValueError,
                         "%s: unsupported dtype %s%d; expected float32, float16, bfloat16, int64 or int32",
                         argname, dl_code_name(dl->dtype.code), (int)dl->dtype.bits);
        }
        return -1;
    }
    if (dl->ndim < 0 || dl->ndim > RPC_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s: expected at most %d dimensions, got %d", argname, RPC_MAX_NDIM,
                     (int)dl->ndim);
        return -1;
    }
    memset(t, 0, sizeof(*t));
    t->device_type = (rpc_device_type)dl->device.device_type;
    t->device_id = (int)dl->device.device_id;
    t->dtype = dtype;
    t->ndim = (int)dl->ndim;
    t->readonly = readonly;
    int empty = 0; /* an empty tensor may list huge sizes beside its zero; it is never read */
    for (int i = 0; i < t->ndim; i++) {
        empty |= dl->shape[i] == 0;
    }
    int64_t running = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        int64_t n = dl->shape[i];
        if (n < 0) {
            PyErr_Format(PyExc_ValueError, "%s: negative size %lld in dimension %d", argname, (long long)n, i);
            return -1;
        }
        t->shape[i] = n;
        t->strides[i] = dl->strides ? dl->strides[i] : running;
        if (__builtin_mul_overflow(running, n, &running)) {
            if (!empty) {
                PyErr_Format(PyExc_ValueError, "%s: the element count overflows 64 bits", argname);
                return -1;
            }
            running = 0;
        }
    }
    t->data = dl->data ? (void *)((char *)dl->data + dl->byte_offset) : NULL;
    /* Kernels load whole elements: a misaligned pointer (NumPy allows them) would be undefined. */
    if ((uintptr_t)t->data % rpc_dtype_size(dtype) != 0) {
        PyErr_Format(PyExc_ValueError, "%s: data pointer %p is not aligned to the %d-byte element size of %s",
                     argname, t->data, (int)rpc_dtype_size(dtype), rpc_dtype_name(dtype));
        return -1;
    }
    return 0;
}

/* Consumes a capsule (new reference `cap` is stolen). */
static int consume_capsule(PyObject *cap, const char *argname, rpc_tensor *t, PyObject **keepalive) {
    int versioned;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        versioned = 1;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        versioned = 0;
    } else {
        const char *name = PyCapsule_GetName(cap);
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "%s: expected an unconsumed DLPack capsule ('dltensor' or 'dltensor_versioned'), "
                     "got a capsule named '%s'",
                     argname, name ? name : "(null)");
        Py_DECREF(cap);
        return -1;
    }
    void *mt = PyCapsule_GetPointer(cap, versioned ? "dltensor_versioned" : "dltensor");
    if (mt == NULL) {
        Py_DECREF(cap);
        return -1;
    }
    const DLTensor *dl;
    int readonly = 0;
    if (versioned) {
        DLManagedTensorVersioned *v = (DLManagedTensorVersioned *)mt;
        if (v->version.major != RPC_DLPACK_MAJOR_VERSION) {
            PyErr_Format(PyExc_ValueError, "%s: unsupported DLPack version %u.%u (expected major version 1)",
                         argname, (unsigned)v->version.major, (unsigned)v->version.minor);
            Py_DECREF(cap); /* still named dltensor_versioned: the producer's destructor frees it */
            return -1;
        }
        readonly = (v->flags & DLPACK_FLAG_BITMASK_READ_ONLY) ? 1 : 0;
        dl = &v->dl_tensor;
    } else {
        dl = &((DLManagedTensor *)mt)->dl_tensor;
    }
    if (fill_tensor(dl, argname, readonly, t) < 0) {
        Py_DECREF(cap);
        return -1;
    }
    PyObject *keep = PyCapsule_New(mt, KEEPALIVE_NAME, keepalive_destructor);
    if (keep == NULL) {
        Py_DECREF(cap);
        return -1;
    }
    if (versioned && PyCapsule_SetContext(keep, mt) < 0) {
        /* The keepalive does not own anything yet: disarm it before dropping it. */
        PyCapsule_SetDestructor(keep, NULL);
        Py_DECREF(keep);
        Py_DECREF(cap);
        return -1;
    }
    if (PyCapsule_SetName(cap, versioned ? "used_dltensor_versioned" : "used_dltensor") < 0) {
        PyCapsule_SetDestructor(keep, NULL);
        Py_DECREF(keep);
        Py_DECREF(cap);
        return -1;
    }
    Py_DECREF(cap);
    *keepalive = keep;
    return 0;
}

/* Returns 1 and fills dev when obj has a usable __dlpack_device__, 0 when it has none, -1 on error. */
static int query_device(PyObject *obj, const char *argname, int *dev_type, int *dev_id) {
    PyObject *meth = NULL;
    if (get_optional_attr(obj, "__dlpack_device__", &meth) < 0) {
        return -1;
    }
    if (meth == NULL) {
        return 0;
    }
    PyObject *res = PyObject_CallNoArgs(meth);
    Py_DECREF(meth);
    if (res == NULL) {
        return -1;
    }
    int ok = PyTuple_Check(res) && PyTuple_GET_SIZE(res) == 2;
    long a = -1, b = -1;
    if (ok) {
        a = PyLong_AsLong(PyTuple_GET_ITEM(res, 0));
        b = (a == -1 && PyErr_Occurred()) ? -1 : PyLong_AsLong(PyTuple_GET_ITEM(res, 1));
        if (PyErr_Occurred()) {
            Py_DECREF(res);
            return -1;
        }
    }
    Py_DECREF(res);
    if (!ok) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack_device__() must return a (device_type, device_id) tuple",
                     argname);
        return -1;
    }
    *dev_type = (int)a;
    *dev_id = (int)b;
    return 1;
}

int rpc_from_dlpack(PyObject *obj, const char *argname, intptr_t stream, rpc_tensor *t,
                    PyObject **keepalive) {
    *keepalive = NULL;
    if (PyCapsule_CheckExact(obj)) {
        Py_INCREF(obj);
        return consume_capsule(obj, argname, t, keepalive);
    }
    PyObject *meth = NULL;
    if (get_optional_attr(obj, "__dlpack__", &meth) < 0) {
        return -1;
    }
    if (meth == NULL) {
        PyErr_Format(PyExc_TypeError,
                     "%s: expected a DLPack tensor (torch, numpy, cupy: an object with __dlpack__), got %s",
                     argname, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int dev_type = kDLCPU, dev_id = 0;
    if (query_device(obj, argname, &dev_type, &dev_id) < 0) {
        Py_DECREF(meth);
        return -1;
    }
    PyObject *kwargs = PyDict_New();
    PyObject *cap = NULL;
    if (kwargs == NULL) {
        goto done;
    }
    if (dev_type == kDLCUDA && stream >= 0) {
        /* DLPack reserves 0 as ambiguous; our 0 means the legacy default stream, DLPack's 1. */
        PyObject *s = stream == 0 ? PyLong_FromLong(1) : PyLong_FromSsize_t((Py_ssize_t)stream);
        if (s == NULL || PyDict_SetItemString(kwargs, "stream", s) < 0) {
            Py_XDECREF(s);
            goto done;
        }
        Py_DECREF(s);
    }
    PyObject *ver = Py_BuildValue("(ii)", RPC_DLPACK_MAJOR_VERSION, RPC_DLPACK_MINOR_VERSION);
    if (ver == NULL || PyDict_SetItemString(kwargs, "max_version", ver) < 0) {
        Py_XDECREF(ver);
        goto done;
    }
    Py_DECREF(ver);
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        goto done;
    }
    cap = PyObject_Call(meth, empty, kwargs);
    if (cap == NULL && PyErr_ExceptionMatches(PyExc_TypeError)) {
        /* A producer from before DLPack 1.0 does not know max_version. */
        PyErr_Clear();
        if (PyDict_DelItemString(kwargs, "max_version") == 0) {
            cap = PyObject_Call(meth, empty, kwargs);
        }
    }
    Py_DECREF(empty);
    if (cap != NULL && !PyCapsule_CheckExact(cap)) {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__() returned %s, expected a capsule", argname,
                     Py_TYPE(cap)->tp_name);
        Py_CLEAR(cap);
    }
done:
    Py_XDECREF(kwargs);
    Py_DECREF(meth);
    if (cap == NULL) {
        return -1;
    }
    return consume_capsule(cap, argname, t, keepalive);
}

int rpc_parse_stream(PyObject *obj, intptr_t *stream) {
    if (obj == NULL || obj == Py_None) {
        *stream = 0;
        return 0;
    }
    if (PyBool_Check(obj) || !PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "stream: expected None or an int CUDA stream handle, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow > 0) {
        /* Handles are pointers: values above INT64_MAX are still valid addresses. */
        unsigned long long u = PyLong_AsUnsignedLongLong(obj);
        if (u == (unsigned long long)-1 && PyErr_Occurred()) {
            return -1;
        }
        *stream = (intptr_t)u;
        return 0;
    }
    if (overflow < 0 || v < 0) {
        PyErr_SetString(PyExc_ValueError, "stream: expected None or a CUDA stream handle >= 0, got a negative int");
        return -1;
    }
    *stream = (intptr_t)v;
    return 0;
}

/* ================================================================== checks */

int rpc_check_ndim_dtype(const rpc_tensor *t, const char *argname, int ndim, int dtype) {
    if (ndim >= 0 && t->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D tensor, got %d-D", argname, ndim, t->ndim);
        return -1;
    }
    if (dtype >= 0 && (int)t->dtype != dtype) {
        PyErr_Format(PyExc_ValueError, "%s: expected dtype %s, got %s", argname, rpc_dtype_name((rpc_dtype)dtype),
                     rpc_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int rpc_check_no_negative_strides(const rpc_tensor *t, const char *argname) {
    for (int i = 0; i < t->ndim; i++) {
        if (t->strides[i] < 0 && t->shape[i] > 1) {
            PyErr_Format(PyExc_ValueError, "%s: expected non-negative strides, got stride %lld in dimension %d",
                         argname, (long long)t->strides[i], i);
            return -1;
        }
    }
    return 0;
}

int rpc_check_writable(const rpc_tensor *t, const char *argname) {
    if (t->readonly) {
        PyErr_Format(PyExc_BufferError, "%s: expected writable memory, got a read-only tensor", argname);
        return -1;
    }
    return 0;
}

/* ================================================================== Storage */

typedef struct {
    PyObject_HEAD
    void *data;                  /* owned: host block from aligned_alloc or device block from rpc_cuda_malloc */
    size_t nbytes;               /* requested size */
    rpc_device_type device_type;
    int device_id;
} StorageObject;

#define RPC_HOST_ALIGN 64

/* Every Storage block is allocated and freed here, so these counters see every host/device allocation
 * rpc_py makes (the kernels allocate nothing). Tests read them through _C._alloc_counts() to prove
 * that a generation allocates nothing after its first compression; on a CPU build the host counts
 * stand for the cudaMalloc/cudaFree calls the same code makes on a GPU. Updated with the GIL held. */
static int64_t alloc_counts[4]; /* host allocs, device allocs, host frees, device frees */

void rpc_alloc_counts(int64_t out[4]) {
    memcpy(out, alloc_counts, sizeof alloc_counts);
}

PyObject *rpc_storage_new(rpc_module_state *st, rpc_device_type dt, int device_id, size_t nbytes,
                          intptr_t stream) {
    if (dt != RPC_DEV_CPU && dt != RPC_DEV_CUDA) {
        PyErr_Format(PyExc_ValueError, "device: unsupported device type %d", (int)dt);
        return NULL;
    }
    StorageObject *self = PyObject_New(StorageObject, st->StorageType);
    if (self == NULL) {
        return NULL;
    }
    self->data = NULL;
    self->nbytes = nbytes;
    self->device_type = dt;
    self->device_id = dt == RPC_DEV_CPU ? 0 : device_id;
    size_t alloc = nbytes == 0 ? RPC_HOST_ALIGN : nbytes;
    if (dt == RPC_DEV_CPU) {
        alloc = (alloc + RPC_HOST_ALIGN - 1) / RPC_HOST_ALIGN * RPC_HOST_ALIGN;
        void *p = NULL;
        if (posix_memalign(&p, RPC_HOST_ALIGN, alloc) != 0) {
            Py_DECREF(self);
            PyErr_Format(PyExc_MemoryError, "cannot allocate %zu bytes of host memory", nbytes);
            return NULL;
        }
        alloc_counts[0]++;
        if (alloc >= ((size_t)1 << 20)) {
            Py_BEGIN_ALLOW_THREADS
            memset(p, 0, alloc);
            Py_END_ALLOW_THREADS
        } else {
            memset(p, 0, alloc);
        }
        self->data = p;
    } else {
        char err[RPC_ERR_LEN] = {0};
        void *p = NULL;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = rpc_cuda_malloc(device_id, alloc, &p, err);
        if (rc == RPC_OK) {
            rc = rpc_cuda_memset_async(device_id, p, 0, alloc, (void *)stream, err);
            if (rc != RPC_OK) {
                char err2[RPC_ERR_LEN];
                rpc_cuda_free(device_id, p, err2);
                p = NULL;
            }
        }
        Py_END_ALLOW_THREADS
        if (rc != RPC_OK) {
            Py_DECREF(self);
            return rpc_raise_status(rc, err);
        }
        alloc_counts[1]++;
        self->data = p;
    }
    return (PyObject *)self;
}

void *rpc_storage_data(PyObject *storage) {
    return ((StorageObject *)storage)->data;
}

size_t rpc_storage_nbytes(PyObject *storage) {
    return ((StorageObject *)storage)->nbytes;
}

static void storage_dealloc(PyObject *op) {
    StorageObject *self = (StorageObject *)op;
    PyTypeObject *tp = Py_TYPE(op);
    if (self->data != NULL) {
        if (self->device_type == RPC_DEV_CPU) {
            free(self->data);
            alloc_counts[2]++;
        } else {
            alloc_counts[3]++;
            char err[RPC_ERR_LEN] = {0};
            int rc = rpc_cuda_free(self->device_id, self->data, err);
            if (rc != RPC_OK) {
                /* A destructor cannot raise: report and leak the block rather than crash. */
#if PY_VERSION_HEX >= 0x030C0000
                PyObject *saved = PyErr_GetRaisedException();
#else
                PyObject *et, *ev, *tb;
                PyErr_Fetch(&et, &ev, &tb);
#endif
                PyErr_Format(PyExc_RuntimeWarning, "rpc_py: freeing CUDA memory failed: %s", err);
                PyErr_WriteUnraisable(op);
#if PY_VERSION_HEX >= 0x030C0000
                PyErr_SetRaisedException(saved);
#else
                PyErr_Restore(et, ev, tb);
#endif
            }
        }
        self->data = NULL;
    }
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyObject *storage_get_nbytes(PyObject *op, void *closure) {
    (void)closure;
    return PyLong_FromSize_t(((StorageObject *)op)->nbytes);
}

static PyObject *storage_get_device(PyObject *op, void *closure) {
    (void)closure;
    StorageObject *self = (StorageObject *)op;
    char buf[48];
    rpc_format_device(buf, sizeof buf, self->device_type, self->device_id);
    return PyUnicode_FromString(buf);
}

static PyObject *storage_get_ptr(PyObject *op, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(((StorageObject *)op)->data);
}

static PyObject *storage_repr(PyObject *op) {
    StorageObject *self = (StorageObject *)op;
    char buf[48];
    rpc_format_device(buf, sizeof buf, self->device_type, self->device_id);
    return PyUnicode_FromFormat("<rpc_py._C.Storage %zu bytes on %s>", self->nbytes, buf);
}

static PyGetSetDef storage_getset[] = {
    {"nbytes", storage_get_nbytes, NULL, "Size of the block in bytes.", NULL},
    {"device", storage_get_device, NULL, "'cpu' or 'cuda:N'.", NULL},
    {"ptr", storage_get_ptr, NULL, "Address of the block (for debugging).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot storage_slots[] = {
    {Py_tp_dealloc, storage_dealloc},
    {Py_tp_repr, storage_repr},
    {Py_tp_getset, storage_getset},
    {Py_tp_doc, "A host or CUDA memory block owned by rpc_py (created by KVCache, not by users)."},
    {0, NULL},
};

static PyType_Spec storage_spec = {
    .name = "rpc_py._C.Storage",
    .basicsize = sizeof(StorageObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = storage_slots,
};

/* ================================================================== View */

typedef struct {
    PyObject_HEAD
    PyObject *owner;             /* strong: keeps the memory alive (a Storage, or None for empty views) */
    void *data;                  /* first element, inside owner's block */
    rpc_device_type device_type;
    int device_id;
    rpc_dtype dtype;
    int ndim;
    int64_t shape[RPC_MAX_NDIM];
    int64_t strides[RPC_MAX_NDIM]; /* elements */
} ViewObject;

PyObject *rpc_view_new(rpc_module_state *st, PyObject *owner, void *data, rpc_device_type dt,
                       int device_id, rpc_dtype dtype, int ndim, const int64_t *shape,
                       const int64_t *strides) {
    if (ndim < 0 || ndim > RPC_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "View: bad ndim %d", ndim);
        return NULL;
    }
    ViewObject *self = PyObject_GC_New(ViewObject, st->ViewType);
    if (self == NULL) {
        return NULL;
    }
    self->owner = Py_NewRef(owner);
    self->data = data;
    self->device_type = dt;
    self->device_id = dt == RPC_DEV_CPU ? 0 : device_id;
    self->dtype = dtype;
    self->ndim = ndim;
    for (int i = 0; i < RPC_MAX_NDIM; i++) {
        self->shape[i] = i < ndim ? shape[i] : 0;
        self->strides[i] = i < ndim ? strides[i] : 0;
    }
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static int view_traverse(PyObject *op, visitproc visit, void *arg) {
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((ViewObject *)op)->owner);
    return 0;
}

static int view_clear(PyObject *op) {
    Py_CLEAR(((ViewObject *)op)->owner);
    return 0;
}

static void view_dealloc(PyObject *op) {
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    view_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

/* One allocation per export: the managed tensor plus the shape/strides it points to. */
typedef struct {
    union {
        DLManagedTensorVersioned v;
        DLManagedTensor l;
    } mt;
    int versioned;
    PyObject *view;              /* strong reference, dropped by the deleter */
    int64_t shape[RPC_MAX_NDIM];
    int64_t strides[RPC_MAX_NDIM];
} ExportCtx;

static void export_release(ExportCtx *ctx) {
    if (ctx == NULL) {
        return;
    }
    /* Consumers may delete from any thread, or during interpreter teardown. */
    if (Py_IsInitialized()) {
        PyGILState_STATE g = PyGILState_Ensure();
        Py_XDECREF(ctx->view);
        PyGILState_Release(g);
    }
    free(ctx);
}

static void export_deleter_versioned(DLManagedTensorVersioned *mt) {
    export_release((ExportCtx *)mt->manager_ctx);
}

static void export_deleter_legacy(DLManagedTensor *mt) {
    export_release((ExportCtx *)mt->manager_ctx);
}

static void export_capsule_destructor(PyObject *cap) {
    /* A consumer that took ownership renamed the capsule to used_*: then it is not ours to free. */
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (mt && mt->deleter) {
            mt->deleter(mt);
        }
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = PyCapsule_GetPointer(cap, "dltensor");
        if (mt && mt->deleter) {
            mt->deleter(mt);
        }
    }
}

static DLDataType rpc_to_dl_dtype(rpc_dtype t) {
    DLDataType d;
    d.lanes = 1;
    switch (t) {
    case RPC_F32: d.code = kDLFloat; d.bits = 32; break;
    case RPC_F16: d.code = kDLFloat; d.bits = 16; break;
    case RPC_BF16: d.code = kDLBfloat; d.bits = 16; break;
    case RPC_I64: d.code = kDLInt; d.bits = 64; break;
    case RPC_I32: d.code = kDLInt; d.bits = 32; break;
    default: d.code = kDLOpaqueHandle; d.bits = 0; break;
    }
    return d;
}

static int parse_max_version(PyObject *obj, int *versioned) {
    *versioned = 0;
    if (obj == NULL || obj == Py_None) {
        return 0;
    }
    if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 2) {
        PyErr_Format(PyExc_TypeError, "max_version: expected None or a (major, minor) tuple, got %s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    long major = PyLong_AsLong(PyTuple_GET_ITEM(obj, 0));
    if (major == -1 && PyErr_Occurred()) {
        return -1;
    }
    *versioned = major >= RPC_DLPACK_MAJOR_VERSION;
    return 0;
}

static PyObject *view_dlpack(PyObject *op, PyObject *args, PyObject *kwargs) {
    ViewObject *self = (ViewObject *)op;
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:__dlpack__", kwlist, &stream, &max_version,
                                     &dl_device, &copy)) {
        return NULL;
    }
    (void)stream; /* Cache operations run on the caller's stream; ordering is the caller's business. */
    int versioned;
    if (parse_max_version(max_version, &versioned) < 0) {
        return NULL;
    }
    if (copy != Py_None && PyObject_IsTrue(copy) == 1) {
        PyErr_SetString(PyExc_BufferError, "copy: a View can only be exported without copying (copy=True given)");
        return NULL;
    }
    if (dl_device != Py_None) {
        long dtp = -1, did = -1;
        if (PyTuple_Check(dl_device) && PyTuple_GET_SIZE(dl_device) == 2) {
            dtp = PyLong_AsLong(PyTuple_GET_ITEM(dl_device, 0));
            did = PyLong_AsLong(PyTuple_GET_ITEM(dl_device, 1));
            if (PyErr_Occurred()) {
                return NULL;
            }
        }
        if (dtp != (long)self->device_type || did != (long)self->device_id) {
            PyErr_SetString(PyExc_BufferError, "dl_device: a View can only be exported on its own device");
            return NULL;
        }
    }
    ExportCtx *ctx = calloc(1, sizeof(ExportCtx));
    if (ctx == NULL) {
        return PyErr_NoMemory();
    }
    ctx->versioned = versioned;
    ctx->view = Py_NewRef(op);
    for (int i = 0; i < self->ndim; i++) {
        ctx->shape[i] = self->shape[i];
        ctx->strides[i] = self->strides[i];
    }
    DLTensor *dl = versioned ? &ctx->mt.v.dl_tensor : &ctx->mt.l.dl_tensor;
    dl->data = self->data;
    dl->device.device_type = (DLDeviceType)self->device_type;
    dl->device.device_id = self->device_id;
    dl->ndim = self->ndim;
    dl->dtype = rpc_to_dl_dtype(self->dtype);
    dl->shape = ctx->shape;
    dl->strides = ctx->strides;
    dl->byte_offset = 0;
    PyObject *cap;
    if (versioned) {
        ctx->mt.v.version.major = RPC_DLPACK_MAJOR_VERSION;
        ctx->mt.v.version.minor = RPC_DLPACK_MINOR_VERSION;
        ctx->mt.v.manager_ctx = ctx;
        ctx->mt.v.deleter = export_deleter_versioned;
        ctx->mt.v.flags = 0;
        cap = PyCapsule_New(&ctx->mt.v, "dltensor_versioned", export_capsule_destructor);
    } else {
        ctx->mt.l.manager_ctx = ctx;
        ctx->mt.l.deleter = export_deleter_legacy;
        cap = PyCapsule_New(&ctx->mt.l, "dltensor", export_capsule_destructor);
    }
    if (cap == NULL) {
        Py_DECREF(ctx->view);
        free(ctx);
        return NULL;
    }
    return cap;
}

static PyObject *view_dlpack_device(PyObject *op, PyObject *unused) {
    (void)unused;
    ViewObject *self = (ViewObject *)op;
    return Py_BuildValue("(ii)", (int)self->device_type, self->device_id);
}

static PyObject *int64_tuple(const int64_t *v, int n) {
    PyObject *t = PyTuple_New(n);
    if (t == NULL) {
        return NULL;
    }
    for (int i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong((long long)v[i]);
        if (x == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, x);
    }
    return t;
}

static PyObject *view_get_shape(PyObject *op, void *closure) {
    (void)closure;
    ViewObject *self = (ViewObject *)op;
    return int64_tuple(self->shape, self->ndim);
}

static PyObject *view_get_strides(PyObject *op, void *closure) {
    (void)closure;
    ViewObject *self = (ViewObject *)op;
    return int64_tuple(self->strides, self->ndim);
}

static PyObject *view_get_dtype(PyObject *op, void *closure) {
    (void)closure;
    return PyUnicode_FromString(rpc_dtype_name(((ViewObject *)op)->dtype));
}

static PyObject *view_get_device(PyObject *op, void *closure) {
    (void)closure;
    ViewObject *self = (ViewObject *)op;
    char buf[48];
    rpc_format_device(buf, sizeof buf, self->device_type, self->device_id);
    return PyUnicode_FromString(buf);
}

static PyObject *view_get_ptr(PyObject *op, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(((ViewObject *)op)->data);
}

static PyObject *view_get_owner(PyObject *op, void *closure) {
    (void)closure;
    return Py_NewRef(((ViewObject *)op)->owner);
}

static PyObject *view_repr(PyObject *op) {
    ViewObject *self = (ViewObject *)op;
    char dev[48], shp[256];
    rpc_format_device(dev, sizeof dev, self->device_type, self->device_id);
    size_t pos = 0;
    shp[0] = '\0';
    for (int i = 0; i < self->ndim && pos < sizeof shp; i++) {
        int w = snprintf(shp + pos, sizeof shp - pos, i ? ", %lld" : "%lld", (long long)self->shape[i]);
        if (w < 0) {
            break;
        }
        pos += (size_t)w;
    }
    return PyUnicode_FromFormat("<rpc_py._C.View shape=[%s] dtype=%s device=%s>", shp,
                                rpc_dtype_name(self->dtype), dev);
}

static PyMethodDef view_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))view_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None): export without copying."},
    {"__dlpack_device__", view_dlpack_device, METH_NOARGS, "(device_type, device_id) as DLPack codes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef view_getset[] = {
    {"shape", view_get_shape, NULL, "Shape as a tuple of ints.", NULL},
    {"strides", view_get_strides, NULL, "Strides in elements.", NULL},
    {"dtype", view_get_dtype, NULL, "Element type name ('float32', 'bfloat16', ...).", NULL},
    {"device", view_get_device, NULL, "'cpu' or 'cuda:N'.", NULL},
    {"ptr", view_get_ptr, NULL, "Address of the first element.", NULL},
    {"owner", view_get_owner, NULL, "The object keeping the memory alive (a Storage).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot view_slots[] = {
    {Py_tp_dealloc, view_dealloc},
    {Py_tp_traverse, view_traverse},
    {Py_tp_clear, view_clear},
    {Py_tp_repr, view_repr},
    {Py_tp_methods, view_methods},
    {Py_tp_getset, view_getset},
    {Py_tp_doc, "A zero-copy DLPack view of rpc_py memory; it keeps its Storage block alive."},
    {0, NULL},
};

static PyType_Spec view_spec = {
    .name = "rpc_py._C.View",
    .basicsize = sizeof(ViewObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_DISALLOW_INSTANTIATION |
             Py_TPFLAGS_IMMUTABLETYPE,
    .slots = view_slots,
};

/* ================================================================== registration */

int rpc_bridge_register(PyObject *module, rpc_module_state *st) {
    st->StorageType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &storage_spec, NULL);
    if (st->StorageType == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, st->StorageType) < 0) {
        return -1;
    }
    st->ViewType = (PyTypeObject *)PyType_FromModuleAndSpec(module, &view_spec, NULL);
    if (st->ViewType == NULL) {
        return -1;
    }
    if (PyModule_AddType(module, st->ViewType) < 0) {
        return -1;
    }
    return 0;
}
