/* Small-batch matmuls for x86-64 CPUs with AVX2, FMA and F16C: the base's projections while a step
has few rows, and the LoRA shrink and expand over float16 adapter weights.

Why hand-written: a decode step reads every weight once for a handful of rows, so it is bound by
memory bandwidth, and MKL's sgemm does not stream at it for such shapes. `lora-serve bench matmuls`
on a 2-vCPU EPYC (SmolLM2-135M's projections and LM head, weights cold in DRAM, 2 threads): 1.8x
torch's F.linear at 1 row, 2.1-2.4x at 8, 1.6x at 32, 1.3x at 64, even at 96; on a Xeon with AVX-512,
which MKL uses, only around 8 rows (model/kernel_rows.py measures where they win). For adapters, torch has no matmul that reads float16 and accumulates in float32 on
these CPUs (its float16 bmm is several times slower than float32's), and upcasting first reads the
weights twice; here the conversion happens in registers (vcvtph2ps).

Every output element is one dot product accumulated in float32 in a fixed order (8 lanes, or 16 where
the CPU has AVX-512, then a horizontal sum), whatever the number of rows: a row's result does not
depend on its batch.
Built at run time by cpu_kernels.py (cc -O3 -mavx2 -mfma -mf16c -fopenmp; libgomp is the one torch
loaded). Row-major; "rows of stride ld" means row i starts at p + i * ld, columns contiguous.

  linear  y[m, n] = sum_k x[m, k] * W[n, k]            x: fp32 [M, K] rows of stride ldx, W: fp32 [N, K]
                                                       contiguous, y: fp32 [M, N] rows of stride ldy
  linear_q8  the same with W int8 [N, K] and y[m, n] = scales[n] * sum_k x[m, k] * W[n, k] (per-output-
          channel symmetric int8, model/quantized_weight.py)
  linear_q4  the same with W 4-bit: per row K / 2 bytes, in runs of 16 bytes that hold 32 weights (byte j:
          weight j in its low nibble, weight j + 16 in its high one); W[n, k] = q * scales[n, g] + mins[n, g]
          for the group g = k / G (G a multiple of 32); summed per group as scales·(q·x) + mins·(x's sum
          over the group), the dequantized weights' product regrouped
  lora    per segment of rows, y += scale·(x·Aᵀ)·Bᵀ of its adapter (lora_seg_f16): the shrink, then the
          expand, in one parallel region; adapters are read where they lie (a table of pointers by
          slot): nothing is stacked, gathered or padded. A segment's rows run in tiles (AVX-512 ones
          where the CPU has it) that give each row the bits it gets alone, on either path.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "cpu_simd.h"

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

/* Weight rows ahead of the ones being multiplied are prefetched: with few rows of x the loads of the
   weights and the FMAs on them did not overlap (a step's matmuls at 8 rows, SmolLM2-135M, 2-vCPU Xeon:
   35.0 ms without, 29.5 ms with; docs/benchmarks.md), though each weight row is read in one sequential run.
   PREFETCH_TILES tiles ahead: far enough to cover DRAM's latency, near enough to stay in L1. */
#define PREFETCH_TILES 2

static inline void prefetch_bytes(const void *p, long bytes) {
    for (long i = 0; i < bytes; i += 64)
        _mm_prefetch((const char *)p + i, _MM_HINT_T0);
}

/* Column k of two float16 rows n apart (pf, pf + n), a cache line of each; pf 0: nothing. */
static inline void prefetch_two_rows_f16(const uint16_t *pf, long n, long k) {
    if (pf) {
        _mm_prefetch((const char *)(pf + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(pf + n + k), _MM_HINT_T0);
    }
}

/* Two weight rows (w0, w1) against four rows of x: eight accumulators, each weight vector loaded once
   per four rows; pf: the two rows to prefetch, a cache line of each per 16 columns. The k loop and the
   tail are those of dot_f32, so results equal the one-row path's. */
static inline void tile_2x4(const float *w0, const float *w1, const float *x, long ldx, float *y, long ldy, long K, const float *pf) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        if ((k & 15) == 0) {
            _mm_prefetch((const char *)(pf + k), _MM_HINT_T0);
            _mm_prefetch((const char *)(pf + K + k), _MM_HINT_T0);
        }
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

void linear_f32_avx2(const float *x, long ldx, const float *W, float *y, long ldy, long M, long N, long K, int num_threads) {
    /* Parallel over pairs of output columns: each weight row is read from memory once, by one thread. */
    long pairs = (N + 1) / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < pairs; p++) {
        long n = 2 * p;
        const float *w0 = W + n * K;
        const float *pf = n + 2 * PREFETCH_TILES + 1 < N ? W + (n + 2 * PREFETCH_TILES) * K : w0;
        if (n + 1 == N) { /* odd N: the last column alone */
            for (long m = 0; m < M; m++)
                y[m * ldy + n] = dot_f32(w0, x + m * ldx, K);
            continue;
        }
        if (M < 4)
            prefetch_bytes(pf, 2 * K * (long)sizeof(float));
        long m = 0;
        for (; m + 4 <= M; m += 4)
            tile_2x4(w0, w0 + K, x + m * ldx, ldx, y + m * ldy + n, ldy, K, m == 0 ? pf : w0);
        for (; m < M; m++) {
            y[m * ldy + n] = dot_f32(w0, x + m * ldx, K);
            y[m * ldy + n + 1] = dot_f32(w0 + K, x + m * ldx, K);
        }
    }
}

