// The integer-code kernels of int_codes.c, written once and compiled twice: int_codes.c includes
// this file inside a `#pragma clang attribute` region for each instruction set, with
//   SUFFIX(name)          the variant's function names (name_avx2, name_vnni),
//   DOT(acc, u8, s8)      acc + the sums of four adjacent unsigned-by-signed byte products per
//                         32-bit lane (vpdpbusd, or vpmaddubsw + vpmaddwd + vpaddd, which give the
//                         same integers here: no 16-bit pair sum exceeds 2 * 255 * 15),
//   KEY_QUERIES           query heads per pass of the key loop (4 accumulators each),
//   VALUE_ACCUMULATORS    accumulators the value loop may hold (queries x code slots).
// Everything but DOT is the same code in both variants, so both give bit-identical results.
// See int_codes.c for the layouts.

/// `n` f16 values at `src` (any alignment) as floats; `dst` has room for n rounded up to 8.
static inline void SUFFIX(halves)(const void *src, size_t n, float *dst) {
    const uint8_t *p = (const uint8_t *)src;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 2 * i))));
    if (i < n) {
        uint16_t tail[8] = {0};
        memcpy(tail, p + 2 * i, 2 * (n - i));
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tail)));
    }
}

/// The largest and the sum of eight floats, in a fixed order.
static inline float SUFFIX(hmax)(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

static inline float SUFFIX(hsum)(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/// Four vectors of 32-bit integers (already within a byte's range) as 32 bytes in order:
/// signed saturation, or unsigned.
static inline __m256i SUFFIX(pack32)(const __m256i v[4], int isSigned) {
    __m256i a = _mm256_packs_epi32(v[0], v[1]), b = _mm256_packs_epi32(v[2], v[3]);
    __m256i bytes = isSigned ? _mm256_packs_epi16(a, b) : _mm256_packus_epi16(a, b);
    return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/// 32 floats at `x`, each run of 8 times its factor, rounded to nearest even within [lo, hi]
/// (NaN to lo), as 32 bytes in order: signed (int8) when lo < 0, else unsigned.
static inline __m256i SUFFIX(quantize32)(const float *x, const float factor[4], float lo, float hi) {
    const __m256 l = _mm256_set1_ps(lo), h = _mm256_set1_ps(hi);
    __m256i v[4];
    for (int i = 0; i < 4; i++)
        v[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), _mm256_set1_ps(factor[i])), l), h));
    return SUFFIX(pack32)(v, lo < 0);
}

/// The rounding residual of 32 floats times their factors (as `quantize32`), times 254 and
/// rounded: the second int8 of a two-level quantization x * f ~ hi + lo / 254.
static inline __m256i SUFFIX(residual32)(const float *x, const float factor[4]) {
    const __m256 l = _mm256_set1_ps(-127), h = _mm256_set1_ps(127), k = _mm256_set1_ps(254);
    __m256i v[4];
    for (int i = 0; i < 4; i++) {
        __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), _mm256_set1_ps(factor[i]));
        __m256 r = _mm256_sub_ps(y, _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        v[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_mul_ps(r, k), l), h));
    }
    return SUFFIX(pack32)(v, 1);
}

/// Lane r: the largest of the eight floats of v[r] (a transposing reduction, 21 operations
/// instead of eight horizontal ones).
static inline __attribute__((always_inline)) __m256 SUFFIX(max8)(const __m256 v[8]) {
    __m256 a[4], b[2];
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_max_ps(_mm256_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm256_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 2; i++)
        b[i] = _mm256_max_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm256_max_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}

