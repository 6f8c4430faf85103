/* Every decoder layer of a step in one call: the library's own kernels, called in the order llama.py's
DecoderLayer calls them, with nothing between them but this loop.

Why: at decode, the Python around a layer's 9-13 kernel calls (argument checks, output tensors, ctypes)
took 5.2 ms of SmolLM2-135M's 30 ms step at 8 rows, and 7.4 ms of 36 with 8 adapters (2-vCPU Xeon;
docs/benchmarks.md, "The decoder layers in one call"). Each kernel here is the one the Python path
calls, with the same operands: a step gives the same bits either way (tests/model/test_cpu_layers.py).
A step past the kernels' 64 rows (a prompt beside the decodes) multiplies through the BLAS sgemm_
F.linear calls, and loses ~20 ms of Python in 150-250 ms (docs/benchmarks.md, "Steps past 64 rows in
one call too"). cpu_layers.py checks the operands once per step, and takes only the steps it covers.

Per layer l, with x [T, D] the residual stream (updated in place) and `down` the last layer's MLP output:
  hn = rms_norm(x += down, in_norm)        (no add in layer 0)
  qkv = hn·W_qkvᵀ (+ bias) + LoRA           [T, (H + 2 KV) Dh]
  rope_write_kv(qkv), then per attention group decode_attention or chunk_attention -> attn [T, H Dh]
  o = attn·W_oᵀ + LoRA;  hn = rms_norm(x += o, post_norm)
  gu = hn·W_gate_upᵀ + LoRA;  act = silu_mul(gu);  down = act·W_downᵀ + LoRA
The caller adds the last `down` into x inside the final norm, as llama.py does.

layers: [L, LAYER_ARGS] int64, addresses (0: none): the two norms' weights, the four projections'
        float32 weights [N, K] (contiguous) and the qkv bias, the layer's K and V caches, and per
        projection the address of its slot table's arguments (cpu_kernels.py's SlotTable.arg_array:
        slot info, blocks, max rank, max blocks, slots).
step:   STEP_ARGS int64: shapes, the step's buffers, rotary and cache-write indexes, the LoRA segments, and
        the address of the BLAS sgemm to multiply with when the step has more rows than the kernels take
        (0: the kernels).
groups: [G, 6] int64 per attention group: queries a row, token_index (0: rows in order), blocks, their
        row stride, context_lens, rows.
Returns 0, or 1 before any work when a segment names a slot past a projection's table (nothing written). */
#include <stdint.h>
#include <stdlib.h>

void linear_f32(const float *x, long ldx, const float *W, float *y, long ldy, long M, long N, long K, int num_threads);
void lora_seg_f16(const float *x, long ldx, long K, float *h, long ldh, float *y, long ldy, long S, const long *seg,
                  const long *slot_info, const long *blocks, long max_r, long max_blocks, int num_threads);
void rms_norm(float *x, long ldx, const float *add, long ldadd, const float *w, float *out, long ldo, long T, long D,
              float eps, int num_threads);
void silu_mul(const float *gu, long ld, long T, long N, float *out, long ldo, int num_threads);
void rope_write_kv(float *qkv, long ld, long T, const int64_t *positions, const float *cos_table, const float *sin_table,
                   long H, long KV, long D, const int64_t *slots, float *k_cache, float *v_cache, int num_threads);
void decode_attention(const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache,
                      const int64_t *blocks, long ldb, const int64_t *context_lens, long B, long H, long KV, long D,
                      long block_size, float scale, float *out, long ldo, int num_threads);
void chunk_attention(const float *q, long ldq, const int64_t *token_index, const float *k_cache, const float *v_cache,
                     const int64_t *blocks, long ldb, const int64_t *context_lens, long B, long Q, long H, long KV, long D,
                     long block_size, float scale, float *out, long ldo, int num_threads);

enum { IN_NORM, POST_NORM, W_QKV, B_QKV, W_O, W_GATE_UP, W_DOWN, K_CACHE, V_CACHE, LORA_QKV, LORA_O, LORA_GATE_UP,
       LORA_DOWN, LAYER_ARGS };
enum { T_, D_, H_, KV_, DH_, I_, X_, HN_, QKV_, ATTN_, O_, GU_, ACT_, DOWN_, POSITIONS_, COS_, SIN_, SLOTS_,
       BLOCK_SIZE_, S_, SEG_, MAX_SLOT_, SGEMM_, STEP_ARGS };

#define P(type, v) ((type)(intptr_t)(v))

/* BLAS's sgemm (column-major, Fortran calling convention), as torch's CPU library exports it. */
typedef void (*sgemm_t)(const char *transa, const char *transb, const int *m, const int *n, const int *k, const float *alpha,
                        const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
                        const int *ldc);

/* y [T, N] = x [T, K]·Wᵀ (+ bias [N]) as llama.py's linear() computes it: on the kernels (linear_f32, then the
   bias added) for the row counts they take, else through the sgemm F.linear calls (st[SGEMM_]), the bias
   first in y and beta = 1, as torch's addmm hands it over. */
