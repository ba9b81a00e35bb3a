// The polar scheme's keys (see include/CKVKernels.h): a decoder, eight pairs per step with the
// same float operations as PolarScheme.decodeVector in Swift (radius = scale * code + offset,
// then radius times the cos and sin of the angle code), so the same bits; cos and sin come from
// registers (vpermps) for angle codes of up to 4 bits, from a gather for 8 bits. And the key
// scores without a tile: each group of eight pairs decoded in registers and multiplied into
// the scores of four query heads at once, the same operations as the row kernels over a tile
// decoded in the scoring layout (tests hold the two to the bits). Decoding to a tile, storing
// it and reading it back cost about as much as the products themselves, and kept the decode's
// shuffles from overlapping the products' multiply-adds.
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "prefetch_plan.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_POLAR_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

static int polar_isa = KVK_TIER_NONE;

__attribute__((constructor)) static void polar_detect(void) { polar_isa = kvk_cpu_tier(); }

/// Widths whose eight codes one load holds (the Swift decoder's vector widths).
static int vector_bits(int b) { return (b >= 1 && b <= 4) || b == 8; }

/// Groups of eight pairs the kernels hold a run's radius scales for (head_dim up to 512).
enum { POLAR_MAX_GROUPS = 32 };

/// Where the decoder puts pair j's x and y (kvk_polar_decode's `layout`).
enum { LAYOUT_ADJACENT = 0, LAYOUT_HALF = 1, LAYOUT_SCORING = 2 };

/// One instantiation of BODY(AB, RB) per (angle bits, radius bits) the vector path takes, picked
/// by the `angleBits` and `radiusBits` in scope: the kernels' loops then have constant widths.
#define POLAR_RADIUS_WIDTHS(BODY, AB)                                                                                                  \
    switch (radiusBits) {                                                                                                              \
    case 1: BODY(AB, 1); break;                                                                                                        \
    case 2: BODY(AB, 2); break;                                                                                                        \
    case 3: BODY(AB, 3); break;                                                                                                        \
    case 4: BODY(AB, 4); break;                                                                                                        \
    default: BODY(AB, 8); break;                                                                                                       \
    }
#define POLAR_WIDTHS(BODY)                                                                                                             \
    switch (angleBits) {                                                                                                               \
    case 1: POLAR_RADIUS_WIDTHS(BODY, 1) break;                                                                                        \
    case 2: POLAR_RADIUS_WIDTHS(BODY, 2) break;                                                                                        \
    case 3: POLAR_RADIUS_WIDTHS(BODY, 3) break;                                                                                        \
    case 4: POLAR_RADIUS_WIDTHS(BODY, 4) break;                                                                                        \
    default: POLAR_RADIUS_WIDTHS(BODY, 8) break;                                                                                       \
    }

static int polar_supported(int angleBits, int radiusBits, int pairs, int radiusGroup) {
    return vector_bits(angleBits) && vector_bits(radiusBits) && pairs > 0 && pairs % 8 == 0 && pairs / 8 <= POLAR_MAX_GROUPS &&
           radiusGroup > 0;
}

#if KVK_POLAR_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#include "codes8.h"   // inside the region: compiled for AVX2, inlined into both variants
#include "score_sums.h"
#define SUFFIX(name) name##_avx2
#define POLAR_VL 0
#include "polar_body.h"
#undef SUFFIX
#undef POLAR_VL
#pragma clang attribute pop

// VL for 32 ymm registers and the two-table permute; no 512-bit vectors (the machines of
// cpu_tier.h's tier 2, as the row kernels' variant).
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))), apply_to = function)
#define SUFFIX(name) name##_avx512
#define POLAR_VL 1
#include "polar_body.h"
#undef SUFFIX
#undef POLAR_VL
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