/// Lane r: the sum of the eight floats of v[r], added in `hsum`'s order (low half plus high
/// half, then lanes 0 + 2 and 1 + 3, then those two), so each lane is bit for bit hsum(v[r]).
static inline __attribute__((always_inline)) __m256 SUFFIX(sum8)(const __m256 v[8]) {
    __m256 a[4], b[2];
    // a[i]: half 0 holds v[2i]'s low plus high half, half 1 v[2i + 1]'s.
    for (int i = 0; i < 4; i++)
        a[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20), _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
    // b[i]: per half, lanes 0 + 2 and 1 + 3 of a[2i], then of a[2i + 1].
    for (int i = 0; i < 2; i++)
        b[i] = _mm256_add_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    // Per half: the totals of v[0], v[2], v[4], v[6] (half 0) or v[1], v[3], v[5], v[7].
    __m256 t = _mm256_add_ps(_mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm256_permutevar8x32_ps(t, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/// Segment k of X[m] to segment m of X[k], within each 128-bit lane (segments of 16 / K bytes:
/// a K x K transpose of qwords, dwords or words).
static inline __attribute__((always_inline)) void SUFFIX(segment_transpose)(__m256i X[8], const int K) {
    if (K == 2) {
        __m256i a = _mm256_unpacklo_epi64(X[0], X[1]), b = _mm256_unpackhi_epi64(X[0], X[1]);
        X[0] = a, X[1] = b;
        return;
    }
    __m256i a[8], b[8];
    if (K == 4) {
        for (int i = 0; i < 2; i++) {
            a[2 * i] = _mm256_unpacklo_epi32(X[2 * i], X[2 * i + 1]);
            a[2 * i + 1] = _mm256_unpackhi_epi32(X[2 * i], X[2 * i + 1]);
        }
        X[0] = _mm256_unpacklo_epi64(a[0], a[2]), X[1] = _mm256_unpackhi_epi64(a[0], a[2]);
        X[2] = _mm256_unpacklo_epi64(a[1], a[3]), X[3] = _mm256_unpackhi_epi64(a[1], a[3]);
        return;
    }
    for (int i = 0; i < 4; i++) {
        a[2 * i] = _mm256_unpacklo_epi16(X[2 * i], X[2 * i + 1]);
        a[2 * i + 1] = _mm256_unpackhi_epi16(X[2 * i], X[2 * i + 1]);
    }
    for (int h = 0; h < 2; h++)
        for (int i = 0; i < 2; i++) {
            b[4 * h + 2 * i] = _mm256_unpacklo_epi32(a[4 * h + i], a[4 * h + i + 2]);
            b[4 * h + 2 * i + 1] = _mm256_unpackhi_epi32(a[4 * h + i], a[4 * h + i + 2]);
        }
    for (int i = 0; i < 4; i++) {
        X[2 * i] = _mm256_unpacklo_epi64(b[i], b[i + 4]);
        X[2 * i + 1] = _mm256_unpackhi_epi64(b[i], b[i + 4]);
    }
}

/// One level of a run's prepared queries: int8 q~ in slot order per head, its lane scales (and
/// integer multipliers), the offset constants.
typedef struct {
    _Alignas(32) int8_t qperm[KEY_QUERIES * 2 * MAX_DIM];
    float qscale[KEY_QUERIES * KEY_STATE];
    float qconst[KEY_QUERIES];
} SUFFIX(key_state);

/// q~ = q * s of one run (its scales and offsets as f32), quantized to int8 in slot order
/// (register p, slot k, lane, byte), with one scale per 32-bit accumulator lane and the offset
/// constant sum_c q_c o_c, for `nq` query heads.
///
/// Lane l of a register sums 4 bytes x K slots = 4K channels that lie together in channel
/// order (a "group"); with one chunk per row, lanes 4-7 repeat lanes 0-3's groups for the
/// second token, and with several registers per row, lane l sums group l of every register.
/// So each lane gets its own int8 scale, from the largest |q~| of its groups: the few outlier
/// channels of RoPE'd keys (large s) coarsen only their own groups' steps, not every channel's.
/// With `levels` 2, state[1] is also made: the rounding residual of that quantization in units
/// of 1/254 step (scales / 254, constant 0); a second pass over the codes with it adds about 8
/// bits. Both levels come from one pass over the queries: they share q~, its lane maxima and steps.
static inline __attribute__((always_inline)) void SUFFIX(key_prepare)(const kvk_int_layout *L, const float *scales, const float *offsets,
                                                                      const float *queries, int nq, SUFFIX(key_state) *state, int mmax,
                                                                      const int K, const int oneChunk, const int fixedUnits,
                                                                      const int levels) {
    // With the registers per row a constant (fixedUnits), so is the head size (a row of one
    // 16-byte chunk holds 16K channels, each 32-byte register of a longer row 32K), and the
    // loops over channels have constant trip counts.
    const int P = fixedUnits ? fixedUnits : L->units;
    const int d = fixedUnits ? (oneChunk ? 16 * K : 32 * K * fixedUnits) : L->dim;
    const int segment = 16 / K, stateBytes = P * K * 32, G = 4 * K;
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    // Byte k * segment + i of a shuffled 16 bytes is byte i * K + k: slot k's bytes gathered.
    _Alignas(16) int8_t pattern[16];
    for (int k = 0; k < K; k++)
        for (int i = 0; i < segment; i++) pattern[k * segment + i] = (int8_t)(i * K + k);
    const __m256i gather = _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)pattern));
    // In three passes over the heads (the largest |q~| per lane, then the steps, then the
    // quantization), so that the heads' dependency chains (reductions, divisions) overlap
    // instead of running one head after another.
    _Alignas(32) float scaled[KEY_QUERIES][MAX_DIM];
    _Alignas(32) int8_t q8[MAX_DIM];
    __m256 tops[KEY_QUERIES];
    float inverses[KEY_QUERIES][8];
    for (int q = 0; q < nq; q++) {
        const float *x = queries + (size_t)q * d;
        __m256 constant = _mm256_setzero_ps();
        // Lane l: the largest |q~| of group l of every register (several chunks per row), or of
        // group l % 4 (one chunk: 4 groups). Groups are G = 4K channels, G / 8 vectors each,
        // taken as q~ is made (not in a second pass over it).
        __m256 top = _mm256_setzero_ps();
        for (int c0 = 0; c0 < d; c0 += 8 * G) {
            __m256 v[8];
            for (int r = 0; r < 8; r++) {
                v[r] = _mm256_setzero_ps();
                if (c0 + r * G >= d) continue;   // one chunk: 4 groups
                for (int c = c0 + r * G; c < c0 + (r + 1) * G; c += 8) {
                    __m256 xv = _mm256_loadu_ps(x + c), sv = _mm256_mul_ps(xv, _mm256_loadu_ps(scales + c));
                    _mm256_store_ps(scaled[q] + c, sv);
                    constant = _mm256_add_ps(constant, _mm256_mul_ps(xv, _mm256_loadu_ps(offsets + c)));
                    v[r] = _mm256_max_ps(v[r], _mm256_and_ps(sv, magnitude));
                }
            }
            top = _mm256_max_ps(top, SUFFIX(max8)(v));
        }
        state[0].qconst[q] = SUFFIX(hsum)(constant);
        if (levels > 1) state[1].qconst[q] = 0;
        tops[q] = oneChunk ? _mm256_permute2f128_ps(top, top, 0x00) : top;
    }
    for (int q = 0; q < nq; q++) {
        const __m256 top = tops[q];
        // Lanes whose largest |q~| is 0 (or not finite) quantize to 0 with scale 0. Eight lanes at
        // once: the inverses in one vector division.
        __m256 usable = _mm256_and_ps(_mm256_cmp_ps(top, _mm256_setzero_ps(), _CMP_GT_OQ),
                                      _mm256_cmp_ps(top, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
        __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0f), top), usable);
        _mm256_storeu_ps(inverses[q], inv);
        for (int level = 0; level < levels; level++) {
            __m256 unit = _mm256_and_ps(_mm256_mul_ps(top, _mm256_set1_ps(level ? 1.0f / (127.0f * 254.0f) : 1.0f / 127.0f)), usable);
            float *lanes = state[level].qscale + KEY_STATE * q;
            _mm256_storeu_ps(lanes, unit);
            if (mmax) {
                // The lane scales as integers m_l ~ unit_l / factor (m_l <= mmax), for the integer
                // finish of key_quad: sum_l unit_l a_l ~ factor * sum_l m_l a_l, each lane's scale
                // off by at most factor / 2, 1/2048 of the largest lane's scale or less (mmax >= 1024).
                float largest = SUFFIX(hmax)(unit);
                __m256i m = _mm256_cvtps_epi32(_mm256_mul_ps(unit, _mm256_set1_ps(largest > 0 ? (float)mmax / largest : 0)));
                // Per 128-bit half: lanes 0-3 (4-7) twice, as int16: what packs of two accumulators pair with.
                _mm256_storeu_si256((__m256i *)(lanes + 8), _mm256_packs_epi32(m, m));
                lanes[16] = largest > 0 ? largest / (float)mmax : 0;
            }
        }
    }
    // Each level of each head: its int8 bytes (q~, or its residual), then in slot order.
    for (int lq = 0; lq < levels * nq; lq++) {
        const int level = lq / nq, q = lq % nq;
        const float *inverse = inverses[q];
        for (int c = 0; c < d; c += 32) {
            float factor[4];
            for (int i = 0; i < 4; i++) {
                int group = (c + 8 * i) / G;
                factor[i] = inverse[oneChunk ? group % 4 : group % 8];
            }
            _mm256_store_si256((__m256i *)(q8 + c), level ? SUFFIX(residual32)(scaled[q] + c, factor)
                                                          : SUFFIX(quantize32)(scaled[q] + c, factor, -127, 127));
        }
        // Slot order: register (p, k) holds slot k of chunk 2p in its low lane and of chunk
        // 2p + 1 in its high lane (one chunk: the same in both). A chunk's 16K channels are K
        // runs of 16 bytes; after the shuffle each run holds `segment` bytes of every slot, and
        // slot k's lane takes segment k of run 0, 1, ... in order: a segment transpose.
        int8_t *perm = state[level].qperm + (size_t)q * stateBytes;
        for (int p = 0; p < P; p++) {
            const int8_t *lo = q8 + (oneChunk ? 0 : 2 * p) * L->chunkChannels;
            const int8_t *hi = oneChunk ? lo : lo + L->chunkChannels;
            __m256i X[8];
            for (int m = 0; m < K; m++)
                X[m] = _mm256_shuffle_epi8(_mm256_loadu2_m128i((const __m128i *)(hi + 16 * m), (const __m128i *)(lo + 16 * m)), gather);
            SUFFIX(segment_transpose)(X, K);
            for (int k = 0; k < K; k++) _mm256_store_si256((__m256i *)(perm + (size_t)(p * K + k) * 32), X[k]);
        }
    }
}

