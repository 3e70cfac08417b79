/*
 * qgraph.calibration::Observe, an onnxruntime custom operator: one activation's calibration statistics for one
 * batch, computed inside the probe graph as soon as the activation exists.
 *
 *   inputs:  x         float32, any shape: the activation (or its NCHWc-blocked form: only the multiset counts)
 *            settings  int64[2]: B, the number of histogram bins (a power of two >= 16, or 0 for the extremes
 *                      only), and T, the threads to spread the work over
 *   outputs: counts    int64[B]: the histogram of x's finite values in the layout given by the summary
 *            summary   float64[5]: e, s, minimum, maximum, n: the layout (half-range R = 2^e; s = 1 for the signed
 *                      layout, else 0), the extremes of the finite values and their number (e and s are 0 when
 *                      B = 0; nothing is counted, and the extremes are +inf and -inf, when n = 0)
 *
 * The layout and the binning are HistogramObserver's (histogram.py), through the same loops (bin_loops.h): value x
 * lands in bin floor(x / w) + offset, w = 2R/B (signed) or R/B, offset B/2 (signed) or 0, R the smallest power of
 * two strictly above the largest finite magnitude (2^-160 for all zeros). Each node remembers the layout of its last
 * batch and first bins the next batch in it, checking block by block that it fits (one pass over the values); when
 * it does not (the range grew, a negative value arrived, a NaN or an infinity), it takes the extremes, chooses the
 * layout that holds them and the remembered one, and bins again. A histogram in one layout re-bins exactly into any
 * wider one, so the observer that adds these per-batch histograms up holds the counts that observing the activation
 * itself would give, count for count, whatever layouts the batches used.
 *
 * Why: returning every activation from the probe keeps them all alive until the run ends (about 230 MB a batch for
 * ResNet-18 at batch 16), so onnxruntime cannot reuse their memory; the run is slower (fresh, cold buffers for every
 * layer's output; page faults on the first batch) and each activation is read back from memory afterwards. Observed
 * here, an activation is read while it is still in cache and its buffer is reused as in plain inference.
 *
 * Threads: onnxruntime calls a custom kernel on one thread while its own pool sleeps (the probe session does not
 * spin), so the kernel splits x into T slices, each binned into its own counters by a thread of a small pool kept
 * by this library (the calling thread takes the first slice), and adds the counts up.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "bin_loops.h"
#include "ort_custom_op.h"

DEFINE_BIN_COUNTS(bin_counts_float_in_float, float, float, FLT_MAX)
DEFINE_BIN_COUNTS(bin_counts_float_in_double, float, double, FLT_MAX)
DEFINE_MIN_MAX(min_max_float, float)

/* HistogramObserver.ZERO_ONLY_EXPONENT: the half-range exponent of a histogram that has seen only zeros */
#define ZERO_ONLY_EXPONENT (-160)
#define MAX_THREADS 64
/* a thread gets at least this many values: waking one costs microseconds */
#define MIN_SLICE ((ptrdiff_t)1 << 16)
/* on the path for tensors holding NaN or inf, finite values are gathered this many at a time, then binned */
#define WINDOW ((ptrdiff_t)1 << 16)
#define SUMMARY_SIZE 5

/* ------------------------------------------------------------------------------------------------ thread pool */
typedef void (*WorkFn)(void *task, int part);

static pthread_mutex_t dispatch_lock = PTHREAD_MUTEX_INITIALIZER; /* one parallel job at a time */
static pthread_mutex_t pool_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t work_done = PTHREAD_COND_INITIALIZER;
static int helpers;               /* helper threads started; helper i runs part i of a job */
static unsigned long generation;  /* bumped for every job */
static unsigned long start_generation[MAX_THREADS];
static int pending;               /* parts of the current job not finished by helpers */
static WorkFn job_work;
static void *job_task;
static int job_parts;

static void *helper_main(void *argument)
{
    int part = (int)(intptr_t)argument;
    pthread_mutex_lock(&pool_lock);
    unsigned long seen = start_generation[part];
    for (;;) {
        while (generation == seen) {
            pthread_cond_wait(&work_ready, &pool_lock);
        }
        seen = generation;
        if (part >= job_parts) {
            continue;
        }
        WorkFn work = job_work;
        void *task = job_task;
        pthread_mutex_unlock(&pool_lock);
        work(task, part);
        pthread_mutex_lock(&pool_lock);
        if (--pending == 0) {
            pthread_cond_signal(&work_done);
        }
    }
    return NULL;
}

/* With dispatch_lock held: start helpers until ``wanted`` threads (the caller included) can work; returns how many. */
static int ensure_threads(int wanted)
{
    while (helpers + 1 < wanted && helpers + 1 < MAX_THREADS) {
        pthread_t thread;
        start_generation[helpers + 1] = generation;
        if (pthread_create(&thread, NULL, helper_main, (void *)(intptr_t)(helpers + 1)) != 0) {
            break;
        }
        pthread_detach(thread);
        helpers += 1;
    }
    return wanted < helpers + 1 ? wanted : helpers + 1;
}

