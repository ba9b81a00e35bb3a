// The weight-product kernels of weights.c, written once and compiled per instruction set:
// weights.c includes this file inside a `#pragma clang attribute` region for each, with
//   SUFFIX(name)    the variant's function names (name_avx2, name_vnni),
//   DOT(u8, s8)     the sums of four adjacent unsigned-by-signed byte products per 32-bit lane
//                   (vpdpbusd from zero, or vpmaddubsw + vpmaddwd: the same integers here, as no
//                   16-bit pair sum exceeds 2 * 127 * 127).
// Everything but DOT is the same code in both, so both give the portable variant's bits.
// The block loops are written once with the encoding as a parameter and instantiated per
// encoding (always_inline with a constant), so the inner loops carry no encoding branches.

#define KVK_INLINE static inline __attribute__((always_inline))

/// The block's 32 weight codes: signed bytes (Q8_0) or nibbles 0...15 (weight j low in byte j,
/// weight j + 16 high).
KVK_INLINE __m256i SUFFIX(block_codes)(const int encoding, const uint8_t *w) {
    if (encoding == KVK_WEIGHTS_Q8_0) return _mm256_loadu_si256((const __m256i *)(w + 2));
    __m128i packed = _mm_loadu_si128((const __m128i *)(w + (encoding == KVK_WEIGHTS_Q4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
}

/// Lane j: sum of codes[i] * x[i] for i in 4j...4j+3, as an exact integer, then as a float.
KVK_INLINE __m256 SUFFIX(block_lanes)(const int encoding, __m256i codes, __m256i x) {
    if (encoding == KVK_WEIGHTS_Q8_0) {  // |w| times x with w's sign: unsigned-by-signed
        x = _mm256_sign_epi8(x, codes);
        codes = _mm256_sign_epi8(codes, codes);
    }
    return _mm256_cvtepi32_ps(DOT(codes, x));
}

/// One row against up to four inputs (prefill): the row's codes expanded once per block.
KVK_INLINE void SUFFIX(row_body)(const int encoding, const uint8_t *row, int blocks, const int8_t *xq, const float *xd, const float *xs,
                                 int count, size_t xStride, float *out) {
    const size_t bb = block_bytes(encoding), perInput = xStride / 32;
    for (int t0 = 0; t0 < count; t0 += 4) {
        const int n = count - t0 < 4 ? count - t0 : 4;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float offsets[4] = {0, 0, 0, 0};
        for (int b = 0; b < blocks; b++) {
            const uint8_t *w = row + b * bb;
            const __m256i codes = SUFFIX(block_codes)(encoding, w);
            const float d = _cvtsh_ss(load_u16(w)), m = encoding == KVK_WEIGHTS_Q4_1 ? _cvtsh_ss(load_u16(w + 2)) : 0;
            for (int t = 0; t < n; t++) {
                const size_t i = (size_t)(t0 + t);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * xStride + 32 * (size_t)b));
                const float scale = d * xd[i * perInput + b], s = xs[i * perInput + b];
                acc[t] = _mm256_fmadd_ps(SUFFIX(block_lanes)(encoding, codes, x), _mm256_set1_ps(scale), acc[t]);
                if (encoding == KVK_WEIGHTS_Q4_0) offsets[t] += (-8.0f * d) * s;
                if (encoding == KVK_WEIGHTS_Q4_1) offsets[t] += m * s;
            }
        }
        for (int t = 0; t < n; t++) {
            float lanes[8];
            _mm256_storeu_ps(lanes, acc[t]);
            out[t0 + t] = finish_lanes(lanes, offsets[t]);
        }
    }
}

/// One input against four rows at once (decode): four independent accumulator chains, the
/// input's codes loaded once per block. Each row's arithmetic is `row_body`'s.
KVK_INLINE void SUFFIX(four_body)(const int encoding, const uint8_t *rows, size_t rowBytes, int blocks, const int8_t *xq, const float *xd,
                                  const float *xs, float *out) {
    const size_t bb = block_bytes(encoding);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
    float off0 = 0, off1 = 0, off2 = 0, off3 = 0;
    const uint8_t *w0 = rows, *w1 = rows + rowBytes, *w2 = rows + 2 * rowBytes, *w3 = rows + 3 * rowBytes;
    const char *ahead = (const char *)rows + PREFETCH_GROUPS * 4 * rowBytes;  // see prefetch_step
    for (int b = 0; b < blocks; b++, w0 += bb, w1 += bb, w2 += bb, w3 += bb, ahead += 4 * bb) {
        prefetch_step(ahead, 4 * bb);
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * (size_t)b));
        const float dx = xd[b], s = xs[b];
        const float d0 = _cvtsh_ss(load_u16(w0)), d1 = _cvtsh_ss(load_u16(w1)), d2 = _cvtsh_ss(load_u16(w2)), d3 = _cvtsh_ss(load_u16(w3));
        acc0 = _mm256_fmadd_ps(SUFFIX(block_lanes)(encoding, SUFFIX(block_codes)(encoding, w0), x), _mm256_set1_ps(d0 * dx), acc0);
        acc1 = _mm256_fmadd_ps(SUFFIX(block_lanes)(encoding, SUFFIX(block_codes)(encoding, w1), x), _mm256_set1_ps(d1 * dx), acc1);
        acc2 = _mm256_fmadd_ps(SUFFIX(block_lanes)(encoding, SUFFIX(block_codes)(encoding, w2), x), _mm256_set1_ps(d2 * dx), acc2);
        acc3 = _mm256_fmadd_ps(SUFFIX(block_lanes)(encoding, SUFFIX(block_codes)(encoding, w3), x), _mm256_set1_ps(d3 * dx), acc3);
        if (encoding == KVK_WEIGHTS_Q4_0) {
            off0 += (-8.0f * d0) * s, off1 += (-8.0f * d1) * s, off2 += (-8.0f * d2) * s, off3 += (-8.0f * d3) * s;
        } else if (encoding == KVK_WEIGHTS_Q4_1) {
            off0 += _cvtsh_ss(load_u16(w0 + 2)) * s, off1 += _cvtsh_ss(load_u16(w1 + 2)) * s;
            off2 += _cvtsh_ss(load_u16(w2 + 2)) * s, off3 += _cvtsh_ss(load_u16(w3 + 2)) * s;
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc0);
    out[0] = finish_lanes(lanes, off0);
    _mm256_storeu_ps(lanes, acc1);
    out[1] = finish_lanes(lanes, off1);
    _mm256_storeu_ps(lanes, acc2);
    out[2] = finish_lanes(lanes, off2);
    _mm256_storeu_ps(lanes, acc3);
    out[3] = finish_lanes(lanes, off3);
}