/// The value weights w_t * s_tg of `n` tokens quantized to u8 per query head and group, for
/// `nq` heads; with `precise`, also their rounding residuals (a second level, about 8 bits
/// more). `scales` and `offsets` are group-major (g * VALUE_SUB_BLOCK + token), zero past n.
/// Eight (head, group) pairs at a time: their largest weights and offset sums reduced together
/// (`max8`, `sum8`) and their steps in one vector division, instead of a horizontal reduction
/// and a scalar division per pair, one after another (they were about a third of the value
/// kernel's time; int:k2v2 values 14% faster this way, perf, 32K tokens).
static void SUFFIX(value_prepare)(const kvk_int_layout *L, int groupSize, const float *scales, const float *offsets, size_t n,
                                  const float *weights, size_t stride, int nq, value_weights *vw, int precise) {
    const int perToken = L->dim / groupSize, pairs = nq * perToken;
    // Every word of the quads is written (zero past n): `weight_lanes` reads four steps at once.
    const size_t padded = VALUE_SUB_BLOCK;
    _Alignas(32) float w[VALUE_QUERIES][VALUE_SUB_BLOCK], x[8][VALUE_SUB_BLOCK];
    const __m256 smallest = _mm256_set1_ps(1e-20f);
    for (int q = 0; q < nq; q++) {
        // Weights below 1e-20 count as 0: next to the softmax's largest weight (1, in some block)
        // they are below f32's resolution, and their products would be subnormal (slow). NaN
        // and negative weights (a softmax makes neither) count as 0 too.
        const float *src = weights + (size_t)q * stride;
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 v = _mm256_loadu_ps(src + i);
            _mm256_store_ps(w[q] + i, _mm256_and_ps(v, _mm256_cmp_ps(v, smallest, _CMP_GE_OQ)));
        }
        for (; i < padded; i++) w[q][i] = i < n && src[i] >= 1e-20f ? src[i] : 0;
    }
    for (int p0 = 0; p0 < pairs; p0 += 8) {
        const int count = pairs - p0 < 8 ? pairs - p0 : 8;
        __m256 largest[8], offsetSum[8];
        for (int r = 0; r < 8; r++) {
            largest[r] = offsetSum[r] = _mm256_setzero_ps();
            if (r >= count) continue;
            const int q = (p0 + r) / perToken, g = (p0 + r) % perToken;
            const float *s = scales + g * VALUE_SUB_BLOCK, *o = offsets + g * VALUE_SUB_BLOCK;
            for (size_t t = 0; t < padded; t += 8) {
                __m256 wv = _mm256_load_ps(w[q] + t), xv = _mm256_mul_ps(wv, _mm256_loadu_ps(s + t));
                _mm256_store_ps(x[r] + t, xv);
                largest[r] = _mm256_max_ps(largest[r], xv);
                offsetSum[r] = _mm256_add_ps(offsetSum[r], _mm256_mul_ps(wv, _mm256_loadu_ps(o + t)));
            }
        }
        // Lane r: pair p0 + r. A pair whose largest weight is 0 (or not finite) gets step 0.
        const __m256 top = SUFFIX(max8)(largest), sums = SUFFIX(sum8)(offsetSum);
        const __m256 usable = _mm256_and_ps(_mm256_cmp_ps(top, _mm256_setzero_ps(), _CMP_GT_OQ),
                                            _mm256_cmp_ps(top, _mm256_set1_ps(INFINITY), _CMP_LT_OQ));
        const __m256 k = _mm256_set1_ps(255.0f);
        float inverse[8], unit[8], offsetSums[8];
        _mm256_storeu_ps(inverse, _mm256_and_ps(_mm256_div_ps(k, top), usable));
        _mm256_storeu_ps(unit, _mm256_and_ps(_mm256_div_ps(top, k), usable));
        _mm256_storeu_ps(offsetSums, sums);
        for (int r = 0; r < count; r++) {
            const int q = (p0 + r) / perToken, g = (p0 + r) % perToken;
            vw->unit[q][g] = unit[r];
            vw->offsetSum[q][g] = offsetSums[r];
            const float factor[4] = {inverse[r], inverse[r], inverse[r], inverse[r]};
            for (size_t t = 0; t < padded; t += 32) {
                _mm256_storeu_si256((__m256i *)((uint8_t *)vw->quads[q][g] + t), SUFFIX(quantize32)(x[r] + t, factor, 0, 255));
                if (precise) _mm256_storeu_si256((__m256i *)((uint8_t *)vw->low[q][g] + t), SUFFIX(residual32)(x[r] + t, factor));
            }
        }
    }
}