/* With AVX-512 (decided at run time, so one build runs on every x86-64 CPU with AVX2): 16 lanes, and
   tiles of 4 weight rows x 8, 4 or 1 rows of x. Every output element is still one chain of FMAs over
   k in steps of 16, then the same reduction and the same scalar tail, whatever the tile: a row's result
   does not depend on its batch here either (it does differ from the AVX2 path's in the last bits).
   8 rows, SmolLM2-135M, 2-vCPU Xeon: 23.9 ms against the AVX2 path's 29.5 (both prefetching). */
#define TILE512(R, C)                                                                                                     \
    __attribute__((target("avx512f"))) static void tile512_##R##x##C(const float *w, const float *x, long ldx, float *y, \
                                                                     long ldy, long K, const float *pf) {               \
        __m512 a[R][C];                                                                                                   \
        for (int r = 0; r < R; r++)                                                                                       \
            for (int c = 0; c < C; c++)                                                                                   \
                a[r][c] = _mm512_setzero_ps();                                                                            \
        long k = 0;                                                                                                       \
        for (; k + 16 <= K; k += 16) {                                                                                    \
            __m512 b[R];                                                                                                  \
            for (int r = 0; r < R; r++) {                                                                                 \
                b[r] = _mm512_loadu_ps(w + r * K + k);                                                                    \
                _mm_prefetch((const char *)(pf + r * K + k), _MM_HINT_T0);                                                \
            }                                                                                                             \
            for (int c = 0; c < C; c++) {                                                                                 \
                __m512 v = _mm512_loadu_ps(x + c * ldx + k);                                                              \
                for (int r = 0; r < R; r++)                                                                               \
                    a[r][c] = _mm512_fmadd_ps(b[r], v, a[r][c]);                                                          \
            }                                                                                                             \
        }                                                                                                                 \
        for (int r = 0; r < R; r++)                                                                                       \
            for (int c = 0; c < C; c++) {                                                                                 \
                float s = _mm512_reduce_add_ps(a[r][c]);                                                                  \
                for (long kk = k; kk < K; kk++)                                                                           \
                    s += w[r * K + kk] * x[c * ldx + kk];                                                                 \
                y[c * ldy + r] = s;                                                                                       \
            }                                                                                                             \
    }
TILE512(4, 8)
TILE512(4, 4)
TILE512(4, 1)
TILE512(1, 8)
TILE512(1, 4)
TILE512(1, 1)

__attribute__((target("avx512f"))) static void linear_f32_avx512(const float *x, long ldx, const float *W, float *y, long ldy,
                                                                 long M, long N, long K, int num_threads) {
    long groups = (N + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (long p = 0; p < groups; p++) {
        long n = 4 * p;
        const float *w = W + n * K;
        const float *pf = n + 4 * PREFETCH_TILES + 4 <= N ? W + (n + 4 * PREFETCH_TILES) * K : w;
        if (n + 4 > N) { /* the last 1-3 columns, one at a time */
            for (; n < N; n++, w += K) {
                long m = 0;
                for (; m + 8 <= M; m += 8)
                    tile512_1x8(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, w);
                for (; m + 4 <= M; m += 4)
                    tile512_1x4(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, w);
                for (; m < M; m++)
                    tile512_1x1(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, w);
            }
            continue;
        }
        long m = 0;
        for (; m + 8 <= M; m += 8, pf = w)
            tile512_4x8(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, pf);
        for (; m + 4 <= M; m += 4, pf = w)
            tile512_4x4(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, pf);
        for (; m < M; m++, pf = w)
            tile512_4x1(w, x + m * ldx, ldx, y + m * ldy + n, ldy, K, pf);
    }
}

/* linear_f32_avx2 is exported too: the same results on every x86-64 CPU, and the path tests check on an AVX-512 one. */
void linear_f32(const float *x, long ldx, const float *W, float *y, long ldy, long M, long N, long K, int num_threads) {
    if (has_avx512())
        linear_f32_avx512(x, ldx, W, y, ldy, M, N, K, num_threads);
    else
        linear_f32_avx2(x, ldx, W, y, ldy, M, N, K, num_threads);
}

/* Quantized weights: each weight row is converted to float32 in registers once per tile of rows of x
   (4, or 8 in 16 lanes where the CPU has AVX-512), so a decode step reads 1 byte (int8) or ~0.6 bytes
   (int4) per weight instead of 4. Parallel over output columns; within a column the order of the sums
   is fixed, as in linear_f32, and the same on both paths: a 16-lane accumulator's lanes 0-7 and 8-15
   are the AVX2 path's two chains (even and odd runs of 8), fed in the same order, and the tail and the
   reduction are shared. linear_q8_avx2 and linear_q4_avx2 are exported too, as linear_f32_avx2 is. */
#define Q_ROWS 4
#define Q_ROWS_512 8
#define Q_PREFETCH_ROWS 8 /* weight rows ahead, prefetched whole as a row starts (see PREFETCH_TILES) */

static inline __m256 load_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* The two 8-lane halves of a 16-lane accumulator, added: the AVX2 path's two chains, added. */
__attribute__((target("avx512f"))) static inline __m256 add_halves(__m512 v) {
    return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

/* int8: a row's chains a0 (even runs of 8) and a1 (odd), from k on: the run of 8 and the scalars past them. */
static inline float q8_finish(__m256 a0, __m256 a1, const int8_t *w, const float *xr, long k, long K) {
    if (k + 8 <= K) {
        a0 = _mm256_fmadd_ps(load_q8(w + k), _mm256_loadu_ps(xr + k), a0);
        k += 8;
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < K; k++)
        s += (float)w[k] * xr[k];
    return s;
}

/* One weight row w against `rows` rows of x (xr, rows of stride ldx); y[i * ldy] = scale · w·x_i. */

static inline __attribute__((always_inline)) void q8_tile_avx2(const int8_t *w, float scale, const float *xr, long ldx, int rows, float *y, long ldy, long K) {
    __m256 acc[Q_ROWS][2]; /* two chains a row: one FMA chain would wait on its own latency */
    for (int i = 0; i < Q_ROWS; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0 = load_q8(w + k), w1 = load_q8(w + k + 8);
        for (int i = 0; i < rows; i++) {
            acc[i][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr + i * ldx + k), acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + i * ldx + k + 8), acc[i][1]);
        }
    }
    for (int i = 0; i < rows; i++)
        y[i * ldy] = scale * q8_finish(acc[i][0], acc[i][1], w, xr + i * ldx, k, K);
}