/* With dispatch_lock held: run work(task, p) for p < parts (at most ensure_threads' answer), part 0 on this thread. */
static void run_parts(WorkFn work, void *task, int parts)
{
    if (parts <= 1) {
        work(task, 0);
        return;
    }
    pthread_mutex_lock(&pool_lock);
    job_work = work;
    job_task = task;
    job_parts = parts;
    pending = parts - 1;
    generation += 1;
    pthread_cond_broadcast(&work_ready);
    pthread_mutex_unlock(&pool_lock);
    work(task, 0);
    pthread_mutex_lock(&pool_lock);
    while (pending > 0) {
        pthread_cond_wait(&work_done, &pool_lock);
    }
    pthread_mutex_unlock(&pool_lock);
}

/* A forked child has none of the parent's threads: it starts its own pool. */
static void reset_pool_in_child(void);
static void install_fork_handler(void) { pthread_atfork(NULL, NULL, reset_pool_in_child); }
static void reset_pool_in_child(void)
{
    pthread_mutex_t fresh_mutex = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    dispatch_lock = fresh_mutex;
    pool_lock = fresh_mutex;
    work_ready = fresh_cond;
    work_done = fresh_cond;
    helpers = 0;
    pending = 0;
}

/* ----------------------------------------------------------------------------------------------------- the work */
typedef struct {
    int exponent;
    int signed_layout;
} Layout;

enum { EXTREMES, BIN_CHECKED, BIN_UNCHECKED, BIN_FINITE_ONLY };

typedef struct {
    /* in */
    ptrdiff_t start, end;
    int64_t *counts;  /* bins int64, zeroed */
    uint32_t *lanes;  /* LANES * bins uint32, zeroed */
    /* out */
    ptrdiff_t processed, finite;
    double minimum, maximum;
} Part;

typedef struct {
    const float *values;
    int mode;
    long bins, offset;
    int width_exponent;
    Part parts[MAX_THREADS];
} Task;

/* Finite minimum, maximum and count of values[0:size). */
static void finite_extremes(const float *values, ptrdiff_t size, Part *part)
{
    int all_finite = 1;
    min_max_float(values, size, &part->minimum, &part->maximum, &all_finite);
    part->finite = size;
    if (all_finite) {
        return;
    }
    float low = INFINITY, high = -INFINITY;
    ptrdiff_t finite = 0;
    for (ptrdiff_t i = 0; i < size; ++i) {
        float value = values[i];
        if (isfinite(value)) {
            low = value < low ? value : low;
            high = value > high ? value : high;
            finite += 1;
        }
    }
    part->minimum = finite ? (double)low : INFINITY;
    part->maximum = finite ? (double)high : -INFINITY;
    part->finite = finite;
}

/* Bin values[0:size) in the task's layout, as HistogramObserver's native path does (same precision rule). */
static BinResult bin(const Task *task, const float *values, ptrdiff_t size, int checked, Part *part)
{
    double low_value = -ldexp((double)task->offset, task->width_exponent);
    double high_value = ldexp((double)(task->bins - task->offset), task->width_exponent);
    if (-task->width_exponent >= -125 && -task->width_exponent <= 126) {
        return bin_counts_float_in_float(values, size, ldexpf(1.0f, -task->width_exponent), task->offset, task->bins,
                                         checked, low_value, high_value, part->lanes, part->counts);
    }
    return bin_counts_float_in_double(values, size, ldexp(1.0, -task->width_exponent), task->offset, task->bins,
                                      checked, low_value, high_value, part->lanes, part->counts);
}

/* Bin only the finite values of values[0:size), gathered a window at a time. */
static void bin_finite_only(const Task *task, const float *values, ptrdiff_t size, Part *part)
{
    float *window = (float *)malloc((size_t)WINDOW * sizeof(float));
    if (window == NULL) {
        part->processed = -1;
        return;
    }
    ptrdiff_t gathered = 0;
    for (ptrdiff_t i = 0; i < size; ++i) {
        if (isfinite(values[i])) {
            window[gathered++] = values[i];
            if (gathered == WINDOW) {
                bin(task, window, gathered, 0, part);
                gathered = 0;
            }
        }
    }
    if (gathered) {
        bin(task, window, gathered, 0, part);
    }
    free(window);
}

