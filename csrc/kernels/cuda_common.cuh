/* cuda_common.cuh: host-side helpers shared by the .cu files: turning CUDA errors into rpc_status
 * codes with a message, and selecting a device for the duration of one launcher call.
 *
 * Launchers report errors through the caller's `err` buffer (RPC_ERR_LEN bytes) and a negative
 * rpc_status; nothing here aborts or touches Python. Each .cu file is its own translation unit, so
 * everything is `static`/inline. */
#ifndef RPC_PY_CUDA_COMMON_CUH
#define RPC_PY_CUDA_COMMON_CUH

#include <cuda_runtime.h>

#include <stdio.h>

#include "rpc.h"

/* RPC_ERR_CUDA with "what: message (name)"; clears the runtime's last (non-sticky) error so the
 * next call does not report it again. */
static inline int rpc_cuda_error(char *err, const char *what, cudaError_t e) {
    if (err) snprintf(err, RPC_ERR_LEN, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
    (void)cudaGetLastError();
    return RPC_ERR_CUDA;
}

static inline int rpc_value_error(char *err, const char *msg) {
    if (err) snprintf(err, RPC_ERR_LEN, "%s", msg);
    return RPC_ERR_VALUE;
}

/* In a function with a `char *err` parameter: return the error of a failing runtime call. */
#define RPC_CUDA_CHECK(call, what)                                                                 \
    do {                                                                                           \
        cudaError_t e_ = (call);                                                                   \
        if (e_ != cudaSuccess) return rpc_cuda_error(err, (what), e_);                             \
    } while (0)

/* Switches to `device` (enter) for the lifetime of the object and back to the caller's device, so
 * calling into rpc_py never changes what torch sees as current. The restore cannot report an error
 * (destructor); the original device was valid a moment ago. */
class RpcDeviceGuard {
  public:
    RpcDeviceGuard() = default;
    RpcDeviceGuard(const RpcDeviceGuard &) = delete;
    RpcDeviceGuard &operator=(const RpcDeviceGuard &) = delete;
    cudaError_t enter(int device) {
        cudaError_t e = cudaGetDevice(&prev_);
        if (e != cudaSuccess) return e;
        if (prev_ != device) {
            e = cudaSetDevice(device);
            if (e != cudaSuccess) return e;
            switched_ = true;
        }
        return cudaSuccess;
    }
    ~RpcDeviceGuard() {
        if (switched_) (void)cudaSetDevice(prev_);
    }

  private:
    int prev_ = 0;
    bool switched_ = false;
};

/* In a launcher with a `char *err` parameter: select `device` until the function returns. */
#define RPC_DEVICE_GUARD(device)                                                                   \
    RpcDeviceGuard device_guard_;                                                                  \
    RPC_CUDA_CHECK(device_guard_.enter(device), "cudaSetDevice")

#endif /* RPC_PY_CUDA_COMMON_CUH */