__attribute__((target("avx512f"), always_inline)) static inline void q8_tile_avx512(const int8_t *w, float scale, const float *xr, long ldx, int rows,
                                                              float *y, long ldy, long K) {
    __m512 acc[Q_ROWS_512];
    for (int i = 0; i < Q_ROWS_512; i++)
        acc[i] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
        for (int i = 0; i < rows; i++)
            acc[i] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xr + i * ldx + k), acc[i]);
    }
    for (int i = 0; i < rows; i++) {
        __m256 a0 = _mm512_castps512_ps256(acc[i]), a1 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1));
        y[i * ldy] = scale * q8_finish(a0, a1, w, xr + i * ldx, k, K);
    }
}

/* The loop over weight rows, once per ISA so that its tile is inlined (a call per tile cost ~10% at 8 rows). */
#define LINEAR_Q8_RUN(NAME, TILE, TILE_ROWS, ...)                                                                           \
    __VA_ARGS__ static void NAME(const float *x, long ldx, const int8_t *W, const float *scales, float *y, long ldy, long M, \
                                 long N, long K, int num_threads) {                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads)") for (long n = 0; n < N; n++) {              \
            const int8_t *w = W + n * K;                                                                                    \
            if (n + Q_PREFETCH_ROWS < N)                                                                                    \
                prefetch_bytes(w + Q_PREFETCH_ROWS * K, K);                                                                 \
            for (long m0 = 0; m0 < M; m0 += TILE_ROWS)                                                                      \
                TILE(w, scales[n], x + m0 * ldx, ldx, M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS, y + m0 * ldy + n,   \
                     ldy, K);                                                                                               \
        }                                                                                                                   \
    }
LINEAR_Q8_RUN(linear_q8_run_avx2, q8_tile_avx2, Q_ROWS)
LINEAR_Q8_RUN(linear_q8_run_avx512, q8_tile_avx512, Q_ROWS_512, __attribute__((target("avx512f"))))

void linear_q8_avx2(const float *x, long ldx, const int8_t *W, const float *scales, float *y, long ldy,
                    long M, long N, long K, int num_threads) {
    linear_q8_run_avx2(x, ldx, W, scales, y, ldy, M, N, K, num_threads);
}

void linear_q8(const float *x, long ldx, const int8_t *W, const float *scales, float *y, long ldy,
               long M, long N, long K, int num_threads) {
    if (has_avx512())
        linear_q8_run_avx512(x, ldx, W, scales, y, ldy, M, N, K, num_threads);
    else
        linear_q8_avx2(x, ldx, W, scales, y, ldy, M, N, K, num_threads);
}

/* int4: sum_k W[n, k]·x[k] = sum_g (scales[n, g]·sum_{k in g} q·x + mins[n, g]·xsum[g]): the inner loop
   is one conversion and one FMA per weight and row; xsum (x's sum over each group, [M, K / G]) comes in.
   A tile takes one weight row (packed w, its groups' scales sc and mins mn) against `rows` rows of x. */

static inline float q4_finish(__m256 acc, const float *mn, const float *xs, long groups) {
    float v = hsum(acc);
    for (long g = 0; g < groups; g++)
        v += mn[g] * xs[g];
    return v;
}

static inline __attribute__((always_inline)) void q4_tile_avx2(const uint8_t *w, const float *sc, const float *mn, const float *xr, long ldx, const float *xs,
                         int rows, float *y, long ldy, long K, long G) {
    const __m128i low = _mm_set1_epi8(0x0F);
    long groups = K / G;
    __m256 acc[Q_ROWS], part[Q_ROWS][2]; /* part: the group's q·x, two chains a row, as in int8 */
    for (int i = 0; i < Q_ROWS; i++)
        acc[i] = _mm256_setzero_ps();
    for (long g = 0; g < groups; g++) {
        for (int i = 0; i < Q_ROWS; i++)
            part[i][0] = part[i][1] = _mm256_setzero_ps();
        for (long k = g * G; k < (g + 1) * G; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w + k / 2));
            __m128i lo = _mm_and_si128(b, low), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low);
            __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int p = 0; p < 4; p++) {
                __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p]));
                for (int i = 0; i < rows; i++)
                    part[i][p & 1] = _mm256_fmadd_ps(q, _mm256_loadu_ps(xr + i * ldx + k + 8 * p), part[i][p & 1]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int i = 0; i < rows; i++)
            acc[i] = _mm256_fmadd_ps(_mm256_add_ps(part[i][0], part[i][1]), s, acc[i]);
    }
    for (int i = 0; i < rows; i++)
        y[i * ldy] = q4_finish(acc[i], mn, xs + i * groups, groups);
}

