/* dlpack.h: the DLPack v1.x data structures, written for rpc_py from the published specification
 * (https://dmlc.github.io/dlpack/latest/). Only what rpc_py needs is declared: devices, dtypes, the
 * plain DLTensor, the legacy DLManagedTensor and the versioned DLManagedTensorVersioned. The field
 * order is ABI: it must match the spec exactly, since producers in other libraries fill these structs.
 */
#ifndef RPC_PY_DLPACK_H
#define RPC_PY_DLPACK_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The DLPack ABI version this file describes (and the one our producer reports). */
#define RPC_DLPACK_MAJOR_VERSION 1
#define RPC_DLPACK_MINOR_VERSION 0

typedef struct {
    uint32_t major; /* ABI-breaking changes bump this: consumers must reject a major they do not know */
    uint32_t minor;
} DLPackVersion;

typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6
} DLDataTypeCode;

typedef struct {
    uint8_t code;   /* a DLDataTypeCode */
    uint8_t bits;   /* bits per lane */
    uint16_t lanes; /* vector lanes; 1 for plain tensors */
} DLDataType;

typedef struct {
    void *data;           /* base pointer; the first element is at (char *)data + byte_offset */
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;       /* ndim entries */
    int64_t *strides;     /* ndim entries, in elements; NULL means C-contiguous */
    uint64_t byte_offset;
} DLTensor;

/* Legacy (pre-1.0) managed tensor, carried by a capsule named "dltensor". */
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

#define DLPACK_FLAG_BITMASK_READ_ONLY (UINT64_C(1) << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (UINT64_C(1) << 1)

/* Versioned managed tensor (DLPack >= 1.0), carried by a capsule named "dltensor_versioned".
 * Note the different field order from DLManagedTensor: the version comes first. */
typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

#ifdef __cplusplus
}
#endif
#endif /* RPC_PY_DLPACK_H */
