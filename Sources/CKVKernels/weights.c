// The model runner's weight products on 8-bit activations (see include/CKVKernels.h), as
// llama.cpp computes them: the input row is quantized to int8 once per 32-element block (one
// f32 step per block), and each 32-weight block of a ggml Q8_0, Q4_0 or Q4_1 row is multiplied
// with it in integers (vpdpbusd, or vpmaddubsw + vpmaddwd), scaled to f32 once per block.
//
// Per block b with activation step dx_b and codes qx (x ~ dx * qx), and xs_b = dx_b * sum(qx):
//   Q8_0 (w = d * qw, qw int8):        d * dx * sum(qw * qx)
//   Q4_0 (w = d * (q - 8), q a nibble): d * (dx * sum(q * qx) - 8 * xs)
//   Q4_1 (w = d * q + m):              d * dx * sum(q * qx) + m * xs
// How the terms are summed (eight lane accumulators, then a fixed-order finish) is below
// `block_bytes`; every variant (portable C here, AVX2 and AVX-512 VNNI in weights_body.h) does
// exactly that, so all give the same bits.
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "half.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_WEIGHTS_X86 1
#endif

// Every variant rounds alike: each lane's product is added with an explicit fused multiply-add
// (fmaf in portable C), and nothing else may be contracted.
#pragma STDC FP_CONTRACT OFF

enum { VARIANT_PORTABLE = KVK_TIER_NONE, VARIANT_AVX2 = KVK_TIER_AVX2, VARIANT_VNNI = KVK_TIER_VNNI };

static int weights_best = VARIANT_PORTABLE;

__attribute__((constructor)) static void weights_detect(void) { weights_best = kvk_cpu_tier(); }

const char *kvk_weights_isa_name(void) {
    return weights_best == VARIANT_VNNI ? "avx512vl-vnni vpdpbusd" : weights_best == VARIANT_AVX2 ? "avx2 vpmaddubsw" : "portable";
}

int kvk_weights_isa(void) { return weights_best; }

static uint16_t load_u16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/// One 32-element block of `kvk_quantize_q8`, in portable C (the reference every variant matches).
static void quantize_q8_block(const float *v, int8_t *q, float *step, float *sum) {
    float top = 0;
    for (int i = 0; i < 32; i++) top = fmaxf(top, fabsf(v[i]));
    float d = top / 127.0f, inverse = top > 0 && top < INFINITY ? 127.0f / top : 0;
    int total = 0;
    for (int i = 0; i < 32; i++) {
        float r = nearbyintf(v[i] * inverse);
        int c = (int)fmaxf(-127.0f, fminf(127.0f, r));
        q[i] = (int8_t)c;
        total += c;
    }
    *step = inverse > 0 ? d : 0;
    *sum = *step * (float)total;
}

static void quantize_q8_portable(const float *x, int cols, int8_t *q, float *step, float *sum) {
    for (int b = 0; b < cols / 32; b++) quantize_q8_block(x + 32 * b, q + 32 * b, step + b, sum + b);
}

// Every variant keeps eight f32 accumulators per input, lane j adding the integer sum of bytes
// 4j...4j+3 of each block times d * dx with one fused multiply-add (the integers are exact: at
// most 4 * 127 * 127), plus one scalar accumulator for the offset terms (-8 d xs for Q4_0, m xs
// for Q4_1), and finishes with the same fixed-order sum: (j + j+4), then (j + j+2), then (0 + 1).

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
            const float d = half_to_float(load_u16(w)), scale = d * xd[(size_t)t * perInput + b], s = xs[(size_t)t * perInput + b];
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
                acc[j] = fmaf((float)lane, scale, acc[j]);
            }
            if (encoding == KVK_WEIGHTS_Q4_0) offsets += (-8.0f * d) * s;
            if (encoding == KVK_WEIGHTS_Q4_1) offsets += half_to_float(load_u16(w + 2)) * s;
        }
        out[t] = finish_lanes(acc, offsets);
    }
}

#if KVK_WEIGHTS_X86
// Decode reads four rows at a time, back to back, and every matrix once per token (96 MB per
// SmolLM2 token, far beyond the caches): left to the hardware prefetcher, the loads wait on
// memory half the time. So each decode kernel asks for the group PREFETCH_GROUPS groups on into
// L1 in step with the current one: `ahead` starts PREFETCH_GROUPS * 4 rows on and advances one
// block of four rows (`step` bytes) per block (SmolLM2 q8 decode, one core: 70 -> 130 tokens/s;
// one group ahead 129, four 124; prefill, which reuses each row for 64 inputs, gained nothing
// from the same and is left alone).
enum { PREFETCH_GROUPS = 2 };

