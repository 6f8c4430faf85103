/* The float32 work of a decoder layer between its matmuls, one call each where torch takes several ops:
RMSNorm (with the residual add before it), rotary embedding with the KV-cache write, the MLP's
silu(gate) * up, and decode attention read straight from the paged cache.

Why: at decode a step's rows are few, so each torch op costs its dispatch more than its arithmetic.
In SmolLM2-135M's 8-row decode step (torch profiler, 2-vCPU Xeon) a layer ran ~35 ops around its four
matmuls: RMSNorm 8, rotary 16, the cache write 2, silu-and-multiply 5, attention 6 (two gathers of
every context block into new tensors, SDPA, the transposes). Built with cpu_kernels.c into one
library (cpu_kernels.py).

Same layouts as cpu_kernels.c: row-major, "rows of stride ld".

  rms_norm        x [T, D]; when `add` is given, x += add first (in place: the residual stream);
                  out[t] = w * (x[t] * 1/sqrt(mean(x[t]^2) + eps)), the order of HF's LlamaRMSNorm
  rope_write_kv   qkv [T, (H + 2 KV) D] as the fused projection writes it: q's heads rotated in place
                  (HF's rotate-half: x*cos + rotate_half(x)*sin at the token's position), k's rotated
                  into k_cache[slots[t]], v copied to v_cache[slots[t]]; caches [num_slots, KV, D]
  silu_mul        gu [T, 2N] as the fused gate/up projection writes it: out[t] = silu(gate) * up, [T, N]
  decode_attention one query token per row against its context in the paged cache:
                  out[t, h] = softmax(q[t, h]·K[b, g]ᵀ * scale)·V[b, g] with g = h / (H / KV) (GQA),
                  row b's keys 0..context_lens[b]-1 in the blocks blocks[b, :] (key j at slot
                  blocks[b, j / block_size] * block_size + j % block_size); t = token_index[b]
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_simd.h"

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

/* Slot of key j of a row whose blocks are blk. */
#define KEY_SLOT(blk, j, block_size) ((blk)[(j) / (block_size)] * (block_size) + (j) % (block_size))

/* Keys ahead whose head of K or V is prefetched: a head's D floats of one key lie KV * D apart from the
   next key's, in blocks anywhere in the cache, and a step's caches come cold from DRAM behind the
   weights (8 rows at context ~80: decode attention 9% of SmolLM2's decode step without). */
#define KEY_PREFETCH 8

static inline void prefetch_head(const float *p, long D) {
    for (long d = 0; d < D; d += 16)
        _mm_prefetch((const char *)(p + d), _MM_HINT_T0);
}

/* p[i * ldp + j] = scale * q_i·k_j for the G query heads of q (rows of D) and keys 0..L-1 of one KV head.
   Four keys at a time where D is a multiple of 8: four independent FMA chains, not one waiting on its own
   latency. */
static void scores(const float *q, long G, long D, const float *cache, long KV, long g, const int64_t *blk,
                   long block_size, long L, float scale, float *p, long ldp) {
    long j = 0;
    if (D % 8 == 0) {
        for (; j + 4 <= L; j += 4) {
            const float *k[4];
            for (int u = 0; u < 4; u++) {
                k[u] = cache + (KEY_SLOT(blk, j + u, block_size) * KV + g) * D;
                if (j + KEY_PREFETCH + u < L)
                    prefetch_head(cache + (KEY_SLOT(blk, j + KEY_PREFETCH + u, block_size) * KV + g) * D, D);
            }
            for (long i = 0; i < G; i++) {
                const float *qi = q + i * D;
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                for (long d = 0; d < D; d += 8) {
                    __m256 qv = _mm256_loadu_ps(qi + d);
                    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + d), a0);
                    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + d), a1);
                    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + d), a2);
                    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + d), a3);
                }
                float *pi = p + i * ldp + j;
                pi[0] = hsum(a0) * scale, pi[1] = hsum(a1) * scale, pi[2] = hsum(a2) * scale, pi[3] = hsum(a3) * scale;
            }
        }
    }
    for (; j < L; j++) {
        const float *k = cache + (KEY_SLOT(blk, j, block_size) * KV + g) * D;
        for (long i = 0; i < G; i++)
            p[i * ldp + j] = dot_f32(q + i * D, k, D) * scale;
    }
}

