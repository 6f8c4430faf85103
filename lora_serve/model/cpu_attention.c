/* Attention over the paged KV cache, read where the cache holds it (no gather into new tensors).

Caches [num_slots, KV, D]; row b's key j lies at slot blocks[b, j / block_size] * block_size +
j % block_size. Head h reads KV head g = h / G with G = H / KV (GQA). Queries and outputs are rows of
[T, H * D] of any stride; row b's query tokens are t = token_index[...] (NULL: in order).

  decode_attention  one query per row against keys 0..context_lens[b]-1:
                    out[t, h] = softmax(q[t, h]·K[b, g]ᵀ * scale)·V[b, g]; with AVX-512 and heads of
                    64, one pass over V for a KV head's G query heads (the same bits)
  chunk_attention   Q queries per row (a prefill chunk, the last Q tokens of its context): query i
                    sees keys 0..context_lens[b]-Q+i (causal), the same sum otherwise

Why a chunk kernel: a chunk of a long prompt attends over its whole context every step. Through
SDPA that took a gather of the context's K and V into new tensors (0.28 ms each a layer at 4000
tokens), then 1.0-1.4 ms of SDPA for 8-16 queries a layer (SmolLM2's heads, 2-vCPU Xeon): at 4000
tokens of context, more than the chunk's projections. Here each KV head's keys are read once for all
the queries that share them (G heads x the chunk's tokens), in tiles that stay in L1.
*/
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include <stdlib.h>

#include "cpu_simd.h"

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
#define WEIGHTED_SUM(NV)                                                                                               \
    static void weighted_sum_##NV(const float *p, float inv, const float *cache, long KV, long g, const int64_t *blk,  \
                                  long block_size, long L, float *o) {                                                 \
        __m256 acc[NV];                                                                                                \
        for (int v = 0; v < NV; v++)                                                                                   \
            acc[v] = _mm256_setzero_ps();                                                                              \
        for (long j = 0; j < L; j++) {                                                                                 \
            const float *vj = cache + (KEY_SLOT(blk, j, block_size) * KV + g) * 8 * NV;                                \
            if (j + KEY_PREFETCH < L)                                                                                  \
                prefetch_head(cache + (KEY_SLOT(blk, j + KEY_PREFETCH, block_size) * KV + g) * 8 * NV, 8 * NV);        \
            __m256 pj = _mm256_set1_ps(p[j]);                                                                          \
            for (int v = 0; v < NV; v++)                                                                               \
                acc[v] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * v), acc[v]);                                     \
        }                                                                                                              \
        for (int v = 0; v < NV; v++)                                                                                   \
            _mm256_storeu_ps(o + 8 * v, _mm256_mul_ps(acc[v], _mm256_set1_ps(inv)));                                   \
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

/* weighted_sum_8 for the G (<= 4) query heads of one KV head at once, with AVX-512: each value row is
   loaded once for all G heads instead of once a head (16 lanes; each output still sums its keys in
   order, so the bits are weighted_sum_8's). p: G rows of ldp; inv: G scales; o: G outputs, D = 64 apart. */
#define HEADS_512 4
__attribute__((target("avx512f"))) static void weighted_sum_heads_512(const float *p, long ldp, const float *inv, long G,
                                                                      const float *cache, long KV, long g, const int64_t *blk,
                                                                      long block_size, long L, float *o) {
    __m512 acc[HEADS_512][4];
    for (int i = 0; i < HEADS_512; i++)
        for (int v = 0; v < 4; v++)
            acc[i][v] = _mm512_setzero_ps();
    for (long j = 0; j < L; j++) {
        const float *vj = cache + (KEY_SLOT(blk, j, block_size) * KV + g) * 64;
        if (j + KEY_PREFETCH < L)
            prefetch_head(cache + (KEY_SLOT(blk, j + KEY_PREFETCH, block_size) * KV + g) * 64, 64);
        __m512 v[4];
        for (int c = 0; c < 4; c++)
            v[c] = _mm512_loadu_ps(vj + 16 * c);
        for (int i = 0; i < HEADS_512; i++) {
            if (i < G) {
                __m512 pj = _mm512_set1_ps(p[i * ldp + j]);
                for (int c = 0; c < 4; c++)
                    acc[i][c] = _mm512_fmadd_ps(pj, v[c], acc[i][c]);
            }
        }
    }
    for (int i = 0; i < G; i++)
        for (int c = 0; c < 4; c++)
            _mm512_storeu_ps(o + i * 64 + 16 * c, _mm512_mul_ps(acc[i][c], _mm512_set1_ps(inv[i])));
}

