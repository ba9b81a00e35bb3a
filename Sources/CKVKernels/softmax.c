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

static int softmax_avx2 = 0;

#if KVK_SOFTMAX_X86
__attribute__((constructor)) static void softmax_detect(void) {
    __builtin_cpu_init();
    softmax_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

/// TileKernels.exp: e^x for x <= 0, 0 below -80 (and for -inf). The range reduction and the
/// polynomial are fused multiply-adds, as Swift's `addingProduct` computes them: 30% less time
/// than separate multiplies and adds (a softmax step was mostly this), the same bits in both.
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    const __m256 magic = _mm256_set1_ps(12582912.0f);
    __m256i ix = _mm256_castps_si256(x);
    // below: negative lanes with a magnitude above 80's (and negative NaNs), zeroed at the end.
    __m256i mag = _mm256_and_si256(ix, _mm256_set1_epi32(0x7FFFFFFF));
    __m256i below = _mm256_and_si256(_mm256_srai_epi32(ix, 31), _mm256_srai_epi32(_mm256_sub_epi32(_mm256_set1_epi32(0x42A00000), mag), 31));
    // Below lanes are zeroed at the end whatever they compute; clamping them to -80 instead of
    // to 0 takes one operation off the chain every lane waits on (x >= -80 and NaN pass through).
    __m256 clamped = _mm256_max_ps(_mm256_set1_ps(-80.0f), x);
    __m256 shifted = _mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504f), magic);
    __m256 n = _mm256_sub_ps(shifted, magic);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.98756915e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.39819995e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665796e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666655e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_sub_epi32(_mm256_castps_si256(shifted), _mm256_set1_epi32(0x4B400000));
    __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(127)), 23));
    return _mm256_castsi256_ps(_mm256_andnot_si256(below, _mm256_castps_si256(_mm256_mul_ps(y, scale))));
}

enum { MAX_HEADS = 16 };

/// Heads [g0, g0 + n) of one step, n <= MAX_HEADS: the maxima first, then the exps of every
/// head's vectors interleaved (independent chains: the polynomial is latency-bound one row at a
/// time), then each head's sum and rescale. Per head, the same operations in the same order as
/// the Swift loop, so the same results.
__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void absorb_heads(float *scores, size_t stride, size_t count,
                                                                                                int g0, const int n, float *runMax, float *runSum,
                                                                                                float *blockAcc, float *tailAcc, int dim) {
    const size_t vectorEnd = count & ~(size_t)7;
    float oldMax[MAX_HEADS], newMax[MAX_HEADS];
    __m256 sums[MAX_HEADS], shift[MAX_HEADS];
    float lanes[8];
    for (int h = 0; h < n; h++) {
        const float *row = scores + (size_t)(g0 + h) * stride;
        // The largest score: a lane takes x when x > it (NaN never), as the scalar loop does.
        __m256 m = _mm256_set1_ps(-INFINITY);
        size_t t = 0;
        for (; t < vectorEnd; t += 8) {
            __m256 x = _mm256_loadu_ps(row + t);
            m = _mm256_blendv_ps(m, x, _mm256_cmp_ps(x, m, _CMP_GT_OQ));
        }
        _mm256_storeu_ps(lanes, m);
        float chunkMax = -INFINITY;
        for (int i = 0; i < 8; i++)
            if (lanes[i] > chunkMax) chunkMax = lanes[i];
        for (; t < count; t++)
            if (row[t] > chunkMax) chunkMax = row[t];
        oldMax[h] = runMax[g0 + h];
        newMax[h] = chunkMax >= oldMax[h] ? chunkMax : oldMax[h];   // Swift's max(oldMax, chunkMax)
        shift[h] = _mm256_set1_ps(newMax[h]);
        sums[h] = _mm256_setzero_ps();
    }
    for (size_t t = 0; t < vectorEnd; t += 8)
        for (int h = 0; h < n; h++) {
            float *row = scores + (size_t)(g0 + h) * stride;
            __m256 w = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + t), shift[h]));
            _mm256_storeu_ps(row + t, w);
            sums[h] = _mm256_add_ps(sums[h], w);
        }
    for (int h = 0; h < n; h++) {
        int g = g0 + h;
        float *row = scores + (size_t)g * stride;
        _mm256_storeu_ps(lanes, sums[h]);
        if (vectorEnd < count) {
            float x[8];
            for (int i = 0; i < 8; i++) x[i] = -INFINITY;
            for (size_t i = 0; i < count - vectorEnd; i++) x[i] = row[vectorEnd + i] - newMax[h];
            float ws[8];
            _mm256_storeu_ps(ws, exp8(_mm256_loadu_ps(x)));
            for (size_t i = 0; i < count - vectorEnd; i++) {
                row[vectorEnd + i] = ws[i];
                lanes[i] += ws[i];
            }
        }
        float sum = lanes[0];
        for (int i = 1; i < 8; i++) sum += lanes[i];
        if (newMax[h] > oldMax[h]) {
            float correction = oldMax[h] == -INFINITY ? 0 : expf(oldMax[h] - newMax[h]);
            runSum[g] *= correction;
            float *b = blockAcc + (size_t)g * dim, *a = tailAcc + (size_t)g * dim;
            for (int i = 0; i < dim; i++) b[i] *= correction;
            for (int i = 0; i < dim; i++) a[i] *= correction;
            runMax[g] = newMax[h];
        }
        runSum[g] += sum;
    }
}

__attribute__((target("avx2,fma"))) static void absorb_avx2(float *scores, size_t stride, size_t count, int group, float *runMax,
                                                        float *runSum, float *blockAcc, float *tailAcc, int dim) {
    // Four heads (the common GQA group) with the count a constant: their running sums then stay
    // in registers instead of going through memory on every vector.
    if (group == 4) return absorb_heads(scores, stride, count, 0, 4, runMax, runSum, blockAcc, tailAcc, dim);
    for (int g0 = 0; g0 < group; g0 += MAX_HEADS)
        absorb_heads(scores, stride, count, g0, group - g0 < MAX_HEADS ? group - g0 : MAX_HEADS, runMax, runSum, blockAcc, tailAcc, dim);
}
#endif

int kvk_softmax_absorb(float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum, float *blockAcc,
                       float *tailAcc, int dim) {
#if KVK_SOFTMAX_X86
    if (softmax_avx2) {
        absorb_avx2(scores, stride, count, group, runMax, runSum, blockAcc, tailAcc, dim);
        return 0;
    }
#endif
    (void)scores, (void)stride, (void)count, (void)group, (void)runMax, (void)runSum, (void)blockAcc, (void)tailAcc, (void)dim;
    return -1;
}

int kvk_softmax_available(void) { return softmax_avx2; }
