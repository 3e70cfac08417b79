/*
 * Two onnxruntime custom operators for QAT's learnable activation quantizers, each one pass over the tensor.
 *
 * qgraph.training::FakeQuantize(t, S, z) -> t_hat: com.microsoft QuantizeLinear followed by DequantizeLinear,
 * bit for bit (S a float scalar, z a uint8 or int8 scalar): v = t / S clamped to [qmin - z, qmax - z] (a NaN
 * to the lower end, as MLAS does), rounded half to even, times S. Measured equal to onnxruntime's pair on a million
 * values, their ties and neighbours, NaN and infinities; multiplying by 1/S instead of dividing differed on 74.
 *
 * qgraph.training::QuantizerGradient, the backward pass of the same quantizer:
 *
 *   inputs:  dY (output gradient), t (quantizer input), t_hat (quantizer output), S (scale), low, high (the ends of the
 *            quantization cells, S·(qmin − z − ½) and S·(qmax − z + ½)); S, low and high are scalars
 *   outputs: dt = dY where low <= t <= high, else 0 (the straight-through estimator; the mask is exactly
 *            Equal(t, Clip(t, low, high)): a NaN t gets 0, a NaN bound clips nothing)
 *            dS = Σ (dY·t_hat − dt·t) / S (LSQ's scale gradient; each term a float32 product, as the
 *            composition of ONNX operators it replaces computes them, summed in double)
 *
 * They replace two kernels (the forward: 54 µs on 200,704 values here) and nine (Clip, Equal, FakeQuantGrad, Identity,
 * two Mul, Sub, ReduceSum, Div: about 280 µs, FakeQuantGrad alone 105 µs) per quantizer and step; see
 * qgraph/train/fused_gradients.py, which rewrites the training graph to use them.
 *
 * No onnxruntime header is needed: qgraph/native/ort_custom_op.h declares the part of the C API used. The tests run the
 * kernels against the composition of onnxruntime operators they replace.
 */
#include "macros.h"
#include "ort_custom_op.h"

/* An output shaped like the type-and-shape ``info`` (released here); NULL on failure. */
static void *output_like(void *context, size_t index, void *info)
{
    size_t rank = 0;
    int64_t dims[16];
    void *value = NULL, *data = NULL;
    int ok = succeeded(CALL(GET_DIMENSIONS_COUNT, GetDimensionsCountFn)(info, &rank)) && rank <= 16 &&
             succeeded(CALL(GET_DIMENSIONS, GetDimensionsFn)(info, dims, rank));
    CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(info);
    if (!ok || !succeeded(CALL(KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, index, dims, rank, &value)) ||
        !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(value, &data))) {
        return NULL;
    }
    return data;
}

/* A scalar (rank 0) output; NULL on failure. */
static void *scalar_output(void *context, size_t index)
{
    int64_t none = 0;
    void *value = NULL, *data = NULL;
    if (!succeeded(CALL(KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, index, &none, 0, &value)) ||
        !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(value, &data))) {
        return NULL;
    }
    return data;
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

static void gradient_compute(void *kernel, void *context)
{
    (void)kernel;
    /* the operator declares float inputs, which onnxruntime enforces: only counts are checked here */
    size_t count = 0, other = 0, scalar = 0;
    void *shape = NULL;
    const float *output_gradient = input_data(context, 0, &other, NULL, NULL);
    const float *input = input_data(context, 1, &count, NULL, &shape);
    if (shape == NULL) {
        return; /* onnxruntime reports the missing output */
    }
    const float *output = input_data(context, 2, &scalar, NULL, NULL);
    int ok = output_gradient != NULL && input != NULL && output != NULL && other == count && scalar == count;
    const float *scale = input_data(context, 3, &scalar, NULL, NULL);
    const float *low = input_data(context, 4, &scalar, NULL, NULL);
    const float *high = input_data(context, 5, &scalar, NULL, NULL);
    ok = ok && scale != NULL && low != NULL && high != NULL;
    if (!ok) {
        CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(shape);
        return;
    }
    float *input_gradient = (float *)output_like(context, 0, shape);
    float *scale_gradient = (float *)scalar_output(context, 1);
    if (input_gradient == NULL || scale_gradient == NULL) {
        return;
    }
    double sum = masked_gradient(output_gradient, input, output, count, *low, *high, input_gradient);
    *scale_gradient = (float)sum / *scale;
}

/* Adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude below 2^22 to an integer, half to even. */
#define ROUNDING_SHIFT 12582912.0f

CPU_VERSIONS static void fake_quantize(const float *input, size_t count, float scale, float low, float high,
                                       float *output)
{
    for (size_t i = 0; i < count; ++i) {
        float v = input[i] / scale;
        v = v > low ? v : low; /* a NaN goes to the lower end, as in MLAS's QuantizeLinear */
        v = v < high ? v : high;
        output[i] = ((v + ROUNDING_SHIFT) - ROUNDING_SHIFT) * scale;
    }
}

static void fake_quantize_compute(void *kernel, void *context)
{
    (void)kernel;
    size_t count = 0, scalar = 0;
    int zero_type = 0;
    void *shape = NULL;
    const float *input = input_data(context, 0, &count, NULL, &shape);
    if (shape == NULL) {
        return;
    }
    const float *scale = input_data(context, 1, &scalar, NULL, NULL);
    const void *zero_point = input_data(context, 2, &scalar, &zero_type, NULL);
    if (input == NULL || scale == NULL || zero_point == NULL ||
        (zero_type != TENSOR_UINT8 && zero_type != TENSOR_INT8)) {
        CALL(RELEASE_TENSOR_TYPE_AND_SHAPE_INFO, ReleaseFn)(shape);
        return;
    }
    float zero = zero_type == TENSOR_UINT8 ? (float)*(const uint8_t *)zero_point : (float)*(const int8_t *)zero_point;
    float low = (zero_type == TENSOR_UINT8 ? 0.0f : -128.0f) - zero;
    float high = (zero_type == TENSOR_UINT8 ? 255.0f : 127.0f) - zero;
    float *output = (float *)output_like(context, 0, shape);
    if (output != NULL) {
        fake_quantize(input, count, *scale, low, high, output);
    }
}

static int kernel_token; /* the kernels keep no state: every node gets this address */
static void *create_kernel(const CustomOp *op, const void *ort_api, const void *info)
{
    (void)op, (void)ort_api, (void)info;
    return &kernel_token;
}
static void destroy_kernel(void *kernel) { (void)kernel; }
static const char *gradient_name(const CustomOp *op) { (void)op; return "QuantizerGradient"; }
static const char *fake_quantize_name(const CustomOp *op) { (void)op; return "FakeQuantize"; }
static int float_type(const CustomOp *op, size_t index) { (void)op, (void)index; return TENSOR_FLOAT; }
static int fake_quantize_input_type(const CustomOp *op, size_t index)
{
    (void)op;
    return index == 2 ? 0 : TENSOR_FLOAT; /* 0, undefined: the zero point may be uint8 or int8 */
}
static size_t six(const CustomOp *op) { (void)op; return 6; }
static size_t three(const CustomOp *op) { (void)op; return 3; }
static size_t two(const CustomOp *op) { (void)op; return 2; }
static size_t one(const CustomOp *op) { (void)op; return 1; }

static const CustomOp quantizer_gradient = {
    API_VERSION, create_kernel, gradient_name, cpu_provider, float_type, six, float_type, two,
    gradient_compute, destroy_kernel, required_argument, required_argument, default_memory,
};
static const CustomOp fake_quantize_op = {
    API_VERSION, create_kernel, fake_quantize_name, cpu_provider, fake_quantize_input_type, three, float_type, one,
    fake_quantize_compute, destroy_kernel, required_argument, required_argument, default_memory,
};

static void *domain;

EXPORT OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base)
{
    static const CustomOp *const operators[] = {&quantizer_gradient, &fake_quantize_op};
    return register_operators(options, base, "qgraph.training", operators, 2, &domain);
}