/* A run of 32 weights widened as two 16-lane vectors: low nibbles (weights 0-15), then high (16-31). */
__attribute__((target("avx512f"), always_inline)) static inline void q4_tile_avx512(const uint8_t *w, const float *sc, const float *mn, const float *xr,
                                                              long ldx, const float *xs, int rows, float *y, long ldy, long K, long G) {
    const __m128i low = _mm_set1_epi8(0x0F);
    long groups = K / G;
    __m256 acc[Q_ROWS_512];
    __m512 part[Q_ROWS_512];
    for (int i = 0; i < Q_ROWS_512; i++)
        acc[i] = _mm256_setzero_ps();
    for (long g = 0; g < groups; g++) {
        for (int i = 0; i < Q_ROWS_512; i++)
            part[i] = _mm512_setzero_ps();
        for (long k = g * G; k < (g + 1) * G; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)(w + k / 2));
            __m512 qlo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(b, low)));
            __m512 qhi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), low)));
            for (int i = 0; i < rows; i++) {
                part[i] = _mm512_fmadd_ps(qlo, _mm512_loadu_ps(xr + i * ldx + k), part[i]);
                part[i] = _mm512_fmadd_ps(qhi, _mm512_loadu_ps(xr + i * ldx + k + 16), part[i]);
            }
        }
        __m256 s = _mm256_set1_ps(sc[g]);
        for (int i = 0; i < rows; i++)
            acc[i] = _mm256_fmadd_ps(add_halves(part[i]), s, acc[i]);
    }
    for (int i = 0; i < rows; i++)
        y[i * ldy] = q4_finish(acc[i], mn, xs + i * groups, groups);
}

#define LINEAR_Q4_RUN(NAME, TILE, TILE_ROWS, ...)                                                                           \
    __VA_ARGS__ static void NAME(const float *x, long ldx, const uint8_t *W, const float *scales, const float *mins,        \
                                 const float *xsum, float *y, long ldy, long M, long N, long K, long G, int num_threads) { \
        long groups = K / G;                                                                                                \
        _Pragma("omp parallel for schedule(static) num_threads(num_threads)") for (long n = 0; n < N; n++) {              \
            const uint8_t *w = W + n * (K / 2);                                                                             \
            if (n + Q_PREFETCH_ROWS < N)                                                                                    \
                prefetch_bytes(w + Q_PREFETCH_ROWS * (K / 2), K / 2);                                                       \
            for (long m0 = 0; m0 < M; m0 += TILE_ROWS)                                                                      \
                TILE(w, scales + n * groups, mins + n * groups, x + m0 * ldx, ldx, xsum + m0 * groups,                     \
                     M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS, y + m0 * ldy + n, ldy, K, G);                         \
        }                                                                                                                   \
    }
LINEAR_Q4_RUN(linear_q4_run_avx2, q4_tile_avx2, Q_ROWS)
LINEAR_Q4_RUN(linear_q4_run_avx512, q4_tile_avx512, Q_ROWS_512, __attribute__((target("avx512f"))))

void linear_q4_avx2(const float *x, long ldx, const uint8_t *W, const float *scales, const float *mins, const float *xsum,
                    float *y, long ldy, long M, long N, long K, long G, int num_threads) {
    linear_q4_run_avx2(x, ldx, W, scales, mins, xsum, y, ldy, M, N, K, G, num_threads);
}

/* Below 4 rows the AVX2 path is faster (one row, SmolLM2-135M's step, 2-vCPU Xeon: 11.2-11.6 ms against
   13.5, `lora-serve bench quantization`); since both give the same bits, the choice may follow M. */
void linear_q4(const float *x, long ldx, const uint8_t *W, const float *scales, const float *mins, const float *xsum,
               float *y, long ldy, long M, long N, long K, long G, int num_threads) {
    if (has_avx512() && M >= 4)
        linear_q4_run_avx512(x, ldx, W, scales, mins, xsum, y, ldy, M, N, K, G, num_threads);
    else
        linear_q4_avx2(x, ldx, W, scales, mins, xsum, y, ldy, M, N, K, G, num_threads);
}