static void matmul(const int64_t *st, const float *x, long K, const float *W, const float *bias, float *y, long N,
                   int num_threads) {
    const long T = st[T_];
    if (st[SGEMM_] == 0) {
        linear_f32(x, K, W, y, N, T, N, K, num_threads);
        if (bias)
            for (long t = 0; t < T; t++)
                for (long n = 0; n < N; n++)
                    y[t * N + n] += bias[n];
        return;
    }
    const int m = (int)N, n = (int)T, k = (int)K;
    const float one = 1.0f, beta = bias ? 1.0f : 0.0f;
    if (bias)
        for (long t = 0; t < T; t++)
            for (long j = 0; j < N; j++)
                y[t * N + j] = bias[j];
    P(sgemm_t, st[SGEMM_])("T", "N", &m, &n, &k, &one, W, &k, x, &k, &beta, y, &m);
}

/* y [T, N] += this projection's LoRA deltas over the step's segments; table: its SlotTable.arg_array. */
static void lora(const int64_t *st, const int64_t *table, const float *x, long K, float *y, long N, float *h, long ldh,
                 int num_threads) {
    if (table == 0 || st[S_] == 0)
        return;
    lora_seg_f16(x, K, K, h, ldh, y, N, st[S_], P(const long *, st[SEG_]), P(const long *, table[0]),
                 P(const long *, table[1]), table[2], table[3], num_threads);
}

static void project(const int64_t *st, const float *x, long K, const int64_t w, const int64_t table, float *y, long N,
                    float *h, long ldh, int num_threads) {
    matmul(st, x, K, P(const float *, w), 0, y, N, num_threads);
    lora(st, P(const int64_t *, table), x, K, y, N, h, ldh, num_threads);
}

int decoder_layers(long L, const int64_t *layers, const int64_t *st, long G, const int64_t *groups, float eps,
                   float scale, int num_threads) {
    const long T = st[T_], D = st[D_], H = st[H_], KV = st[KV_], Dh = st[DH_], I = st[I_];
    const long NQKV = (H + 2 * KV) * Dh;
    long ldh = 1; /* the widest table's rank: the shrink's scratch h [T, ldh] */
    for (long l = 0; l < L; l++)
        for (int p = LORA_QKV; p <= LORA_DOWN; p++) {
            const int64_t *table = P(const int64_t *, layers[l * LAYER_ARGS + p]);
            if (table == 0 || st[S_] == 0)
                continue;
            if (st[MAX_SLOT_] >= table[4])
                return 1;
            ldh = table[2] > ldh ? table[2] : ldh;
        }
    float *h = st[S_] ? malloc(sizeof(float) * T * ldh) : 0;
    float *x = P(float *, st[X_]), *hn = P(float *, st[HN_]), *qkv = P(float *, st[QKV_]), *attn = P(float *, st[ATTN_]);
    float *o = P(float *, st[O_]), *gu = P(float *, st[GU_]), *act = P(float *, st[ACT_]), *down = P(float *, st[DOWN_]);
    for (long l = 0; l < L; l++) {
        const int64_t *a = layers + l * LAYER_ARGS;
        rms_norm(x, D, l ? down : 0, D, P(const float *, a[IN_NORM]), hn, D, T, D, eps, num_threads);
        matmul(st, hn, D, P(const float *, a[W_QKV]), P(const float *, a[B_QKV]), qkv, NQKV, num_threads);
        lora(st, P(const int64_t *, a[LORA_QKV]), hn, D, qkv, NQKV, h, ldh, num_threads);
        float *kc = P(float *, a[K_CACHE]), *vc = P(float *, a[V_CACHE]);
        rope_write_kv(qkv, NQKV, T, P(const int64_t *, st[POSITIONS_]), P(const float *, st[COS_]),
                      P(const float *, st[SIN_]), H, KV, Dh, P(const int64_t *, st[SLOTS_]), kc, vc, num_threads);
        for (long g = 0; g < G; g++) {
            const int64_t *gr = groups + 6 * g;
            if (gr[0] == 1)
                decode_attention(qkv, NQKV, P(const int64_t *, gr[1]), kc, vc, P(const int64_t *, gr[2]), gr[3],
                                 P(const int64_t *, gr[4]), gr[5], H, KV, Dh, st[BLOCK_SIZE_], scale, attn, H * Dh,
                                 num_threads);
            else
                chunk_attention(qkv, NQKV, P(const int64_t *, gr[1]), kc, vc, P(const int64_t *, gr[2]), gr[3],
                                P(const int64_t *, gr[4]), gr[5], gr[0], H, KV, Dh, st[BLOCK_SIZE_], scale, attn,
                                H * Dh, num_threads);
        }
        project(st, attn, H * Dh, a[W_O], a[LORA_O], o, D, h, ldh, num_threads);
        rms_norm(x, D, o, D, P(const float *, a[POST_NORM]), hn, D, T, D, eps, num_threads);
        project(st, hn, D, a[W_GATE_UP], a[LORA_GATE_UP], gu, 2 * I, h, ldh, num_threads);
        silu_mul(gu, 2 * I, T, I, act, I, num_threads);
        project(st, act, I, a[W_DOWN], a[LORA_DOWN], down, D, h, ldh, num_threads);
    }
    free(h);
    return 0;
}
