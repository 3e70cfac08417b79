/*
 * qgraph.training::QuantizerGradient, an onnxruntime custom operator: the backward pass of QAT's learnable activation
 * quantizer in one pass over the tensor.
 *
 *   inputs:  dY (output gradient), t (quantizer input), t_hat (quantizer output), S (scale), low, high (the ends of the
 *            quantization cells, S·(qmin − z − ½) and S·(qmax − z + ½)); S, low and high are scalars
 *   outputs: dt = dY where low <= t <= high, else 0 (the straight-through estimator; the mask is exactly
 *            Equal(t, Clip(t, low, high)): a NaN t gets 0, a NaN bound clips nothing)
 *            dS = Σ (dY·t_hat − dt·t) / S (LSQ's scale gradient; each term a float32 product, as the
 *            composition of ONNX operators it replaces computes them, summed in double)
 *
 * It replaces nine onnxruntime kernels per quantizer and step (Clip, Equal, FakeQuantGrad, Identity, two Mul, Sub,
 * ReduceSum, Div: about 280 µs on 200,704 values here, FakeQuantGrad alone 105 µs), see
 * qgraph/train/fused_gradients.py, which rewrites the training graph to use it.
 *
 * No onnxruntime header is needed (the wheel ships none). The library talks to onnxruntime through the C API's
 * function table (OrtApi), a struct of function pointers to which each release only appends: the entries used here
 * are indexed by their position in that table, part of onnxruntime's stable ABI, and the operator description
 * follows OrtCustomOp's layout at API version 13, which later runtimes accept. onnxruntime-training-cpu 1.19.2, the
 * last training release, is the runtime it runs in; the tests run it against the composition it replaces.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

#if defined(__x86_64__) && defined(__ELF__) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 6)
#define CPU_VERSIONS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_VERSIONS
#endif

typedef void OrtStatus;
typedef struct OrtApiBase {
    const void *(*GetApi)(uint32_t version);
    const char *(*GetVersionString)(void);
} OrtApiBase;

/* Positions in OrtApi (onnxruntime_c_api.h) of the functions used here. */
enum {
    CREATE_STATUS = 0,
    CREATE_CUSTOM_OP_DOMAIN = 26,
    CUSTOM_OP_DOMAIN_ADD = 27,
    ADD_CUSTOM_OP_DOMAIN = 28,
    GET_TENSOR_MUTABLE_DATA = 51,
    GET_TENSOR_SHAPE_ELEMENT_COUNT = 64,
    GET_TENSOR_TYPE_AND_SHAPE = 65,
    GET_DIMENSIONS_COUNT = 61,
    GET_DIMENSIONS = 62,
    KERNEL_CONTEXT_GET_INPUT = 90,
    KERNEL_CONTEXT_GET_OUTPUT = 91,
    RELEASE_STATUS = 93,
    RELEASE_TENSOR_TYPE_AND_SHAPE_INFO = 99,
};
#define API_VERSION 13
#define ORT_FAIL 1
#define TENSOR_FLOAT 1 /* ONNXTensorElementDataType */

typedef OrtStatus *(*CreateStatusFn)(int code, const char *message);
typedef OrtStatus *(*CreateCustomOpDomainFn)(const char *domain, void **out);
typedef OrtStatus *(*CustomOpDomainAddFn)(void *domain, const void *op);
typedef OrtStatus *(*AddCustomOpDomainFn)(void *options, void *domain);
typedef OrtStatus *(*GetTensorMutableDataFn)(void *value, void **out);
typedef OrtStatus *(*GetTensorTypeAndShapeFn)(const void *value, void **out);
typedef OrtStatus *(*GetTensorShapeElementCountFn)(const void *info, size_t *out);
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

/* The float data and element count of input ``index``; NULL on failure. */
static const float *input_data(void *context, size_t index, size_t *count, void **shape_out)
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
    int ok = succeeded(CALL(GET_TENSOR_SHAPE_ELEMENT_COUNT, GetTensorShapeElementCountFn)(info, count));
    if (shape_out != NULL && ok) {
        *shape_out = info; /* the caller releases it */
    } else {
        CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(info);
    }
    if (!ok || !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)((void *)value, &data))) {
        return NULL;
    }
    return (const float *)data;
}