/// `kvk_quantize_q8` with eight lanes: the same operations per element (|x| max, x * (127 /
/// max) rounded to nearest even, clamped; integer sums are exact), so the same codes, steps
/// and sums.
static void SUFFIX(quantize_q8)(const float *x, int cols, int8_t *q, float *step, float *sum) {
    const __m256 signBit = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    for (int b = 0; b < cols / 32; b++) {
        const float *v = x + 32 * b;
        __m256 a0 = _mm256_loadu_ps(v), a1 = _mm256_loadu_ps(v + 8), a2 = _mm256_loadu_ps(v + 16), a3 = _mm256_loadu_ps(v + 24);
        __m256 m = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(signBit, a0), _mm256_andnot_ps(signBit, a1)),
                                 _mm256_max_ps(_mm256_andnot_ps(signBit, a2), _mm256_andnot_ps(signBit, a3)));
        // A NaN or an infinity: the portable loop's fmaxf/fminf rules decide (rare; the vector
        // min/max would propagate NaN differently).
        const __m256 inf = _mm256_set1_ps(INFINITY);
        const __m256 bad = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(_mm256_andnot_ps(signBit, a0), inf, _CMP_NLT_UQ),
                                                     _mm256_cmp_ps(_mm256_andnot_ps(signBit, a1), inf, _CMP_NLT_UQ)),
                                        _mm256_or_ps(_mm256_cmp_ps(_mm256_andnot_ps(signBit, a2), inf, _CMP_NLT_UQ),
                                                     _mm256_cmp_ps(_mm256_andnot_ps(signBit, a3), inf, _CMP_NLT_UQ)));
        if (_mm256_movemask_ps(bad)) {
            quantize_q8_block(v, q + 32 * b, step + b, sum + b);
            continue;
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float top = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));  // exact in any order
        const float d = top / 127.0f, inverse = top > 0 && top < INFINITY ? 127.0f / top : 0;
        const __m256 inv = _mm256_set1_ps(inverse);
        __m256i c[4];
        const __m256 parts[4] = {a0, a1, a2, a3};
        for (int k = 0; k < 4; k++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(parts[k], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            c[k] = _mm256_cvtps_epi32(_mm256_max_ps(lo, _mm256_min_ps(hi, r)));
        }
        // Pack 32 int32 to int8 in order: packs interleave 128-bit lanes, a permute restores it.
        __m256i w01 = _mm256_packs_epi32(c[0], c[1]), w23 = _mm256_packs_epi32(c[2], c[3]);
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + 32 * b), bytes);
        __m256i total = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
        step[b] = inverse > 0 ? d : 0;
        sum[b] = step[b] * (float)_mm_cvtsi128_si32(t);
    }
}

#define KVK_PER_ENCODING(call)                                                                                                             \
    switch (encoding) {                                                                                                                    \
    case KVK_WEIGHTS_Q8_0: call(KVK_WEIGHTS_Q8_0); break;                                                                                  \
    case KVK_WEIGHTS_Q4_0: call(KVK_WEIGHTS_Q4_0); break;                                                                                  \
    default: call(KVK_WEIGHTS_Q4_1); break;                                                                                                \
    }

/// `kvk_weight_dots` in this variant: four rows at a time for one input, else row by row in
/// runs of up to 64 inputs.
static void SUFFIX(weight_dots)(int encoding, const uint8_t *w, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                                const float *xs, int count, size_t xStride, float *out, size_t outStride) {
    int r = 0;
    if (count == 1) {
#define FOUR(e) for (; r + 4 <= rowCount; r += 4) SUFFIX(four_body)(e, w + r * rowBytes, rowBytes, blocks, xq, xd, xs, out + r)
        KVK_PER_ENCODING(FOUR)
#undef FOUR
    }
    float tmp[64];
    for (; r < rowCount; r++) {
        for (int t0 = 0; t0 < count; t0 += 64) {
            const int n = count - t0 < 64 ? count - t0 : 64;
            const size_t x0 = (size_t)t0 * xStride, s0 = (size_t)t0 * (xStride / 32);
#define ROW(e) SUFFIX(row_body)(e, w + r * rowBytes, blocks, xq + x0, xd + s0, xs + s0, n, xStride, tmp)
            KVK_PER_ENCODING(ROW)
#undef ROW
            for (int t = 0; t < n; t++) out[(size_t)(t0 + t) * outStride + r] = tmp[t];
        }
    }
}

#undef KVK_PER_ENCODING
#undef KVK_INLINE
