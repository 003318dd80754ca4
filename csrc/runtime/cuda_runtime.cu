/* cuda_runtime.cu: the CUDA runtime services of rpc_py: device count, memory, copies, sync.
 *
 * Every entry point takes the device explicitly and restores the caller's current device on return,
 * so calling into rpc_py never changes what torch (or anybody else in the thread) sees as current.
 * Work is enqueued on the caller's stream and nothing here waits for the device: host values reach it
 * as kernel arguments (set_int64s), never through a copy from pageable host memory, which the driver
 * may serialize with the stream. Errors come back as RPC_ERR_CUDA with the runtime's message; nothing
 * here aborts or touches Python.
 *
 * copy4d moves a strided [n0, n1, n2, n3] block (the KV append path). When both sides are contiguous
 * along the last dimension and everything is suitably aligned, rows are moved in 16-, 8- or 4-byte
 * words, so the same kernel runs at close to copy bandwidth for bf16/fp16 rows of 64-256 bytes.
 */
#include "cuda_common.cuh"
#include "rpc.h"

#include <cuda_runtime.h>

#include <stdint.h>
#include <stdio.h>

namespace {

template <typename T>
__global__ void copy4d_kernel(T *__restrict__ dst, const T *__restrict__ src, int64_t n1, int64_t n2, int64_t n3,
                              int64_t total, int64_t d0, int64_t d1, int64_t d2, int64_t d3, int64_t s0,
                              int64_t s1, int64_t s2, int64_t s3) {
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t i3 = i % n3;
        int64_t r = i / n3;
        int64_t i2 = r % n2;
        r /= n2;
        int64_t i1 = r % n1;
        int64_t i0 = r / n1;
        dst[i0 * d0 + i1 * d1 + i2 * d2 + i3 * d3] = src[i0 * s0 + i1 * s1 + i2 * s2 + i3 * s3];
    }
}

struct Word16 {
    uint4 v;
};

template <typename T>
cudaError_t launch_copy(void *dst, const int64_t ds[4], const void *src, const int64_t ss[4], const int64_t n[4],
                        cudaStream_t stream) {
    const int64_t total = n[0] * n[1] * n[2] * n[3];
    const int threads = 256;
    int64_t blocks = (total + threads - 1) / threads;
    if (blocks > 65535LL * 8) {
        blocks = 65535LL * 8; /* grid-stride loop covers the rest */
    }
    copy4d_kernel<T><<<(unsigned)blocks, threads, 0, stream>>>((T *)dst, (const T *)src, n[1], n[2], n[3], total,
                                                               ds[0], ds[1], ds[2], ds[3], ss[0], ss[1], ss[2],
                                                               ss[3]);
    return cudaGetLastError();
}

/* Largest word (16/8/4/2/1 bytes) such that every row start and the row length are multiples of it. */
size_t pick_word(const void *dst, const int64_t ds[4], const void *src, const int64_t ss[4], const int64_t n[4],
                 size_t esize) {
    if (ds[3] != 1 || ss[3] != 1) {
        return esize;
    }
    for (size_t w = 16; w > esize; w /= 2) {
        bool ok = ((uintptr_t)dst % w == 0) && ((uintptr_t)src % w == 0) && ((size_t)n[3] * esize) % w == 0;
        for (int d = 0; ok && d < 3; d++) {
            ok = (n[d] <= 1) || (((size_t)ds[d] * esize) % w == 0 && ((size_t)ss[d] * esize) % w == 0);
        }
        if (ok) {
            return w;
        }
    }
    return esize;
}

/* Host values passed by value: the launch carries them, so no host buffer has to outlive the call. */
struct Int64Args {
    int64_t v[RPC_SET_INT64S_MAX];
};

__global__ void set_int64s_kernel(int64_t *dst, Int64Args args, int n) {
    if ((int)threadIdx.x < n) {
        dst[threadIdx.x] = args.v[threadIdx.x];
    }
}

} // namespace

extern "C" {

int rpc_cuda_built(void) {
    return 1;
}

int rpc_cuda_device_count(int *count, char *err) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
        (void)cudaGetLastError();
        *count = 0;
        return RPC_OK;
    }
    if (e != cudaSuccess) {
        *count = 0;
        return rpc_cuda_error(err, "cudaGetDeviceCount", e);
    }
    *count = n;
    return RPC_OK;
}

int rpc_cuda_malloc(int device, size_t nbytes, void **ptr, char *err) {
    *ptr = nullptr;
    RPC_DEVICE_GUARD(device);
    cudaError_t e = cudaMalloc(ptr, nbytes == 0 ? 1 : nbytes);
    if (e != cudaSuccess) {
        *ptr = nullptr;
        int rc = rpc_cuda_error(err, "cudaMalloc", e);
        if (e == cudaErrorMemoryAllocation) {
            snprintf(err, RPC_ERR_LEN, "cudaMalloc of %zu bytes on cuda:%d failed: out of memory", nbytes, device);
            return RPC_ERR_NOMEM;
        }
        return rc;
    }
    return RPC_OK;
}

int rpc_cuda_free(int device, void *ptr, char *err) {
    if (ptr == nullptr) {
        return RPC_OK;
    }
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaFree(ptr), "cudaFree");
    return RPC_OK;
}

