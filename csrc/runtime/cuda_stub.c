/* cuda_stub.c: the rpc_cuda_* entry points of a CPU-only build (RPC_PY_CUDA=0 or no nvcc).
 *
 * setup.py compiles this file instead of the .cu files, so the rest of the extension links the same
 * way in both builds. Every call that would touch a device fails with RPC_ERR_NOT_BUILT and a message
 * saying how to get a CUDA build; asking for the device count is not an error and reports zero.
 */
#include "rpc.h"

#include <stdio.h>

#define RPC_NOT_BUILT_MSG                                                                            \
    "rpc_py was built without CUDA (RPC_PY_CUDA=0 or nvcc not found); reinstall with nvcc available " \
    "(RPC_PY_CUDA=1) to use CUDA tensors"

static int not_built(const char *what, char *err) {
    snprintf(err, RPC_ERR_LEN, "%s: %s", what, RPC_NOT_BUILT_MSG);
    return RPC_ERR_NOT_BUILT;
}

int rpc_cuda_built(void) {
    return 0;
}

int rpc_cuda_device_count(int *count, char *err) {
    (void)err;
    *count = 0;
    return RPC_OK;
}

int rpc_cuda_malloc(int device, size_t nbytes, void **ptr, char *err) {
    (void)device;
    (void)nbytes;
    *ptr = NULL;
    return not_built("cuda_malloc", err);
}

int rpc_cuda_free(int device, void *ptr, char *err) {
    (void)device;
    (void)ptr;
    return not_built("cuda_free", err);
}

int rpc_cuda_memset_async(int device, void *ptr, int value, size_t nbytes, void *stream, char *err) {
    (void)device;
    (void)ptr;
    (void)value;
    (void)nbytes;
    (void)stream;
    return not_built("cuda_memset", err);
}

int rpc_cuda_memset2d_async(int device, void *ptr, size_t pitch, int value, size_t width, size_t height,
                           void *stream, char *err) {
    (void)device;
    (void)ptr;
    (void)pitch;
    (void)value;
    (void)width;
    (void)height;
    (void)stream;
    return not_built("cuda_memset2d", err);
}

int rpc_cuda_set_int64s(int device, int64_t *dst, const int64_t *values, int n, void *stream, char *err) {
    (void)device;
    (void)dst;
    (void)values;
    (void)n;
    (void)stream;
    return not_built("set_int64s", err);
}

int rpc_cuda_copy4d(int device, void *dst, const int64_t dst_stride[4], const void *src,
                    const int64_t src_stride[4], const int64_t shape[4], size_t elem_size, void *stream,
                    char *err) {
    (void)device;
    (void)dst;
    (void)dst_stride;
    (void)src;
    (void)src_stride;
    (void)shape;
    (void)elem_size;
    (void)stream;
    return not_built("cuda_copy4d", err);
}

int rpc_cuda_score(int device, const rpc_score_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("score", err);
}

int rpc_cuda_select(int device, const rpc_select_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("select", err);
}

int rpc_cuda_compact(int device, const rpc_compact_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("compact", err);
}

int rpc_cuda_decode_attention(int device, const rpc_decode_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("decode_attention", err);
}

int rpc_cuda_append_at_length(int device, const rpc_append_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("append_at_length", err);
}

int rpc_cuda_ring_write(int device, const rpc_ring_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("ring_write", err);
}

int rpc_cuda_score_workspace(int device, const rpc_score_params *p, size_t *bytes, char *err) {
    (void)device;
    (void)p;
    *bytes = 0;
    return not_built("score_workspace", err);
}

int rpc_cuda_event_create(int device, void **event, char *err) {
    (void)device;
    *event = NULL;
    return not_built("event_create", err);
}

int rpc_cuda_event_destroy(int device, void *event, char *err) {
    (void)device;
    (void)err;
    return event == NULL ? RPC_OK : not_built("event_destroy", err);
}

int rpc_cuda_event_record(int device, void *event, void *stream, char *err) {
    (void)device;
    (void)event;
    (void)stream;
    return not_built("event_record", err);
}

int rpc_cuda_stream_wait_event(int device, void *stream, void *event, char *err) {
    (void)device;
    (void)stream;
    (void)event;
    return not_built("stream_wait_event", err);
}

int rpc_cuda_attn_scores(int device, const rpc_attn_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("attn_scores", err);
}

int rpc_cuda_redundancy(int device, const rpc_redundancy_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("redundancy", err);
}

int rpc_cuda_fill_scores(int device, const rpc_fill_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("fill_scores", err);
}

int rpc_cuda_accumulate(int device, const rpc_accumulate_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("accumulate", err);
}

int rpc_cuda_pool(int device, const float *scores, int64_t rows, int64_t N, rpc_pooling pool, int kernel_size,
                  float *out, void *stream, char *err) {
    (void)device;
    (void)scores;
    (void)rows;
    (void)N;
    (void)pool;
    (void)kernel_size;
    (void)out;
    (void)stream;
    return not_built("pool", err);
}

int rpc_cuda_compact_acc(int device, const rpc_acc_compact_params *p, void *stream, char *err) {
    (void)device;
    (void)p;
    (void)stream;
    return not_built("compact accumulator", err);
}
