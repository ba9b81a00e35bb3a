// The model runner's weight products on 8-bit activations (see include/CKVKernels.h), as
// llama.cpp computes them: the input row is quantized to int8 once per 32-element block (one
// f32 step per block), and each 32-weight block of a ggml Q8_0, Q4_0 or Q4_1 row is multiplied
// with it in integers (vpmaddubsw + vpmaddwd), scaled to f32 once per block.
//
// Per block b with activation step dx_b and codes qx (x ~ dx * qx), and xs_b = dx_b * sum(qx):
//   Q8_0 (w = d * qw, qw int8):        d * dx * sum(qw * qx)
//   Q4_0 (w = d * (q - 8), q a nibble): d * (dx * sum(q * qx) - 8 * xs)
//   Q4_1 (w = d * q + m):              d * dx * sum(q * qx) + m * xs
// How the terms are summed (eight lane accumulators, then a fixed-order finish) is below
// `block_bytes`; both variants do exactly that, without contraction, so they give the same bits.
#include "CKVKernels.h"
#include "half.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_WEIGHTS_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

static int weights_avx2 = 0;

#if KVK_WEIGHTS_X86
__attribute__((constructor)) static void weights_detect(void) {
    __builtin_cpu_init();
    weights_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
#endif

const char *kvk_weights_isa_name(void) { return weights_avx2 ? "avx2 vpmaddubsw" : "portable"; }


static uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

void kvk_quantize_q8(const float *x, int cols, int8_t *q, float *step, float *sum) {
    for (int b = 0; b < cols / 32; b++) {
        const float *v = x + 32 * b;
        float top = 0;
        for (int i = 0; i < 32; i++) top = fmaxf(top, fabsf(v[i]));
        float d = top / 127.0f, inverse = top > 0 && top < INFINITY ? 127.0f / top : 0;
        int total = 0;
        for (int i = 0; i < 32; i++) {
            float r = nearbyintf(v[i] * inverse);
            int c = (int)fmaxf(-127.0f, fminf(127.0f, r));
            q[32 * b + i] = (int8_t)c;
            total += c;
        }
        step[b] = inverse > 0 ? d : 0;
        sum[b] = step[b] * (float)total;
    }
}

// Both variants keep eight f32 accumulators per input, lane j holding the integer sums of
// bytes 4j...4j+3 of every block scaled by d * dx (exact integers, at most 4 * 127 * 127), plus
// one scalar accumulator for the offset terms (-8 d xs for Q4_0, m xs for Q4_1), and finish
// with the same fixed-order sum: (j + j+4), then (j + j+2), then (0 + 1).

static size_t block_bytes(int encoding) { return encoding == KVK_WEIGHTS_Q8_0 ? 34 : encoding == KVK_WEIGHTS_Q4_0 ? 18 : 20; }

static float finish_lanes(const float acc[8], float offsets) {
    float a0 = acc[0] + acc[4], a1 = acc[1] + acc[5], a2 = acc[2] + acc[6], a3 = acc[3] + acc[7];
    return ((a0 + a2) + (a1 + a3)) + offsets;
}

static void row_dots_portable(int encoding, const uint8_t *row, int blocks, const int8_t *xq, const float *xd, const float *xs, int count,
                          size_t xStride, float *out) {
    const size_t bb = block_bytes(encoding), perInput = xStride / 32;
    for (int t = 0; t < count; t++) {
        float acc[8] = {0}, offsets = 0;
        for (int b = 0; b < blocks; b++) {
            const uint8_t *w = row + b * bb;
            const int8_t *q = xq + (size_t)t * xStride + 32 * (size_t)b;
            float d = half_to_float(load_u16(w)), scale = d * xd[(size_t)t * perInput + b], s = xs[(size_t)t * perInput + b];
            int code[32];
            if (encoding == KVK_WEIGHTS_Q8_0) {
                for (int i = 0; i < 32; i++) code[i] = ((const int8_t *)(w + 2))[i];
            } else {
                const uint8_t *nib = w + (encoding == KVK_WEIGHTS_Q4_1 ? 4 : 2);
                for (int i = 0; i < 16; i++) { code[i] = nib[i] & 15; code[i + 16] = nib[i] >> 4; }
            }
            for (int j = 0; j < 8; j++) {
                int lane = 0;
                for (int i = 4 * j; i < 4 * j + 4; i++) lane += code[i] * q[i];
                acc[j] += (float)lane * scale;
            }
            if (encoding == KVK_WEIGHTS_Q4_0) offsets += (-8.0f * d) * s;
            if (encoding == KVK_WEIGHTS_Q4_1) offsets += half_to_float(load_u16(w + 2)) * s;
        }
        out[t] = finish_lanes(acc, offsets);
    }
}

#if KVK_WEIGHTS_X86
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)

/// The block's 32 weight codes: signed bytes (Q8_0) or nibbles 0...15 (weight j low in byte j,
/// weight j + 16 high).
static inline __m256i block_codes_avx2(int encoding, const uint8_t *w) {
    if (encoding == KVK_WEIGHTS_Q8_0) return _mm256_loadu_si256((const __m256i *)(w + 2));
    __m128i packed = _mm_loadu_si128((const __m128i *)(w + (encoding == KVK_WEIGHTS_Q4_1 ? 4 : 2)));
    const __m128i low = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), low), _mm_and_si128(packed, low));
}

