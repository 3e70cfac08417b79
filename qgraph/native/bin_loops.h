/*
 * The observers' per-value loops, used by the Python extension (observer_loops.c).
 *
 * bin_counts_*(values, size, scale, offset, bins, checked, low_value, high_value, lanes, counts) adds to ``counts``
 * (int64, length ``bins``) the count of each bin: value x lands at index floor(x * scale) + offset with scale =
 * 2^-width_exponent (see observer_loops.c for the precision rule and the checked mode); ``lanes`` is scratch of
 * LANES * LANE_STRIDE(bins) zeroed uint32 counters, left zeroed. min_max_*(values, size, ...) gives both extremes in one pass.
 */
#ifndef QGRAPH_BIN_LOOPS_H
#define QGRAPH_BIN_LOOPS_H

#include <float.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "macros.h"

#define BLOCK 256
#define LANES 4
/*
 * Each sub-histogram has SPARE_SLOTS counters past its bins, all standing for the bin that holds zero: value i of a
 * block counts there in slot i mod SPARE_SLOTS. A ReLU output is often half exact zeros, and consecutive increments
 * of one counter wait for each other's store (measured here: 0.47 ns a value on such data against 0.19 on spread
 * values; with the spare slots, 0.40 and 0.36 on two sizes against 0.47 and 0.53).
 */
#define SPARE_SLOTS 64
#define LANE_STRIDE(bins) ((bins) + SPARE_SLOTS)
_Static_assert(LANES == 4, "the scatter loop of bin_counts is written out for four sub-histograms");
/* Lane counters are 32-bit; they are flushed into the int64 counts every CHUNK values, long before they could wrap. */
#define CHUNK ((ptrdiff_t)1 << 24)

/*
 * Min/max reductions over floats vectorise only when the compiler may reorder them, which plain C forbids (NaN
 * semantics): an OpenMP simd reduction allows it for these loops alone (-fopenmp-simd, no OpenMP runtime).  NaNs are
 * detected separately, so their effect on the extremes never matters.
 */

typedef struct {
    ptrdiff_t processed;
    double minimum, maximum;
} BinResult;

/*
 * One function per element type and working precision.  Per block, one branch-free loop the compiler vectorises
 * computes the extremes, the range check (a NaN fails
 * it: the bounds are the layout's extent in the input's type, with an overflowing bound widened to the type's
 * extremes, so -inf still fails) and the indices; then the scatter, value i counting in sub-histogram i mod LANES.
 * The signed bin is clamped, then floored by truncation with a correction for negative non-integers (no libm call).
 */