/// The scores of 4 tokens at `rows` (each `rowBytes` apart) for KEY_QUERIES prepared query
/// heads (the ones past `nq` are zero and not stored); `valid` of them are stored. K (slots per
/// byte) and oneChunk are constants at every call, so the loops unroll and the accumulators
/// stay in registers.
static inline __attribute__((always_inline)) void SUFFIX(key_quad)(const uint8_t *rows, const kvk_int_layout *L, const int8_t *qperm,
                                                                   const float *qscale, const float *qconst, int nq, float *out,
                                                                   size_t stride, int valid, const int K, const int oneChunk,
                                                                   const int fixedUnits, const int intFinish) {
    const __m256i mask = _mm256_set1_epi8((char)L->mask);
    const __m256i *qv = (const __m256i *)qperm;
    // Registers per row: a constant where the caller knows it (the loops then unroll and the
    // 16 accumulators stay in registers; as a variable they went through the stack).
    const int P = fixedUnits ? fixedUnits : L->units, perQuery = P * K, bits = 8 / K;
    __m256i acc[KEY_QUERIES][4];
    for (int q = 0; q < KEY_QUERIES; q++)
        for (int j = 0; j < 4; j++) acc[q][j] = _mm256_setzero_si256();
    if (oneChunk) {
        // Two tokens per register: lane 0 holds token 2u, lane 1 token 2u + 1.
        for (int u = 0; u < 2; u++) {
            const uint8_t *r0 = rows + (size_t)(2 * u) * L->rowBytes;
            __m256i R = _mm256_loadu2_m128i((const __m128i *)(r0 + L->rowBytes), (const __m128i *)r0);
            for (int k = 0; k < K; k++) {
                __m256i S = _mm256_and_si256(k ? _mm256_srli_epi16(R, k * bits) : R, mask);
                for (int q = 0; q < KEY_QUERIES; q++) acc[q][u] = DOT(acc[q][u], S, _mm256_load_si256(qv + q * perQuery + k));
            }
        }
    } else {
        for (int j = 0; j < 4; j++) {
            const uint8_t *row = rows + (size_t)j * L->rowBytes;
            for (int p = 0; p < P; p++) {
                __m256i R = _mm256_loadu_si256((const __m256i *)(row + 32 * p));
                for (int k = 0; k < K; k++) {
                    __m256i S = _mm256_and_si256(k ? _mm256_srli_epi16(R, k * bits) : R, mask);
                    for (int q = 0; q < KEY_QUERIES; q++) acc[q][j] = DOT(acc[q][j], S, _mm256_load_si256(qv + q * perQuery + p * K + k));
                }
            }
        }
    }
    for (int q = 0; q < KEY_QUERIES && q < nq; q++) {
        // Each lane's integer sum times its scale, then the lanes added in a fixed order.
        const float *state = qscale + KEY_STATE * q;
        const __m256 laneScale = _mm256_loadu_ps(state);
        __m128 sums;
        if (intFinish) {
            // The lane sums fit int16 and their products with the lane multipliers an int32 sum
            // (key_batch checked): pairs of accumulators packed, multiplied and summed per pair of
            // lanes (vpmaddwd), the pairs summed, one conversion and one scale per four tokens.
            const __m256i m = _mm256_loadu_si256((const __m256i *)(state + 8));
            __m128i total;
            if (oneChunk) {
                // Halves of the packed pair: tokens 0, 2 (lanes 0-3) and 1, 3 (lanes 4-7).
                __m256i y = _mm256_madd_epi16(_mm256_packs_epi32(acc[q][0], acc[q][1]), m);
                __m256i z = _mm256_hadd_epi32(y, y);
                total = _mm_unpacklo_epi32(_mm256_castsi256_si128(z), _mm256_extracti128_si256(z, 1));
            } else {
                __m256i y01 = _mm256_madd_epi16(_mm256_packs_epi32(acc[q][0], acc[q][1]), m);
                __m256i y23 = _mm256_madd_epi16(_mm256_packs_epi32(acc[q][2], acc[q][3]), m);
                __m256i z = _mm256_hadd_epi32(y01, y23);
                total = _mm_add_epi32(_mm256_castsi256_si128(z), _mm256_extracti128_si256(z, 1));
            }
            sums = _mm_mul_ps(_mm_cvtepi32_ps(total), _mm_set1_ps(state[16]));
        } else if (oneChunk) {
            // acc[q][0] lanes: tokens 0, 1; acc[q][1]: tokens 2, 3.
            __m256 h = _mm256_hadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[q][0]), laneScale),
                                      _mm256_mul_ps(_mm256_cvtepi32_ps(acc[q][1]), laneScale));
            h = _mm256_hadd_ps(h, h);
            sums = _mm_unpacklo_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        } else {
            __m256 f[4];
            for (int j = 0; j < 4; j++) f[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[q][j]), laneScale);
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
            sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        }
        __m128 s = _mm_add_ps(sums, _mm_set1_ps(qconst[q]));
        if (valid == 4) {
            _mm_storeu_ps(out + (size_t)q * stride, s);
        } else {
            float tmp[4];
            _mm_storeu_ps(tmp, s);
            for (int i = 0; i < valid; i++) out[(size_t)q * stride + i] = tmp[i];
        }
    }
}

