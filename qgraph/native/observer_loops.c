/*
 * qgraph.native._observer_loops: the per-value loops of the observers, one pass over a batch each.
 *
 * min_max(values) -> (minimum, maximum, all_finite): both extremes in one pass (numpy's min() and max() read the
 * batch twice, and a probe's activations come from memory, not cache).
 *
 * bin_counts(values, width_exponent, offset, counts, checked) -> (processed, minimum, maximum) adds to ``counts``
 * (int64, length B) the count of each bin of ``values``: value x lands at index floor(x * 2^-width_exponent) +
 * offset, the index HistogramObserver's numpy path computes, and exactly so: the product is computed in float32
 * only when the input is float32 and 2^-width_exponent a normal float32 (as numpy does), else in double, where
 * multiplying by a power of two is exact.  With ``checked`` the caller need not know the batch's extent: the loop
 * stops before the first block of 256 values holding a value outside the layout, [-offset, B - offset) · 2^w, or a
 * NaN/inf, and reports how many values it counted and their extremes; the caller re-bins and finishes the rest.
 * Unchecked, every value must be finite and inside the layout (indices are clamped anyway, for memory safety).
 *
 * Why: with numpy an update reads the batch three times (min, max, binning) and bins at about 2 ns a value
 * (multiply, float->int, lane offset, then np.bincount, which converts to intp, scans for the extent and
 * scatters), as much as onnxruntime spends computing the activation.  Here each block of 256 values is read once
 * by a vectorised loop (extremes, range check, indices; compiled with -fno-trapping-math so the clamps become
 * min/max instructions) and scattered into four interleaved 32-bit sub-histograms, so that runs of equal values
 * (ReLU outputs are often half exact zeros) do not serialise on one counter, the bin holding zero spread further
 * over spare counters; the scatter loop takes eight values a turn, their indices loaded before any counter is
 * touched (5-10% faster than one value at a time here).  The GIL is released, so observers of different tensors run
 * in parallel.  The loops themselves are in bin_loops.h.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

#include "bin_loops.h"

DEFINE_BIN_COUNTS(bin_counts_float_in_float, float, float, FLT_MAX)
DEFINE_BIN_COUNTS(bin_counts_float_in_double, float, double, FLT_MAX)
DEFINE_BIN_COUNTS(bin_counts_double_in_double, double, double, DBL_MAX)
DEFINE_MIN_MAX(min_max_float, float)
DEFINE_MIN_MAX(min_max_double, double)

static int is_format(const Py_buffer *view, char code)
{
    const char *format = view->format ? view->format : "B";
    if (format[0] == '<' || format[0] == '=' || format[0] == '@') {
        format += 1;
    }
    return format[0] == code && format[1] == '\0';
}

/* A C-contiguous float32 or float64 buffer of ``object``; sets *is_float. */
static int get_values(PyObject *object, Py_buffer *values, int *is_float)
{
    if (PyObject_GetBuffer(object, values, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        return -1;
    }
    *is_float = is_format(values, 'f');
    if (!*is_float && !is_format(values, 'd')) {
        PyBuffer_Release(values);
        PyErr_SetString(PyExc_TypeError, "values must be a C-contiguous float32 or float64 buffer");
        return -1;
    }
    return 0;
}

static PyObject *min_max(PyObject *self, PyObject *args)
{
    PyObject *values_object;
    Py_buffer values;
    int is_float, all_finite = 1;
    double minimum = INFINITY, maximum = -INFINITY;
    (void)self;
    if (!PyArg_ParseTuple(args, "O", &values_object) || get_values(values_object, &values, &is_float) < 0) {
        return NULL;
    }
    Py_ssize_t size = values.len / values.itemsize;
    if (size > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (is_float) {
            min_max_float((const float *)values.buf, size, &minimum, &maximum, &all_finite);
        } else {
            min_max_double((const double *)values.buf, size, &minimum, &maximum, &all_finite);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&values);
    return Py_BuildValue("ddO", minimum, maximum, all_finite ? Py_True : Py_False);
}

static PyObject *bin_counts(PyObject *self, PyObject *args)
{
    PyObject *values_object, *counts_object;
    Py_buffer values, counts;
    int width_exponent, checked, is_float;
    long offset;
    (void)self;
    if (!PyArg_ParseTuple(args, "OilOp", &values_object, &width_exponent, &offset, &counts_object, &checked)) {
        return NULL;
    }
    if (get_values(values_object, &values, &is_float) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(counts_object, &counts, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&values);
        return NULL;
    }
    PyObject *result = NULL;
    uint32_t *lanes = NULL;
    long bins = (long)(counts.len / (Py_ssize_t)sizeof(int64_t));
    if (!(is_format(&counts, 'q') || is_format(&counts, 'l')) || counts.itemsize != 8 || bins <= 0) {
        PyErr_SetString(PyExc_TypeError, "counts must be a non-empty C-contiguous int64 buffer");
        goto done;
    }
    if (offset < 0 || offset >= bins) {
        PyErr_SetString(PyExc_ValueError, "offset must index a bin");
        goto done;
    }
    lanes = (uint32_t *)calloc((size_t)LANES * (size_t)LANE_STRIDE(bins), sizeof(uint32_t));
    if (lanes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        Py_ssize_t size = values.len / values.itemsize;
        int64_t *destination = (int64_t *)counts.buf;
        /* the layout's extent in value units: [-offset, bins - offset) * 2^width_exponent (inf beyond double) */
        double low_value = -ldexp((double)offset, width_exponent);
        double high_value = ldexp((double)(bins - offset), width_exponent);
        int in_float = is_float && -width_exponent >= -125 && -width_exponent <= 126;
        BinResult outcome = {0, INFINITY, -INFINITY};
        Py_BEGIN_ALLOW_THREADS
        if (in_float) {
            outcome = bin_counts_float_in_float((const float *)values.buf, size, ldexpf(1.0f, -width_exponent),
                                                offset, bins, checked, low_value, high_value, lanes, destination);
        } else if (is_float) {
            outcome = bin_counts_float_in_double((const float *)values.buf, size, ldexp(1.0, -width_exponent),
                                                 offset, bins, checked, low_value, high_value, lanes, destination);
        } else {
            outcome = bin_counts_double_in_double((const double *)values.buf, size, ldexp(1.0, -width_exponent),
                                                  offset, bins, checked, low_value, high_value, lanes, destination);
        }
        Py_END_ALLOW_THREADS
        result = Py_BuildValue("ndd", outcome.processed, outcome.minimum, outcome.maximum);
    }
done:
    free(lanes);
    PyBuffer_Release(&values);
    PyBuffer_Release(&counts);
    return result;
}

static PyMethodDef methods[] = {
    {"min_max", min_max, METH_VARARGS, "min_max(values) -> (minimum, maximum, all_finite), in one pass."},
    {"bin_counts", bin_counts, METH_VARARGS,
     "bin_counts(values, width_exponent, offset, counts, checked) -> (processed, minimum, maximum)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_observer_loops", "Single-pass loops of qgraph's observers (see observer_loops.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__observer_loops(void) { return PyModule_Create(&module); }