int rpc_cuda_memset_async(int device, void *ptr, int value, size_t nbytes, void *stream, char *err) {
    if (nbytes == 0) {
        return RPC_OK;
    }
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaMemsetAsync(ptr, value, nbytes, (cudaStream_t)stream), "cudaMemsetAsync");
    return RPC_OK;
}

int rpc_cuda_memset2d_async(int device, void *ptr, size_t pitch, int value, size_t width, size_t height,
                           void *stream, char *err) {
    if (width == 0 || height == 0) {
        return RPC_OK;
    }
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaMemset2DAsync(ptr, pitch, value, width, height, (cudaStream_t)stream), "cudaMemset2DAsync");
    return RPC_OK;
}

int rpc_cuda_set_int64s(int device, int64_t *dst, const int64_t *values, int n, void *stream, char *err) {
    if (n < 0 || n > RPC_SET_INT64S_MAX) {
        snprintf(err, RPC_ERR_LEN, "set_int64s: expected 0..%d values, got %d", RPC_SET_INT64S_MAX, n);
        return RPC_ERR_VALUE;
    }
    if (n == 0) {
        return RPC_OK;
    }
    RPC_DEVICE_GUARD(device);
    Int64Args args;
    for (int i = 0; i < n; i++) {
        args.v[i] = values[i];
    }
    set_int64s_kernel<<<1, 32, 0, (cudaStream_t)stream>>>(dst, args, n);
    RPC_CUDA_CHECK(cudaGetLastError(), "set_int64s kernel launch");
    return RPC_OK;
}

int rpc_cuda_copy4d(int device, void *dst, const int64_t dst_stride[4], const void *src,
                    const int64_t src_stride[4], const int64_t shape[4], size_t elem_size, void *stream,
                    char *err) {
    for (int i = 0; i < 4; i++) {
        if (shape[i] < 0) {
            snprintf(err, RPC_ERR_LEN, "copy4d: negative size %lld in dimension %d", (long long)shape[i], i);
            return RPC_ERR_VALUE;
        }
        if (shape[i] == 0) {
            return RPC_OK;
        }
    }
    if (elem_size != 1 && elem_size != 2 && elem_size != 4 && elem_size != 8) {
        snprintf(err, RPC_ERR_LEN, "copy4d: unsupported element size %zu", elem_size);
        return RPC_ERR_VALUE;
    }
    RPC_DEVICE_GUARD(device);
    size_t w = pick_word(dst, dst_stride, src, src_stride, shape, elem_size);
    int64_t ds[4], ss[4], n[4];
    const int64_t ratio = (int64_t)(w / elem_size); /* elements per word; 1 when w == elem_size */
    for (int d = 0; d < 3; d++) {
        ds[d] = dst_stride[d] * (int64_t)elem_size / (int64_t)w;
        ss[d] = src_stride[d] * (int64_t)elem_size / (int64_t)w;
        n[d] = shape[d];
    }
    if (w != elem_size) {
        ds[3] = ss[3] = 1;
        n[3] = shape[3] / ratio;
    } else {
        ds[3] = dst_stride[3];
        ss[3] = src_stride[3];
        n[3] = shape[3];
        for (int d = 0; d < 3; d++) {
            ds[d] = dst_stride[d];
            ss[d] = src_stride[d];
        }
    }
    cudaStream_t s = (cudaStream_t)stream;
    cudaError_t e;
    switch (w) {
    case 16: e = launch_copy<Word16>(dst, ds, src, ss, n, s); break;
    case 8: e = launch_copy<uint64_t>(dst, ds, src, ss, n, s); break;
    case 4: e = launch_copy<uint32_t>(dst, ds, src, ss, n, s); break;
    case 2: e = launch_copy<uint16_t>(dst, ds, src, ss, n, s); break;
    default: e = launch_copy<uint8_t>(dst, ds, src, ss, n, s); break;
    }
    RPC_CUDA_CHECK(e, "copy4d kernel launch");
    return RPC_OK;
}

int rpc_cuda_event_create(int device, void **event, char *err) {
    *event = nullptr;
    RPC_DEVICE_GUARD(device);
    cudaEvent_t ev = nullptr;
    RPC_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    *event = static_cast<void *>(ev);
    return RPC_OK;
}

int rpc_cuda_event_destroy(int device, void *event, char *err) {
    if (event == nullptr) {
        return RPC_OK;
    }
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaEventDestroy(static_cast<cudaEvent_t>(event)), "cudaEventDestroy");
    return RPC_OK;
}

int rpc_cuda_event_record(int device, void *event, void *stream, char *err) {
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(event), (cudaStream_t)stream), "cudaEventRecord");
    return RPC_OK;
}

int rpc_cuda_stream_wait_event(int device, void *stream, void *event, char *err) {
    RPC_DEVICE_GUARD(device);
    RPC_CUDA_CHECK(cudaStreamWaitEvent((cudaStream_t)stream, static_cast<cudaEvent_t>(event), 0),
                   "cudaStreamWaitEvent");
    return RPC_OK;
}

} // extern "C"