/// Lane j: sum of codes[i] * x[i] for i in 4j...4j+3, as an exact integer.
static inline __m256i block_lanes_avx2(__m256i codes, __m256i x, int isSigned) {
    if (isSigned) {  // |w| times x with w's sign: unsigned-by-signed, as vpmaddubsw needs
        x = _mm256_sign_epi8(x, codes);
        codes = _mm256_sign_epi8(codes, codes);
    }
    // Pair sums are at most 2 * 127 * 127 in magnitude: vpmaddubsw does not saturate.
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, x), _mm256_set1_epi16(1));
}

static void row_dots_avx2(int encoding, const uint8_t *row, int blocks, const int8_t *xq, const float *xd, const float *xs, int count,
                      size_t xStride, float *out) {
    const size_t bb = block_bytes(encoding), perInput = xStride / 32;
    const int isSigned = encoding == KVK_WEIGHTS_Q8_0;
    for (int t0 = 0; t0 < count; t0 += 4) {
        const int n = count - t0 < 4 ? count - t0 : 4;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        float offsets[4] = {0, 0, 0, 0};
        for (int b = 0; b < blocks; b++) {
            const uint8_t *w = row + b * bb;
            const __m256i codes = block_codes_avx2(encoding, w);
            const float d = _cvtsh_ss(load_u16(w)), m = encoding == KVK_WEIGHTS_Q4_1 ? _cvtsh_ss(load_u16(w + 2)) : 0;
            for (int t = 0; t < n; t++) {
                const size_t i = (size_t)(t0 + t);
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + i * xStride + 32 * (size_t)b));
                const float scale = d * xd[i * perInput + b], s = xs[i * perInput + b];
                acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(block_lanes_avx2(codes, x, isSigned)), _mm256_set1_ps(scale)));
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

/// One input against four rows at once (decode): four independent accumulator chains instead of
/// one, the input's codes loaded once per block. Each row's arithmetic is `row_dots_avx2`'s.
static void four_rows_avx2(int encoding, const uint8_t *rows, size_t rowBytes, int blocks, const int8_t *xq, const float *xd,
                           const float *xs, float *out) {
    const size_t bb = block_bytes(encoding);
    const int isSigned = encoding == KVK_WEIGHTS_Q8_0;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    float offsets[4] = {0, 0, 0, 0};
    for (int b = 0; b < blocks; b++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + 32 * (size_t)b));
        const float dx = xd[b], s = xs[b];
        for (int r = 0; r < 4; r++) {
            const uint8_t *w = rows + r * rowBytes + b * bb;
            const __m256i codes = block_codes_avx2(encoding, w);
            const float d = _cvtsh_ss(load_u16(w));
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(_mm256_cvtepi32_ps(block_lanes_avx2(codes, x, isSigned)), _mm256_set1_ps(d * dx)));
            if (encoding == KVK_WEIGHTS_Q4_0) offsets[r] += (-8.0f * d) * s;
            if (encoding == KVK_WEIGHTS_Q4_1) offsets[r] += _cvtsh_ss(load_u16(w + 2)) * s;
        }
    }
    for (int r = 0; r < 4; r++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[r]);
        out[r] = finish_lanes(lanes, offsets[r]);
    }
}

#pragma clang attribute pop
#endif

void kvk_weight_dots(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                     const float *xs, int count, size_t xStride, float *out, size_t outStride) {
    const uint8_t *w = (const uint8_t *)rows;
    float tmp[64];
    int r = 0;
#if KVK_WEIGHTS_X86
    if (weights_avx2) {
        if (count == 1)
            for (; r + 4 <= rowCount; r += 4) four_rows_avx2(encoding, w + r * rowBytes, rowBytes, blocks, xq, xd, xs, out + r);
        for (; r < rowCount; r++) {
            for (int t0 = 0; t0 < count; t0 += 64) {
                int n = count - t0 < 64 ? count - t0 : 64;
                row_dots_avx2(encoding, w + r * rowBytes, blocks, xq + (size_t)t0 * xStride, xd + (size_t)t0 * (xStride / 32),
                              xs + (size_t)t0 * (xStride / 32), n, xStride, tmp);
                for (int t = 0; t < n; t++) out[(size_t)(t0 + t) * outStride + r] = tmp[t];
            }
        }
        return;
    }
#endif
    kvk_weight_dots_portable(encoding, rows, rowBytes, rowCount, blocks, xq, xd, xs, count, xStride, out, outStride);
}

void kvk_weight_dots_portable(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                              const float *xs, int count, size_t xStride, float *out, size_t outStride) {
    const uint8_t *w = (const uint8_t *)rows;
    float tmp[64];
    for (int r = 0; r < rowCount; r++) {
        for (int t0 = 0; t0 < count; t0 += 64) {
            int n = count - t0 < 64 ? count - t0 : 64;
            row_dots_portable(encoding, w + r * rowBytes, blocks, xq + (size_t)t0 * xStride, xd + (size_t)t0 * (xStride / 32),
                              xs + (size_t)t0 * (xStride / 32), n, xStride, tmp);
            for (int t = 0; t < n; t++) out[(size_t)(t0 + t) * outStride + r] = tmp[t];
        }
    }
}