static void decode_run(const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache,
                       const int64_t *blocks, long ldb, const int64_t *context_lens, long B, long H, long KV, long D,
                       long block_size, float scale, float *out, long ldo, int num_threads, int wide) {
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
                float *o = out + t * ldo + g * G * D;
                if (wide && D == 64 && G <= HEADS_512) {
                    float inv[HEADS_512];
                    for (long i = 0; i < G; i++)
                        inv[i] = 1.0f / softmax_numerators(p + i * max_len, L);
                    weighted_sum_heads_512(p, max_len, inv, G, v_cache, KV, g, blk, block_size, L, o);
                    continue;
                }
                for (long i = 0; i < G; i++) {
                    float sum = softmax_numerators(p + i * max_len, L);
                    weighted_sum(p + i * max_len, 1.0f / sum, v_cache, KV, g, blk, block_size, L, D, o + i * D);
                }
            }
        }
        free(p);
    }
}

#define DECODE_ATTENTION_ARGS                                                                                          \
    const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache, const int64_t *blocks, \
        long ldb, const int64_t *context_lens, long B, long H, long KV, long D, long block_size, float scale, float *out, \
        long ldo, int num_threads
#define DECODE_ATTENTION_PASS                                                                                          \
    q, ldq, token_index, k_cache, v_cache, blocks, ldb, context_lens, B, H, KV, D, block_size, scale, out, ldo, num_threads

void decode_attention(DECODE_ATTENTION_ARGS) { decode_run(DECODE_ATTENTION_PASS, has_avx512()); }

/* Without the AVX-512 value sum even where the CPU has it (the same bits). */
void decode_attention_avx2(DECODE_ATTENTION_ARGS) { decode_run(DECODE_ATTENTION_PASS, 0); }

/* chunk_attention runs in tasks: one row's KV head g, a run of n of its query tokens (M = n * G queries,
   padded to a multiple of 8) and a span of its keys, read once for all M queries. Every array of a task
   is [*, M], queries the contiguous axis, so the online softmax and its rescaling run 8 queries to a
   vector:
     qt [D, M]         the queries, transposed and times scale
     s  [KEY_TILE, M]  one tile's scores, then their softmax numerators
     ot [D, M]         the running weighted sum of values
     mx, sum, lim [M]  the running max and sum of numerators; how many keys each query sees
   A tile's K (16 KB at D = 64) stays in L1 while every query is scored against it, then its V while
   every query sums it. */
#define KEY_TILE 64

/* The tiles' register blocks: R rows (keys of s, or dims of ot) x NV vectors of queries (8 lanes, or 16
   with AVX-512), 8 independent FMA chains; each row's scalar broadcast, a vector of queries to a load.
   scores: s[r, :] = kp[c + r]·qt[:, :] over D;  values: ot[r, :] += sum over keys j < kn of vp[j][d0 + r] * p[j, :]. */
#define FOR_TILE(R, NV) for (int r = 0; r < R; r++) for (int v = 0; v < NV; v++) /* each accumulator acc[r][v] */
/* acc[r][:] += a_r * b[:] for the tile's rows r, a_r = BCAST(the row's scalar, an expression of r). */
#define RANK1(R, NV, VEC, FMA, BCAST, SCALAR)                                                                          \
    for (int r = 0; r < R; r++) {                                                                                      \
        VEC a = BCAST(SCALAR);                                                                                         \
        for (int v = 0; v < NV; v++)                                                                                   \
            acc[r][v] = FMA(a, b[v], acc[r][v]);                                                                       \
    }
#define TILE_BODIES(R, NV, NAME, ATTR, VEC, LANES, LOAD, STORE, ZERO, FMA, BCAST)                                      \
    ATTR static void scores_##NAME(const float *const *kp, const float *qt, long M, long D, float *s) {                \
        VEC acc[R][NV], b[NV];                                                                                         \
        FOR_TILE(R, NV) acc[r][v] = ZERO();                                                                            \
        for (long d = 0; d < D; d++) {                                                                                 \
            for (int v = 0; v < NV; v++)                                                                               \
                b[v] = LOAD(qt + d * M + LANES * v);                                                                   \
            RANK1(R, NV, VEC, FMA, BCAST, kp[r][d])                                                                    \
        }                                                                                                              \
        FOR_TILE(R, NV) STORE(s + r * M + LANES * v, acc[r][v]);                                                       \
    }                                                                                                                  \
    ATTR static void values_##NAME(const float *const *vp, long d0, const float *p, long M, long kn, float *ot) {      \
        VEC acc[R][NV], b[NV];                                                                                         \
        FOR_TILE(R, NV) acc[r][v] = LOAD(ot + r * M + LANES * v);                                                      \
        for (long j = 0; j < kn; j++) {                                                                                \
            for (int v = 0; v < NV; v++)                                                                               \
                b[v] = LOAD(p + j * M + LANES * v);                                                                    \
            RANK1(R, NV, VEC, FMA, BCAST, vp[j][d0 + r])                                                               \
        }                                                                                                              \
        FOR_TILE(R, NV) STORE(ot + r * M + LANES * v, acc[r][v]);                                                      \
    }
