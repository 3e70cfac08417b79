/*
 * What qgraph's onnxruntime custom-operator libraries share: the part of onnxruntime's C API they use, without its
 * header (the wheel ships none).
 *
 * The libraries talk to onnxruntime through the C API's function table (OrtApi), a struct of function pointers to
 * which each release only appends: the entries used are indexed by their position in that table, part of
 * onnxruntime's stable ABI, and an operator description follows OrtCustomOp's layout at API version 13, which later
 * runtimes accept. onnxruntime-training-cpu 1.19.2, the last training release, is the runtime they run in.
 *
 * Each library includes this once and sets ``api`` in its RegisterCustomOps.
 */
#ifndef QGRAPH_ORT_CUSTOM_OP_H
#define QGRAPH_ORT_CUSTOM_OP_H

#include <stddef.h>
#include <stdint.h>

#include "macros.h"

typedef void OrtStatus;
typedef struct OrtApiBase {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* Positions in OrtApi (onnxruntime_c_api.h) of the functions used here. */
enum {
    CREATE_CUSTOM_OP_DOMAIN = 26,
    CUSTOM_OP_DOMAIN_ADD = 27,
    ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51,
    GET_TENSOR_ELEMENT_TYPE = 60,
    GET_DIMENSIONS_COUNT = 61,
    GET_DIMENSIONS = 62,
    GET_TENSOR_SHAPE_ELEMENT_COUNT = 64,
    GET_TENSOR_TYPE_AND_SHAPE = 65,
    KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91,
    RELEASE_STATUS = 93,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};
#define API_VERSION 13
/* ONNXTensorElementDataType */
#define TENSOR_FLOAT 1
#define TENSOR_UINT8 2
#define TENSOR_INT8 3
#define TENSOR_INT64 7
#define TENSOR_DOUBLE 11

typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, void **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(void *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(void *options, void *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(void *value, void **out);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const void *value, void **out);
typedef OrtStatus *(*GetTensorShapeElementCountFn)(const void *info, size_t *out);
typedef OrtStatus *(*GetTensorElementTypeFn)(const void *info, int *out);
typedef OrtStatus *(*GetDimensionsCountFn)(const void *info, size_t *out);
typedef OrtStatus *(*GetDimensionsFn)(const void *info, int64_t *values, size_t count);
typedef OrtStatus *(*KernelContextGetInputFn)(const void *context, size_t index, const void **out);
typedef OrtStatus *(*KernelContextGetOutputFn)(void *context, size_t index, const int64_t *dims, size_t count,
                                                void **out);
typedef void (*ReleaseFn)(void *object);

static const void *const *api;
#define CALL(index, type) ((type)api[index])

/* OrtCustomOp at API version 13: the version, then its callbacks in this order. */
typedef struct CustomOp {
    uint32_t version;
    void *(*CreateKernel)(const struct CustomOp *op, const void *api, const void *info);
    const char *(*GetName)(const struct CustomOp *op);
    const char *(*GetExecutionProviderType)(const struct CustomOp *op);
    int (*GetInputType)(const struct CustomOp *op, size_t index);
    size_t (*GetInputTypeCount)(const struct CustomOp *op);
    int (*GetOutputType)(const struct CustomOp *op, size_t index);
    size_t (*GetOutputTypeCount)(const struct CustomOp *op);
    void (*KernelCompute)(void *kernel, void *context);
    void (*KernelDestroy)(void *kernel);
    int (*GetInputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetOutputCharacteristic)(const struct CustomOp *op, size_t index);
    int (*GetInputMemoryType)(const struct CustomOp *op, size_t index);
} CustomOp;

/* Frees a status; returns whether the call succeeded. */
static int succeeded(OrtStatus *status)
{
    if (status == NULL) {
        return 1;
    }
    CALL(RELEASE_STATUS, ReleaseFn)(status);
    return 0;
}

/* The data and element count of input ``index``, its element type in *type and its type-and-shape info in
 * *shape_out if asked (for the caller to release); NULL on failure. */
static void *input_data(void *context, size_t index, size_t *count, int *type, void **shape_out)
{
    const void *value = NULL;
    void *info = NULL;
    void *data = NULL;
    if (!succeeded(CALL(KERNEL_CONTEXT_GET_INPUT, KernelContextGetInputFn)(context, index, &value)) || value == NULL) {
        return NULL;
    }
    if (!succeeded(CALL(GET_TENSOR_TYPE_AND_SHAPE, GetTensorTypeAndShapeFn)(value, &info))) {
        return NULL;
    }
    int element_type = 0;
    int ok = succeeded(CALL(GET_TENSOR_SHAPE_ELEMENT_COUNT, GetTensorShapeElementCountFn)(info, count)) &&
             succeeded(CALL(GET_TENSOR_ELEMENT_TYPE, GetTensorElementTypeFn)(info, &element_type));
    if (type != NULL) {
        *type = element_type;
    }
    if (shape_out != NULL && ok) {
        *shape_out = info;
    } else {
        CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(info);
    }
    if (!ok || !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)((void *)value, &data))) {
        return NULL;
    }
    return data;
}


static inline const char *cpu_provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
/* Every input and output is required (OrtCustomOpInputOutputCharacteristic 0) and in default memory (0). */
static inline int required_argument(const CustomOp *op, size_t index) { (void)op, (void)index; return 0; }
static inline int default_memory(const CustomOp *op, size_t index) { (void)op, (void)index; return 0; }

/*
 * RegisterCustomOps's work: sets ``api`` on the first call, creates the domain ``name`` holding ``operators`` once
 * for the process (onnxruntime keeps a pointer to it in every session that registered the library), and adds it to
 * the session options.
 */
static inline OrtStatus *register_operators(void *options, const OrtApiBase *base, const char *name,
                                            const CustomOp *const *operators, size_t count, void **domain)
{
    if (api == NULL) {
        api = (const void *const *)base->GetApi(API_VERSION);
        if (api == NULL) {
            return NULL; /* cannot even create a status: onnxruntime then fails on the unknown operator */
        }
    }
    if (*domain == NULL) {
        OrtStatus *status = CALL(CREATE_CUSTOM_OP_DOMAIN, CreateCustomOpDomainFn)(name, domain);
        for (size_t index = 0; status == NULL && index < count; ++index) {
            status = CALL(CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(*domain, operators[index]);
        }
        if (status != NULL) {
            *domain = NULL;
            return status;
        }
    }
    return CALL(ADD_CUSTOM_OP_DOMAIN, AddCustomOpDomainFn)(options, *domain);
}

#endif
