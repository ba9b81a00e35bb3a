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
    // The four rows lie back to back, and a decode step reads every matrix once (96 MB per
    // SmolLM2 token, far beyond the caches): left to the hardware prefetcher, the loads wait on
    // memory half the time. The group two groups on is asked for into L1 in step with this one
    // (SmolLM2 decode, one core: 70 -> 130 tokens/s; one group ahead 129, four 124; prefill,
    // which reuses each row for 64 inputs, gained nothing from the same and is left alone).
    const char *ahead = (const char *)rows + 2 * 4 * rowBytes;
    for (int b = 0; b < blocks; b++, w0 += bb, w1 += bb, w2 += bb, w3 += bb, ahead += 4 * bb) {
        _mm_prefetch(ahead, _MM_HINT_T0);
        _mm_prefetch(ahead + 64, _MM_HINT_T0);
        if (4 * bb > 128) _mm_prefetch(ahead + 128, _MM_HINT_T0);  // Q8_0: 136 bytes per step
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
