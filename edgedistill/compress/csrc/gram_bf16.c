/* Gram matrix of bf16 rows with fp32 accumulation, on AVX-512 BF16 (edgedistill/compress/gram.py builds and loads it).

   out = beta * out + alpha * Xᵀ X for X: n rows of d bf16 values. A calibration Hessian's inputs are bf16 (the block
   forwards run in bf16); each product of two bf16 values is exact in fp32, and vdpbf16ps adds two of them to an
   fp32 accumulator per lane, so this is an fp32-accumulated Hessian at the bf16 multiply rate.

   Layout: rows are taken in pairs (t, t+1). A slab of KC pairs is packed as Q[g][k][f], one 32-bit word per feature
   holding (x[t][16g+f], x[t+1][16g+f]), so one vdpbf16ps of a broadcast word of feature i against 16 words of
   features j..j+15 adds x[t][i]x[t][j] + x[t+1][i]x[t+1][j] to 16 lanes. Tiles of MR × NR outputs stay in
   registers over a slab; only tiles touching the lower triangle are computed. Threads split the output's column
   blocks: each packs every slab into its own buffer and adds into its own tiles of one shared accumulator. */
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define MR 8              /* output rows per tile: 8 × 3 accumulators of 16 lanes = 24 of the 32 zmm registers */
#define NV 3
#define NR (16 * NV)      /* output columns per tile */
#ifndef KC
/* row pairs per slab. Accumulators restart per slab and slabs are added into the thread's sum, so sums are blocked:
   on a 16384 × 1536 product, 64 gave 3e-7 max / 1e-7 norm relative error against float64 (torch's fp32 GEMM:
   4e-7 / 2e-7), 256 gave 1e-6 / 4e-7, at the same speed */
#define KC 64
#endif
#define MAX_THREADS 64

typedef struct {
    const uint16_t *x;
    int64_t n, d, ldx, dp;
    float *acc;      /* dp × dp, shared: each thread adds into its own column blocks' tiles only */
    int worker, workers, status;
} job_t;

static void pack(const uint16_t *x, int64_t d, int64_t ldx, int64_t t, int64_t t_end, int64_t kc, int64_t dp,
                 uint32_t *Q) {
    int64_t groups = dp / 16;
    for (int64_t k = 0; k < kc; k++) {
        const uint16_t *r0 = (t + 2 * k < t_end) ? x + (t + 2 * k) * ldx : NULL;
        const uint16_t *r1 = (t + 2 * k + 1 < t_end) ? x + (t + 2 * k + 1) * ldx : NULL;
        for (int64_t g = 0; g < groups; g++) {
            int64_t f0 = 16 * g, left = d - f0;
            __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (left <= 0 ? 0 : (__mmask16)((1u << left) - 1));
            __m256i a = r0 ? _mm256_maskz_loadu_epi16(m, r0 + f0) : _mm256_setzero_si256();
            __m256i b = r1 ? _mm256_maskz_loadu_epi16(m, r1 + f0) : _mm256_setzero_si256();
            __m512i lo = _mm512_cvtepu16_epi32(a), hi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16);
            _mm512_storeu_si512((void *)(Q + (g * kc + k) * 16), _mm512_or_si512(lo, hi));
        }
    }
}

static inline void tile(const uint32_t *Q, int64_t kc, int64_t i0, int64_t j0, float *C, int64_t ldc) {
    const uint32_t *A = Q + (i0 / 16) * kc * 16 + (i0 % 16);
    const uint32_t *B = Q + (j0 / 16) * kc * 16;
    __m512 acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512bh b[NV];
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512((const void *)(B + (v * kc + k) * 16));
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[k * 16 + r]);
#pragma GCC unroll 3
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], a, b[v]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 3
        for (int v = 0; v < NV; v++) {
            float *c = C + (i0 + r) * ldc + j0 + 16 * v;
            _mm512_storeu_ps(c, _mm512_add_ps(_mm512_loadu_ps(c), acc[r][v]));
        }
}

/* Column block J (NR columns) belongs to worker w when J mod 2W is w or 2W−1−w: blocks near the diagonal's top
   are tall, near its bottom short, so the zigzag evens the workers' tile counts. */
static int owns(const job_t *j, int64_t block) {
    int64_t r = block % (2 * j->workers);
    return r == j->worker || r == 2 * j->workers - 1 - j->worker;
}

static void *run(void *arg) {
    job_t *j = (job_t *)arg;
    void *buf = NULL;
    if (posix_memalign(&buf, 64, (size_t)KC * j->dp * 4)) { j->status = 1; return NULL; }
    uint32_t *Q = (uint32_t *)buf;
    for (int64_t t = 0; t < j->n; t += 2 * KC) {
        int64_t kc = (j->n - t + 1) / 2;
        if (kc > KC) kc = KC;
        pack(j->x, j->d, j->ldx, t, j->n, kc, j->dp, Q);   /* every worker packs the slab: ~2/d of its work */
        for (int64_t j0 = 0; j0 < j->dp; j0 += NR) {
            if (!owns(j, j0 / NR)) continue;
            for (int64_t i0 = j0; i0 < j->dp; i0 += MR)   /* rows below the block's first column: the lower triangle */
                tile(Q, kc, i0, j0, j->acc, j->dp);
        }
    }
    free(buf);
    return NULL;
}

/* out[i][j] = beta * out[i][j] + alpha * Σ_t x[t][i] x[t][j], both triangles written (out must be symmetric on entry
   when beta != 0; with beta 0 it is not read). x: n rows of d bf16 values, row stride ldx (elements); out: d × d
   fp32, row stride ldo. Threads split the output's column blocks and share one dp × dp accumulator (no per-thread
   copies: a 14336-wide input's would be 0.8 GB each). Returns 0, or 1 when memory could not be had (out is then
   untouched). */
int gram_bf16(const uint16_t *x, int64_t n, int64_t d, int64_t ldx, float *out, int64_t ldo, float alpha,
              float beta, int threads) {
    if (threads < 1) threads = 1;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    int64_t dp = (d + NR - 1) / NR * NR;
    if ((int64_t)threads > dp / NR) threads = (int)(dp / NR);   /* at least one column block each */
    float *acc = calloc((size_t)dp * dp, sizeof(float));
    if (!acc) return 1;
    job_t jobs[MAX_THREADS];
    pthread_t tid[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    int fail = 0;
    for (int w = 0; w < threads; w++) jobs[w] = (job_t){x, n, d, ldx, dp, acc, w, threads, 0};
    for (int w = 1; w < threads; w++) started[w] = pthread_create(&tid[w], NULL, run, &jobs[w]) == 0;
    run(&jobs[0]);
    for (int w = 1; w < threads; w++) {
        if (started[w]) pthread_join(tid[w], NULL);
        else run(&jobs[w]);   /* no thread to be had: this one does the share */
    }
    for (int w = 0; w < threads; w++) fail |= jobs[w].status;
    if (!fail) {
        /* scale into out and mirror, in 32 × 32 blocks (the mirrored writes of a block stay within 32 rows) */
        for (int64_t ib = 0; ib < d; ib += 32)
            for (int64_t jb = 0; jb <= ib; jb += 32)
                for (int64_t i = ib; i < ib + 32 && i < d; i++)
                    for (int64_t j = jb; j < jb + 32 && j <= i; j++) {
                        float s = acc[i * dp + j];
                        float v = beta != 0.0f ? beta * out[i * ldo + j] + alpha * s : alpha * s;
                        out[i * ldo + j] = v;
                        out[j * ldo + i] = v;
                    }
    }
    free(acc);
    return fail;
}
