// The two products of attention over plain rows (f32, f16 or bf16; see include/CKVKernels.h):
// scores (queries x rows) and value accumulation (weights x rows), with the rows widened in
// registers. They compute exactly what the Swift TileKernels compute over rows widened into an
// f32 tile (every f16 and bf16 is an f32, so widening is exact):
//   score(q, t) = s(a) with a = sum over 8-channel chunks c, in order, of fma(q[c], row[c], a)
//                 from zero, and s(a) = ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7));
//   acc[q][c]   = fma(w[q][t], row t [c], acc[q][c]) for t in order.
// Each score and each accumulator depends only on its own operations, so the blocking here
// (four query heads at once, rows widened once for all of them) gives the same bits. Swift
// keeps its path for machines without AVX2 + FMA + F16C, where this returns -1.
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "prefetch_plan.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_ROWS_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

enum { ROW_F32 = 0, ROW_F16 = 1, ROW_BF16 = 2 };

static int rows_available = 0;

__attribute__((constructor)) static void rows_detect(void) { rows_available = kvk_cpu_tier() >= KVK_TIER_AVX2; }

int kvk_rows_available(void) { return rows_available; }

#if KVK_ROWS_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

/// Eight elements of a row at `p` (any alignment) as floats.
static inline __attribute__((always_inline)) __m256 load8(const uint8_t *p, const int type) {
    switch (type) {
    case ROW_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    case ROW_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    default: return _mm256_loadu_ps((const float *)p);
    }
}

/// The scores of two tokens for one query head, each reduced as TileKernels.sum does.
static inline __attribute__((always_inline)) __m128 pair_sums(__m256 a, __m256 b) {
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 h = _mm_hadd_ps(a4, b4);   // a4_0 + a4_1, a4_2 + a4_3, b4_0 + b4_1, b4_2 + b4_3
    return _mm_hadd_ps(h, h);         // score a, score b, score a, score b
}

/// Scores of `count` rows for QB query heads: two rows at a time, each 8-channel chunk of a
/// row widened once for every head.
static inline __attribute__((always_inline)) void scores_block(const uint8_t *rows, size_t rowBytes, int dim, size_t count,
                                                               const float *queries, float *out, size_t stride, const int QB,
                                                               const int type) {
    const int width = type == ROW_F32 ? 4 : 2;
    size_t t = 0;
    for (; t + 2 <= count; t += 2) {
        const uint8_t *r0 = rows + t * rowBytes, *r1 = r0 + rowBytes;
        kvk_plan_advance(2 * rowBytes);
        __m256 a[4][2];
        for (int q = 0; q < QB; q++) a[q][0] = a[q][1] = _mm256_setzero_ps();
        for (int c = 0; c < dim; c += 8) {
            __m256 k0 = load8(r0 + c * width, type), k1 = load8(r1 + c * width, type);
            for (int q = 0; q < QB; q++) {
                __m256 x = _mm256_loadu_ps(queries + (size_t)q * dim + c);
                a[q][0] = _mm256_fmadd_ps(x, k0, a[q][0]);
                a[q][1] = _mm256_fmadd_ps(x, k1, a[q][1]);
            }
        }
        for (int q = 0; q < QB; q++) _mm_storel_pi((__m64 *)(out + (size_t)q * stride + t), pair_sums(a[q][0], a[q][1]));
    }
    if (t < count) {
        const uint8_t *r0 = rows + t * rowBytes;
        kvk_plan_advance(rowBytes);
        __m256 a[4];
        for (int q = 0; q < QB; q++) a[q] = _mm256_setzero_ps();
        for (int c = 0; c < dim; c += 8) {
            __m256 k0 = load8(r0 + c * width, type);
            for (int q = 0; q < QB; q++) a[q] = _mm256_fmadd_ps(_mm256_loadu_ps(queries + (size_t)q * dim + c), k0, a[q]);
        }
        for (int q = 0; q < QB; q++) out[(size_t)q * stride + t] = _mm_cvtss_f32(pair_sums(a[q], a[q]));
    }
}