/// The scores of one run's tokens [t, end) for the prepared query heads.
static inline __attribute__((always_inline)) void SUFFIX(key_run)(const uint8_t *codes, const kvk_int_layout *L, size_t t, size_t end,
                                                                  const int8_t *qperm, const float *qscale, const float *qconst, int nq,
                                                                  float *out, size_t stride, const int K, const int oneChunk,
                                                                  const int fixedUnits, const int intFinish) {
    _Alignas(32) uint8_t padded[4 * MAX_ROW_BYTES];
    for (; t + 4 <= end; t += 4, out += 4) {
        kvk_plan_advance(4 * (size_t)L->rowBytes);
        SUFFIX(key_quad)(codes + t * L->rowBytes, L, qperm, qscale, qconst, nq, out, stride, 4, K, oneChunk, fixedUnits, intFinish);
    }
    if (t < end) {
        // The last 1-3 tokens: rows copied next to zero rows, so nothing past them is read.
        int n = (int)(end - t);
        memset(padded, 0, sizeof padded);
        memcpy(padded, codes + t * L->rowBytes, (size_t)n * L->rowBytes);
        SUFFIX(key_quad)(padded, L, qperm, qscale, qconst, nq, out, stride, n, K, oneChunk, fixedUnits, intFinish);
    }
}

/// Scores of one run's tokens [t, end) for query heads [0, nq) of `queries` (nq at most
/// KEY_QUERIES), the run's scales and offsets given as f32. Keys of 4 bits (K = 2) take a second
/// pass with the query's rounding residual (`key_prepare`): their own error is small enough that
/// an 8-bit query's would show (tested: at most a tenth of the scheme's attention error).
static inline __attribute__((always_inline)) void SUFFIX(key_batch)(const uint8_t *codes, const kvk_int_layout *L, const float *runScales,
                                                                    const float *runOffsets, size_t t, size_t end, const float *queries,
                                                                    int nq, float *out, size_t stride, const int K, const int oneChunk,
                                                                    const int fixedUnits) {
    const int precise = K <= 2;
    SUFFIX(key_state) state[2];
    const int stateBytes = L->units * K * 32;
    // The integer finish where a lane's sum (channels x largest code x 127) fits int16 and eight
    // lanes' products with multipliers of at least 1024 fit int32 (1 and 2 bits, and 4 bits up
    // to 128 channels); else the f32 one.
    const int laneChannels = 4 * K * (oneChunk ? 1 : L->units), laneMax = laneChannels * L->mask * 127;
    const int mmax = laneMax > 32767 ? 0 : (int)(2147483647 / (8 * (long)laneMax) < 32767 ? 2147483647 / (8 * (long)laneMax) : 32767);
    const int intFinish = mmax >= 1024;
    // Heads past nq score with a zero query (cheaper than a branch in the loop).
    for (int level = 0; level <= precise; level++)
        memset(state[level].qperm + (size_t)nq * stateBytes, 0, (size_t)(KEY_QUERIES - nq) * stateBytes);
    // Both levels from one pass over the queries (they share q~, its lane maxima and steps).
    SUFFIX(key_prepare)(L, runScales, runOffsets, queries, nq, state, intFinish ? mmax : 0, K, oneChunk, fixedUnits, precise + 1);
#define KEY_RUN(...) (intFinish ? SUFFIX(key_run)(__VA_ARGS__, K, oneChunk, fixedUnits, 1) : SUFFIX(key_run)(__VA_ARGS__, K, oneChunk, fixedUnits, 0))
    if (!precise) {
        KEY_RUN(codes, L, t, end, state[0].qperm, state[0].qscale, state[0].qconst, nq, out, stride);
        return;
    }
    float low[KEY_QUERIES * 64];
    for (size_t a = t; a < end; a += 64) {
        size_t b = end - a < 64 ? end : a + 64;
        KEY_RUN(codes, L, a, b, state[0].qperm, state[0].qscale, state[0].qconst, nq, out + (a - t), stride);
        KEY_RUN(codes, L, a, b, state[1].qperm, state[1].qscale, state[1].qconst, nq, low, 64);
        for (int q = 0; q < nq; q++)
            for (size_t i = 0; i < b - a; i++) out[(size_t)q * stride + (a - t) + i] += low[q * 64 + i];
    }
#undef KEY_RUN
}