#define EXPAND(...) TILE_BODIES(__VA_ARGS__) /* ISA's list expanded into TILE_BODIES' arguments */
#define TILES(R, NV, ISA, NAME, ATTR) EXPAND(R, NV, NAME, ATTR, ISA)
#define AVX2 __m256, 8, _mm256_loadu_ps, _mm256_storeu_ps, _mm256_setzero_ps, _mm256_fmadd_ps, _mm256_set1_ps
#define AVX512 __m512, 16, _mm512_loadu_ps, _mm512_storeu_ps, _mm512_setzero_ps, _mm512_fmadd_ps, _mm512_set1_ps
TILES(4, 2, AVX2, 4x2, inline)
TILES(8, 1, AVX2, 8x1, inline)
TILES(4, 2, AVX512, 4x2_512, __attribute__((target("avx512f"))))
TILES(8, 1, AVX512, 8x1_512, __attribute__((target("avx512f"))))

/* One tile's scores s [KEY_TILE, M] (keys j0..j0+kn-1) into softmax numerators against the running max,
   zero where a query may not see the key (only tiles that reach past `all_see`, the keys every query
   sees, are masked); the running sums and ot rescaled to the new max (online softmax). A query that
   has seen no key yet keeps max -inf: its alpha is exp8(NaN or -inf), e^-87.3 by exp8's clamps, and
   multiplies a sum and values of 0. */
static void online_softmax(float *s, long j0, long kn, long all_see, long M, const float *lim, float *mx, float *sum, float *ot,
                           long D) {
    const __m256 neg_inf = _mm256_set1_ps(-INFINITY), all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    int masked = j0 + kn > all_see;
    for (long m = 0; m < M; m += 8) {
        __m256 seen = _mm256_loadu_ps(lim + m), top = neg_inf;
        for (long j = 0; j < kn; j++) {
            __m256 sj = _mm256_loadu_ps(s + j * M + m);
            if (masked)
                sj = _mm256_blendv_ps(neg_inf, sj, _mm256_cmp_ps(_mm256_set1_ps((float)(j0 + j)), seen, _CMP_LT_OQ));
            top = _mm256_max_ps(top, sj);
        }
        __m256 old = _mm256_loadu_ps(mx + m), new_max = _mm256_max_ps(old, top), total = _mm256_setzero_ps();
        __m256 alpha = exp8(_mm256_sub_ps(old, new_max)); /* 1 where the max held */
        for (long j = 0; j < kn; j++) {
            __m256 sees = masked ? _mm256_cmp_ps(_mm256_set1_ps((float)(j0 + j)), seen, _CMP_LT_OQ) : all;
            __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j * M + m), new_max)), sees);
            _mm256_storeu_ps(s + j * M + m, e);
            total = _mm256_add_ps(total, e);
        }
        _mm256_storeu_ps(mx + m, new_max);
        _mm256_storeu_ps(sum + m, _mm256_fmadd_ps(_mm256_loadu_ps(sum + m), alpha, total));
        for (long d = 0; d < D; d++)
            _mm256_storeu_ps(ot + d * M + m, _mm256_mul_ps(_mm256_loadu_ps(ot + d * M + m), alpha));
    }
}

/* A tile's scores for every column of queries (M a multiple of 8): 32 and 16 at a time with AVX-512
   (`wide`), then 16 and 8 at a time with AVX2. */
static void tile_scores(const float *const *kp, long kn, const float *qt, long M, long D, float *s, int wide) {
    long m = 0;
    if (wide) {
        for (; m + 32 <= M; m += 32)
            for (long c = 0; c < kn; c += 4)
                scores_4x2_512(kp + c, qt + m, M, D, s + c * M + m);
        if (m + 16 <= M) {
            for (long c = 0; c < kn; c += 8)
                scores_8x1_512(kp + c, qt + m, M, D, s + c * M + m);
            m += 16;
        }
    }
    for (; m + 16 <= M; m += 16)
        for (long c = 0; c < kn; c += 4)
            scores_4x2(kp + c, qt + m, M, D, s + c * M + m);
    if (m < M)
        for (long c = 0; c < kn; c += 8)
            scores_8x1(kp + c, qt + m, M, D, s + c * M + m);
}

