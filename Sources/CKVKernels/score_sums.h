// How the row kernels (rows_body.h) and polar's key scores without a tile (polar_body.h) finish a
// score: one definition, because the two are held to the same bits. Included inside each file's
// target("avx2,...") region (as codes8.h), so it compiles with those instructions and inlines
// into both variants.
#ifndef KVK_SCORE_SUMS_H
#define KVK_SCORE_SUMS_H

#include <immintrin.h>

/// The scores of two tokens for one query head from their eight-lane accumulators, each reduced
/// as TileKernels.sum does: ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)).
static inline __attribute__((always_inline)) __m128 kvk_pair_sums(__m256 a, __m256 b) {
    __m128 a4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 b4 = _mm_add_ps(_mm256_castps256_ps128(b), _mm256_extractf128_ps(b, 1));
    __m128 h = _mm_hadd_ps(a4, b4);   // a4_0 + a4_1, a4_2 + a4_3, b4_0 + b4_1, b4_2 + b4_3
    return _mm_hadd_ps(h, h);         // score a, score b, score a, score b
}

/// The scores of TB (1 to 4) consecutive tokens of one head, from their accumulators, at `o`.
static inline __attribute__((always_inline)) void kvk_store_scores(float *o, const __m256 *acc, const int TB) {
    for (int j = 0; j + 2 <= TB; j += 2) _mm_storel_pi((__m64 *)(o + j), kvk_pair_sums(acc[j], acc[j + 1]));
    if (TB & 1) o[TB - 1] = _mm_cvtss_f32(kvk_pair_sums(acc[TB - 1], acc[TB - 1]));
}

#endif
