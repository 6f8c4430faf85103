/* Small-batch matmuls for x86-64 CPUs with AVX2, FMA and F16C: the base's projections while a step
has few rows, and the LoRA shrink and expand over float16 adapter weights.

Why hand-written: a decode step reads every weight once for a handful of rows, so it is bound by
memory bandwidth, and MKL's sgemm does not stream at it for such shapes. Measured on a 2-vCPU EPYC
(SmolLM2-135M's projections and lm_head, weights cold in DRAM, 2 threads): 79 -> 41 ms at 1 row,
161 -> 65 ms at 8, 260 -> 162 ms at 32; even past 128 rows, where MKL catches up. For adapters,
torch has no matmul that reads float16 and accumulates in float32 on these CPUs (its float16 bmm is
several times slower than float32's), and upcasting first reads the weights twice; here the
conversion happens in registers (vcvtph2ps).

Every output element is one dot product accumulated in float32 in a fixed order (8 lanes, then a
horizontal sum), whatever the number of rows: a row's result does not depend on its batch.
Built at run time by cpu_kernels.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp; libgomp is the one torch
loaded). Row-major; "rows of stride ld" means row i starts at p + i * ld, columns contiguous.

  linear  y[m, n] = sum_k x[m, k] * W[n, k]            x: fp32 [M, K] rows of stride ldx, W: fp32 [N, K]
                                                       contiguous, y: fp32 [M, N] rows of stride ldy
  shrink  out[row, r] = sum_k x[row, k] * A[g, r, k]   row = g * M + i; x: fp32 rows of stride ldx,
                                                       A: fp16 [G, R, K], out: fp32 [G * M, R] contiguous
  expand  y[row, o] += sum_j h[row, j] * B[g, o, j]    h: fp32 rows of stride ldh (r columns read),
                                                       B: fp16 [G, O, r], y: fp32 rows of stride ldy
*/
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_k a[k] * x[k] over n elements, both float32. */
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

static inline __m256 load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

/* sum_k a[k] * x[k] over n elements, a in float16. */
static inline float dot_f16(const uint16_t *a, const float *x, long n) {
    __m256 acc = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(load_f16(a + k), _mm256_loadu_ps(x + k), acc);
    float s = hsum(acc);
    for (; k < n; k++)
        s += _cvtsh_ss(a[k]) * x[k];
    return s;
}

/* Two weight rows (w0, w1) against four rows of x: eight accumulators, each weight vector loaded once
   per four rows. The k loop and the tail are those of dot_f32, so results equal the one-row path's. */
static inline void tile_2x4(const float *w0, const float *w1, const float *x, long ldx, float *y, long ldy, long K) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 b0 = _mm256_loadu_ps(w0 + k), b1 = _mm256_loadu_ps(w1 + k), v;
        v = _mm256_loadu_ps(x0 + k), a00 = _mm256_fmadd_ps(b0, v, a00), a01 = _mm256_fmadd_ps(b1, v, a01);
        v = _mm256_loadu_ps(x1 + k), a10 = _mm256_fmadd_ps(b0, v, a10), a11 = _mm256_fmadd_ps(b1, v, a11);
        v = _mm256_loadu_ps(x2 + k), a20 = _mm256_fmadd_ps(b0, v, a20), a21 = _mm256_fmadd_ps(b1, v, a21);
        v = _mm256_loadu_ps(x3 + k), a30 = _mm256_fmadd_ps(b0, v, a30), a31 = _mm256_fmadd_ps(b1, v, a31);
    }
    float s[8] = {hsum(a00), hsum(a01), hsum(a10), hsum(a11), hsum(a20), hsum(a21), hsum(a30), hsum(a31)};
    for (; k < K; k++) {
        for (int i = 0; i < 4; i++) {
            float xv = x[i * ldx + k];
            s[2 * i] += w0[k] * xv;
            s[2 * i + 1] += w1[k] * xv;
        }
    }
    for (int i = 0; i < 4; i++) {
        y[i * ldy] = s[2 * i];
        y[i * ldy + 1] = s[2 * i + 1];
    }
}

void linear_f32(const float *x, long ldx, const float *W, float *y, long ldy, long M, long N, long K, int num_threads) {
    /* Parallel over pairs of output columns: each weight row is read from memory once, by one thread. */
    long pairs = (N + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < pairs; p++) {
        long n = 2 * p;
        const float *w0 = W + n * K;
        if (n + 1 == N) { /* odd N: the last column alone */
            for (long m = 0; m < M; m++)
                y[m * ldy + n] = dot_f32(w0, x + m * ldx, K);
            continue;
        }
        long m = 0;
        for (; m + 4 <= M; m += 4)
            tile_2x4(w0, w0 + K, x + m * ldx, ldx, y + m * ldy + n, ldy, K);
        for (; m < M; m++) {
            y[m * ldy + n] = dot_f32(w0, x + m * ldx, K);
            y[m * ldy + n + 1] = dot_f32(w0 + K, x + m * ldx, K);
        }
    }
}

void lora_shrink_f16(const float *x, long ldx, const uint16_t *A, float *out,
                     long G, long M, long K, long R, int num_threads) {
    /* Each (group, rank) pair reads its row of A once and applies it to the group's M rows. */
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (long g = 0; g < G; g++) {
        for (long r = 0; r < R; r++) {
            const uint16_t *a = A + (g * R + r) * K;
            for (long i = 0; i < M; i++) {
                long row = g * M + i;
                out[row * R + r] = dot_f16(a, x + row * ldx, K);
            }
        }
    }
}

#define OUT_BLOCK 64 /* outputs per task: enough tasks for the threads when G * M is 1 */

void lora_expand_f16(const float *h, long ldh, const uint16_t *B, float *y, long ldy,
                     long G, long M, long O, long r, int num_threads) {
    long blocks = (O + OUT_BLOCK - 1) / OUT_BLOCK;
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (long g = 0; g < G; g++) {
        for (long ob = 0; ob < blocks; ob++) {
            long end = (ob + 1) * OUT_BLOCK < O ? (ob + 1) * OUT_BLOCK : O;
            for (long o = ob * OUT_BLOCK; o < end; o++) {
                const uint16_t *b = B + (g * O + o) * r;
                for (long i = 0; i < M; i++) {
                    long row = g * M + i;
                    y[row * ldy + o] += dot_f16(b, h + row * ldh, r);
                }
            }
        }
    }
}
