/*
 * The one set of macros every C source of qgraph shares.
 *
 * CPU_VERSIONS: function multiversioning (GCC >= 6, Clang >= 14, x86-64 ELF): each marked loop is compiled for
 * AVX-512, AVX2 and the baseline, and the dynamic loader picks the widest the CPU has. Measured here (AVX-512):
 * binning 25% faster, the min-max pass 1.6x, than the SSE2 baseline alone. Integer results are the same whatever the
 * version; float results too, since every loop keeps its order of operations (no -ffast-math).
 *
 * EXPORT: the visibility of the one symbol an onnxruntime custom-operator library exports (RegisterCustomOps).
 */
#ifndef QGRAPH_MACROS_H
#define QGRAPH_MACROS_H

#if defined(__x86_64__) && defined(__ELF__) && (defined(__clang__) ? __clang_major__ >= 14 : __GNUC__ >= 6)
#define CPU_VERSIONS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CPU_VERSIONS
#endif

#if defined(_WIN32)
#define EXPORT __declspec(dllexport)
#else
#define EXPORT __attribute__((visibility("default")))
#endif

#endif
