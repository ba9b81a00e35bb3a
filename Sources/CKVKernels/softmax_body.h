// The online-softmax step of softmax.c, included once per instruction-set variant with SUFFIX
// (the functions' names) and SOFTMAX_WIDE (1: the exps sixteen lanes at a time, AVX-512 F)
// defined. Every lane's exp is the same operations in either width, and the per-lane sums add
// the same values in the same order, so both variants give the same bits.

/// Heads [g0, g0 + n) of one step, n <= MAX_HEADS: the maxima first, then the exps of every
/// head's vectors interleaved (independent chains: the polynomial is latency-bound one row at a
/// time), then each head's sum and rescale. Per head, the same operations in the same order as
/// the Swift loop, so the same results.
static inline __attribute__((always_inline)) void SUFFIX(absorb_heads)(float *scores, size_t stride, size_t count, int g0, const int n,
                                                                       float *runMax, float *runSum, float *blockAcc, float *tailAcc,
                                                                       int dim) {
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
    size_t t = 0;
#if SOFTMAX_WIDE
    // Sixteen exps per instruction (half the instructions in flight for the same work: the
    // polynomial's waiting operations had filled the scheduler), each half added to the sums
    // as the eight-lane loop adds it.
    for (; t + 16 <= vectorEnd; t += 16)
        for (int h = 0; h < n; h++) {
            float *row = scores + (size_t)(g0 + h) * stride;
            __m512 w = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + t), _mm512_broadcast_f32x8(shift[h])));
            _mm512_storeu_ps(row + t, w);
            sums[h] = _mm256_add_ps(sums[h], _mm512_castps512_ps256(w));
            sums[h] = _mm256_add_ps(sums[h], _mm512_extractf32x8_ps(w, 1));
        }
#endif
    for (; t < vectorEnd; t += 8)
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

static void SUFFIX(absorb)(float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum, float *blockAcc,
                           float *tailAcc, int dim) {
    // Four heads (the common GQA group) with the count a constant: their running sums then stay
    // in registers instead of going through memory on every vector.
    if (group == 4) return SUFFIX(absorb_heads)(scores, stride, count, 0, 4, runMax, runSum, blockAcc, tailAcc, dim);
    for (int g0 = 0; g0 < group; g0 += MAX_HEADS)
        SUFFIX(absorb_heads)(scores, stride, count, g0, group - g0 < MAX_HEADS ? group - g0 : MAX_HEADS, runMax, runSum, blockAcc, tailAcc, dim);
}
