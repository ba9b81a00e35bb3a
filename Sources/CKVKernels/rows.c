// The two products of attention over plain rows (f32, f16 or bf16; see include/CKVKernels.h):
// scores (queries x rows) and value accumulation (weights x rows), with the rows widened in
// registers. They compute exactly what the Swift TileKernels compute over rows widened into an
// f32 tile (every f16 and bf16 is an f32, so widening is exact):
//   score(q, t) = s(a) with a = sum over 8-channel chunks c, in order, of fma(q[c], row[c], a)
//                 from zero, and s(a) = ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7));
//   acc[q][c]   = fma(w[q][t], row t [c], acc[q][c]) for t in order.
// Each score and each accumulator depends only on its own operations, so the blocking here
// (four query heads at once, rows widened once for all of them) gives the same bits. The loops
// are in rows_body.h, built twice: for AVX2 and, with more rows and channels per step, for the
// 32 registers of AVX-512 VL machines (picked at load time; tests hold both to the bits). Swift
// keeps its path for machines without AVX2 + FMA + F16C, where this returns -1.
//
// The same loops read the nsn scheme's codes in place: a row is then a token's pieces, and the
// "widening" of an 8-element chunk decodes a piece's codeword. For 1-bit codes over long spans
// nsn scores from a table of every query piece's dot product with every codeword instead, and
// its Hadamard transform is here too (the rotation of every block's mean during attention).
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "prefetch_plan.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_ROWS_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

enum { ROW_F32 = 0, ROW_F16 = 1, ROW_BF16 = 2, ROW_NSN1 = 3, ROW_NSN2 = 4 };

/// Bytes of one 8-element chunk of a row: f32 32, f16 and bf16 16; an nsn piece is one code byte
/// (1 bit) or a sign byte and a magnitude byte (2 bits).
static inline __attribute__((always_inline)) int chunk_bytes(const int type) {
    switch (type) {
    case ROW_F32: return 32;
    case ROW_NSN1: return 1;
    case ROW_NSN2: return 2;
    default: return 16;
    }
}

/// What decodes an nsn piece: the 256 x 8 codebook (entries, or magnitudes for 2 bits) and, for
/// 2 bits, the 256 x 8 sign masks (bit j of a sign byte as bit 31 of lane j).
typedef struct {
    const float *book;
    const uint32_t *signs;
} row_codes;

static int rows_available = 0, rows_isa = KVK_TIER_NONE;

__attribute__((constructor)) static void rows_detect(void) {
    rows_isa = kvk_cpu_tier();
    rows_available = rows_isa >= KVK_TIER_AVX2;
}

int kvk_rows_available(void) { return rows_available; }

int kvk_rows_isa(void) { return rows_isa; }

/// The variant `isa` asks for (0: the machine's), or KVK_TIER_NONE where it cannot run.
static int rows_variant(int isa) {
    if (isa == 0) return rows_isa;
    return isa <= rows_isa ? isa : KVK_TIER_NONE;
}

#if KVK_ROWS_X86
// One instantiation per (heads in the pass, row type): the loops of rows_body.h then have
// constant bounds and their accumulators stay in registers. ROWS_DISPATCH picks the row type,
// ROWS_BY_HEADS the heads of a pass (1-4, `heads` at run time).
#define ROWS_DISPATCH(fn, QB, ...)                                     \
    switch (type) {                                                    \
    case ROW_F16: fn(__VA_ARGS__, QB, ROW_F16); break;                 \
    case ROW_BF16: fn(__VA_ARGS__, QB, ROW_BF16); break;               \
    case ROW_NSN1: fn(__VA_ARGS__, QB, ROW_NSN1); break;               \
    case ROW_NSN2: fn(__VA_ARGS__, QB, ROW_NSN2); break;               \
    default: fn(__VA_ARGS__, QB, ROW_F32); break;                      \
    }