static inline void prefetch_step(const char *ahead, size_t step) {
    _mm_prefetch(ahead, _MM_HINT_T0);
    _mm_prefetch(ahead + 64, _MM_HINT_T0);
    if (step > 128) _mm_prefetch(ahead + 128, _MM_HINT_T0);  // Q8_0: 136 bytes per step
}

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define SUFFIX(name) name##_avx2
#define DOT(u, s) _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1))
#include "weights_body.h"
#undef SUFFIX
#undef DOT
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))), apply_to = function)
#define SUFFIX(name) name##_vnni
#define DOT(u, s) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (u), (s))
#include "weights_body.h"
#undef SUFFIX
#undef DOT
#pragma clang attribute pop
#endif

// MARK: Exact products on f32 inputs (the runner's default)
//
// The Swift path's arithmetic (WeightMatrix.blockDot1/blockDot4), so the same bits: each block
// expanded to f32 weights (Q8_0 d*q, Q4_0 d*(q-8), both exact; Q4_1 fma(d, q, m)), then per
// input two accumulators of eight, a0 += w[0..7] x[0..7], a1 += w[8..15] x[8..15], a0 +=
// w[16..23] x[16..23], a1 += w[24..31] x[24..31] (fused), and the lanes of a0 + a1 summed in
// order 0...7 (Swift's SIMD8.sum()).
#if KVK_WEIGHTS_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

#define KVK_INLINE static inline __attribute__((always_inline))

KVK_INLINE void expand_block(const int encoding, const uint8_t *w, __m256 out[4]) {
    const __m256 d = _mm256_set1_ps(_cvtsh_ss(load_u16(w)));
    if (encoding == KVK_WEIGHTS_Q8_0) {
        const __m128i lo = _mm_loadu_si128((const __m128i *)(w + 2)), hi = _mm_loadu_si128((const __m128i *)(w + 18));
        out[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
        out[1] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8))));
        out[2] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
        out[3] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8))));
        return;
    }
    const __m128i packed = _mm_loadu_si128((const __m128i *)(w + (encoding == KVK_WEIGHTS_Q4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(15), lo = _mm_and_si128(packed, mask), hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
    __m256 q[4] = {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                   _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)))};
    if (encoding == KVK_WEIGHTS_Q4_0) {
        const __m256 eight = _mm256_set1_ps(8.0f);
        for (int k = 0; k < 4; k++) out[k] = _mm256_mul_ps(d, _mm256_sub_ps(q[k], eight));
    } else {
        const __m256 m = _mm256_set1_ps(_cvtsh_ss(load_u16(w + 2)));
        for (int k = 0; k < 4; k++) out[k] = _mm256_fmadd_ps(d, q[k], m);
    }
}

/// (a0 + a1).sum() as Swift computes it: lane by lane from 0 to 7 (measured: SIMD8<Float>.sum()
/// is a sequential sum, not a tree).
KVK_INLINE float fold_sum(__m256 a0, __m256 a1) {
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(a0, a1));
    float s = lanes[0];
    for (int j = 1; j < 8; j++) s += lanes[j];
    return s;
}

/// Four rows against one input (decode), later rows prefetched (`prefetch_step`).
KVK_INLINE void f32_four_rows(const int encoding, const uint8_t *rows, size_t rowBytes, int blocks, const float *x, float *out) {
    const size_t bb = block_bytes(encoding);
    __m256 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
    const char *ahead = (const char *)rows + PREFETCH_GROUPS * 4 * rowBytes;
    for (int b = 0; b < blocks; b++, ahead += 4 * bb) {
        prefetch_step(ahead, 4 * bb);
        const __m256 x0 = _mm256_loadu_ps(x + 32 * b), x1 = _mm256_loadu_ps(x + 32 * b + 8);
        const __m256 x2 = _mm256_loadu_ps(x + 32 * b + 16), x3 = _mm256_loadu_ps(x + 32 * b + 24);
        for (int r = 0; r < 4; r++) {
            __m256 w[4];
            expand_block(encoding, rows + r * rowBytes + b * bb, w);
            acc[2 * r] = _mm256_fmadd_ps(w[0], x0, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(w[1], x1, acc[2 * r + 1]);
            acc[2 * r] = _mm256_fmadd_ps(w[2], x2, acc[2 * r]);
            acc[2 * r + 1] = _mm256_fmadd_ps(w[3], x3, acc[2 * r + 1]);
        }
    }
    for (int r = 0; r < 4; r++) out[r] = fold_sum(acc[2 * r], acc[2 * r + 1]);
}

/// One row against up to four inputs (prefill): the block expanded once for all of them.
KVK_INLINE void f32_row(const int encoding, const uint8_t *row, int blocks, const float *x, size_t xStride, int n, float *out) {
    const size_t bb = block_bytes(encoding);
    __m256 acc[8];
    for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
    for (int b = 0; b < blocks; b++) {
        __m256 w[4];
        expand_block(encoding, row + b * bb, w);
        for (int t = 0; t < n; t++) {
            const float *xt = x + t * xStride + 32 * b;
            acc[2 * t] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(xt), acc[2 * t]);
            acc[2 * t + 1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xt + 8), acc[2 * t + 1]);
            acc[2 * t] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xt + 16), acc[2 * t]);
            acc[2 * t + 1] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xt + 24), acc[2 * t + 1]);
        }
    }
    for (int t = 0; t < n; t++) out[t] = fold_sum(acc[2 * t], acc[2 * t + 1]);
}

