// The polar scheme's key decoder (see include/CKVKernels.h): eight pairs per step, the same
// float operations as PolarScheme.decodeVector in Swift (radius = scale * code + offset, then
// radius times the cos and sin of the angle code), so the same bits; cos and sin come from
// registers (vpermps) for angle codes of up to 4 bits, from a gather for 8 bits.
#include "CKVKernels.h"
#include "cpu_tier.h"

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_POLAR_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

static int polar_available = 0;

__attribute__((constructor)) static void polar_detect(void) { polar_available = kvk_cpu_tier() >= KVK_TIER_AVX2; }

/// Widths whose eight codes one load holds (the Swift decoder's vector widths).
static int vector_bits(int b) { return (b >= 1 && b <= 4) || b == 8; }

/// Groups of eight pairs the decoder holds a run's radius scales for (head_dim up to 512).
enum { MAX_GROUPS = 32 };

#if KVK_POLAR_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

#include "codes8.h"

static inline __attribute__((always_inline)) void polar_decode_body(const uint8_t *p, int pairs, int radiusGroup, size_t radiusSection,
                                                                     size_t scalesOffset, size_t offsetsOffset, const float *table, int half,
                                                                     size_t t0, size_t count, float *out, const int AB, const int RB) {
    const int d = 2 * pairs, groups = pairs / 8;
    // cos and sin of codes 0-15 as two 8-entry registers each (entries past 2^AB unused).
    float c[16] = {0}, s[16] = {0};
    if (AB <= 4)
        for (int a = 0; a < (1 << AB); a++) c[a] = table[2 * a], s[a] = table[2 * a + 1];
    const __m256 cosLo = _mm256_loadu_ps(c), cosHi = _mm256_loadu_ps(c + 8), sinLo = _mm256_loadu_ps(s), sinHi = _mm256_loadu_ps(s + 8);
    // A run's radius scales and offsets, widened once per run instead of once per token.
    __m256 scales[MAX_GROUPS], offsets[MAX_GROUPS];
    size_t widened = SIZE_MAX;
    for (size_t row = 0; row < count; row++) {
        const size_t t = t0 + row, run = t / (size_t)radiusGroup;
        float *o = out + row * (size_t)d;
        if (run != widened) {
            for (int k = 0; k < groups; k++) {
                const size_t range = run * (size_t)pairs + 8 * (size_t)k;
                scales[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + scalesOffset + 2 * range)));
                offsets[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + offsetsOffset + 2 * range)));
            }
            widened = run;
        }
        for (int k = 0; k < groups; k++) {
            const size_t index = t * (size_t)pairs + 8 * (size_t)k;
            __m256i a = codes8(p, index, AB);
            __m256 code = _mm256_cvtepi32_ps(codes8(p + radiusSection, index, RB));
            __m256 r = _mm256_add_ps(_mm256_mul_ps(scales[k], code), offsets[k]);
            __m256 cv, sv;
            if (AB <= 3) {
                cv = _mm256_permutevar8x32_ps(cosLo, a), sv = _mm256_permutevar8x32_ps(sinLo, a);
            } else if (AB == 4) {
                __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(a, 28));   // bit 3 of the code as the sign bit
                cv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(cosLo, a), _mm256_permutevar8x32_ps(cosHi, a), high);
                sv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(sinLo, a), _mm256_permutevar8x32_ps(sinHi, a), high);
            } else {
                __m256i twice = _mm256_slli_epi32(a, 1);
                cv = _mm256_i32gather_ps(table, twice, 4);
                sv = _mm256_i32gather_ps(table + 1, twice, 4);
            }
            __m256 x = _mm256_mul_ps(r, cv), y = _mm256_mul_ps(r, sv);
            if (half) {
                _mm256_storeu_ps(o + 8 * k, x);
                _mm256_storeu_ps(o + pairs + 8 * k, y);
            } else {
                __m256 lo = _mm256_unpacklo_ps(x, y), hi = _mm256_unpackhi_ps(x, y);
                _mm256_storeu_ps(o + 16 * k, _mm256_permute2f128_ps(lo, hi, 0x20));
                _mm256_storeu_ps(o + 16 * k + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
            }
        }
    }
}

// One instantiation per (angle bits, radius bits) the vector path takes.
#define POLAR_RB(AB)                                                                                                              \
    switch (radiusBits) {                                                                                                         \
    case 1: polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count, out, AB, 1); break; \
    case 2: polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count, out, AB, 2); break; \
    case 3: polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count, out, AB, 3); break; \
    case 4: polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count, out, AB, 4); break; \
    default: polar_decode_body(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count, out, AB, 8); break; \
    }

static void polar_decode_avx2(const uint8_t *p, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                              size_t scalesOffset, size_t offsetsOffset, const float *table, int half, size_t t0, size_t count, float *out) {
    switch (angleBits) {
    case 1: POLAR_RB(1) break;
    case 2: POLAR_RB(2) break;
    case 3: POLAR_RB(3) break;
    case 4: POLAR_RB(4) break;
    default: POLAR_RB(8) break;
    }
}

#pragma clang attribute pop
#endif

int kvk_polar_decode(const uint8_t *block, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                     size_t scalesOffset, size_t offsetsOffset, const float *table, int half, size_t t0, size_t count, float *out) {
    if (!polar_available || !vector_bits(angleBits) || !vector_bits(radiusBits) || pairs <= 0 || pairs % 8 || pairs / 8 > MAX_GROUPS ||
        radiusGroup <= 0)
        return -1;
#if KVK_POLAR_X86
    polar_decode_avx2(block, angleBits, radiusBits, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, half, t0, count,
                      out);
    return 0;
#else
    (void)block, (void)radiusSection, (void)scalesOffset, (void)offsetsOffset, (void)table, (void)half, (void)t0, (void)count, (void)out;
    return -1;
#endif
}