/* ot += a tile's numerators p times its values, column blocks as tile_scores. */
static void tile_values(const float *const *vp, long kn, const float *p, long M, long D, float *ot, int wide) {
    long m = 0;
    if (wide) {
        for (; m + 32 <= M; m += 32)
            for (long d0 = 0; d0 < D; d0 += 4)
                values_4x2_512(vp, d0, p + m, M, kn, ot + d0 * M + m);
        if (m + 16 <= M) {
            for (long d0 = 0; d0 < D; d0 += 8)
                values_8x1_512(vp, d0, p + m, M, kn, ot + d0 * M + m);
            m += 16;
        }
    }
    for (; m + 16 <= M; m += 16)
        for (long d0 = 0; d0 < D; d0 += 4)
            values_4x2(vp, d0, p + m, M, kn, ot + d0 * M + m);
    if (m < M)
        for (long d0 = 0; d0 < D; d0 += 8)
            values_8x1(vp, d0, p + m, M, kn, ot + d0 * M + m);
}

/* Query m's output row in out: token `first_row + m / G` (or tok[m / G]), head g * G + m % G. */
#define OUT_ROW(m) (out + (tok ? tok[(m) / G] : first_row + (m) / G) * ldo + (g * G + (m) % G) * D)

/* One task: n query tokens, rows tok[0..n) of q (NULL: first_row, first_row + 1, ...), the first at
   position `first` (it sees keys 0..first), against KV head g's keys [k0, k1). work: (2 D + KEY_TILE + 3) * M
   floats. Leaves ot, mx, sum in work (the span's share); with `finish`, writes the outputs too. */
static void chunk_task(const float *q, long ldq, const int64_t *tok, long first_row, long n, long first, long k0, long k1,
                       const float *k_cache, const float *v_cache, const int64_t *blk, long block_size, long KV, long g, long G,
                       long D, float scale, float *out, long ldo, float *work, int finish, int wide) {
    long real = n * G, M = (real + 7) / 8 * 8;
    float *ot = work, *mx = ot + D * M, *sum = mx + M, *lim = sum + M, *qt = lim + M, *s = qt + D * M;
    for (long m = 0; m < M; m++) {
        const float *qm = m < real ? q + (tok ? tok[m / G] : first_row + m / G) * ldq + (g * G + m % G) * D : NULL;
        for (long d = 0; d < D; d++) {
            qt[d * M + m] = qm ? qm[d] * scale : 0.0f;
            ot[d * M + m] = 0.0f;
        }
        lim[m] = (float)(m < real ? first + m / G + 1 : first + n); /* padding sees what the last query sees */
        mx[m] = -INFINITY;
        sum[m] = 0.0f;
    }
    const float *kp[KEY_TILE], *vp[KEY_TILE];
    for (long j0 = k0; j0 < k1; j0 += KEY_TILE) {
        long kn = k1 - j0 < KEY_TILE ? k1 - j0 : KEY_TILE;
        long b = j0 / block_size, slot = blk[b] * block_size + j0 % block_size;
        for (long c = 0; c < KEY_TILE; c++) { /* rows past kn repeat the last key: scored in blocks, then masked */
            kp[c] = k_cache + (slot * KV + g) * D;
            vp[c] = v_cache + (slot * KV + g) * D;
            if (c + 1 < kn) /* the next key: the next slot, or the start of the next block */
                slot = (j0 + c + 1) % block_size ? slot + 1 : blk[++b] * block_size;
        }
        tile_scores(kp, kn, qt, M, D, s, wide);
        online_softmax(s, j0, kn, first + 1, M, lim, mx, sum, ot, D);
        tile_values(vp, kn, s, M, D, ot, wide);
    }
    if (finish)
        for (long m = 0; m < real; m++) {
            float *o = OUT_ROW(m), inv = 1.0f / sum[m];
            for (long d = 0; d < D; d++)
                o[d] = ot[d * M + m] * inv;
        }
}

/* The outputs of one run of tokens from its `spans` tasks' shares (work, one after another, `stride`
   floats apart): each share's values and sum scaled by e^(its max - the overall max). */
