// The polar kernels of polar.c, included once per instruction-set variant with SUFFIX (the
// functions' names) and POLAR_VL defined: 0 for AVX2 (the decoder's pieces), 1 for AVX-512 VL
// (the same pieces with the two-table permute, which looks up 16 entries in one instruction,
// and the key scores without a tile, which need its 32 registers: four tokens of four heads
// are 16 accumulators; with AVX2's 16 the scores without a tile measured slower than decoding
// to a tile, 876 against 811 us over 32K tokens). Both variants compute every value with the
// same operations in the same order, so both give the same bits.

/// cos and sin of angle codes 0-15, two 8-entry registers each (entries past 2^AB unused).
typedef struct {
    __m256 cosLo, cosHi, sinLo, sinHi;
} SUFFIX(polar_tables);

static inline __attribute__((always_inline)) SUFFIX(polar_tables) SUFFIX(polar_load_tables)(const float *table, const int AB) {
    float c[16] = {0}, s[16] = {0};
    if (AB <= 4)
        for (int a = 0; a < (1 << AB); a++) c[a] = table[2 * a], s[a] = table[2 * a + 1];
    SUFFIX(polar_tables) T = {_mm256_loadu_ps(c), _mm256_loadu_ps(c + 8), _mm256_loadu_ps(s), _mm256_loadu_ps(s + 8)};
    return T;
}

/// A run's radius scales and offsets for every group of eight pairs, widened once per run
/// (they depend on the run only).
static inline __attribute__((always_inline)) void SUFFIX(polar_widen_run)(const uint8_t *p, size_t run, int pairs, size_t scalesOffset,
                                                                          size_t offsetsOffset, __m256 *scales, __m256 *offsets) {
    for (int k = 0; k < pairs / 8; k++) {
        const size_t range = run * (size_t)pairs + 8 * (size_t)k;
        scales[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + scalesOffset + 2 * range)));
        offsets[k] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + offsetsOffset + 2 * range)));
    }
}

/// x and y of pairs index ..< index + 8 (of token index / pairs): radius = scale * code + offset,
/// then radius times the cos and sin of the angle code, as PolarScheme.decodeVector.
static inline __attribute__((always_inline)) void SUFFIX(polar_pairs8)(const uint8_t *p, size_t index, size_t radiusSection, __m256 scale,
                                                                       __m256 offset, const SUFFIX(polar_tables) * T, const float *table,
                                                                       __m256 *x, __m256 *y, const int AB, const int RB) {
    __m256i a = codes8(p, index, AB);
    __m256 code = _mm256_cvtepi32_ps(codes8(p + radiusSection, index, RB));
    __m256 r = _mm256_add_ps(_mm256_mul_ps(scale, code), offset);
    __m256 cv, sv;
    if (AB <= 3) {
        cv = _mm256_permutevar8x32_ps(T->cosLo, a), sv = _mm256_permutevar8x32_ps(T->sinLo, a);
    } else if (AB == 4) {
#if POLAR_VL
        cv = _mm256_permutex2var_ps(T->cosLo, a, T->cosHi), sv = _mm256_permutex2var_ps(T->sinLo, a, T->sinHi);
#else
        __m256 high = _mm256_castsi256_ps(_mm256_slli_epi32(a, 28));   // bit 3 of the code as the sign bit
        cv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(T->cosLo, a), _mm256_permutevar8x32_ps(T->cosHi, a), high);
        sv = _mm256_blendv_ps(_mm256_permutevar8x32_ps(T->sinLo, a), _mm256_permutevar8x32_ps(T->sinHi, a), high);
#endif
    } else {
        __m256i twice = _mm256_slli_epi32(a, 1);
        cv = _mm256_i32gather_ps(table, twice, 4);
        sv = _mm256_i32gather_ps(table + 1, twice, 4);
    }
    *x = _mm256_mul_ps(r, cv), *y = _mm256_mul_ps(r, sv);
}