static void SUFFIX(channel_scores)(const uint8_t *codes, const void *scales, const void *offsets, const kvk_int_layout *L,
                                   int runTokens, size_t t0, size_t count, const float *queries, int group, float *scores,
                                   size_t stride) {
    float runScales[MAX_DIM], runOffsets[MAX_DIM];
    size_t t = t0, end = t0 + count;
    while (t < end) {
        size_t run = t / (size_t)runTokens;
        size_t runEnd = (run + 1) * (size_t)runTokens;
        if (runEnd > end) runEnd = end;
        SUFFIX(halves)((const uint8_t *)scales + 2 * run * (size_t)L->dim, (size_t)L->dim, runScales);
        SUFFIX(halves)((const uint8_t *)offsets + 2 * run * (size_t)L->dim, (size_t)L->dim, runOffsets);
        for (int q0 = 0; q0 < group; q0 += KEY_QUERIES) {
            int nq = group - q0 < KEY_QUERIES ? group - q0 : KEY_QUERIES;
            const float *q = queries + (size_t)q0 * L->dim;
            float *out = scores + (size_t)q0 * stride + (t - t0);
            // Slots per byte, one chunk or not, and registers per row (1 and 2 as constants).
#define KEY_BATCH(K, oneChunk, units) \
    SUFFIX(key_batch)(codes, L, runScales, runOffsets, t, runEnd, q, nq, out, stride, K, oneChunk, units)
#define KEY_BATCH_UNITS(K)                                \
    (L->units == 1   ? KEY_BATCH(K, 0, 1)                 \
     : L->units == 2 ? KEY_BATCH(K, 0, 2)                 \
                     : KEY_BATCH(K, 0, 0))
            switch (L->slots * 2 + (L->chunks == 1)) {
            case 4: KEY_BATCH_UNITS(2); break;
            case 5: KEY_BATCH(2, 1, 1); break;
            case 8: KEY_BATCH_UNITS(4); break;
            case 9: KEY_BATCH(4, 1, 1); break;
            case 16: KEY_BATCH_UNITS(8); break;
            default: KEY_BATCH(8, 1, 1); break;
            }
#undef KEY_BATCH_UNITS
#undef KEY_BATCH
        }
        t = runEnd;
    }
}

/// Rows t .. t+3 of one 16-byte chunk pair `p` (or, one chunk per row, rows t .. t+3 in lane 0
/// and t+4 .. t+7 in lane 1), bytes 4i .. 4i+3 of each lane transposed so that 32-bit lane j
/// holds byte 4i + j of the four rows.
static inline __attribute__((always_inline)) __m256i SUFFIX(value_quads)(const uint8_t *rows, const kvk_int_layout *L, int p, int i,
                                                                         const int oneChunk) {
    __m256i R[4];
    for (int j = 0; j < 4; j++) {
        const uint8_t *row = rows + (size_t)j * L->rowBytes;
        R[j] = oneChunk ? _mm256_loadu2_m128i((const __m128i *)(row + 4 * (size_t)L->rowBytes), (const __m128i *)row)
                        : _mm256_loadu_si256((const __m256i *)(row + 32 * p));
    }
    __m256i a = i < 2 ? _mm256_unpacklo_epi8(R[0], R[1]) : _mm256_unpackhi_epi8(R[0], R[1]);
    __m256i c = i < 2 ? _mm256_unpacklo_epi8(R[2], R[3]) : _mm256_unpackhi_epi8(R[2], R[3]);
    return (i & 1) ? _mm256_unpackhi_epi16(a, c) : _mm256_unpacklo_epi16(a, c);
}

