// Attention over the int scheme's codes with integer dot products (see include/CKVKernels.h).
//
// Layouts. A row of an int block holds `dim` codes of `bits` bits, code c at bits
// [c*bits, (c+1)*bits) from the row's first byte, so byte B holds codes B*K .. B*K + K-1
// (K = 8 / bits slots) and slot k of every byte is one shift and one mask away. The kernels read
// rows in 16-byte chunks (16*K channels each), two per 256-bit register: two chunks of one row
// when a row has an even number of chunks, or the same chunk of two tokens when it has one.
//
// Keys (per-channel groups, KIVI's layout): within a run of tokens sharing scale s_c and offset
// o_c, q . k_t = sum_c (q_c s_c) code_tc + sum_c q_c o_c. The first sum is an integer dot product
// of the codes with q~ = q * s quantized to int8 (one f32 scale per query head, run and 32-bit
// accumulator lane; 4-bit keys add a pass with the rounding residual), laid out in slot order;
// the second is one f32 constant per head and run.
//
// Values (per-token groups): sum_t w_t v_tc = sum_t (w_t s_tg) code_tc + sum_t w_t o_tg. The
// weights w_t s_tg are quantized to u8 per query head, group and sub-block of 64 tokens; four
// tokens' codes are transposed into each 32-bit lane so one vpdpbusd adds four tokens'
// products per channel. The integer sums are flushed to f32 once per sub-block, into the
// accumulator in slot order ("scrambled"); kvk_int_token_layout says which channel each
// accumulator slot is, for the caller to put back once per attention call.
#include "CKVKernels.h"
#include "cpu_tier.h"
#include "prefetch_plan.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__)
#include <immintrin.h>
#define KVK_INT_X86 1
#endif

// Both variants must round alike: no contraction of a * b + c into one fused operation that
// only one of them would make.
#pragma STDC FP_CONTRACT OFF

enum { MAX_DIM = 256, MAX_ROW_BYTES = 128, MAX_GROUPS = 8, VALUE_QUERIES = 4, VALUE_SUB_BLOCK = 64 };
/// Floats of one query head's key state beside its int8 query: 8 lane scales, 16 int16 lane
/// multipliers (8 floats' room), the multipliers' unit (key_prepare).
enum { KEY_STATE = 24 };
enum { ISA_NONE = KVK_TIER_NONE, ISA_AVX2 = KVK_TIER_AVX2, ISA_VNNI = KVK_TIER_VNNI };

static int int_isa = ISA_NONE;

__attribute__((constructor)) static void int_detect(void) { int_isa = kvk_cpu_tier(); }

const char *kvk_int_codes_isa_name(void) {
    return int_isa == ISA_VNNI ? "avx512vl-vnni vpdpbusd" : int_isa == ISA_AVX2 ? "avx2 vpmaddubsw" : "none (Swift fallback)";
}

int kvk_int_codes_isa(void) { return int_isa; }

typedef struct {
    int bits, slots, mask, dim, rowBytes, chunks, units, chunkChannels;
} kvk_int_layout;

static int int_layout(int bits, int dim, kvk_int_layout *L) {
    if (bits != 1 && bits != 2 && bits != 4) return 0;
    if (dim <= 0 || dim > MAX_DIM || dim % 8) return 0;
    int rowBytes = dim * bits / 8;
    if (rowBytes % 16) return 0;
    int chunks = rowBytes / 16;
    if (chunks != 1 && chunks % 2) return 0;
    L->bits = bits;
    L->slots = 8 / bits;
    L->mask = (1 << bits) - 1;
    L->dim = dim;
    L->rowBytes = rowBytes;
    L->chunks = chunks;
    L->units = chunks == 1 ? 1 : chunks / 2;
    L->chunkChannels = 16 * L->slots;
    return 1;
}

// MARK: Shared by both variants

/// Quantized value weights of one sub-block.
typedef struct {
    /// One byte per token, four tokens per word, per query head and group.
    uint32_t quads[VALUE_QUERIES][MAX_GROUPS][VALUE_SUB_BLOCK / 4];
    /// For 4-bit values, the rounding residuals of the same, in 1/254 units (signed bytes).
    uint32_t low[VALUE_QUERIES][MAX_GROUPS][VALUE_SUB_BLOCK / 4];
    /// What one unit of a quantized weight is worth, per query head and group.
    float unit[VALUE_QUERIES][MAX_GROUPS];
    /// sum_t w_t * offset_tg, per query head and group.
    float offsetSum[VALUE_QUERIES][MAX_GROUPS];
} value_weights;

/// The value group of lane `lane` of register `p`.
static int value_group(const kvk_int_layout *L, int groupSize, int p, int lane) {
    int chunk = L->chunks == 1 ? 0 : 2 * p + lane;
    return chunk * L->chunkChannels / groupSize;
}