#if POLAR_VL
/// Scores of TB tokens from t for four query heads (queries in the scoring layout: per group of
/// eight pairs, the eight x then the eight y channels), each pair decoded once for every head.
static inline __attribute__((always_inline)) void SUFFIX(polar_scores_step)(const uint8_t *p, int pairs, size_t radiusSection,
                                                                            const __m256 *scales, const __m256 *offsets,
                                                                            const SUFFIX(polar_tables) * T, const float *table, size_t t,
                                                                            const float *queries, int nq, float *out, size_t stride,
                                                                            size_t planPerToken, const int AB, const int RB, const int TB) {
    const int d = 2 * pairs;
    kvk_plan_advance((size_t)TB * planPerToken);
    __m256 acc[4][4];
    for (int q = 0; q < 4; q++)
        for (int j = 0; j < TB; j++) acc[q][j] = _mm256_setzero_ps();
    for (int k = 0; k < pairs / 8; k++) {
        __m256 x[4], y[4];
        for (int j = 0; j < TB; j++)
            SUFFIX(polar_pairs8)(p, (t + (size_t)j) * (size_t)pairs + 8 * (size_t)k, radiusSection, scales[k], offsets[k], T, table, &x[j],
                                 &y[j], AB, RB);
        for (int q = 0; q < 4; q++) {
            const __m256 qx = _mm256_loadu_ps(queries + (size_t)q * d + 16 * k), qy = _mm256_loadu_ps(queries + (size_t)q * d + 16 * k + 8);
            for (int j = 0; j < TB; j++) acc[q][j] = _mm256_fmadd_ps(qy, y[j], _mm256_fmadd_ps(qx, x[j], acc[q][j]));
        }
    }
    // Reduced as the row kernels reduce a score (score_sums.h): the same bits.
    for (int q = 0; q < nq; q++) kvk_store_scores(out + (size_t)q * stride, acc[q], TB);
}

/// Scores of tokens [t0, t0 + count) for `nq` (1-4) heads of `queries` (four heads' room; the
/// ones past nq zero): four tokens per step within a radius run, then one at a time.
static inline __attribute__((always_inline)) void SUFFIX(polar_scores_body)(const uint8_t *p, int pairs, int radiusGroup,
                                                                            size_t radiusSection, size_t scalesOffset, size_t offsetsOffset,
                                                                            const float *table, size_t t0, size_t count,
                                                                            const float *queries, int nq, float *out, size_t stride,
                                                                            const int AB, const int RB) {
    const SUFFIX(polar_tables) T = SUFFIX(polar_load_tables)(table, AB);
    __m256 scales[POLAR_MAX_GROUPS], offsets[POLAR_MAX_GROUPS];
    size_t t = t0;
    // The thread's prefetch plan (the blocks two segments ahead) spread evenly over these tokens
    // (prefetch_plan.h); by the codes' own 64 bytes a token it was 1.44 ms, not 1.26, at 32K.
    const size_t end = t0 + count, planPerToken = kvk_plan_share(count);
    while (t < end) {
        const size_t run = t / (size_t)radiusGroup, runEnd = (run + 1) * (size_t)radiusGroup < end ? (run + 1) * (size_t)radiusGroup : end;
        SUFFIX(polar_widen_run)(p, run, pairs, scalesOffset, offsetsOffset, scales, offsets);
        for (; t + 4 <= runEnd; t += 4)
            SUFFIX(polar_scores_step)(p, pairs, radiusSection, scales, offsets, &T, table, t, queries, nq, out + (t - t0), stride, planPerToken, AB, RB, 4);
        for (; t < runEnd; t++)
            SUFFIX(polar_scores_step)(p, pairs, radiusSection, scales, offsets, &T, table, t, queries, nq, out + (t - t0), stride, planPerToken, AB, RB, 1);
    }
}

static void SUFFIX(polar_scores)(const uint8_t *p, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                                 size_t scalesOffset, size_t offsetsOffset, const float *table, size_t t0, size_t count,
                                 const float *queries, int nq, float *out, size_t stride) {
#define POLAR_SCORES(AB, RB)                                                                                                           \
    SUFFIX(polar_scores_body)(p, pairs, radiusGroup, radiusSection, scalesOffset, offsetsOffset, table, t0, count, queries, nq, out, stride, \
                              AB, RB)
    POLAR_WIDTHS(POLAR_SCORES)
#undef POLAR_SCORES
}
#endif
