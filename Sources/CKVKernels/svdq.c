// The svdq scheme's key scores (see include/CKVKernels.h): the projected queries against the
// latent codes of a block, eight tokens per vector, every latent channel decoded once for four
// query heads and two vectors of tokens. The same float operations as SVDqScheme.scores in Swift
// (latent = scale * code + offset, a multiply then an add; each score a fused multiply-add per
// channel, channels in order, from zero), so the same bits.
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "prefetch_plan.h"

#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_SVDQ_X86 1
#endif

#pragma STDC FP_CONTRACT OFF

enum { SVDQ_MAX_RANK = 512 };

static int svdq_available = 0;

__attribute__((constructor)) static void svdq_detect(void) { svdq_available = kvk_cpu_tier() >= KVK_TIER_AVX2; }

/// A plan (kvk_svdq_plan), as int64s: blockBytes, rank, tokens, stored channels, runs, then each
/// run (first channel, channels, kind), then each stored channel (where its codes start, its
/// index: its column of the query state and of the scales, its width).
enum { PLAN_HEADER = 5, RUN_INTS = 3, CHANNEL_INTS = 3 };

typedef struct {
    int64_t at, index, bits;
} svdq_channel;

typedef struct {
    int64_t start, count, kind;
} svdq_run;

#if KVK_SVDQ_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

#include "codes8.h"

/// Latent values of tokens t ..< t + 8 (t a multiple of 8, so their codes start on a byte) of a
/// channel of B bits, times the scale plus the offset (16 bits: the f16 values themselves).
/// B 1-4 read one 4-byte word, 8 one 8-byte word: the caller has checked they lie in the block.
/// B 0 stands for any other case (5 or 6 bits, or a channel whose last word would leave the
/// block): the codes' own bytes, read as far as the block goes.
static inline __attribute__((always_inline)) __m256 latent8(const uint8_t *p, size_t end, const svdq_channel *c, const float *ranges,
                                                             int rank, size_t t, const int B) {
    if (B == 16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + c->at + 2 * t)));
    __m256i codes;
    if (B) {
        codes = codes8(p + c->at, t, B);
    } else {
        const int b = (int)c->bits;
        const size_t first = c->at + ((t * (size_t)b) >> 3);
        uint64_t word = 0;
        size_t n = end - first < (size_t)b ? end - first : (size_t)b;
        memcpy(&word, p + first, n);
        _Alignas(32) int32_t lane[8];
        for (int i = 0; i < 8; i++) lane[i] = (int32_t)((word >> (i * b)) & ((1u << b) - 1));
        codes = _mm256_load_si256((const __m256i *)lane);
    }
    __m256 f = _mm256_cvtepi32_ps(codes);   // exact: codes are small integers
    return _mm256_add_ps(_mm256_mul_ps(_mm256_set1_ps(ranges[c->index]), f), _mm256_set1_ps(ranges[rank + c->index]));
}

/// One run of channels of one kind (B as in latent8) over tokens [t0, t0 + count) for QB query
/// heads, V vectors of eight tokens per pass. The scores so far are in `out` (zero before the
/// first run): each score's fused multiply-adds continue in channel order across runs, so the
/// blocking changes no bit.
static inline __attribute__((always_inline)) void run_scores(const uint8_t *p, size_t end, const svdq_channel *channels, int n,
                                                             const float *ranges, const float *state, int rank, size_t t0, size_t count, float *out,
                                                             size_t stride, int first, size_t share, const int QB, const int B) {
    size_t t = t0;
    for (; t + 16 <= t0 + count || t < t0 + count; t += 16) {
        kvk_plan_advance(share);
        const int V = t + 16 <= t0 + count ? 2 : 1;
        __m256 a[4][2];
        for (int q = 0; q < QB; q++)
            for (int v = 0; v < 2; v++)
                a[q][v] = first || v >= V ? _mm256_setzero_ps() : _mm256_loadu_ps(out + (size_t)q * stride + (t - t0) + 8 * v);
        for (int i = 0; i < n; i++) {
            const svdq_channel *c = channels + i;
            __m256 x[2];
            x[0] = latent8(p, end, c, ranges, rank, t, B);
            x[1] = V == 2 ? latent8(p, end, c, ranges, rank, t + 8, B) : x[0];
            for (int q = 0; q < QB; q++) {
                __m256 s = _mm256_broadcast_ss(state + (size_t)q * rank + c->index);
                a[q][0] = _mm256_fmadd_ps(s, x[0], a[q][0]);
                a[q][1] = _mm256_fmadd_ps(s, x[1], a[q][1]);
            }
        }
        for (int q = 0; q < QB; q++)
            for (int v = 0; v < V; v++) _mm256_storeu_ps(out + (size_t)q * stride + (t - t0) + 8 * v, a[q][v]);
    }
}

#define SVDQ_KIND(QB, B) run_scores(p, end, channels + r->start, (int)r->count, ranges, state, rank, t0, count, out, stride, first, share, QB, B)
#define SVDQ_KINDS(QB)                                                                                                                   \
    switch (r->kind) {                                                                                                                   \
    case 1: SVDQ_KIND(QB, 1); break;                                                                                                     \
    case 2: SVDQ_KIND(QB, 2); break;                                                                                                     \
    case 3: SVDQ_KIND(QB, 3); break;                                                                                                     \
    case 4: SVDQ_KIND(QB, 4); break;                                                                                                     \
    case 8: SVDQ_KIND(QB, 8); break;                                                                                                     \
    case 16: SVDQ_KIND(QB, 16); break;                                                                                                   \
    default: SVDQ_KIND(QB, 0); break;                                                                                                    \
    }

