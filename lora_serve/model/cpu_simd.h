/* The AVX2 pieces the kernels' sources share (cpu_kernels.c, cpu_layer_ops.c, cpu_attention.c: one library; cpu_kernels.py). */
#ifndef LORA_SERVE_CPU_SIMD_H
#define LORA_SERVE_CPU_SIMD_H

#include <immintrin.h>

/* Whether this CPU has AVX-512 (every entry point that has such a path asks; cached after the first
   call, a benign race: every thread that tests it writes the same value). */
static inline int has_avx512(void) {
    static int avx512 = -1;
    if (avx512 < 0)
        avx512 = __builtin_cpu_supports("avx512f");
    return avx512;
}

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

/* e^x for 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-5 polynomial for e^r, then
   2^n in the exponent bits); relative error ~2e-7; x is clamped to [-87.3, 88], where float32's
   exponent holds 2^n. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif
