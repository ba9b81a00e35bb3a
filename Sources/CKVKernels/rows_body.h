// The row kernels of rows.c, included once per instruction-set variant with SUFFIX (the
// functions' names), ROW_TOKENS (rows scored per step) and ROW_VECTORS (8-channel vectors
// accumulated per pass over the rows) defined. A score is a chain of dependent multiply-adds;
// with two rows per step (four heads: eight chains) the core waited on them, so AVX2 scores
// three rows per step (twelve accumulators: what its 16 registers hold) and AVX-512 VL, with
// 32 registers, four; its value passes cover 32 channels instead of 16, so each weight
// broadcast serves four multiply-adds instead of two. Every score and every accumulator still
// depends only on its own operations, in the same order, so both variants give the same bits.

/// Eight elements of a row at `p` (any alignment) as floats: widened, or an nsn piece's codeword.
static inline __attribute__((always_inline)) __m256 SUFFIX(load8)(const uint8_t *p, const int type, const row_codes *codes) {
    switch (type) {
    case ROW_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    case ROW_BF16: return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    case ROW_NSN1: return _mm256_loadu_ps(codes->book + 8 * (size_t)p[0]);
    case ROW_NSN2: {
        __m256i magnitude = _mm256_loadu_si256((const __m256i *)(codes->book + 8 * (size_t)p[1]));
        return _mm256_castsi256_ps(_mm256_xor_si256(magnitude, _mm256_loadu_si256((const __m256i *)(codes->signs + 8 * (size_t)p[0]))));
    }
    default: return _mm256_loadu_ps((const float *)p);
    }
}

/// Scores of TB (1 to 4) consecutive rows from `r0` for QB query heads, each 8-channel chunk
/// of a row widened once for every head.
static inline __attribute__((always_inline)) void SUFFIX(scores_step)(const uint8_t *r0, size_t rowBytes, int dim, const float *queries,
                                                                      float *out, size_t stride, const row_codes *codes, size_t share,
                                                                      const int QB, const int type, const int TB) {
    const int chunk = chunk_bytes(type);
    kvk_plan_advance((size_t)TB * share);
    __m256 a[4][4];
    for (int q = 0; q < QB; q++)
        for (int j = 0; j < TB; j++) a[q][j] = _mm256_setzero_ps();
    for (int c = 0; c < dim; c += 8) {
        __m256 k[4];
        for (int j = 0; j < TB; j++) k[j] = SUFFIX(load8)(r0 + (size_t)j * rowBytes + c / 8 * chunk, type, codes);
        for (int q = 0; q < QB; q++) {
            __m256 x = _mm256_loadu_ps(queries + (size_t)q * dim + c);
            for (int j = 0; j < TB; j++) a[q][j] = _mm256_fmadd_ps(x, k[j], a[q][j]);
        }
    }
    for (int q = 0; q < QB; q++) kvk_store_scores(out + (size_t)q * stride, a[q], TB);
}

/// Scores of `count` rows for QB query heads: ROW_TOKENS rows per step, then two, then one.
static inline __attribute__((always_inline)) void SUFFIX(scores_block)(const uint8_t *rows, size_t rowBytes, int dim, size_t count,
                                                                       const float *queries, float *out, size_t stride,
                                                                       const row_codes *codes, const int QB, const int type) {
    size_t t = 0;
    const size_t share = kvk_plan_share(count);
    for (; t + ROW_TOKENS <= count; t += ROW_TOKENS)
        SUFFIX(scores_step)(rows + t * rowBytes, rowBytes, dim, queries, out + t, stride, codes, share, QB, type, ROW_TOKENS);
    for (; t + 2 <= count; t += 2) SUFFIX(scores_step)(rows + t * rowBytes, rowBytes, dim, queries, out + t, stride, codes, share, QB, type, 2);
    if (t < count) SUFFIX(scores_step)(rows + t * rowBytes, rowBytes, dim, queries, out + t, stride, codes, share, QB, type, 1);
}

/// acc rows of QB query heads, channels [c, c + 8 NV), += their weights times `count` rows: the
/// accumulators in registers across every row, each row chunk widened once for every head.
static inline __attribute__((always_inline)) void SUFFIX(accumulate_step)(const uint8_t *rows, size_t rowBytes, int dim, int c,
                                                                          size_t count, const float *weights, size_t stride, float *acc,
                                                                          const row_codes *codes, const int QB, const int type,
                                                                          const int NV) {
    const int chunk = chunk_bytes(type);
    __m256 a[4][4];
    for (int q = 0; q < QB; q++)
        for (int j = 0; j < NV; j++) a[q][j] = _mm256_loadu_ps(acc + (size_t)q * dim + c + 8 * j);
    const uint8_t *r = rows + (size_t)(c / 8 * chunk);
    for (size_t t = 0; t < count; t++, r += rowBytes) {
        if (c == 0) kvk_plan_advance(rowBytes);   // the first pass over the rows reads them all
        __m256 v[4];
        for (int j = 0; j < NV; j++) v[j] = SUFFIX(load8)(r + j * chunk, type, codes);
        for (int q = 0; q < QB; q++) {
            __m256 w = _mm256_broadcast_ss(weights + (size_t)q * stride + t);
            for (int j = 0; j < NV; j++) a[q][j] = _mm256_fmadd_ps(w, v[j], a[q][j]);
        }
    }
    for (int q = 0; q < QB; q++)
        for (int j = 0; j < NV; j++) _mm256_storeu_ps(acc + (size_t)q * dim + c + 8 * j, a[q][j]);
}

/// acc rows of QB query heads += their weights times `count` rows: 8 ROW_VECTORS channels per
/// pass over the rows, then 16, then the last 8 (dim a multiple of 8).
static inline __attribute__((always_inline)) void SUFFIX(accumulate_block)(const uint8_t *rows, size_t rowBytes, int dim, size_t count,
                                                                           const float *weights, size_t stride, float *acc,
                                                                           const row_codes *codes, const int QB, const int type) {
    int c = 0;
    for (; c + 8 * ROW_VECTORS <= dim; c += 8 * ROW_VECTORS)
        SUFFIX(accumulate_step)(rows, rowBytes, dim, c, count, weights, stride, acc, codes, QB, type, ROW_VECTORS);
    for (; c + 16 <= dim; c += 16) SUFFIX(accumulate_step)(rows, rowBytes, dim, c, count, weights, stride, acc, codes, QB, type, 2);
    if (c < dim) SUFFIX(accumulate_step)(rows, rowBytes, dim, c, count, weights, stride, acc, codes, QB, type, 1);
}

static void SUFFIX(rows_scores)(const uint8_t *rows, int type, int dim, size_t count, const float *queries, int group, float *out,
                                size_t stride, const row_codes *codes) {
    const size_t rowBytes = (size_t)(dim / 8 * chunk_bytes(type));
    for (int q0 = 0; q0 < group; q0 += 4) {
        const float *q = queries + (size_t)q0 * dim;
        float *o = out + (size_t)q0 * stride;
        ROWS_BY_HEADS(SUFFIX(scores_block), group - q0, rows, rowBytes, dim, count, q, o, stride, codes)
    }
}

static void SUFFIX(rows_accumulate)(const uint8_t *rows, int type, int dim, size_t count, const float *weights, size_t stride, int group,
                                    float *acc, const row_codes *codes) {
    const size_t rowBytes = (size_t)(dim / 8 * chunk_bytes(type));
    for (int q0 = 0; q0 < group; q0 += 4) {
        const float *w = weights + (size_t)q0 * stride;
        float *a = acc + (size_t)q0 * dim;
        ROWS_BY_HEADS(SUFFIX(accumulate_block), group - q0, rows, rowBytes, dim, count, w, stride, a, codes)
    }
}