/* The LoRA delta of one pass's segments on one projection, in one parallel region: y += scale·(x·Aᵀ)·Bᵀ
   per segment, with that segment's adapter, read where it lies (pointers in the slot table).

   seg: S rows of (slot, lo, hi): rows [lo, hi) of x, h and y use the adapter in `slot`; a pass's
        segments share no row.
   slot_info: per slot (slot, 5 longs): address of A, fp16 [R, K] (0: the adapter does not target this
        projection), R, address of its column scales (fp32 [R]), first expand block, block count.
   blocks: per expand block (6 longs): first column of h (hcol), rank r, address of B at the block's
        first output (fp16 [r, O] rows of stride ldb, the transpose of PEFT's B: LoRAModel.packed's
        b_transposed), ldb, first output column of y (ycol), width <= 64.
   Shrink: h[t, c] = scale[c] * x[t]·A[c] for c < R (h: fp32 rows of stride ldh >= max R; other
   columns and rows are not written). Expand: y[t, ycol + o] += sum_j h[t, hcol + j] * B[j * ldb + o],
   each rank's row added to 64 outputs held in 8 registers (no horizontal sums).

   Shrink tasks take two ranks of a segment over all its rows. A decode row is alone in its segment, and
   reading its adapter is the cost, bound by how many lines a core keeps in flight more than by DRAM's
   bandwidth: one run of adapter rows at a time per thread, prefetched in bursts, read at ~17 GB/s where
   the base's weights stream at ~30. So one-row segments go in pairs, s with s + ceil(S/2): a task reads
   ranks c, c + 1 of both adapters (dot_f16_pair), and an expand task block q of both, in a static order,
   each thread walking two runs of memory and prefetching within the loads, a line at a time, what it
   reads next in each (SHRINK_AHEAD ranks on, EXPAND_AHEAD blocks on, into the next segment of the run
   at its end). One-row segments on SmolLM2-135M's qkv, 2-vCPU Xeon, cold: 64 adapters' call 414 ->
   325-355 us; a 16-adapter decode step's 120 LoRA calls 13.3-13.8 -> 10.7-11.0 ms (docs/benchmarks.md,
   "Two runs of adapter rows a thread"). Its expand tasks take one block of 64 outputs each. A prefill
   chunk's rows run in tiles (shrink: 2 ranks x 2 rows, expand: 4 rows x 16 outputs, and wider with
   AVX-512), so each converted weight register feeds several rows' FMAs and the FMAs, not the
   conversions and loads, bound the work; its expand tasks take a tile of rows over every block.
   Each output element sums in the same order in a tile as alone (dot_f16's two chains; the expand's
   ranks in order onto y), so a row's result does not depend on its segment's length.
   A step of 16 prompts of 64 tokens on 16 adapters, SmolLM2-135M, 2-vCPU Xeon: the LoRA calls of a
   layer took 0.30 of its base projections' time one row at a time, 0.14 in these tiles, and prefill
   went from 0.78x to 0.89x the base's (`lora-serve bench lora --num-seqs 16 --num-adapters 16`). */
#define OUT_BLOCK 64
#define SHRINK_AHEAD 8 /* ranks ahead (9 KB of A at K = 576); 4 to 32 timed alike */
#define EXPAND_AHEAD 2 /* blocks ahead (4 KB of B at rank 16); 1 to 4 timed alike */
#define EXPAND_ROWS 4 /* rows of an expand tile */
#define EXPAND_COLS 16 /* outputs of an expand tile: 2 registers a row */

static void expand_block(const float *hr, float *yr, const uint16_t *b, long ldb, long r, long width, const long *pf) {
    if (width == OUT_BLOCK) {
        __m256 acc[8];
        for (int q = 0; q < 8; q++)
            acc[q] = _mm256_loadu_ps(yr + 8 * q);
        for (long j = 0; j < r; j++) {
            if (pf && j < pf[1]) {
                const char *p = (const char *)((const uint16_t *)pf[2] + j * pf[3]);
                _mm_prefetch(p, _MM_HINT_T0);
                _mm_prefetch(p + 64, _MM_HINT_T0);
            }
            __m256 hv = _mm256_set1_ps(hr[j]);
            const uint16_t *bj = b + j * ldb;
            for (int q = 0; q < 8; q++)
                acc[q] = _mm256_fmadd_ps(load_f16(bj + 8 * q), hv, acc[q]);
        }
        for (int q = 0; q < 8; q++)
            _mm256_storeu_ps(yr + 8 * q, acc[q]);
        return;
    }
    for (long o = 0; o < width; o++) { /* the last, narrower block of a slice */
        float acc = yr[o];
        for (long j = 0; j < r; j++)
            acc = fmaf(_cvtsh_ss(b[j * ldb + o]), hr[j], acc);
        yr[o] = acc;
    }
}

/* expand_block for EXPAND_ROWS rows (h rows of stride ldh, y rows of stride ldy) of a full block: per
   16 outputs, each rank's two converted registers feed 4 rows. The same sums, in the same order. */
static void expand_block_rows(const float *h, long ldh, float *y, long ldy, const uint16_t *b, long ldb, long r) {
    for (long o = 0; o < OUT_BLOCK; o += EXPAND_COLS) {
        __m256 acc[EXPAND_ROWS][2];
        for (int i = 0; i < EXPAND_ROWS; i++) {
            acc[i][0] = _mm256_loadu_ps(y + i * ldy + o);
            acc[i][1] = _mm256_loadu_ps(y + i * ldy + o + 8);
        }
        for (long j = 0; j < r; j++) {
            __m256 b0 = load_f16(b + j * ldb + o), b1 = load_f16(b + j * ldb + o + 8);
            for (int i = 0; i < EXPAND_ROWS; i++) {
                __m256 hv = _mm256_set1_ps(h[i * ldh + j]);
                acc[i][0] = _mm256_fmadd_ps(b0, hv, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(b1, hv, acc[i][1]);
            }
        }
        for (int i = 0; i < EXPAND_ROWS; i++) {
            _mm256_storeu_ps(y + i * ldy + o, acc[i][0]);
            _mm256_storeu_ps(y + i * ldy + o + 8, acc[i][1]);
        }
    }
}

/* dot_f16 of two rows of A (a0, a1) with `rows` (1 or 2) rows of x (x0, x1): out[i][j] = a_i·x_j, each
   summed as dot_f16 sums it (K a multiple of 16; other K go through dot_f16). One row still runs four
   chains at once where dot_f16 runs two. */
static inline void dot_f16_2xn(const uint16_t *a0, const uint16_t *a1, const float *x0, const float *x1, long n, int rows,
                               float out[2][2], const uint16_t *pf) {
    __m256 acc[2][2][2]; /* [rank][row][chain] */
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++)
            acc[i][j][0] = acc[i][j][1] = _mm256_setzero_ps();
    for (long k = 0; k < n; k += 16) {
        if ((k & 31) == 0)
            prefetch_two_rows_f16(pf, n, k);
        for (int c = 0; c < 2; c++) {
            __m256 av0 = load_f16(a0 + k + 8 * c), av1 = load_f16(a1 + k + 8 * c);
            for (int j = 0; j < rows; j++) {
                __m256 xv = _mm256_loadu_ps((j ? x1 : x0) + k + 8 * c);
                acc[0][j][c] = _mm256_fmadd_ps(av0, xv, acc[0][j][c]);
                acc[1][j][c] = _mm256_fmadd_ps(av1, xv, acc[1][j][c]);
            }
        }
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < rows; j++)
            out[i][j] = hsum(_mm256_add_ps(acc[i][j][0], acc[i][j][1]));
}