/// acc rows of QB query heads += their weights times `count` rows: 16 channels at a time, the
/// accumulators in registers across every row, each row chunk widened once for every head.
static inline __attribute__((always_inline)) void accumulate_block(const uint8_t *rows, size_t rowBytes, int dim, size_t count,
                                                                   const float *weights, size_t stride, float *acc, const int QB,
                                                                   const int type) {
    const int width = type == ROW_F32 ? 4 : 2;
    int c = 0;
    for (; c + 16 <= dim; c += 16) {
        __m256 a[4][2];
        for (int q = 0; q < QB; q++) {
            a[q][0] = _mm256_loadu_ps(acc + (size_t)q * dim + c);
            a[q][1] = _mm256_loadu_ps(acc + (size_t)q * dim + c + 8);
        }
        const uint8_t *r = rows + (size_t)c * width;
        for (size_t t = 0; t < count; t++, r += rowBytes) {
            if (c == 0) kvk_plan_advance(rowBytes);   // the first pass over the rows reads them all
            __m256 v0 = load8(r, type), v1 = load8(r + 8 * width, type);
            for (int q = 0; q < QB; q++) {
                __m256 w = _mm256_broadcast_ss(weights + (size_t)q * stride + t);
                a[q][0] = _mm256_fmadd_ps(w, v0, a[q][0]);
                a[q][1] = _mm256_fmadd_ps(w, v1, a[q][1]);
            }
        }
        for (int q = 0; q < QB; q++) {
            _mm256_storeu_ps(acc + (size_t)q * dim + c, a[q][0]);
            _mm256_storeu_ps(acc + (size_t)q * dim + c + 8, a[q][1]);
        }
    }
    if (c < dim) {   // the last 8 channels (dim a multiple of 8, not of 16)
        __m256 a[4];
        for (int q = 0; q < QB; q++) a[q] = _mm256_loadu_ps(acc + (size_t)q * dim + c);
        const uint8_t *r = rows + (size_t)c * width;
        if (c == 0) kvk_plan_advance(count * rowBytes);
        for (size_t t = 0; t < count; t++, r += rowBytes) {
            __m256 v = load8(r, type);
            for (int q = 0; q < QB; q++) a[q] = _mm256_fmadd_ps(_mm256_broadcast_ss(weights + (size_t)q * stride + t), v, a[q]);
        }
        for (int q = 0; q < QB; q++) _mm256_storeu_ps(acc + (size_t)q * dim + c, a[q]);
    }
}

// One instantiation per (heads in the block, row type): the loops above then have constant
// bounds and their accumulators stay in registers.
#define ROWS_DISPATCH(fn, QB, ...)                                     \
    switch (type) {                                                    \
    case ROW_F16: fn(__VA_ARGS__, QB, ROW_F16); break;                 \
    case ROW_BF16: fn(__VA_ARGS__, QB, ROW_BF16); break;               \
    default: fn(__VA_ARGS__, QB, ROW_F32); break;                      \
    }

static void rows_scores_avx2(const uint8_t *rows, int type, int dim, size_t count, const float *queries, int group, float *out,
                             size_t stride) {
    const size_t rowBytes = (size_t)dim * (type == ROW_F32 ? 4 : 2);
    for (int q0 = 0; q0 < group; q0 += 4) {
        const float *q = queries + (size_t)q0 * dim;
        float *o = out + (size_t)q0 * stride;
        switch (group - q0 < 4 ? group - q0 : 4) {
        case 1: ROWS_DISPATCH(scores_block, 1, rows, rowBytes, dim, count, q, o, stride) break;
        case 2: ROWS_DISPATCH(scores_block, 2, rows, rowBytes, dim, count, q, o, stride) break;
        case 3: ROWS_DISPATCH(scores_block, 3, rows, rowBytes, dim, count, q, o, stride) break;
        default: ROWS_DISPATCH(scores_block, 4, rows, rowBytes, dim, count, q, o, stride) break;
        }
    }
}

static void rows_accumulate_avx2(const uint8_t *rows, int type, int dim, size_t count, const float *weights, size_t stride, int group,
                                 float *acc) {
    const size_t rowBytes = (size_t)dim * (type == ROW_F32 ? 4 : 2);
    for (int q0 = 0; q0 < group; q0 += 4) {
        const float *w = weights + (size_t)q0 * stride;
        float *a = acc + (size_t)q0 * dim;
        switch (group - q0 < 4 ? group - q0 : 4) {
        case 1: ROWS_DISPATCH(accumulate_block, 1, rows, rowBytes, dim, count, w, stride, a) break;
        case 2: ROWS_DISPATCH(accumulate_block, 2, rows, rowBytes, dim, count, w, stride, a) break;
        case 3: ROWS_DISPATCH(accumulate_block, 3, rows, rowBytes, dim, count, w, stride, a) break;
        default: ROWS_DISPATCH(accumulate_block, 4, rows, rowBytes, dim, count, w, stride, a) break;
        }
    }
}

#pragma clang attribute pop
#endif

static int rows_supported(int type, int dim, int group) {
    return rows_available && (type == ROW_F32 || type == ROW_F16 || type == ROW_BF16) && dim > 0 && dim % 8 == 0 && group > 0;
}

int kvk_rows_scores(const void *rows, int type, int dim, size_t count, const float *queries, int group, float *out, size_t stride) {
    if (!rows_supported(type, dim, group)) return -1;
#if KVK_ROWS_X86
    rows_scores_avx2((const uint8_t *)rows, type, dim, count, queries, group, out, stride);
    return 0;
#else
    (void)rows, (void)count, (void)queries, (void)out, (void)stride;
    return -1;
#endif
}

int kvk_rows_accumulate(const void *rows, int type, int dim, size_t count, const float *weights, size_t stride, int group, float *acc) {
    if (!rows_supported(type, dim, group)) return -1;
#if KVK_ROWS_X86
    rows_accumulate_avx2((const uint8_t *)rows, type, dim, count, weights, stride, group, acc);
    return 0;
#else
    (void)rows, (void)count, (void)weights, (void)stride, (void)acc;
    return -1;
#endif
}