/// What one sub-block adds to the accumulators of query heads [qa, qa + nq) (row 0 of `acc` is
/// head 0 of the pass) for register p: integer sums over the steps, flushed to f32 once.
/// NQ heads are computed (lanes past nq are zero), nq stored. 4-bit values (K = 2) also sum
/// the codes against the weights' residuals (`lanesLow`, codes as the unsigned operand): their
/// own error is small enough that 8-bit weights' would show.
static inline __attribute__((always_inline)) void SUFFIX(value_unit)(const uint8_t *codes, const uint8_t *padded, size_t first,
                                                                     size_t steps, size_t fullSteps, const kvk_int_layout *L, int p,
                                                                     __m256i lanes[VALUE_QUERIES][VALUE_SUB_BLOCK / 4],
                                                                     __m256i lanesLow[VALUE_QUERIES][VALUE_SUB_BLOCK / 4], int qa, int nq,
                                                                     const value_weights *vw, int g0, int g1, float *acc,
                                                                     const int K, const int oneChunk) {
    const int precise = K <= 2, levels = 1 + precise;
    const int NQ = VALUE_ACCUMULATORS / (K * levels) < VALUE_QUERIES ? VALUE_ACCUMULATORS / (K * levels) : VALUE_QUERIES;
    const int per = oneChunk ? 8 : 4, bits = 8 / K;
    const __m256i mask = _mm256_set1_epi8((char)L->mask);
    // What a unit of each head's integer sums is worth, per 128-bit lane (its group), and the
    // offsets' share: the same for every slot, so set up once.
    __m256 unit[VALUE_QUERIES], unitLow[VALUE_QUERIES], offset[VALUE_QUERIES];
    for (int q = 0; q < NQ && q < nq; q++) {
        int head = qa + q;
        unit[q] = _mm256_setr_m128(_mm_set1_ps(vw->unit[head][g0]), _mm_set1_ps(vw->unit[head][g1]));
        unitLow[q] = _mm256_setr_m128(_mm_set1_ps(vw->unit[head][g0] / 254.0f), _mm_set1_ps(vw->unit[head][g1] / 254.0f));
        offset[q] = _mm256_setr_m128(_mm_set1_ps(vw->offsetSum[head][g0]), _mm_set1_ps(vw->offsetSum[head][g1]));
    }
    for (int i = 0; i < 4; i++) {
        __m256i sum[VALUE_ACCUMULATORS], low[VALUE_ACCUMULATORS];
        for (int x = 0; x < NQ * K; x++) sum[x] = low[x] = _mm256_setzero_si256();
        for (size_t s = 0; s < steps; s++) {
            const uint8_t *rows = s < fullSteps ? codes + (first + s * (size_t)per) * L->rowBytes : padded;
            __m256i W = SUFFIX(value_quads)(rows, L, p, i, oneChunk);
            for (int k = 0; k < K; k++) {
                __m256i S = _mm256_and_si256(k ? _mm256_srli_epi16(W, k * bits) : W, mask);
                for (int q = 0; q < NQ; q++) {
                    sum[q * K + k] = DOT(sum[q * K + k], lanes[(qa + q) % VALUE_QUERIES][s], S);
                    if (precise) low[q * K + k] = DOT(low[q * K + k], S, lanesLow[(qa + q) % VALUE_QUERIES][s]);
                }
            }
        }
        for (int q = 0; q < NQ && q < nq; q++) {
            float *out = acc + (size_t)(qa + q) * L->dim;
            for (int k = 0; k < K; k++) {
                __m256i v = sum[q * K + k], w = low[q * K + k];
                if (oneChunk) {
                    __m128 r = _mm_mul_ps(_mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1))),
                                          _mm256_castps256_ps128(unit[q]));
                    if (precise)
                        r = _mm_add_ps(r, _mm_mul_ps(_mm_cvtepi32_ps(_mm_add_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1))),
                                                     _mm256_castps256_ps128(unitLow[q])));
                    float *o = out + (i * K + k) * 4;
                    _mm_storeu_ps(o, _mm_add_ps(_mm_loadu_ps(o), _mm_add_ps(r, _mm256_castps256_ps128(offset[q]))));
                } else {
                    __m256 r = _mm256_mul_ps(_mm256_cvtepi32_ps(v), unit[q]);
                    if (precise) r = _mm256_add_ps(r, _mm256_mul_ps(_mm256_cvtepi32_ps(w), unitLow[q]));
                    float *o = out + (size_t)p * 32 * K + (i * K + k) * 8;
                    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), _mm256_add_ps(r, offset[q])));
                }
            }
        }
    }
}

/// One head's weights per step (`value_prepare`'s quads of groups g0 and g1, all 16 words
/// written): each 32-bit lane of the low half holds the four bytes of the tokens its codes
/// hold, and so the high half: group g0's word s and g1's word s (two chunks per row), or words
/// 2s and 2s + 1 of g0 (one chunk: the high half holds the next four tokens). Four steps per load.
static inline __attribute__((always_inline)) void SUFFIX(weight_lanes)(const uint32_t *w0, const uint32_t *w1, size_t steps, __m256i *out,
                                                                       const int oneChunk) {
    for (size_t s = 0; s < steps; s += 4) {
        if (oneChunk) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(w0 + 2 * s));
            for (int j = 0; j < 4; j++)
                out[s + j] = _mm256_permutevar8x32_epi32(c, _mm256_setr_epi32(2 * j, 2 * j, 2 * j, 2 * j, 2 * j + 1, 2 * j + 1, 2 * j + 1, 2 * j + 1));
        } else {
            __m256i c = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(w0 + s))),
                                                _mm_loadu_si128((const __m128i *)(w1 + s)), 1);
            out[s] = _mm256_shuffle_epi32(c, 0x00);
            out[s + 1] = _mm256_shuffle_epi32(c, 0x55);
            out[s + 2] = _mm256_shuffle_epi32(c, 0xAA);
            out[s + 3] = _mm256_shuffle_epi32(c, 0xFF);
        }
    }
}