/* p[j] = e^(p[j] - max p) over L; returns their sum. */
static float softmax_numerators(float *p, long L) {
    float m = -INFINITY;
    for (long j = 0; j < L; j++)
        m = p[j] > m ? p[j] : m;
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    long j = 0;
    for (; j + 8 <= L; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), mv));
        _mm256_storeu_ps(p + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; j < L; j++) {
        p[j] = expf(p[j] - m);
        sum += p[j];
    }
    return sum;
}

/* o = (sum_j p[j] * v_j) / sum over keys 0..L-1 of one KV head; for D = 64 and 128 (most Llama-family
   heads) the D outputs stay in registers through the sum. */
#define WEIGHTED_SUM(NV)                                                                                                \
    static void weighted_sum_##NV(const float *p, float inv, const float *cache, long KV, long g, const int64_t *blk, \
                                  long block_size, long L, float *o) {                                                 \
        __m256 acc[NV];                                                                                                 \
        for (int v = 0; v < NV; v++)                                                                                    \
            acc[v] = _mm256_setzero_ps();                                                                               \
        for (long j = 0; j < L; j++) {                                                                                  \
            const float *vj = cache + (KEY_SLOT(blk, j, block_size) * KV + g) * 8 * NV;                                 \
            if (j + KEY_PREFETCH < L)                                                                                   \
                prefetch_head(cache + (KEY_SLOT(blk, j + KEY_PREFETCH, block_size) * KV + g) * 8 * NV, 8 * NV);         \
            __m256 pj = _mm256_set1_ps(p[j]);                                                                           \
            for (int v = 0; v < NV; v++)                                                                                \
                acc[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * v), acc[v]);                                      \
        }                                                                                                               \
        for (int v = 0; v < NV; v++)                                                                                    \
            _mm256_storeu_ps(o + 8 * v, _mm256_mul_ps(acc[v], _mm256_set1_ps(inv)));                                    \
    }
WEIGHTED_SUM(8)
WEIGHTED_SUM(16)

static void weighted_sum(const float *p, float inv, const float *cache, long KV, long g, const int64_t *blk, long block_size,
                         long L, long D, float *o) {
    if (D == 64)
        return weighted_sum_8(p, inv, cache, KV, g, blk, block_size, L, o);
    if (D == 128)
        return weighted_sum_16(p, inv, cache, KV, g, blk, block_size, L, o);
    for (long d = 0; d < D; d++)
        o[d] = 0.0f;
    for (long j = 0; j < L; j++) {
        const float *vj = cache + (KEY_SLOT(blk, j, block_size) * KV + g) * D;
        for (long d = 0; d < D; d++)
            o[d] += p[j] * vj[d];
    }
    for (long d = 0; d < D; d++)
        o[d] *= inv;
}

void decode_attention(const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache,
                      const int64_t *blocks, long ldb, const int64_t *context_lens, long B, long H, long KV, long D,
                      long block_size, float scale, float *out, long ldo, int num_threads) {
    long G = H / KV, max_len = 0;
    for (long b = 0; b < B; b++)
        max_len = context_lens[b] > max_len ? context_lens[b] : max_len;
#pragma omp parallel num_threads(num_threads) if (B * KV > 1)
    {
        float *p = malloc(sizeof(float) * (G * max_len + 8)); /* scores, then their exponentials: [G, L] */
#pragma omp for collapse(2) schedule(static)
        for (long b = 0; b < B; b++) {
            for (long g = 0; g < KV; g++) {
                long L = context_lens[b], t = token_index ? token_index[b] : b;
                const int64_t *blk = blocks + b * ldb;
                scores(q + t * ldq + g * G * D, G, D, k_cache, KV, g, blk, block_size, L, scale, p, max_len);
                for (long i = 0; i < G; i++) {
                    float sum = softmax_numerators(p + i * max_len, L);
                    weighted_sum(p + i * max_len, 1.0f / sum, v_cache, KV, g, blk, block_size, L, D, out + t * ldo + (g * G + i) * D);
                }
            }
        }
        free(p);
    }
}
