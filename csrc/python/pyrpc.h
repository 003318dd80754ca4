/* pyrpc.h: the Python layer's shared declarations (csrc/python/: common.c, dlpack_bridge.c,
 * binding_util.c, and the files that use them). Kernel and runtime files must not include this header.
 *
 * Ownership conventions: every `PyObject **` out-parameter receives a new reference; every function
 * returning int returns 0 on success and -1 with a Python exception set on failure.
 */
#ifndef RPC_PY_PYRPC_H
#define RPC_PY_PYRPC_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "rpc.h"

/* Per-module state: the heap types. */
typedef struct {
    PyTypeObject *KVCacheType;
    PyTypeObject *StorageType;   /* owns one host or device allocation */
    PyTypeObject *ViewType;      /* DLPack producer over (part of) a Storage */
} rpc_module_state;

/* ---- common.c (the base every binding file uses; it calls none of them) */
int rpc_common_init(PyModuleDef *def);  /* module.c's exec slot: NumPy C API + the module definition */
rpc_module_state *rpc_get_state_from_type(PyTypeObject *tp); /* tp: one of our heap types */
rpc_module_state *rpc_get_state(PyObject *module);

/* ---- DLPack consumer (dlpack_bridge.c)
 * Accepts any object with __dlpack__ (torch, numpy, cupy, our View) or a raw DLPack capsule.
 * Requests a versioned capsule (max_version=(1, 0)), falls back to the legacy one.
 * `stream`: the consumer's CUDA stream as an integer handle, or -1 to not pass one.
 * On success fills *t (byte_offset applied, strides always filled, in elements) and stores in
 * *keepalive a new reference that keeps the producer's memory alive; DECREF it when done.
 * Rejects: not a DLPack producer (TypeError), major version != 1, lanes != 1, unsupported dtype or
 * device (ValueError), ndim > RPC_MAX_NDIM. Messages start with `argname`. */
int rpc_from_dlpack(PyObject *obj, const char *argname, intptr_t stream, rpc_tensor *t,
                    PyObject **keepalive);

/* Parse the `stream=` keyword: None -> 0 (legacy default stream), int -> handle. */
int rpc_parse_stream(PyObject *obj, intptr_t *stream);

/* Validation helpers: raise ValueError naming `argname`. `dtype`/`ndim` < 0 = any. */
int rpc_check_ndim_dtype(const rpc_tensor *t, const char *argname, int ndim, int dtype);
int rpc_check_no_negative_strides(const rpc_tensor *t, const char *argname);
int rpc_check_writable(const rpc_tensor *t, const char *argname);         /* BufferError */
const char *rpc_dtype_name(rpc_dtype t);                                   /* "float32", ... */
int rpc_dtype_from_name(const char *name, rpc_dtype *out);                 /* -1 + ValueError */
void rpc_format_device(char *buf, size_t n, rpc_device_type dt, int id);   /* "cpu", "cuda:0" */

/* ---- Storage and View (dlpack_bridge.c) */
/* New Storage holding `nbytes` zero-initialised bytes on the device (CUDA: memset on `stream`). */
PyObject *rpc_storage_new(rpc_module_state *st, rpc_device_type dt, int device_id, size_t nbytes,
                          intptr_t stream);
void *rpc_storage_data(PyObject *storage);
/* Storage allocations and frees since import: {host allocs, device allocs, host frees, device frees}. */
void rpc_alloc_counts(int64_t out[4]);
size_t rpc_storage_nbytes(PyObject *storage);

/* New View (a DLPack producer) over memory owned by `owner` (a Storage, kept alive by the view). */
PyObject *rpc_view_new(rpc_module_state *st, PyObject *owner, void *data, rpc_device_type dt,
                       int device_id, rpc_dtype dtype, int ndim, const int64_t *shape,
                       const int64_t *strides);

/* Host results as NumPy arrays (common.c, the one file that uses the NumPy C API): wraps `data` (inside
 * `storage`, C-contiguous) without a copy and keeps the storage alive as the array's base. */