/* Two adapters' ranks c, c + 1 (rows a and a + n of A1 and of A2) against one row of x each (x1, x2):
   out[j][i] = A_j[i]·x_j, each summed as dot_f16 sums it. The two adapters lie apart in memory: two runs
   read at once (see lora_seg). pf1, pf2: rows to prefetch for each (0: none), a line of each row per 32
   columns. */
static inline void dot_f16_pair(const uint16_t *A1, const uint16_t *A2, const float *x1, const float *x2, long n,
                                float out[2][2], const uint16_t *pf1, const uint16_t *pf2) {
    __m256 acc[2][2][2]; /* [adapter][rank][chain] */
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 2; i++)
            acc[j][i][0] = acc[j][i][1] = _mm256_setzero_ps();
    for (long k = 0; k < n; k += 16) {
        if ((k & 31) == 0) {
            prefetch_two_rows_f16(pf1, n, k);
            prefetch_two_rows_f16(pf2, n, k);
        }
        for (int c = 0; c < 2; c++) {
            __m256 xv1 = _mm256_loadu_ps(x1 + k + 8 * c), xv2 = _mm256_loadu_ps(x2 + k + 8 * c);
            acc[0][0][c] = _mm256_fmadd_ps(load_f16(A1 + k + 8 * c), xv1, acc[0][0][c]);
            acc[0][1][c] = _mm256_fmadd_ps(load_f16(A1 + n + k + 8 * c), xv1, acc[0][1][c]);
            acc[1][0][c] = _mm256_fmadd_ps(load_f16(A2 + k + 8 * c), xv2, acc[1][0][c]);
            acc[1][1][c] = _mm256_fmadd_ps(load_f16(A2 + n + k + 8 * c), xv2, acc[1][1][c]);
        }
    }
    for (int j = 0; j < 2; j++)
        for (int i = 0; i < 2; i++)
            out[j][i] = hsum(_mm256_add_ps(acc[j][i][0], acc[j][i][1]));
}

/* h[t, c] for the rows [lo, hi) and the ranks c, c + 1 (< R) of one adapter. */
static void shrink_ranks(const float *x, long ldx, long K, float *h, long ldh, const uint16_t *A, const float *scale,
                         long c, long R, long lo, long hi, const uint16_t *pf) {
    if (c + 1 < R && K % 16 == 0) {
        float out[2][2];
        long t = lo;
        for (; t + 2 <= hi; t += 2) {
            dot_f16_2xn(A + c * K, A + (c + 1) * K, x + t * ldx, x + (t + 1) * ldx, K, 2, out, t == lo ? pf : 0);
            for (int j = 0; j < 2; j++)
                for (int i = 0; i < 2; i++)
                    h[(t + j) * ldh + c + i] = scale[c + i] * out[i][j];
        }
        if (t < hi) {
            dot_f16_2xn(A + c * K, A + (c + 1) * K, x + t * ldx, x + t * ldx, K, 1, out, t == lo ? pf : 0);
            for (int i = 0; i < 2; i++)
                h[t * ldh + c + i] = scale[c + i] * out[i][0];
        }
        return;
    }
    for (long t = lo; t < hi; t++)
        for (long i = c; i < c + 2 && i < R; i++)
            h[t * ldh + i] = scale[i] * dot_f16(A + i * K, x + t * ldx, K);
}

/* With AVX-512, the tiles are wider and give the same bits. Shrink: 2 ranks x 4 rows, one 16-lane
   accumulator per pair, whose lanes 0-7 and 8-15 are dot_f16's two chains, added and summed as it adds
   and sums them. Expand: 4 rows x 64 outputs; each output still sums its ranks in order onto y. */
#define SHRINK_ROWS_512 4

__attribute__((target("avx512f"))) static inline __m512 load_f16_512(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

__attribute__((target("avx512f"))) static void shrink_ranks_512(const float *x, long ldx, long K, float *h, long ldh,
                                                                const uint16_t *A, const float *scale, long c, long t) {
    __m512 acc[2][SHRINK_ROWS_512];
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < SHRINK_ROWS_512; j++)
            acc[i][j] = _mm512_setzero_ps();
    const uint16_t *a0 = A + c * K, *a1 = a0 + K;
    for (long k = 0; k < K; k += 16) {
        __m512 av0 = load_f16_512(a0 + k), av1 = load_f16_512(a1 + k);
        for (int j = 0; j < SHRINK_ROWS_512; j++) {
            __m512 xv = _mm512_loadu_ps(x + (t + j) * ldx + k);
            acc[0][j] = _mm512_fmadd_ps(av0, xv, acc[0][j]);
            acc[1][j] = _mm512_fmadd_ps(av1, xv, acc[1][j]);
        }
    }
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < SHRINK_ROWS_512; j++) {
            h[(t + j) * ldh + c + i] = scale[c + i] * hsum(add_halves(acc[i][j]));
        }
}