static void work(void *argument, int index)
{
    Task *task = (Task *)argument;
    Part *part = &task->parts[index];
    const float *values = task->values + part->start;
    ptrdiff_t size = part->end - part->start;
    part->processed = size;
    if (size <= 0) {
        part->processed = 0;
        part->finite = 0;
        part->minimum = INFINITY;
        part->maximum = -INFINITY;
        return;
    }
    if (task->mode == EXTREMES) {
        finite_extremes(values, size, part);
    } else if (task->mode == BIN_FINITE_ONLY) {
        bin_finite_only(task, values, size, part);
    } else {
        BinResult result = bin(task, values, size, task->mode == BIN_CHECKED, part);
        part->processed = result.processed;
        part->minimum = result.minimum;
        part->maximum = result.maximum;
    }
}

/* ----------------------------------------------------------------------------------------------------- kernel */
/* A node's state: the layout of its last batch, packed as ((exponent << 1) | signed) + 1; 0 before any. */
typedef struct {
    int64_t last_layout;
} Kernel;

static Layout unpack(int64_t packed)
{
    Layout layout = {(int)((packed - 1) >> 1), (int)((packed - 1) & 1)};
    return layout;
}

static int64_t pack(Layout layout) { return (((int64_t)layout.exponent << 1) | layout.signed_layout) + 1; }

static int log2_of(long bins)
{
    int log2 = 0;
    while ((1L << log2) < bins) {
        ++log2;
    }
    return log2;
}

static void combine(Task *task, int parts, double *minimum, double *maximum, ptrdiff_t *finite)
{
    *minimum = INFINITY;
    *maximum = -INFINITY;
    *finite = 0;
    for (int p = 0; p < parts; ++p) {
        *minimum = task->parts[p].minimum < *minimum ? task->parts[p].minimum : *minimum;
        *maximum = task->parts[p].maximum > *maximum ? task->parts[p].maximum : *maximum;
        *finite += task->parts[p].finite;
    }
}

static void reset_counts(Task *task, int parts)
{
    for (int p = 0; p < parts; ++p) {
        memset(task->parts[p].counts, 0, (size_t)task->bins * sizeof(int64_t));
    }
}

/* Observe values[0:size) with the pool's lock held; fills counts (bins) and summary; returns 0 on failure. */
static int observe(Kernel *kernel, Task *task, ptrdiff_t size, int parts, int64_t *counts, double *summary)
{
    double minimum, maximum;
    ptrdiff_t finite;
    summary[0] = summary[1] = 0.0;
    if (task->bins == 0) {
        task->mode = EXTREMES;
        run_parts(work, task, parts);
        combine(task, parts, &minimum, &maximum, &finite);
        summary[2] = minimum, summary[3] = maximum, summary[4] = (double)finite;
        return 1;
    }
    int log2_bins = log2_of(task->bins);
    int64_t remembered = __atomic_load_n(&kernel->last_layout, __ATOMIC_RELAXED);
    Layout layout = unpack(remembered);
    int fits = 0;
    if (remembered != 0) {
        /* one pass: bin in the last batch's layout, each slice stopping at the first block that does not fit */
        task->mode = BIN_CHECKED;
        task->width_exponent = layout.exponent - log2_bins + layout.signed_layout;
        task->offset = layout.signed_layout ? task->bins / 2 : 0;
        run_parts(work, task, parts);
        fits = 1;
        for (int p = 0; p < parts; ++p) {
            fits &= task->parts[p].processed == task->parts[p].end - task->parts[p].start;
            task->parts[p].finite = task->parts[p].processed;
        }
        combine(task, parts, &minimum, &maximum, &finite);
    }
    if (!fits) {
        task->mode = EXTREMES;
        run_parts(work, task, parts);
        combine(task, parts, &minimum, &maximum, &finite);
        reset_counts(task, parts);
        if (finite > 0) {
            double magnitude = -minimum > maximum ? -minimum : maximum;
            int needed = ZERO_ONLY_EXPONENT;
            if (magnitude > 0) {
                frexp(magnitude, &needed);
            }
            if (remembered == 0 || needed > layout.exponent) {
                layout.exponent = needed;
            }
            layout.signed_layout = (remembered != 0 && layout.signed_layout) || minimum < 0;
            task->mode = finite == size ? BIN_UNCHECKED : BIN_FINITE_ONLY;
            task->width_exponent = layout.exponent - log2_bins + layout.signed_layout;
            task->offset = layout.signed_layout ? task->bins / 2 : 0;
            run_parts(work, task, parts);
            for (int p = 0; p < parts; ++p) {
                if (task->parts[p].processed < 0) {
                    return 0;
                }
            }
            __atomic_store_n(&kernel->last_layout, pack(layout), __ATOMIC_RELAXED);
        }
    }
    memset(counts, 0, (size_t)task->bins * sizeof(int64_t));
    for (int p = 0; p < parts; ++p) {
        for (long b = 0; b < task->bins; ++b) {
            counts[b] += task->parts[p].counts[b];
        }
    }
    if (finite > 0) {
        summary[0] = (double)layout.exponent;
        summary[1] = (double)layout.signed_layout;
    }
    summary[2] = minimum, summary[3] = maximum, summary[4] = (double)finite;
    return 1;
}

