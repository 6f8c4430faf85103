/* Small-batch matmuls for x86-64 CPUs with AVX2, FMA and F16C: the base's projections while a step
has few rows, and the LoRA shrink and expand over float16 adapter weights.

Why hand-written: a decode step reads every weight once for a handful of rows, so it is bound by
memory bandwidth, and MKL's sgemm does not stream at it for such shapes. `lora-serve bench matmuls`
on a 2-vCPU EPYC (SmolLM2-135M's projections and LM head, weights cold in DRAM, 2 threads): 1.8x
torch's F.linear at 1 row, 2.1-2.4x at 8, 1.6x at 32, 1.3x at 64, even at 96 (model/linear.py's
MAX_KERNEL_ROWS). For adapters, torch has no matmul that reads float16 and accumulates in float32 on
these CPUs (its float16 bmm is several times slower than float32's), and upcasting first reads the
weights twice; here the conversion happens in registers (vcvtph2ps).

Every output element is one dot product accumulated in float32 in a fixed order (8 lanes, then a
horizontal sum), whatever the number of rows: a row's result does not depend on its batch.
Built at run time by cpu_kernels.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp; libgomp is the one torch
loaded). Row-major; "rows of stride ld" means row i starts at p + i * ld, columns contiguous.

  linear  y[m, n] = sum_k x[m, k] * W[n, k]            x: fp32 [M, K] rows of stride ldx, W: fp32 [N, K]
                                                       contiguous, y: fp32 [M, N] rows of stride ldy
  shrink  per segment of rows, x·Aᵀ of its adapter, scaled per column      (lora_shrink_seg_f16)
  expand  per segment and output slice, y += (x·Aᵀ)·Bᵀ of its adapter      (lora_expand_seg_f16)
          adapters are read where they lie (arrays of pointers): nothing is stacked, gathered or padded.
*/
#include <immintrin.h>
#include <math.h>
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

/* sum_k a[k] * x[k] over n elements, a in float16 (two accumulators: the FMA's latency, not its
   throughput, bounds one chain). */
static inline float dot_f16(const uint16_t *a, const float *x, long n) {
    __m256 acc = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= n; k += 16) {
        acc = _mm256_fmadd_ps(load_f16(a + k), _mm256_loadu_ps(x + k), acc);
        acc1 = _mm256_fmadd_ps(load_f16(a + k + 8), _mm256_loadu_ps(x + k + 8), acc1);
    }
    for (; k + 8 <= n; k += 8)
        acc = _mm256_fmadd_ps(load_f16(a + k), _mm256_loadu_ps(x + k), acc);
    float s = hsum(_mm256_add_ps(acc, acc1));
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

/* The LoRA shrink over a step's segments: rows [lo[s], hi[s]) use adapter s, whose A is fp16 [R[s], K]
   at A[s] and whose per-column scales are fp32 [R[s]] at scale[s]. out[t, r] = scale[s][r] * x[t]·A[s][r]
   for r < R[s] (out: fp32 rows of stride ldo >= max R; other columns and rows are not written). */
void lora_shrink_seg_f16(const float *x, long ldx, long K, long S, const long *lo, const long *hi,
                         const uint16_t *const *A, const long *R, const float *const *scale,
                         float *out, long ldo, long max_r, int num_threads) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(num_threads)
    for (long s = 0; s < S; s++) {
        for (long r = 0; r < max_r; r++) {
            if (r >= R[s])
                continue;
            const uint16_t *a = A[s] + r * K; /* read once from memory, then from L1 for each row */
            float sc = scale[s][r];
            for (long t = lo[s]; t < hi[s]; t++)
                out[t * ldo + r] = sc * dot_f16(a, x + t * ldx, K);
        }
    }
}

#define OUT_BLOCK 64 /* outputs per task: enough tasks for the threads when a step has few segments */

/* The LoRA expand over tasks, one per (segment, targeted output slice): for rows [lo[i], hi[i]),
   y[t, ycol[i] + o] += sum_j h[t, hcol[i] + j] * B[i][j, o] for o < O[i], j < r[i], with B fp16 [r[i], O[i]]
   (the transpose of PEFT's B: each rank's row is added to 64 outputs held in 8 registers, no horizontal sums).
   Tasks of one call write disjoint parts of y (segments of a pass share no row; slices share no column). */
void lora_expand_seg_f16(const float *h, long ldh, float *y, long ldy, long n,
                         const long *lo, const long *hi, const long *hcol, const long *r,
                         const uint16_t *const *B, const long *ycol, const long *O, long max_blocks, int num_threads) {
#pragma omp parallel for collapse(2) schedule(dynamic, 4) num_threads(num_threads)
    for (long i = 0; i < n; i++) {
        for (long ob = 0; ob < max_blocks; ob++) {
            long o0 = ob * OUT_BLOCK, width = O[i] - o0 < OUT_BLOCK ? O[i] - o0 : OUT_BLOCK;
            if (width <= 0)
                continue;
            const uint16_t *b = B[i] + o0; /* rank j's outputs at b + j * O[i] */
            for (long t = lo[i]; t < hi[i]; t++) {
                float *yr = y + t * ldy + ycol[i] + o0;
                const float *hr = h + t * ldh + hcol[i];
                if (width == OUT_BLOCK) {
                    __m256 acc[8];
                    for (int q = 0; q < 8; q++)
                        acc[q] = _mm256_loadu_ps(yr + 8 * q);
                    for (long j = 0; j < r[i]; j++) {
                        __m256 hv = _mm256_set1_ps(hr[j]);
                        const uint16_t *bj = b + j * O[i];
                        for (int q = 0; q < 8; q++)
                            acc[q] = _mm256_fmadd_ps(load_f16(bj + 8 * q), hv, acc[q]);
                    }
                    for (int q = 0; q < 8; q++)
                        _mm256_storeu_ps(yr + 8 * q, acc[q]);
                } else { /* the last, narrower block of a slice whose width is not a multiple of 64 */
                    for (long o = 0; o < width; o++) {
                        float acc = yr[o];
                        for (long j = 0; j < r[i]; j++)
                            acc = fmaf(_cvtsh_ss(b[j * O[i] + o]), hr[j], acc);
                        yr[o] = acc;
                    }
                }
            }
        }
    }
}