static inline __attribute__((always_inline)) void polar_decode_body(const uint8_t *p, int pairs, int radiusGroup, size_t radiusSection,
                                                                     size_t scalesOffset, size_t offsetsOffset, const float *table, int layout,
                                                                     size_t t0, size_t count, float *out, const int AB, const int RB) {
    const int d = 2 * pairs, groups = pairs / 8;
    const polar_tables_avx2 T = polar_load_tables_avx2(table, AB);
    __m256 scales[POLAR_MAX_GROUPS], offsets[POLAR_MAX_GROUPS];
    size_t widened = SIZE_MAX;
    for (size_t row = 0; row < count; row++) {
        const size_t t = t0 + row, run = t / (size_t)radiusGroup;
        float *o = out + row * (size_t)d;
        if (run != widened) {
            polar_widen_run_avx2(p, run, pairs, scalesOffset, offsetsOffset, scales, offsets);
            widened = run;
        }
        for (int k = 0; k < groups; k++) {
            __m256 x, y;
            polar_pairs8_avx2(p, t * (size_t)pairs + 8 * (size_t)k, radiusSection, scales[k], offsets[k], &T, table, &x, &y, AB, RB);
            if (layout == LAYOUT_HALF) {
                _mm256_storeu_ps(o + 8 * k, x);
                _mm256_storeu_ps(o + pairs + 8 * k, y);
            } else if (layout == LAYOUT_SCORING) {
                _mm256_storeu_ps(o + 16 * k, x);
                _mm256_storeu_ps(o + 16 * k + 8, y);
            } else {
                __m256 lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);
                _mm256_storeu_ps(o + 16 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(o + 16 * k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
    }
}

static void polar_decode_avx2(const uint8_t *p, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                              size_t scalesOffset, size_t offsetsOffset, const float *table, int layout, size_t t0, size_t count, float *out) {
#define POLAR_DECODE(AB, RB)                                                                                                           \
    polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, layout, t0, count, out, AB, RB)
    POLAR_WIDTHS(POLAR_DECODE)
#undef POLAR_DECODE
}

#pragma clang attribute pop
#endif

int kvk_polar_isa(void) { return polar_isa; }

int kvk_polar_decode(const uint8_t *block, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                     size_t scalesOffset, size_t offsetsOffset, const float *table, int layout, size_t t0, size_t count, float *out) {
    if (polar_isa < KVK_TIER_AVX2 || !polar_supported(angleBits, radiusBits, pairs, radiusGroup) || layout < 0 || layout > 2) return -1;
#if KVK_POLAR_X86
    polar_decode_avx2(block, angleBits, radiusBits, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, layout, t0,
                      count, out);
    return 0;
#else
    (void)block, (void)radiusSection, (void)scalesOffset, (void)offsetsOffset, (void)table, (void)t0, (void)count, (void)out;
    return -1;
#endif
}

int kvk_polar_scores(const uint8_t *block, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                     size_t scalesOffset, size_t offsetsOffset, const float *table, size_t t0, size_t count, const float *queries,
                     int group, float *out, size_t stride) {
    if (polar_isa < KVK_TIER_VNNI || !polar_supported(angleBits, radiusBits, pairs, radiusGroup) || group <= 0) return -1;
#if KVK_POLAR_X86
    const int d = 2 * pairs;
    // Four heads per pass; a last pass of fewer scores zero queries for the missing ones.
    _Alignas(32) float padded[4 * 2 * 8 * POLAR_MAX_GROUPS];
    for (int q0 = 0; q0 < group; q0 += 4) {
        const int nq = group - q0 < 4 ? group - q0 : 4;
        const float *q = queries + (size_t)q0 * d;
        if (nq < 4) {
            memset(padded, 0, sizeof(float) * 4 * (size_t)d);
            memcpy(padded, q, sizeof(float) * (size_t)nq * (size_t)d);
            q = padded;
        }
        polar_scores_avx512(block, angleBits, radiusBits, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, t0, count,
                            q, nq, out + (size_t)q0 * stride, stride);
    }
    return 0;
#else
    (void)block, (void)radiusSection, (void)scalesOffset, (void)offsetsOffset, (void)table, (void)t0, (void)count, (void)queries;
    (void)out, (void)stride;
    return -1;
#endif
}