static void *create_kernel(const CustomOp *op, const void *ort_api, const void *info)
{
    (void)op, (void)ort_api, (void)info;
    return calloc(1, sizeof(Kernel));
}

static void destroy_kernel(void *kernel) { free(kernel); }

static void *output(void *context, size_t index, int64_t size)
{
    void *value = NULL, *data = NULL;
    if (!succeeded(CALL(KERNEL_CONTEXT_GET_OUTPUT, KernelContextGetOutputFn)(context, index, &size, 1, &value)) ||
        !succeeded(CALL(GET_TENSOR_MUTABLE_DATA, GetTensorMutableDataFn)(value, &data))) {
        return NULL;
    }
    return data;
}

static void compute(void *kernel, void *context)
{
    size_t size = 0, setting_count = 0;
    const float *values = input_data(context, 0, &size, NULL, NULL);
    const int64_t *settings = input_data(context, 1, &setting_count, NULL, NULL);
    if (values == NULL && size > 0) {
        return; /* onnxruntime reports the outputs that were not made */
    }
    if (settings == NULL || setting_count != 2) {
        return;
    }
    long bins = (long)settings[0];
    if (bins != 0 && (bins < 16 || (bins & (bins - 1)) != 0 || bins > (1L << 24))) {
        return;
    }
    int64_t *counts = (int64_t *)output(context, 0, bins);
    double *summary = (double *)output(context, 1, SUMMARY_SIZE);
    if ((counts == NULL && bins > 0) || summary == NULL) {
        return;
    }
    int64_t wanted = settings[1] < 1 ? 1 : settings[1];
    int64_t by_size = (int64_t)(size / MIN_SLICE) + 1;
    wanted = wanted < by_size ? wanted : by_size;
    wanted = wanted < MAX_THREADS ? wanted : MAX_THREADS;

    Task *task = (Task *)calloc(1, sizeof(Task));
    void *scratch = NULL;
    pthread_mutex_lock(&dispatch_lock);
    int parts = ensure_threads((int)wanted);
    size_t per_part = (size_t)bins * sizeof(int64_t) + (size_t)LANES * (size_t)LANE_STRIDE(bins) * sizeof(uint32_t);
    if (task != NULL && bins > 0) {
        scratch = calloc((size_t)parts, per_part);
    }
    if (task != NULL && (bins == 0 || scratch != NULL)) {
        task->values = values;
        task->bins = bins;
        /* slices of whole blocks, so that a slice stops at the same block boundaries a single pass would */
        ptrdiff_t slice = (ptrdiff_t)(((size + (size_t)parts - 1) / (size_t)parts + BLOCK - 1) / BLOCK * BLOCK);
        for (int p = 0; p < parts; ++p) {
            Part *part = &task->parts[p];
            part->start = (ptrdiff_t)p * slice < (ptrdiff_t)size ? (ptrdiff_t)p * slice : (ptrdiff_t)size;
            part->end = part->start + slice < (ptrdiff_t)size ? part->start + slice : (ptrdiff_t)size;
            if (bins > 0) {
                part->counts = (int64_t *)((char *)scratch + (size_t)p * per_part);
                part->lanes = (uint32_t *)(part->counts + bins);
            }
        }
        if (!observe((Kernel *)kernel, task, (ptrdiff_t)size, parts, counts, summary)) {
            summary[4] = -1.0; /* out of memory: the caller refuses the summary */
        }
    } else {
        summary[4] = -1.0;
    }
    pthread_mutex_unlock(&dispatch_lock);
    free(scratch);
    free(task);
}

static const char *name(const CustomOp *op) { (void)op; return "Observe"; }
static int input_type(const CustomOp *op, size_t index) { (void)op; return index == 0 ? TENSOR_FLOAT : TENSOR_INT64; }
static int output_type(const CustomOp *op, size_t index) { (void)op; return index == 0 ? TENSOR_INT64 : TENSOR_DOUBLE; }
static size_t two(const CustomOp *op) { (void)op; return 2; }

static const CustomOp observe_op = {
    API_VERSION, create_kernel, name, cpu_provider, input_type, two, output_type, two,
    compute, destroy_kernel, required_argument, required_argument, default_memory,
};

static void *domain;

EXPORT OrtStatus *RegisterCustomOps(void *options, const OrtApiBase *base)
{
    static const CustomOp *const operators[] = {&observe_op};
    static pthread_once_t fork_handler = PTHREAD_ONCE_INIT;
    pthread_once(&fork_handler, install_fork_handler);
    return register_operators(options, base, "qgraph.calibration", operators, 1, &domain);
}