PyObject *rpc_numpy_from_storage(PyObject *storage, void *data, rpc_dtype dtype, int ndim, const int64_t *shape);

/* ---- Shared binding helpers (binding_util.c) */
void rpc_format_dims(char *buf, size_t n, const int64_t *shape, int ndim);    /* "[2, 4, 37]" */
void rpc_format_shape(char *buf, size_t n, const rpc_tensor *t);
int rpc_check_float(const rpc_tensor *t, const char *argname);               /* f32, f16 or bf16 */
/* t must live where ref lives; the message names both arguments. */
int rpc_check_same_device(const rpc_tensor *ref, const char *refname, const rpc_tensor *t, const char *argname);
int rpc_sizes_fit(const int64_t *dims, int n, const char *what);              /* product fits int64 / 16 */
int rpc_parse_float(PyObject *obj, const char *argname, double *out);         /* TypeError naming argname */
/* The option vocabulary, parsed in one place: value must be one of names[0..count), *out its index. */
int rpc_parse_choice(const char *value, const char *argname, const char *const *names, int count, int *out);
int rpc_parse_aggregation(const char *value, rpc_aggregation *out);           /* "all" | "group" */
int rpc_parse_pooling(const char *value, rpc_pooling *out);                   /* "avg" | "max" */
int rpc_check_kernel_size(int kernel_size);                                   /* odd, >= 1 */

/* A result a binding returns: either the caller's `out=` tensor or a fresh, counted Storage block
 * (NumPy array over it on the CPU, View on CUDA). Usage: init -> use_out (optional) -> alloc (no-op when
 * out was given) -> kernels write r.data -> take -> release. */
typedef struct {
    rpc_device_type dt;
    int device_id;
    rpc_dtype dtype;
    int ndim;
    int64_t shape[RPC_MAX_NDIM];
    size_t count;        /* elements of one result of `shape` */
    void *data;          /* where the kernels write (borrowed from out, or storage's memory) */
    PyObject *out;       /* borrowed: the caller's out= object, or NULL */
    PyObject *keep;      /* owned: DLPack keepalive of out */
    PyObject *storage;   /* owned: the allocated block, or NULL */
} rpc_result;
int rpc_result_init(rpc_result *r, rpc_device_type dt, int device_id, rpc_dtype dtype, int ndim,
                    const int64_t *shape);
/* Checks `out` (None/NULL: nothing to do): writable, C-contiguous, r's dtype, shape and device. */
int rpc_result_use_out(rpc_result *r, PyObject *out, const char *argname, intptr_t stream);
/* Allocates count + extra_elements elements unless out was given. */
int rpc_result_alloc(rpc_result *r, rpc_module_state *st, size_t extra_elements, intptr_t stream);
/* New reference: out itself, or an array/View of r's shape starting `offset` elements into the block. */
PyObject *rpc_result_take(rpc_result *r, rpc_module_state *st, size_t offset);
void rpc_result_release(rpc_result *r);
/* Host int64 values to device memory on the stream, as kernel arguments (no pageable copy, no wait). */
int rpc_upload_int64s(int device, int64_t *dst, const int64_t *values, int64_t n, intptr_t stream, char *err);

/* Turn a kernel status + message into a Python exception; returns NULL. */
PyObject *rpc_raise_status(int status, const char *err);
int rpc_raise_status_int(int status, const char *err); /* same, returns -1 */

/* ---- Module assembly: module.c's exec slot calls these in order (each returns 0 or -1 + exception). */
int rpc_bridge_register(PyObject *module, rpc_module_state *st);  /* dlpack_bridge.c: Storage, View */
int rpc_kvcache_register(PyObject *module, rpc_module_state *st); /* kvcache.c: KVCache */
int rpc_ops_register(PyObject *module);                           /* ops_binding.c: score/select/compact */
int rpc_decode_register(PyObject *module);                        /* decode_binding.c: decode step */
int rpc_policy_register(PyObject *module);                        /* policy_binding.c: policy kernels */

#endif /* RPC_PY_PYRPC_H */
