// The online-softmax step of attention (see include/CKVKernels.h), the same arithmetic as the
// Swift OnlineSoftmax.absorb it stands in for: the chunk's largest score, exp(s - max) by the
// same range reduction and polynomial (Cephes' expf, in fused multiply-adds), operation for operation, the per-lane
// sums added lane by lane, and the accumulators rescaled by expf(old - new) when the max grows.
#include "CKVKernels.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_SOFTMAX_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

// 0 none (the Swift path runs), 1 AVX2 + FMA, 2 the same with AVX-512 F + DQ (sixteen exps per
// instruction).
static int softmax_isa = 0;

#if KVK_SOFTMAX_X86
__attribute__((constructor)) static void softmax_detect(void) {
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return;
    softmax_isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") ? 2 : 1;
}

/// TileKernels.exp's range reduction and polynomial for the clamped lanes `c` (x >= -80, or NaN),
/// giving y and the power-of-two scale whose product is e^c; written once for both vector
/// widths (P: the intrinsics' prefix, V and VI: the float and integer vector types, SI: their
/// cast suffix), so each lane gets the same operations, and the same bits, in either. Fused
/// multiply-adds, as Swift's `addingProduct` computes them: 30% less time than separate
/// multiplies and adds (a softmax step was mostly this), the same bits in C and Swift.
#define EXP_CORE(P, V, VI, SI, c, y, scale)                                                                    \
    do {                                                                                                       \
        const V magic = P##_set1_ps(12582912.0f);                                                              \
        V shifted = P##_fmadd_ps(c, P##_set1_ps(1.44269504f), magic);                                          \
        V n = P##_sub_ps(shifted, magic);                                                                      \
        V r = P##_fnmadd_ps(n, P##_set1_ps(0.693359375f), c);                                                  \
        r = P##_fnmadd_ps(n, P##_set1_ps(-2.12194440e-4f), r);                                                 \
        V p = P##_set1_ps(1.98756915e-4f);                                                                     \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.39819995e-3f));                                                   \
        p = P##_fmadd_ps(p, r, P##_set1_ps(8.3334519e-3f));                                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(4.1665796e-2f));                                                    \
        p = P##_fmadd_ps(p, r, P##_set1_ps(1.66666655e-1f));                                                   \
        p = P##_fmadd_ps(p, r, P##_set1_ps(5.0000001e-1f));                                                    \
        y = P##_add_ps(P##_fmadd_ps(p, P##_mul_ps(r, r), r), P##_set1_ps(1.0f));                               \
        VI bits = P##_sub_epi32(P##_castps_##SI(shifted), P##_set1_epi32(0x4B400000));                         \
        scale = P##_cast##SI##_ps(P##_slli_epi32(P##_add_epi32(bits, P##_set1_epi32(127)), 23));               \
    } while (0)

/// TileKernels.exp: e^x for x <= 0, 0 below -80 (and for -inf).
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    __m256i ix = _mm256_castps_si256(x);
    // below: negative lanes with a magnitude above 80's (and negative NaNs), zeroed at the end.
    __m256i mag = _mm256_and_si256(ix, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i below = _mm256_and_si256(_mm256_srai_epi32(ix, 31), _mm256_srai_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x42A00000), mag), 31));
    // Below lanes are zeroed at the end whatever they compute; clamping them to -80 instead of
    // to 0 takes one operation off the chain every lane waits on (x >= -80 and NaN pass through).
    __m256 clamped = _mm256_max_ps(_mm256_set1_ps(-80.0f), x), y, scale;
    EXP_CORE(_mm256, __m256, __m256i, si256, clamped, y, scale);
    return _mm256_castsi256_ps(_mm256_andnot_si256(below, _mm256_castps_si256(_mm256_mul_ps(y, scale))));
}

/// exp8 on sixteen lanes: the same operations lane by lane, so the same bits.
__attribute__((target("avx2,fma,avx512f,avx512dq"))) static inline __m512 exp16(__m512 x) {
    __m512i ix = _mm512_castps_si512(x);
    __m512i mag = _mm512_and_si512(ix, _mm512_set1_epi32(0x7FFFFFFF));
    // The sign bit of ix AND (80's bits - mag): exp8's two arithmetic shifts, as a mask.
    __mmask16 below = _mm512_movepi32_mask(_mm512_and_si512(ix, _mm512_sub_epi32(_mm512_set1_epi32(0x42A00000), mag)));
    __m512 clamped = _mm512_max_ps(_mm512_set1_ps(-80.0f), x), y, scale;
    EXP_CORE(_mm512, __m512, __m512i, si512, clamped, y, scale);
    return _mm512_maskz_mul_ps((__mmask16)~below, y, scale);
}

enum { MAX_HEADS = 16 };

#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#define SUFFIX(name) name##_avx2
#define SOFTMAX_WIDE 0
#include "softmax_body.h"
#undef SUFFIX
#undef SOFTMAX_WIDE
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,avx512f,avx512dq"))), apply_to = function)
#define SUFFIX(name) name##_avx512
#define SOFTMAX_WIDE 1
#include "softmax_body.h"
#undef SUFFIX
#undef SOFTMAX_WIDE
#pragma clang attribute pop
#endif

int kvk_softmax_absorb_variant(int isa, float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum,
                               float *blockAcc, float *tailAcc, int dim) {
#if KVK_SOFTMAX_X86
    if (isa == 0) isa = softmax_isa;
    if (isa > softmax_isa || isa < 1) return -1;
    if (isa == 2) absorb_avx512(scores, stride, count, group, runMax, runSum, blockAcc, tailAcc, dim);
    else absorb_avx2(scores, stride, count, group, runMax, runSum, blockAcc, tailAcc, dim);
    return 0;
#else
    (void)isa, (void)scores, (void)stride, (void)count, (void)group, (void)runMax, (void)runSum, (void)blockAcc, (void)tailAcc, (void)dim;
    return -1;
#endif
}

int kvk_softmax_absorb(float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum, float *blockAcc,
                       float *tailAcc, int dim) {
    return kvk_softmax_absorb_variant(0, scores, stride, count, group, runMax, runSum, blockAcc, tailAcc, dim);
}

int kvk_softmax_available(void) { return softmax_isa != 0; }
int kvk_softmax_isa(void) { return softmax_isa; }