#define DEFINE_BIN_COUNTS(name, type, work, type_max)                                                \
    CPU_VERSIONS static BinResult name(const type *values, ptrdiff_t size, work scale, long offset, long bins, int checked,     \
                          double low_value, double high_value, uint32_t *lanes, int64_t *counts)                   \
    {                                                                                                              \
        BinResult result = {0, INFINITY, -INFINITY};                                                               \
        int32_t indices[BLOCK];                                                                                    \
        const work lowest = -(work)offset, highest = (work)(bins - offset) - (work)0.5;                              \
        const type low_bound = low_value < -(double)type_max ? -(type)type_max : (type)low_value;                  \
        const type high_bound = high_value > (double)type_max ? (type)INFINITY : (type)high_value;                 \
        const int32_t shift = (int32_t)offset, spare = (int32_t)bins;                                             \
        const long stride = LANE_STRIDE(bins);                                                                     \
        int stopped = 0;                                                                                           \
        for (ptrdiff_t chunk = 0; chunk < size && !stopped; chunk += CHUNK) {                                     \
            ptrdiff_t chunk_end = size - chunk < CHUNK ? size : chunk + CHUNK;                                    \
            for (ptrdiff_t start = chunk; start < chunk_end; start += BLOCK) {                                    \
                ptrdiff_t count = chunk_end - start < BLOCK ? chunk_end - start : BLOCK;                          \
                const type *block = values + start;                                                                \
                type block_min = (type)INFINITY, block_max = -(type)INFINITY;                                      \
                int outside = 0;                                                                                   \
                _Pragma("omp simd reduction(min : block_min) reduction(max : block_max) reduction(| : outside)")  \
                for (ptrdiff_t i = 0; i < count; ++i) {                                                           \
                    type value = block[i];                                                                         \
                    block_min = value < block_min ? value : block_min;                                             \
                    block_max = value > block_max ? value : block_max;                                             \
                    outside |= (value < low_bound) | (value >= high_bound) | (value != value);                     \
                    work position = (work)value * scale;                                                           \
                    position = position < lowest ? lowest : position;                                              \
                    position = position > highest ? highest : position;                                            \
                    int32_t truncated = (int32_t)position;                                                         \
                    int32_t index = truncated - (position < (work)truncated) + shift;                              \
                    /* the bin holding zero takes a spare counter by position: runs of zeros spread out */           \
                    indices[i] = index == shift ? spare + (int32_t)(i & (SPARE_SLOTS - 1)) : index;                \
                }                                                                                                  \
                if (checked && outside) {                                                                          \
                    stopped = 1;                                                                                   \
                    break;                                                                                         \
                }                                                                                                  \
                ptrdiff_t i = 0;                                                                                  \
                uint32_t *lane0 = lanes, *lane1 = lanes + stride, *lane2 = lanes + 2 * stride;                 \
                uint32_t *lane3 = lanes + 3 * stride;                                                              \
                for (; i + 8 <= count; i += 8) {                                                                   \
                    uint32_t a0 = (uint32_t)indices[i], a1 = (uint32_t)indices[i + 1];                             \
                    uint32_t a2 = (uint32_t)indices[i + 2], a3 = (uint32_t)indices[i + 3];                         \
                    uint32_t b0 = (uint32_t)indices[i + 4], b1 = (uint32_t)indices[i + 5];                         \
                    uint32_t b2 = (uint32_t)indices[i + 6], b3 = (uint32_t)indices[i + 7];                         \
                    lane0[a0]++; lane1[a1]++; lane2[a2]++; lane3[a3]++;                                            \
                    lane0[b0]++; lane1[b1]++; lane2[b2]++; lane3[b3]++;                                            \
                }                                                                                                  \
                for (; i < count; ++i) {                                                                           \
                    lanes[indices[i]] += 1;                                                                        \
                }                                                                                                  \
                result.minimum = (double)block_min < result.minimum ? (double)block_min : result.minimum;          \
                result.maximum = (double)block_max > result.maximum ? (double)block_max : result.maximum;          \
                result.processed = start + count;                                                                  \
            }                                                                                                      \
            for (long lane = 0; lane < LANES; ++lane) {                                                            \
                for (long bin = 0; bin < bins; ++bin) {                                                            \
                    counts[bin] += lanes[lane * stride + bin];                                                     \
                    lanes[lane * stride + bin] = 0;                                                                \
                }                                                                                                  \
                for (long slot = bins; slot < stride; ++slot) {                                                    \
                    counts[offset] += lanes[lane * stride + slot];                                                 \
                    lanes[lane * stride + slot] = 0;                                                               \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
        return result;                                                                                             \
    }


/* Extremes in one pass; all_finite is false when a NaN or an infinity was seen (then the extremes are not used). */
#define DEFINE_MIN_MAX(name, type)                                                                   \
    CPU_VERSIONS static void name(const type *values, ptrdiff_t size, double *minimum, double *maximum, int *all_finite)       \
    {                                                                                                              \
        type low = (type)INFINITY, high = -(type)INFINITY;                                                         \
        int not_finite = 0;                                                                                        \
        _Pragma("omp simd reduction(min : low) reduction(max : high) reduction(| : not_finite)")                     \
        for (ptrdiff_t i = 0; i < size; ++i) {                                                                    \
            type value = values[i];                                                                                \
            type difference = value - value; /* NaN for NaN and infinities */                                      \
            low = value < low ? value : low;                                                                       \
            high = value > high ? value : high;                                                                    \
            not_finite |= difference != difference;                                                                \
        }                                                                                                          \
        *minimum = (double)low;                                                                                    \
        *maximum = (double)high;                                                                                   \
        *all_finite = !not_finite;                                                                                 \
    }


#endif