KVK_INLINE void f32_dots(const int encoding, const uint8_t *w, size_t rowBytes, int rowCount, int blocks, const float *x, int count,
                         size_t xStride, float *out, size_t outStride) {
    int r = 0;
    if (count == 1)
        for (; r + 4 <= rowCount; r += 4) f32_four_rows(encoding, w + r * rowBytes, rowBytes, blocks, x, out + r);
    for (; r < rowCount; r++) {
        for (int t0 = 0; t0 < count; t0 += 4) {
            const int n = count - t0 < 4 ? count - t0 : 4;
            float tmp[4];
            f32_row(encoding, w + r * rowBytes, blocks, x + (size_t)t0 * xStride, xStride, n, tmp);
            for (int t = 0; t < n; t++) out[(size_t)(t0 + t) * outStride + r] = tmp[t];
        }
    }
}

static void weight_dots_f32_avx2(int encoding, const uint8_t *w, size_t rowBytes, int rowCount, int blocks, const float *x, int count,
                                 size_t xStride, float *out, size_t outStride) {
    switch (encoding) {
    case KVK_WEIGHTS_Q8_0: f32_dots(KVK_WEIGHTS_Q8_0, w, rowBytes, rowCount, blocks, x, count, xStride, out, outStride); break;
    case KVK_WEIGHTS_Q4_0: f32_dots(KVK_WEIGHTS_Q4_0, w, rowBytes, rowCount, blocks, x, count, xStride, out, outStride); break;
    default: f32_dots(KVK_WEIGHTS_Q4_1, w, rowBytes, rowCount, blocks, x, count, xStride, out, outStride); break;
    }
}

#undef KVK_INLINE
#pragma clang attribute pop
#endif

int kvk_weight_dots_f32(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const float *x, int count, size_t xStride,
                        float *out, size_t outStride) {
#if KVK_WEIGHTS_X86
    if (weights_best >= VARIANT_AVX2) {
        weight_dots_f32_avx2(encoding, (const uint8_t *)rows, rowBytes, rowCount, blocks, x, count, xStride, out, outStride);
        return 0;
    }
#endif
    (void)encoding, (void)rows, (void)rowBytes, (void)rowCount, (void)blocks, (void)x, (void)count, (void)xStride, (void)out, (void)outStride;
    return -1;
}

static void weight_dots_portable(int encoding, const uint8_t *w, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                                 const float *xs, int count, size_t xStride, float *out, size_t outStride) {
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

int kvk_weight_dots_variant(int variant, int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq,
                            const float *xd, const float *xs, int count, size_t xStride, float *out, size_t outStride) {
    if (variant < VARIANT_PORTABLE || variant > weights_best) return -1;
    const uint8_t *w = (const uint8_t *)rows;
    switch (variant) {
#if KVK_WEIGHTS_X86
    case VARIANT_VNNI: weight_dots_vnni(encoding, w, rowBytes, rowCount, blocks, xq, xd, xs, count, xStride, out, outStride); return 0;
    case VARIANT_AVX2: weight_dots_avx2(encoding, w, rowBytes, rowCount, blocks, xq, xd, xs, count, xStride, out, outStride); return 0;
#endif
    default: weight_dots_portable(encoding, w, rowBytes, rowCount, blocks, xq, xd, xs, count, xStride, out, outStride); return 0;
    }
}

int kvk_quantize_q8_variant(int variant, const float *x, int cols, int8_t *q, float *step, float *sum) {
    if (variant < VARIANT_PORTABLE || variant > weights_best) return -1;
    switch (variant) {
#if KVK_WEIGHTS_X86
    case VARIANT_VNNI: quantize_q8_vnni(x, cols, q, step, sum); return 0;
    case VARIANT_AVX2: quantize_q8_avx2(x, cols, q, step, sum); return 0;
#endif
    default: quantize_q8_portable(x, cols, q, step, sum); return 0;
    }
}

void kvk_quantize_q8(const float *x, int cols, int8_t *q, float *step, float *sum) {
    (void)kvk_quantize_q8_variant(weights_best, x, cols, q, step, sum);
}

void kvk_weight_dots(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                     const float *xs, int count, size_t xStride, float *out, size_t outStride) {
    (void)kvk_weight_dots_variant(weights_best, encoding, rows, rowBytes, rowCount, blocks, xq, xd, xs, count, xStride, out, outStride);
}