static void SUFFIX(token_accumulate)(const uint8_t *codes, const void *scales, const void *offsets, const kvk_int_layout *L,
                                     int groupSize, size_t t0, size_t count, const float *weights, size_t stride, int group,
                                     float *acc) {
    const int K = L->slots, P = L->units, oneChunk = L->chunks == 1, per = oneChunk ? 8 : 4;
    const int levels = K <= 2 ? 2 : 1;
    const int NQ = VALUE_ACCUMULATORS / (K * levels) < VALUE_QUERIES ? VALUE_ACCUMULATORS / (K * levels) : VALUE_QUERIES;
    const size_t perToken = (size_t)(L->dim / groupSize);
    value_weights vw;
    __m256i lanes[VALUE_QUERIES][VALUE_SUB_BLOCK / 4], lanesLow[VALUE_QUERIES][VALUE_SUB_BLOCK / 4];
    _Alignas(32) uint8_t padded[8 * MAX_ROW_BYTES];
    float blockScales[VALUE_SUB_BLOCK * MAX_GROUPS], blockOffsets[VALUE_SUB_BLOCK * MAX_GROUPS];
    float tokenMajor[2 * VALUE_SUB_BLOCK * MAX_GROUPS];
    for (size_t a = t0; a < t0 + count; a += VALUE_SUB_BLOCK) {
        size_t n = t0 + count - a < VALUE_SUB_BLOCK ? t0 + count - a : VALUE_SUB_BLOCK;
        kvk_plan_advance(n * (size_t)L->rowBytes);
        size_t steps = (n + (size_t)per - 1) / (size_t)per;
        // Full steps read the block's rows; a partial last step reads a zero-padded copy (its
        // missing tokens have weight 0).
        size_t fullSteps = n / (size_t)per;
        if (fullSteps < steps) {
            memset(padded, 0, sizeof padded);
            memcpy(padded, codes + (a + fullSteps * (size_t)per) * L->rowBytes, (n - fullSteps * (size_t)per) * L->rowBytes);
        }
        // Scales and offsets group-major, zero past n (value_prepare reads all 64).
        if (n < VALUE_SUB_BLOCK) {
            memset(blockScales, 0, sizeof(float) * VALUE_SUB_BLOCK * perToken);
            memset(blockOffsets, 0, sizeof(float) * VALUE_SUB_BLOCK * perToken);
        }
        if (perToken == 2 && n == VALUE_SUB_BLOCK) {
            // Two groups per token: eight halves are four tokens' (g0, g1) pairs; one permute
            // puts g0's four in the low half and g1's in the high half.
            const __m256i split = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            for (int which = 0; which < 2; which++) {
                const uint8_t *src = (const uint8_t *)(which ? offsets : scales) + 2 * a * perToken;
                float *dst = which ? blockOffsets : blockScales;
                for (size_t i = 0; i < VALUE_SUB_BLOCK; i += 4) {
                    __m256 v = _mm256_permutevar8x32_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 4 * i))), split);
                    _mm_storeu_ps(dst + i, _mm256_castps256_ps128(v));
                    _mm_storeu_ps(dst + VALUE_SUB_BLOCK + i, _mm256_extractf128_ps(v, 1));
                }
            }
        } else if (perToken == 1) {
            SUFFIX(halves)((const uint8_t *)scales + 2 * a, n, blockScales);
            SUFFIX(halves)((const uint8_t *)offsets + 2 * a, n, blockOffsets);
        } else {
            SUFFIX(halves)((const uint8_t *)scales + 2 * a * perToken, n * perToken, tokenMajor);
            SUFFIX(halves)((const uint8_t *)offsets + 2 * a * perToken, n * perToken, tokenMajor + VALUE_SUB_BLOCK * MAX_GROUPS);
            for (size_t i = 0; i < n; i++)
                for (size_t g = 0; g < perToken; g++) {
                    blockScales[g * VALUE_SUB_BLOCK + i] = tokenMajor[i * perToken + g];
                    blockOffsets[g * VALUE_SUB_BLOCK + i] = tokenMajor[VALUE_SUB_BLOCK * MAX_GROUPS + i * perToken + g];
                }
        }
        for (int q0 = 0; q0 < group; q0 += VALUE_QUERIES) {
            int nb = group - q0 < VALUE_QUERIES ? group - q0 : VALUE_QUERIES;
            SUFFIX(value_prepare)(L, groupSize, blockScales, blockOffsets, n, weights + (size_t)q0 * stride + (a - t0), stride, nb, &vw, levels == 2);
            float *rows = acc + (size_t)q0 * L->dim;
            for (int p = 0; p < P; p++) {
                int g0 = value_group(L, groupSize, p, 0), g1 = value_group(L, groupSize, p, 1);
                // Each step's weights per head: lane 0's four bytes in each of its 32-bit lanes,
                // lane 1's in its; zero for heads past nb.
                for (int q = 0; q < VALUE_QUERIES; q++) {
                    if (q >= nb) {
                        for (size_t s = 0; s < steps; s++) lanes[q][s] = lanesLow[q][s] = _mm256_setzero_si256();
                        continue;
                    }
                    SUFFIX(weight_lanes)(vw.quads[q][g0], vw.quads[q][g1], steps, lanes[q], oneChunk);
                    if (levels == 2) SUFFIX(weight_lanes)(vw.low[q][g0], vw.low[q][g1], steps, lanesLow[q], oneChunk);
                }
                for (int qa = 0; qa < nb; qa += NQ) {
                    int nq = nb - qa;
                    switch (K * 2 + oneChunk) {
                    case 4: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 2, 0); break;
                    case 5: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 2, 1); break;
                    case 8: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 4, 0); break;
                    case 9: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 4, 1); break;
                    case 16: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 8, 0); break;
                    default: SUFFIX(value_unit)(codes, padded, a, steps, fullSteps, L, p, lanes, lanesLow, qa, nq, &vw, g0, g1, rows, 8, 1); break;
                    }
                }
            }
        }
    }
}
