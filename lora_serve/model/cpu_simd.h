/* The AVX2 pieces cpu_kernels.c and cpu_layer_ops.c share (one library, two sources; cpu_kernels.py). */
#ifndef LORA_SERVE_CPU_SIMD_H
#define LORA_SERVE_CPU_SIMD_H

#include <immintrin.h>

/* The sum of v's 8 lanes, in a fixed order. */
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_k a[k] * x[k] over n elements, both float32: one FMA chain in 8 lanes, then the tail. */
static inline float dot_f32(const float *a, const float *x, long n) {
    __m256 acc = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(x + k), acc);
    float s = hsum(acc);
    for (; k < n; k++)
        s += a[k] * x[k];
    return s;
}

#endif