static void merge_spans(const float *work, long stride, long spans, const int64_t *tok, long first_row, long n, long G, long g,
                        long D, float *out, long ldo) {
    long M = (n * G + 7) / 8 * 8;
    for (long m = 0; m < n * G; m++) {
        float top = -INFINITY, total = 0.0f, *o = OUT_ROW(m);
        for (long p = 0; p < spans; p++)
            top = fmaxf(top, work[p * stride + D * M + m]);
        for (long d = 0; d < D; d++)
            o[d] = 0.0f;
        for (long p = 0; p < spans; p++) {
            const float *ot = work + p * stride, *mx = ot + D * M, *sum = mx + M;
            float w = expf(mx[m] - top); /* 0 for a span the query sees none of */
            total += sum[m] * w;
            for (long d = 0; d < D; d++)
                o[d] += ot[d * M + m] * w;
        }
        for (long d = 0; d < D; d++)
            o[d] /= total;
    }
}

/* D must be a multiple of 8. wide: AVX-512 tiles where they fit; each query's sums run in the same order either way. */
static void chunk_run(const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache,
                      const int64_t *blocks, long ldb, const int64_t *context_lens, long B, long Q, long H, long KV, long D,
                      long block_size, float scale, float *out, long ldo, int num_threads, int wide) {
    /* A row's tokens go in even runs of at most 64 queries where G allows (a task's arrays stay in L1 and
       L2). While there are fewer tasks than two a thread, each run's keys split into spans of whole tiles,
       merged after: SmolLM2's 3 KV heads, one 8-token chunk, 2 threads: a run of 24 queries per KV head,
       its keys in 2 spans, 6 tasks. Splitting keys rather than tokens reads each key once. */
    if (B == 0)
        return;
    long G = H / KV, parts = (Q * G + 63) / 64; /* runs of at most 64 queries, if G allows */
    long tb = (Q + parts - 1) / parts, runs = (Q + tb - 1) / tb, spans = 1;
    long min_len = context_lens[0];
    for (long b = 1; b < B; b++)
        min_len = context_lens[b] < min_len ? context_lens[b] : min_len;
    while (B * KV * runs * spans < 2 * num_threads && (spans + 1) * KEY_TILE <= min_len)
        spans++;
    long M = (tb * G + 7) / 8 * 8, stride = (2 * D + KEY_TILE + 3) * M, tasks = B * KV * runs * spans;
    float *work = malloc(sizeof(float) * stride * (spans > 1 ? tasks : num_threads));
#pragma omp parallel num_threads(num_threads) if (tasks > 1)
    {
#pragma omp for schedule(dynamic, 1)
        for (long task = 0; task < tasks; task++) {
            long p = task % spans, u = task / spans % runs, g = task / spans / runs % KV, b = task / spans / runs / KV;
            long i0 = u * tb, n = Q - i0 < tb ? Q - i0 : tb, first = context_lens[b] - Q + i0;
            long tiles = (first + n + KEY_TILE - 1) / KEY_TILE; /* a span may hold none: its queries' max stays -inf */
            long k0 = tiles * p / spans * KEY_TILE, k1 = tiles * (p + 1) / spans * KEY_TILE;
            k1 = k1 < first + n ? k1 : first + n; /* the run's last query sees keys 0..first + n - 1 */
            chunk_task(q, ldq, token_index ? token_index + b * Q + i0 : NULL, b * Q + i0, n, first, k0, k1, k_cache, v_cache,
                       blocks + b * ldb, block_size, KV, g, G, D, scale, out, ldo,
                       work + stride * (spans > 1 ? task : omp_get_thread_num()), spans == 1, wide);
        }
        if (spans > 1) {
#pragma omp for schedule(static)
            for (long row = 0; row < B * KV * runs; row++) {
                long u = row % runs, g = row / runs % KV, b = row / runs / KV, i0 = u * tb, n = Q - i0 < tb ? Q - i0 : tb;
                merge_spans(work + stride * spans * row, stride, spans, token_index ? token_index + b * Q + i0 : NULL, b * Q + i0,
                            n, G, g, D, out, ldo);
            }
        }
    }
    free(work);
}

#define CHUNK_ATTENTION_ARGS                                                                                           \
    const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache, const int64_t *blocks, \
        long ldb, const int64_t *context_lens, long B, long Q, long H, long KV, long D, long block_size, float scale,  \
        float *out, long ldo, int num_threads
#define CHUNK_ATTENTION_PASS                                                                                           \
    q, ldq, token_index, k_cache, v_cache, blocks, ldb, context_lens, B, Q, H, KV, D, block_size, scale, out, ldo, num_threads

void chunk_attention(CHUNK_ATTENTION_ARGS) { chunk_run(CHUNK_ATTENTION_PASS, has_avx512()); }

/* The 8-lane path even where AVX-512 is there (the same bits). */
void chunk_attention_avx2(CHUNK_ATTENTION_ARGS) { chunk_run(CHUNK_ATTENTION_PASS, 0); }