__attribute__((target("avx512f"))) static void expand_block_rows_512(const float *h, long ldh, float *y, long ldy,
                                                                     const uint16_t *b, long ldb, long r) {
    __m512 acc[EXPAND_ROWS][4];
    for (int i = 0; i < EXPAND_ROWS; i++)
        for (int q = 0; q < 4; q++)
            acc[i][q] = _mm512_loadu_ps(y + i * ldy + 16 * q);
    for (long j = 0; j < r; j++) {
        __m512 bv[4];
        for (int q = 0; q < 4; q++)
            bv[q] = load_f16_512(b + j * ldb + 16 * q);
        for (int i = 0; i < EXPAND_ROWS; i++) {
            __m512 hv = _mm512_set1_ps(h[i * ldh + j]);
            for (int q = 0; q < 4; q++)
                acc[i][q] = _mm512_fmadd_ps(bv[q], hv, acc[i][q]);
        }
    }
    for (int i = 0; i < EXPAND_ROWS; i++)
        for (int q = 0; q < 4; q++)
            _mm512_storeu_ps(y + i * ldy + 16 * q, acc[i][q]);
}

/* The rows of A to prefetch while segment s's rows c, c + 1 are read: SHRINK_AHEAD ranks on in this
   thread's order, this adapter's, then those of segment `next` (-1: none). 0: nothing to prefetch. */
static const uint16_t *shrink_ahead(const long *seg, const long *slot_info, long K, long s, long next, long c) {
    const long *info = slot_info + 5 * seg[3 * s];
    if (c + SHRINK_AHEAD + 1 < info[1])
        return (const uint16_t *)info[0] + (c + SHRINK_AHEAD) * K;
    if (next < 0)
        return 0;
    const long *n = slot_info + 5 * seg[3 * next];
    long cn = c + SHRINK_AHEAD - info[1];
    cn = cn < 0 ? 0 : cn;
    return n[0] != 0 && cn + 1 < n[1] ? (const uint16_t *)n[0] + cn * K : 0;
}

/* The shrink of segment s's ranks c, c + 1 over all its rows. */
static void shrink_task(const float *x, long ldx, long K, float *h, long ldh, const long *seg, const long *slot_info,
                        long s, long next, long c, int wide) {
    const long *seg_s = seg + 3 * s, *info = slot_info + 5 * seg_s[0];
    if (info[0] == 0 || c >= info[1])
        return;
    const uint16_t *A = (const uint16_t *)info[0]; /* its rows c, c + 1: from memory once, then L1 */
    const uint16_t *pf = shrink_ahead(seg, slot_info, K, s, next, c);
    long t = seg_s[1];
    if (wide && c + 1 < info[1] && K % 16 == 0 && t + SHRINK_ROWS_512 <= seg_s[2]) {
        if (pf) /* at once: the tiles' FMAs on rows read once outlast the loads */
            prefetch_bytes(pf, 2 * K * (long)sizeof(uint16_t));
        pf = 0;
        for (; t + SHRINK_ROWS_512 <= seg_s[2]; t += SHRINK_ROWS_512)
            shrink_ranks_512(x, ldx, K, h, ldh, A, (const float *)info[2], c, t);
    }
    shrink_ranks(x, ldx, K, h, ldh, A, (const float *)info[2], c, info[1], t, seg_s[2], pf);
}

/* Ranks c, c + 1 of two one-row segments s1 and s2 at once, when both adapters have them: two streams of
   adapter rows in flight, which a core reads faster than one (see dot_f16_pair). 0: not such a pair. */
static int shrink_pair(const float *x, long ldx, long K, float *h, long ldh, const long *seg, const long *slot_info,
                       long s1, long s2, long S, long P, long c) {
    const long *g1 = seg + 3 * s1, *g2 = seg + 3 * s2, *i1 = slot_info + 5 * g1[0], *i2 = slot_info + 5 * g2[0];
    if (K % 16 || g1[2] - g1[1] != 1 || g2[2] - g2[1] != 1 || i1[0] == 0 || i2[0] == 0 || c + 1 >= i1[1] || c + 1 >= i2[1])
        return 0;
    const uint16_t *A1 = (const uint16_t *)i1[0] + c * K, *A2 = (const uint16_t *)i2[0] + c * K;
    float out[2][2];
    dot_f16_pair(A1, A2, x + g1[1] * ldx, x + g2[1] * ldx, K, out,
                 shrink_ahead(seg, slot_info, K, s1, s1 + 1 < P ? s1 + 1 : -1, c),
                 shrink_ahead(seg, slot_info, K, s2, s2 + 1 < S ? s2 + 1 : -1, c));
    const float *sc1 = (const float *)i1[2], *sc2 = (const float *)i2[2];
    for (int i = 0; i < 2; i++) {
        h[g1[1] * ldh + c + i] = sc1[c + i] * out[0][i];
        h[g2[1] * ldh + c + i] = sc2[c + i] * out[1][i];
    }
    return 1;
}