#define ROWS_BY_HEADS(fn, heads, ...)                                  \
    switch (heads) {                                                   \
    case 1: ROWS_DISPATCH(fn, 1, __VA_ARGS__) break;                   \
    case 2: ROWS_DISPATCH(fn, 2, __VA_ARGS__) break;                   \
    case 3: ROWS_DISPATCH(fn, 3, __VA_ARGS__) break;                   \
    default: ROWS_DISPATCH(fn, 4, __VA_ARGS__) break;                  \
    }

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#include "score_sums.h"   // inside the region: compiled for AVX2, inlined into both variants
#define SUFFIX(name) name##_avx2
#define ROW_TOKENS 3
#define ROW_VECTORS 2
#include "rows_body.h"
#undef SUFFIX
#undef ROW_TOKENS
#undef ROW_VECTORS
#pragma clang attribute pop

// VL for 32 ymm registers; no 512-bit vectors (the same instructions on 256-bit ones).
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))), apply_to = function)
#define SUFFIX(name) name##_avx512
#define ROW_TOKENS 4
#define ROW_VECTORS 4
#include "rows_body.h"
#undef SUFFIX
#undef ROW_TOKENS
#undef ROW_VECTORS
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

/// The lookup table of `kvk_nsn_lut` for query heads [q0, q0 + QB): entry (s, e) holds the QB
/// dot products of piece s of each query with codeword e (four floats, the unused ones zero).
static void nsn_lut_avx2(const float *book, const float *queries, int group, int dim, float *lut) {
    const int pieces = dim / 8;
    for (int q0 = 0; q0 < group; q0 += 4) {
        const int QB = group - q0 < 4 ? group - q0 : 4;
        float *table = lut + (size_t)(q0 / 4) * pieces * 1024;
        for (int s = 0; s < pieces; s++) {
            // Lane j of the queries' piece as one vector of the four heads.
            __m128 Q[8];
            for (int j = 0; j < 8; j++) {
                float x[4] = {0, 0, 0, 0};
                for (int q = 0; q < QB; q++) x[q] = queries[(size_t)(q0 + q) * dim + 8 * s + j];
                Q[j] = _mm_loadu_ps(x);
            }
            for (int e = 0; e < 256; e++) {
                const float *c = book + 8 * e;
                __m128 a = _mm_mul_ps(_mm_set1_ps(c[0]), Q[0]);
                for (int j = 1; j < 8; j++) a = _mm_fmadd_ps(_mm_set1_ps(c[j]), Q[j], a);
                _mm_storeu_ps(table + (size_t)s * 1024 + 4 * e, a);
            }
        }
    }
}

/// Four tokens' scores for four heads from the table: per token, one 16-byte load per piece.
/// `P` is the number of pieces when the caller knows it (0: dim / 8): with a constant, each
/// piece's table is a fixed displacement and a lookup is a byte load, a shift and an add.
static inline __attribute__((always_inline)) void nsn_lut_dots_body(const uint8_t *codes, int dim, size_t count, const float *lut,
                                                                    int group, float *out, size_t stride, const int P) {
    const int pieces = P ? P : dim / 8;
    for (int q0 = 0; q0 < group; q0 += 4) {
        const int QB = group - q0 < 4 ? group - q0 : 4;
        const float *table = lut + (size_t)(q0 / 4) * pieces * 1024;
        for (size_t t = 0; t < count; t += 4) {
            const int n = count - t < 4 ? (int)(count - t) : 4;
            kvk_plan_advance((size_t)n * pieces);
            __m128 acc[4];
            for (int i = 0; i < 4; i++) {
                // Two chains (even and odd pieces) for latency; tokens past count score zero.
                __m128 a = _mm_setzero_ps(), b = _mm_setzero_ps();
                if (i < n) {
                    const uint8_t *c = codes + (t + i) * (size_t)pieces;
                    int s = 0;
                    for (; s + 2 <= pieces; s += 2) {
                        a = _mm_add_ps(a, _mm_loadu_ps(table + (size_t)s * 1024 + 4 * c[s]));
                        b = _mm_add_ps(b, _mm_loadu_ps(table + (size_t)(s + 1) * 1024 + 4 * c[s + 1]));
                    }
                    if (s < pieces) a = _mm_add_ps(a, _mm_loadu_ps(table + (size_t)s * 1024 + 4 * c[s]));
                }
                acc[i] = _mm_add_ps(a, b);
            }
            _MM_TRANSPOSE4_PS(acc[0], acc[1], acc[2], acc[3]);   // now acc[q] holds head q's four tokens
            for (int q = 0; q < QB; q++) {
                float *o = out + (size_t)(q0 + q) * stride + t;
                if (n == 4) {
                    _mm_storeu_ps(o, acc[q]);
                } else {
                    float x[4];
                    _mm_storeu_ps(x, acc[q]);
                    for (int i = 0; i < n; i++) o[i] = x[i];
                }
            }
        }
    }
}