static void svdq_scores_avx2(const uint8_t *p, size_t end, const svdq_channel *channels, const svdq_run *runs, int runCount,
                             const float *ranges, const float *state, int rank, int heads, size_t t0, size_t count, float *out, size_t stride) {
    const size_t steps = (size_t)runCount * ((count + 15) / 16), share = kvk_plan_share(steps);
    for (int i = 0; i < runCount; i++) {
        const svdq_run *r = runs + i;
        const int first = i == 0;
        switch (heads) {
        case 1: SVDQ_KINDS(1) break;
        case 2: SVDQ_KINDS(2) break;
        case 3: SVDQ_KINDS(3) break;
        default: SVDQ_KINDS(4) break;
        }
    }
    if (runCount == 0)
        for (int q = 0; q < heads; q++) memset(out + (size_t)q * stride, 0, count * sizeof(float));
}

/// The block's rank scales, then its rank offsets, widened eight at a time (the caller checked
/// that the 4 * rank bytes are there).
static void svdq_ranges(const uint8_t *block, int rank, float *ranges) {
    uint16_t tail[8];
    for (int i = 0; i < 2 * rank; i += 8) {
        const uint8_t *src = block + 2 * (size_t)i;
        if (2 * rank - i < 8) {
            memset(tail, 0, sizeof tail);
            memcpy(tail, src, 2 * (size_t)(2 * rank - i));
            src = (const uint8_t *)tail;
        }
        _mm256_storeu_ps(ranges + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)src)));
    }
}

#pragma clang attribute pop
#endif

size_t kvk_svdq_plan_ints(int rank) { return PLAN_HEADER + (size_t)(rank > 0 ? rank : 0) * (RUN_INTS + CHANNEL_INTS); }

int kvk_svdq_plan(size_t blockBytes, int rank, const intptr_t *channelBits, const intptr_t *streamOffsets, size_t tokens, int64_t *plan) {
    if (rank <= 0 || rank > SVDQ_MAX_RANK || (size_t)rank * 4 > blockBytes || tokens == 0 || tokens % 8) return -1;
    svdq_run *runs = (svdq_run *)(plan + PLAN_HEADER);
    svdq_channel *channels = (svdq_channel *)(plan + PLAN_HEADER + (size_t)rank * RUN_INTS);
    int64_t live = 0, runCount = 0;
    for (int c = 0; c < rank; c++) {
        const intptr_t b = channelBits[c];
        if (b == 0) continue;
        if (!((b >= 1 && b <= 8 && b != 7) || b == 16)) return -1;
        // Every code of tokens [0, tokens) must lie in the block (the scheme's layout makes it so).
        const size_t need = b == 16 ? 2 * tokens : (tokens * (size_t)b + 7) / 8;
        if (streamOffsets[c] < 0 || (size_t)streamOffsets[c] > blockBytes || need > blockBytes - (size_t)streamOffsets[c]) return -1;
        channels[live] = (svdq_channel){(int64_t)streamOffsets[c], c, (int64_t)b};
        // Its kind: one word per eight codes where the last such word still lies in the block.
        const size_t last = (size_t)streamOffsets[c] + ((tokens - 8) * (size_t)b >> 3);
        const int64_t kind = b == 16 ? 16 : (b <= 4 && last + 4 <= blockBytes) ? (int64_t)b : (b == 8 && last + 8 <= blockBytes) ? 8 : 0;
        if (runCount > 0 && runs[runCount - 1].kind == kind) {
            runs[runCount - 1].count++;
        } else {
            runs[runCount++] = (svdq_run){live, 1, kind};
        }
        live++;
    }
    // The channels follow the rank run slots, so move them next to the runs actually used.
    memmove(plan + PLAN_HEADER + runCount * RUN_INTS, channels, (size_t)live * sizeof(svdq_channel));
    plan[0] = (int64_t)blockBytes, plan[1] = rank, plan[2] = (int64_t)tokens, plan[3] = live, plan[4] = runCount;
    return 0;
}

int kvk_svdq_scores(const uint8_t *block, size_t blockBytes, const int64_t *plan, size_t t0, size_t count, const float *state, int group,
                    float *scores, size_t stride) {
    if (!svdq_available || group <= 0 || t0 % 8 || count % 8) return -1;
    // A plan is made for one block size and number of tokens.
    if (plan[0] != (int64_t)blockBytes || t0 > (size_t)plan[2] || count > (size_t)plan[2] - t0) return -1;
#if KVK_SVDQ_X86
    const int rank = (int)plan[1], runCount = (int)plan[4];
    const svdq_run *runs = (const svdq_run *)(plan + PLAN_HEADER);
    const svdq_channel *channels = (const svdq_channel *)(plan + PLAN_HEADER + (size_t)runCount * RUN_INTS);
    float ranges[2 * SVDQ_MAX_RANK + 8];
    svdq_ranges(block, rank, ranges);
    for (int q0 = 0; q0 < group; q0 += 4)
        svdq_scores_avx2(block, blockBytes, channels, runs, runCount, ranges, state + (size_t)q0 * rank, rank, group - q0 < 4 ? group - q0 : 4,
                         t0, count, scores + (size_t)q0 * stride, stride);
    return 0;
#else
    (void)block, (void)state, (void)scores, (void)stride;
    return -1;
#endif
}