/* Block q of segment s's expand, for a segment of fewer than EXPAND_ROWS rows (others: nothing). The block
   EXPAND_AHEAD on in this thread's order (this adapter's, then those of segment `next`, -1: none) is
   prefetched a rank at a time as this one's are read. */
static void expand_task(const float *h, long ldh, float *y, long ldy, const long *seg, const long *slot_info,
                        const long *blocks, long s, long next, long q) {
    const long *seg_s = seg + 3 * s, *info = slot_info + 5 * seg_s[0];
    if (q >= info[4] || seg_s[2] - seg_s[1] >= EXPAND_ROWS)
        return;
    const long *blk = blocks + 6 * (info[3] + q), *pf = 0;
    if (q + EXPAND_AHEAD < info[4])
        pf = blocks + 6 * (info[3] + q + EXPAND_AHEAD);
    else if (next >= 0) {
        const long *n = slot_info + 5 * seg[3 * next];
        if (q + EXPAND_AHEAD - info[4] < n[4])
            pf = blocks + 6 * (n[3] + q + EXPAND_AHEAD - info[4]);
    }
    if (pf && pf[5] != OUT_BLOCK)
        pf = 0;
    for (long t = seg_s[1]; t < seg_s[2]; t++)
        expand_block(h + t * ldh + blk[0], y + t * ldy + blk[4], (const uint16_t *)blk[2], blk[3], blk[1], blk[5],
                     t == seg_s[1] ? pf : 0);
}

static void lora_seg(const float *x, long ldx, long K, float *h, long ldh, float *y, long ldy,
                     long S, const long *seg, const long *slot_info, const long *blocks,
                     long max_r, long max_blocks, int num_threads, int wide) {
    long max_tiles = 0; /* row tiles of the longest segment */
    for (long s = 0; s < S; s++) {
        long tiles = (seg[3 * s + 2] - seg[3 * s + 1] + EXPAND_ROWS - 1) / EXPAND_ROWS;
        max_tiles = tiles > max_tiles ? tiles : max_tiles;
    }
    long P = (S + 1) / 2; /* segments s and s + P make a pair */
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for collapse(2) schedule(static)
        for (long p = 0; p < P; p++) {
            for (long c = 0; c < max_r; c += 2) {
                if (p + P < S && shrink_pair(x, ldx, K, h, ldh, seg, slot_info, p, p + P, S, P, c))
                    continue;
                shrink_task(x, ldx, K, h, ldh, seg, slot_info, p, p + 1 < P ? p + 1 : -1, c, wide);
                if (p + P < S)
                    shrink_task(x, ldx, K, h, ldh, seg, slot_info, p + P, p + P + 1 < S ? p + P + 1 : -1, c, wide);
            }
        }
        /* the implicit barrier: every h row is written before any is read */
#pragma omp for collapse(2) schedule(static) nowait
        for (long p = 0; p < P; p++) { /* segments of fewer than EXPAND_ROWS rows (decode): block q of a pair */
            for (long q = 0; q < max_blocks; q++) {
                expand_task(h, ldh, y, ldy, seg, slot_info, blocks, p, p + 1 < P ? p + 1 : -1, q);
                if (p + P < S)
                    expand_task(h, ldh, y, ldy, seg, slot_info, blocks, p + P, p + P + 1 < S ? p + P + 1 : -1, q);
            }
        }
        /* Longer segments (prefill chunks): a task per tile of rows, over every block, so y (as wide as the
           projection's output, and written by the base's matmul just before, out of cache when the step
           has many rows) is read and written in runs along its rows, once. */
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (long s = 0; s < S; s++) {
            for (long tile = 0; tile < max_tiles; tile++) {
                const long *seg_s = seg + 3 * s, *info = slot_info + 5 * seg_s[0];
                long lo = seg_s[1] + tile * EXPAND_ROWS, hi = seg_s[2];
                if (hi - seg_s[1] < EXPAND_ROWS || lo >= hi)
                    continue;
                for (long q = 0; q < info[4]; q++) {
                    const long *blk = blocks + 6 * (info[3] + q);
                    const uint16_t *b = (const uint16_t *)blk[2];
                    if (lo + EXPAND_ROWS <= hi && blk[5] == OUT_BLOCK)
                        (wide ? expand_block_rows_512 : expand_block_rows)(h + lo * ldh + blk[0], ldh, y + lo * ldy + blk[4], ldy, b, blk[3], blk[1]);
                    else
                        for (long t = lo; t < hi && t < lo + EXPAND_ROWS; t++)
                            expand_block(h + t * ldh + blk[0], y + t * ldy + blk[4], b, blk[3], blk[1], blk[5], 0);
                }
            }
        }
    }
}

/* The AVX-512 tiles where the CPU has them; lora_seg_f16_avx2 never takes them (the same bits, for tests). */
void lora_seg_f16(const float *x, long ldx, long K, float *h, long ldh, float *y, long ldy, long S, const long *seg,
                  const long *slot_info, const long *blocks, long max_r, long max_blocks, int num_threads) {
    lora_seg(x, ldx, K, h, ldh, y, ldy, S, seg, slot_info, blocks, max_r, max_blocks, num_threads, has_avx512());
}

void lora_seg_f16_avx2(const float *x, long ldx, long K, float *h, long ldh, float *y, long ldy, long S, const long *seg,
                       const long *slot_info, const long *blocks, long max_r, long max_blocks, int num_threads) {
    lora_seg(x, ldx, K, h, ldh, y, ldy, S, seg, slot_info, blocks, max_r, max_blocks, num_threads, 0);
}