// MARK: Variants

#if KVK_INT_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define SUFFIX(name) name##_avx2
#define DOT(acc, u, s) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((u), (s)), _mm256_set1_epi16(1)))
#define KEY_QUERIES 2
#define VALUE_ACCUMULATORS 8
#include "int_codes_body.h"
#undef SUFFIX
#undef DOT
#undef KEY_QUERIES
#undef VALUE_ACCUMULATORS
#pragma clang attribute pop

#pragma clang attribute push(__attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni"))), apply_to = function)
#define SUFFIX(name) name##_vnni
#define DOT(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#define KEY_QUERIES 4
#define VALUE_ACCUMULATORS 16
#include "int_codes_body.h"
#undef SUFFIX
#undef DOT
#undef KEY_QUERIES
#undef VALUE_ACCUMULATORS
#pragma clang attribute pop
#endif

// MARK: Entry points

static int chosen_isa(int isa) {
    if (isa == 0) return int_isa;
    return isa <= int_isa ? isa : ISA_NONE;
}

int kvk_int_channel_supported(int bits, int dim) {
    kvk_int_layout L;
    return int_isa != ISA_NONE && int_layout(bits, dim, &L);
}

/// The layout of `bits`-bit values in groups of `groupSize` channels, if the value kernel takes
/// it: groups that divide dim, are whole 16-byte chunks of codes, at most MAX_GROUPS per token.
static int token_layout(int bits, int dim, int groupSize, kvk_int_layout *L) {
    return int_layout(bits, dim, L) && groupSize > 0 && dim % groupSize == 0 && groupSize % L->chunkChannels == 0 &&
           dim / groupSize <= MAX_GROUPS;
}

int kvk_int_token_supported(int bits, int dim, int groupSize) {
    kvk_int_layout L;
    return int_isa != ISA_NONE && token_layout(bits, dim, groupSize, &L);
}

int kvk_int_channel_scores(const uint8_t *codes, const void *scales, const void *offsets, int bits, int dim, int runTokens, size_t t0,
                           size_t count, const float *queries, int group, float *scores, size_t stride, int isa) {
    kvk_int_layout L;
    if (!int_layout(bits, dim, &L) || runTokens <= 0 || group <= 0) return -1;
#if KVK_INT_X86
    switch (chosen_isa(isa)) {
    case ISA_VNNI:
        channel_scores_vnni(codes, scales, offsets, &L, runTokens, t0, count, queries, group, scores, stride);
        return 0;
    case ISA_AVX2:
        channel_scores_avx2(codes, scales, offsets, &L, runTokens, t0, count, queries, group, scores, stride);
        return 0;
    }
#endif
    (void)codes, (void)scales, (void)offsets, (void)t0, (void)count, (void)queries, (void)scores, (void)stride, (void)isa;
    return -1;
}

int kvk_int_token_accumulate(const uint8_t *codes, const void *scales, const void *offsets, int bits, int dim, int groupSize, size_t t0,
                             size_t count, const float *weights, size_t stride, int group, float *acc, int isa) {
    kvk_int_layout L;
    if (!token_layout(bits, dim, groupSize, &L) || group <= 0) return -1;
#if KVK_INT_X86
    switch (chosen_isa(isa)) {
    case ISA_VNNI:
        token_accumulate_vnni(codes, scales, offsets, &L, groupSize, t0, count, weights, stride, group, acc);
        return 0;
    case ISA_AVX2:
        token_accumulate_avx2(codes, scales, offsets, &L, groupSize, t0, count, weights, stride, group, acc);
        return 0;
    }
#endif
    (void)codes, (void)scales, (void)offsets, (void)t0, (void)count, (void)weights, (void)stride, (void)acc, (void)isa;
    return -1;
}

int kvk_int_token_layout(int bits, int dim, int32_t *channelOfSlot) {
    kvk_int_layout L;
    if (!int_layout(bits, dim, &L)) return -1;
    const int K = L.slots;
    if (L.chunks == 1) {
        for (int i = 0; i < 4; i++)
            for (int k = 0; k < K; k++)
                for (int j = 0; j < 4; j++) channelOfSlot[(i * K + k) * 4 + j] = (4 * i + j) * K + k;
    } else {
        for (int p = 0; p < L.units; p++)
            for (int i = 0; i < 4; i++)
                for (int k = 0; k < K; k++)
                    for (int lane = 0; lane < 2; lane++)
                        for (int j = 0; j < 4; j++)
                            channelOfSlot[p * 32 * K + (i * K + k) * 8 + lane * 4 + j] = (2 * p + lane) * L.chunkChannels + (4 * i + j) * K + k;
    }
    return 0;
}

// MARK: Decoding (the exact path)

#if KVK_INT_X86
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)

#include "codes8.h"