CPU_VERSIONS static double masked_gradient(const float *output_gradient, const float *input, const float *output,
                                           size_t count, float low, float high, float *input_gradient)
{
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (size_t i = 0; i < count; ++i) {
        float x = input[i];
        float gradient = output_gradient[i];
        /* the mask of Equal(x, Clip(x, low, high)) exactly: a NaN x fails it, a NaN bound clips nothing */
        float passed = (x == x && !(x < low) && !(x > high)) ? gradient : 0.0f;
        input_gradient[i] = passed;
        sum += (double)(gradient * output[i] - passed * x);
    }
    return sum;
}

static void compute(void *kernel, void *context)
{
    (void)kernel;
    size_t count = 0, other = 0, scalar = 0;
    void *shape = NULL;
    const float *output_gradient = input_data(context, 0, &other, NULL);
    const float *input = input_data(context, 1, &count, &shape);
    if (output_gradient == NULL || input == NULL || shape == NULL || other != count) {
        if (shape != NULL) {
            CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(shape);
        }
        return; /* onnxruntime reports the missing output */
    }
    const float *output = input_data(context, 2, &other, NULL);
    const float *scale = input_data(context, 3, &scalar, NULL);
    const float *low = input_data(context, 4, &scalar, NULL);
    const float *high = input_data(context, 5, &scalar, NULL);
    size_t rank = 0;
    int64_t dims[16];
    int ok = output != NULL && other == count && scale != NULL && low != NULL && high != NULL &&
             succeeded(CALL(GET_DIMENSIONS_COUNT, GetDimensionsCountFn)(shape, &rank)) && rank <= 16 &&
             succeeded(CALL(GET_DIMENSIONS, GetDimensionsFn)(shape, dims, rank));
    CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(shape);
    if (!ok) {
        return;
    }
    void *input_gradient_value = NULL, *scale_gradient_value = NULL;
    void *input_gradient = NULL, *scale_gradient = NULL;
    if (!succeeded(CALL(KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, 0, dims, rank,
                                                                              &input_gradient_value)) ||
        !succeeded(CALL(KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, 1, dims, 0,
                                                                              &scale_gradient_value)) ||
        !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(input_gradient_value, &input_gradient)) ||
        !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(scale_gradient_value, &scale_gradient))) {
        return;
    }
    double sum = masked_gradient(output_gradient, input, output, count, *low, *high, (float *)input_gradient);
    *(float *)scale_gradient = (float)sum / *scale;
}

static void *create_kernel(const CustomOp *op, const void *ort_api, const void *info)
{
    (void)op, (void)ort_api, (void)info;
    return malloc(1); /* one object per node; the kernel keeps no state */
}
static void destroy_kernel(void *kernel) { free(kernel); }
static const char *name(const CustomOp *op) { (void)op; return "QuantizerGradient"; }
static const char *provider(const CustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static int float_type(const CustomOp *op, size_t index) { (void)op, (void)index; return TENSOR_FLOAT; }
static size_t input_count(const CustomOp *op) { (void)op; return 6; }
static size_t output_count(const CustomOp *op) { (void)op; return 2; }
static int required(const CustomOp *op, size_t index) { (void)op, (void)index; return 0; }
static int default_memory(const CustomOp *op, size_t index) { (void)op, (void)index; return 0; }

static const CustomOp quantizer_gradient = {
    API_VERSION, create_kernel, name, provider, float_type, input_count, float_type, output_count,
    compute, destroy_kernel, required, required, default_memory,
};

/* One domain for the process: onnxruntime keeps a pointer to it in every session that registered this library. */
static void *domain;

EXPORT OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base)
{
    if (api == NULL) {
        api = (const void *const *)base->GetApi(API_VERSION);
        if (api == NULL) {
            return NULL; /* cannot even create a status: onnxruntime then fails on the unknown operator */
        }
    }
    OrtStatus *status = NULL;
    if (domain == NULL) {
        status = CALL(CREATE_CUSTOM_OP_DOMAIN, CreateCustomOpDomainFn)("qgraph.training", &domain);
        if (status == NULL) {
            status = CALL(CUSTOM_OP_DOMAIN_ADD, CustomOpDomainAddFn)(domain, &quantizer_gradient);
        }
        if (status != NULL) {
            domain = NULL;
            return status;
        }
    }
    return CALL(ADD_CUSTOM_OP_DOMAIN, AddCustomOpDomainFn)(options, domain);
}