static void nsn_lut_dots_avx2(const uint8_t *codes, int dim, size_t count, const float *lut, int group, float *out, size_t stride) {
    switch (dim) {
    case 64: nsn_lut_dots_body(codes, dim, count, lut, group, out, stride, 8); break;
    case 128: nsn_lut_dots_body(codes, dim, count, lut, group, out, stride, 16); break;
    default: nsn_lut_dots_body(codes, dim, count, lut, group, out, stride, 0); break;
    }
}

/// kvk_nsn_token_weights and kvk_nsn_norm_scores: the per-token norm arithmetic of the nsn
/// scheme's blocks, element by element as its Swift loops do it (the same bits).
static void nsn_token_weights_avx2(const float *weights, size_t stride, int group, const float *n1, const float *n2, float invRoot,
                                   size_t n, float *out) {
    const __m256 r = _mm256_set1_ps(invRoot);
    for (int q = 0; q < group; q++) {
        const float *w = weights + (size_t)q * stride;
        float *o = out + (size_t)q * n;
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 f = _mm256_mul_ps(_mm256_loadu_ps(n1 + i), _mm256_mul_ps(_mm256_loadu_ps(n2 + i), r));
            _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), f));
        }
        for (; i < n; i++) o[i] = w[i] * (n1[i] * (n2[i] * invRoot));
    }
}

static void nsn_norm_scores_avx2(float *scores, size_t stride, int group, const float *n1, const float *n2, const float *meanTerms,
                                 size_t n) {
    for (int q = 0; q < group; q++) {
        float *row = scores + (size_t)q * stride;
        const float m = meanTerms[q];
        const __m256 mv = _mm256_set1_ps(m);
        size_t i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 a = _mm256_loadu_ps(n1 + i);
            __m256 x = _mm256_mul_ps(_mm256_mul_ps(a, _mm256_loadu_ps(n2 + i)), _mm256_loadu_ps(row + i));
            _mm256_storeu_ps(row + i, _mm256_add_ps(x, _mm256_mul_ps(mv, a)));
        }
        for (; i < n; i++) row[i] = (n1[i] * n2[i]) * row[i] + m * n1[i];
    }
}

/// The orthonormal Walsh-Hadamard transform of `size` floats (a power of two, 8 or more), in
/// place: at each stage h = 1, 2, 4, ... the pairs (j, j + h) become (a + b, a - b), then every
/// element times 1 / sqrt(size). The same operations, on the same operands, as the Swift loop.
static void hadamard_avx2(float *x, int size, float norm) {
    const int n = size / 8;
    __m256 odd1 = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    __m256 odd2 = _mm256_castsi256_ps(_mm256_setr_epi32(0, 0, -1, -1, 0, 0, -1, -1));
    for (int k = 0; k < n; k++) {
        __m256 v = _mm256_loadu_ps(x + 8 * k);
        // h = 1: lane j pairs with j ^ 1; even lanes take a + b, odd ones a - b (a the even lane).
        __m256 p = _mm256_permute_ps(v, _MM_SHUFFLE(2, 3, 0, 1));
        v = _mm256_blendv_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), odd1);
        // h = 2: lane j pairs with j ^ 2.
        p = _mm256_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2));
        v = _mm256_blendv_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), odd2);
        // h = 4: the two 128-bit halves.
        p = _mm256_permute2f128_ps(v, v, 0x01);
        v = _mm256_blend_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), 0xF0);
        _mm256_storeu_ps(x + 8 * k, v);
    }
    for (int h = 1; h < n; h *= 2)
        for (int i = 0; i < n; i += 2 * h)
            for (int k = i; k < i + h; k++) {
                __m256 a = _mm256_loadu_ps(x + 8 * k), b = _mm256_loadu_ps(x + 8 * (k + h));
                _mm256_storeu_ps(x + 8 * k, _mm256_add_ps(a, b));
                _mm256_storeu_ps(x + 8 * (k + h), _mm256_sub_ps(a, b));
            }
    const __m256 f = _mm256_set1_ps(norm);
    for (int k = 0; k < n; k++) _mm256_storeu_ps(x + 8 * k, _mm256_mul_ps(_mm256_loadu_ps(x + 8 * k), f));
}