/// Codes 8j ..< 8j + 8 of a row as floats (exact: they are small integers), as
/// IntScheme.codeValues reads them.
static inline __attribute__((always_inline)) __m256 code_values(const uint8_t *row, int j, const int B) {
    return _mm256_cvtepi32_ps(codes8(row, 8 * (size_t)j, B));
}

static inline __attribute__((always_inline)) void decode_body(const uint8_t *block, int dim, int channelGrouping, int groupSize,
                                                              size_t scalesOffset, size_t offsetsOffset, size_t t0, size_t n, float *tile,
                                                              size_t rowStride, const int B) {
    const size_t rowBytes = (size_t)dim * B / 8;
    const int chunks = dim / 8;
    if (channelGrouping) {
        size_t t = t0;
        while (t < t0 + n) {
            const size_t run = t / (size_t)groupSize, end = (run + 1) * (size_t)groupSize < t0 + n ? (run + 1) * (size_t)groupSize : t0 + n;
            const uint8_t *sc = block + scalesOffset + 2 * run * (size_t)dim, *of = block + offsetsOffset + 2 * run * (size_t)dim;
            for (size_t row = t; row < end; row++) {
                const uint8_t *codes = block + row * rowBytes;
                float *o = tile + (row - t0) * rowStride;
                for (int j = 0; j < chunks; j++) {
                    __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16 * j)));
                    __m256 f = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(of + 16 * j)));
                    _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(code_values(codes, j, B), s, f));
                }
            }
            t = end;
        }
        return;
    }
    const int perToken = dim / groupSize, chunksPerGroup = groupSize / 8;
    for (size_t row = 0; row < n; row++) {
        const size_t t = t0 + row;
        const uint8_t *codes = block + t * rowBytes;
        float *o = tile + row * rowStride;
        int j = 0;
        for (int grp = 0; grp < perToken; grp++) {
            const size_t g = t * (size_t)perToken + (size_t)grp;
            uint16_t h[2];
            memcpy(&h[0], block + scalesOffset + 2 * g, 2);
            memcpy(&h[1], block + offsetsOffset + 2 * g, 2);
            __m128 so = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h[0] | (int)h[1] << 16));
            const __m256 s = _mm256_broadcastss_ps(so), f = _mm256_broadcastss_ps(_mm_shuffle_ps(so, so, 1));
            for (int c = 0; c < chunksPerGroup; c++, j++) _mm256_storeu_ps(o + 8 * j, _mm256_fmadd_ps(code_values(codes, j, B), s, f));
        }
    }
}

static void int_decode_avx2(const uint8_t *block, int bits, int dim, int channelGrouping, int groupSize, size_t scalesOffset,
                            size_t offsetsOffset, size_t t0, size_t n, float *tile, size_t rowStride) {
    switch (bits) {
    case 1: decode_body(block, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride, 1); break;
    case 2: decode_body(block, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride, 2); break;
    case 3: decode_body(block, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride, 3); break;
    case 4: decode_body(block, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride, 4); break;
    default: decode_body(block, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride, 8); break;
    }
}

#pragma clang attribute pop
#endif

int kvk_int_decode(const uint8_t *block, size_t blockBytes, int bits, int dim, int channelGrouping, int groupSize, size_t scalesOffset,
                   size_t offsetsOffset, size_t t0, size_t n, float *tile, size_t rowStride) {
    if (int_isa == ISA_NONE || n == 0) return -1;
    if (!(bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8) || dim <= 0 || dim % 8 || groupSize <= 0) return -1;
    if (!channelGrouping && (dim % groupSize || groupSize % 8)) return -1;
    if (t0 > UINT32_MAX || n > UINT32_MAX) return -1;   // rows of one block: no product below can wrap
    // Every byte read must lie in the block: the last row's last code word, and the last group's
    // scale and offset.
    const size_t rowBytes = (size_t)dim * (size_t)bits / 8, last = t0 + n - 1;
    const size_t codesEnd = last * rowBytes + (bits == 8 ? rowBytes : (size_t)(dim / 8 - 1) * (size_t)bits + 4);
    const size_t groupsEnd = channelGrouping ? (last / (size_t)groupSize + 1) * (size_t)dim : (last + 1) * (size_t)(dim / groupSize);
    if (codesEnd > blockBytes || scalesOffset > blockBytes || offsetsOffset > blockBytes ||
        2 * groupsEnd > blockBytes - scalesOffset || 2 * groupsEnd > blockBytes - offsetsOffset)
        return -1;
#if KVK_INT_X86
    int_decode_avx2(block, bits, dim, channelGrouping, groupSize, scalesOffset, offsetsOffset, t0, n, tile, rowStride);
    return 0;
#else
    (void)tile, (void)rowStride;
    return -1;
#endif
}
