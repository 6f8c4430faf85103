/* The float32 work of a decoder layer between its matmuls, one call each where torch takes several ops:
RMSNorm (with the residual add before it), rotary embedding with the KV-cache write, the MLP's
silu(gate) * up. Attention over the paged cache is cpu_attention.c's.

Why: at decode a step's rows are few, so each torch op costs its dispatch more than its arithmetic.
In SmolLM2-135M's 8-row decode step (torch profiler, 2-vCPU Xeon) a layer ran ~35 ops around its four
matmuls: RMSNorm 8, rotary 16, the cache write 2, silu-and-multiply 5, attention 6 (two gathers of
every context block into new tensors, SDPA, the transposes). Built with cpu_kernels.c and
cpu_attention.c into one library (cpu_kernels.py).

Same layouts as cpu_kernels.c: row-major, "rows of stride ld".

  rms_norm        x [T, D]; when `add` is given, x += add first (in place: the residual stream);
                  out[t] = w * (x[t] * 1/sqrt(mean(x[t]^2) + eps)), the order of HF's LlamaRMSNorm
  rope_write_kv   qkv [T, (H + 2 KV) D] as the fused projection writes it: q's heads rotated in place
                  (HF's rotate-half: x*cos + rotate_half(x)*sin at the token's position), k's rotated
                  into k_cache[slots[t]], v copied to v_cache[slots[t]]; caches [num_slots, KV, D]
  silu_mul        gu [T, 2N] as the fused gate/up projection writes it: out[t] = silu(gate) * up, [T, N]
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "cpu_simd.h"

/* A parallel region costs a few microseconds: rows that take less stay on the calling thread. */
#define PARALLEL_MIN 65536

void rms_norm(float *x, long ldx, const float *add, long ldadd, const float *w, float *out, long ldo,
              long T, long D, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T * D >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        float *xr = x + t * ldx, *o = out + t * ldo;
        if (add != NULL) {
            const float *a = add + t * ldadd;
            for (long d = 0; d < D; d++)
                xr[d] += a[d];
        }
        float r = 1.0f / sqrtf(dot_f32(xr, xr, D) / (float)D + eps);
        for (long d = 0; d < D; d++)
            o[d] = w[d] * (xr[d] * r);
    }
}

void silu_mul(const float *gu, long ld, long T, long N, float *out, long ldo, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T * N >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        const float *g = gu + t * ld, *u = g + N;
        float *o = out + t * ldo;
        long j = 0;
        for (; j + 8 <= N; j += 8) {
            __m256 gv = _mm256_loadu_ps(g + j);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), gv)); /* e^-g */
            __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
            _mm256_storeu_ps(o + j, _mm256_mul_ps(silu, _mm256_loadu_ps(u + j)));
        }
        for (; j < N; j++)
            o[j] = g[j] / (1.0f + expf(-g[j])) * u[j];
    }
}

/* out = x*cos + rotate_half(x)*sin over one head of D (rotate_half(x) = [-x2, x1]). */
static inline void rotate(const float *x, float *out, const float *c, const float *s, long D) {
    long half = D / 2;
    for (long i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        out[i] = x1 * c[i] + -x2 * s[i];
        out[i + half] = x2 * c[i + half] + x1 * s[i + half];
    }
}

void rope_write_kv(float *qkv, long ld, long T, const int64_t *positions, const float *cos_table, const float *sin_table,
                   long H, long KV, long D, const int64_t *slots, float *k_cache, float *v_cache, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (T * (H + 2 * KV) * D >= PARALLEL_MIN)
    for (long t = 0; t < T; t++) {
        float *row = qkv + t * ld, tmp[D];
        const float *c = cos_table + positions[t] * D, *s = sin_table + positions[t] * D;
        for (long h = 0; h < H; h++) {
            rotate(row + h * D, tmp, c, s, D);
            for (long d = 0; d < D; d++)
                row[h * D + d] = tmp[d];
        }
        float *kc = k_cache + slots[t] * KV * D, *vc = v_cache + slots[t] * KV * D;
        for (long g = 0; g < KV; g++)
            rotate(row + (H + g) * D, kc + g * D, c, s, D);
        for (long d = 0; d < KV * D; d++)
            vc[d] = row[(H + KV) * D + d];
    }
}