/// RowKernels.dot: two vectors of fused products over 16 elements at a time (a last 8 into the
/// first), their sum, its lanes added in order, then the tail as multiply and add.
static float dot_avx2(const float *a, const float *b, size_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    if (i + 8 <= n) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        i += 8;
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_add_ps(acc0, acc1));
    float s = lanes[0];
    for (int l = 1; l < 8; l++) s += lanes[l];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/// RowKernels.axpy: y += alpha x, fused by eights, the tail as multiply and add.
static void axpy_avx2(float alpha, const float *x, float *y, size_t n) {
    const __m256 a = _mm256_set1_ps(alpha);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++) y[i] += alpha * x[i];
}

static void widen_f16_avx2(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(src[i])));
}

#pragma clang attribute pop
#endif

// MARK: Small vector helpers (RowKernels.dot, axpy, widenFloat16), for builds where Swift's SIMD
// types compile to calls. Only where kvk_rows_available() (the caller checks).

float kvk_dot(const float *a, const float *b, size_t n) {
#if KVK_ROWS_X86
    return dot_avx2(a, b, n);
#else
    (void)a, (void)b, (void)n;
    return 0;
#endif
}

void kvk_axpy(float alpha, const float *x, float *y, size_t n) {
#if KVK_ROWS_X86
    axpy_avx2(alpha, x, y, n);
#else
    (void)alpha, (void)x, (void)y, (void)n;
#endif
}

void kvk_widen_f16(const void *src, float *dst, size_t n) {
#if KVK_ROWS_X86
    widen_f16_avx2((const uint16_t *)src, dst, n);
#else
    (void)src, (void)dst, (void)n;
#endif
}

int kvk_nsn_token_weights(const float *weights, size_t stride, int group, const float *n1, const float *n2, float invRoot, size_t n,
                          float *out) {
    if (!rows_available || group <= 0) return -1;
#if KVK_ROWS_X86
    nsn_token_weights_avx2(weights, stride, group, n1, n2, invRoot, n, out);
    return 0;
#else
    (void)weights, (void)stride, (void)n1, (void)n2, (void)invRoot, (void)n, (void)out;
    return -1;
#endif
}

int kvk_nsn_norm_scores(float *scores, size_t stride, int group, const float *n1, const float *n2, const float *meanTerms, size_t n) {
    if (!rows_available || group <= 0) return -1;
#if KVK_ROWS_X86
    nsn_norm_scores_avx2(scores, stride, group, n1, n2, meanTerms, n);
    return 0;
#else
    (void)scores, (void)stride, (void)n1, (void)n2, (void)meanTerms, (void)n;
    return -1;
#endif
}

/// Scores or accumulation over rows of `type` in the variant `isa` asks for: 0, or -1 where
/// that variant does not run here.
static int rows_run(int isa, int accumulate, const uint8_t *rows, int type, int dim, size_t count, const float *in, size_t stride,
                    int group, float *out, const row_codes *codes) {
#if KVK_ROWS_X86
    switch (rows_variant(isa)) {
    case KVK_TIER_VNNI:
        if (accumulate) rows_accumulate_avx512(rows, type, dim, count, in, stride, group, out, codes);
        else rows_scores_avx512(rows, type, dim, count, in, group, out, stride, codes);
        return 0;
    case KVK_TIER_AVX2:
        if (accumulate) rows_accumulate_avx2(rows, type, dim, count, in, stride, group, out, codes);
        else rows_scores_avx2(rows, type, dim, count, in, group, out, stride, codes);
        return 0;
    }
#endif
    (void)accumulate, (void)rows, (void)type, (void)dim, (void)count, (void)in, (void)stride, (void)group, (void)out, (void)codes;
    return -1;
}

static int rows_supported(int type, int dim, int group) {
    return rows_available && (type == ROW_F32 || type == ROW_F16 || type == ROW_BF16) && dim > 0 && dim % 8 == 0 && group > 0;
}

int kvk_rows_scores(const void *rows, int type, int dim, size_t count, const float *queries, int group, float *out, size_t stride,
                    int isa) {
    if (!rows_supported(type, dim, group)) return -1;
    return rows_run(isa, 0, (const uint8_t *)rows, type, dim, count, queries, stride, group, out, NULL);
}

int kvk_rows_accumulate(const void *rows, int type, int dim, size_t count, const float *weights, size_t stride, int group, float *acc,
                        int isa) {
    if (!rows_supported(type, dim, group)) return -1;
    return rows_run(isa, 1, (const uint8_t *)rows, type, dim, count, weights, stride, group, acc, NULL);
}

// MARK: nsn codes as rows

static int nsn_supported(int bits, int dim, int group) {
    return rows_available && (bits == 1 || bits == 2) && dim > 0 && dim % 8 == 0 && group > 0;
}

int kvk_nsn_dots(const uint8_t *codes, int bits, int dim, size_t count, const float *book, const uint32_t *signs, const float *queries,
                 int group, float *out, size_t stride, int isa) {
    if (!nsn_supported(bits, dim, group)) return -1;
    const row_codes c = {book, signs};
    return rows_run(isa, 0, codes, bits == 1 ? ROW_NSN1 : ROW_NSN2, dim, count, queries, stride, group, out, &c);
}

int kvk_nsn_accumulate(const uint8_t *codes, int bits, int dim, size_t count, const float *book, const uint32_t *signs,
                       const float *weights, size_t stride, int group, float *acc, int isa) {
    if (!nsn_supported(bits, dim, group)) return -1;
    const row_codes c = {book, signs};
    return rows_run(isa, 1, codes, bits == 1 ? ROW_NSN1 : ROW_NSN2, dim, count, weights, stride, group, acc, &c);
}

size_t kvk_nsn_lut_floats(int group, int dim) { return (size_t)((group + 3) / 4) * (size_t)(dim / 8) * 1024; }

int kvk_nsn_lut(const float *book, const float *queries, int group, int dim, float *lut) {
    if (!nsn_supported(1, dim, group)) return -1;
#if KVK_ROWS_X86
    nsn_lut_avx2(book, queries, group, dim, lut);
    return 0;
#else
    (void)book, (void)queries, (void)lut;
    return -1;
#endif
}

int kvk_nsn_lut_dots(const uint8_t *codes, int dim, size_t count, const float *lut, int group, float *out, size_t stride) {
    if (!nsn_supported(1, dim, group)) return -1;
#if KVK_ROWS_X86
    nsn_lut_dots_avx2(codes, dim, count, lut, group, out, stride);
    return 0;
#else
    (void)codes, (void)count, (void)lut, (void)out, (void)stride;
    return -1;
#endif
}

int kvk_hadamard(float *x, int size, float norm) {
    if (!rows_available || size < 8 || (size & (size - 1))) return -1;
#if KVK_ROWS_X86
    hadamard_avx2(x, size, norm);
    return 0;
#else
    (void)x, (void)norm;
    return -1;
#endif
}
