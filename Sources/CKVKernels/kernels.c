// See include/CKVKernels.h. The AVX2 functions carry their own target attribute, so the target
// compiles with the package's default flags (no unsafeFlags) and the binary runs anywhere: the
// dispatcher picks a variant once, when the library loads.
#include "CKVKernels.h"
#include "half.h"
#include "prefetch_plan.h"

#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVK_X86 1
#endif

enum { KVK_PORTABLE = 0, KVK_AVX2 = 1 };
static int kvk_isa = KVK_PORTABLE;
/// AVX-512 with VNNI (foundation, byte/word and VNNI extensions): the 512-bit vpdpbusd.
static int kvk_vnni512 = 0;

#if KVK_X86
__attribute__((constructor)) static void kvk_detect(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) kvk_isa = KVK_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni")) kvk_vnni512 = 1;
}
#endif

const char *kvk_isa_name(void) { return kvk_isa == KVK_AVX2 ? "avx2+fma+f16c" : "portable"; }

// MARK: Streaming read

static float stream_read_portable(const void *p, size_t bytes) {
    const uint64_t *w = (const uint64_t *)p;
    uint64_t a = 0, b = 0, c = 0, d = 0;
    for (size_t i = 0; i + 4 <= bytes / 8; i += 4) {
        a ^= w[i];
        b ^= w[i + 1];
        c ^= w[i + 2];
        d ^= w[i + 3];
    }
    uint64_t x = a ^ b ^ c ^ d;
    x ^= x >> 32;
    x ^= x >> 16;
    return (float)(x & 0xFFFF);
}

#if KVK_X86
__attribute__((target("avx2"))) static float stream_read_avx2(const void *p, size_t bytes) {
    const __m256i *v = (const __m256i *)p;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    size_t n = bytes / 256;
    for (size_t i = 0; i < n; i++, v += 8) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256(v));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256(v + 1));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256(v + 2));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256(v + 3));
        a4 = _mm256_xor_si256(a4, _mm256_loadu_si256(v + 4));
        a5 = _mm256_xor_si256(a5, _mm256_loadu_si256(v + 5));
        a6 = _mm256_xor_si256(a6, _mm256_loadu_si256(v + 6));
        a7 = _mm256_xor_si256(a7, _mm256_loadu_si256(v + 7));
    }
    __m256i x = _mm256_xor_si256(_mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3)),
                                 _mm256_xor_si256(_mm256_xor_si256(a4, a5), _mm256_xor_si256(a6, a7)));
    // Fold every lane into 16 bits: a flipped bit anywhere flips one bit of the result.
    __m128i y = _mm_xor_si128(_mm256_castsi256_si128(x), _mm256_extracti128_si256(x, 1));
    y = _mm_xor_si128(y, _mm_srli_si128(y, 8));
    y = _mm_xor_si128(y, _mm_srli_si128(y, 4));
    uint32_t w = (uint32_t)_mm_cvtsi128_si32(y);
    return (float)((w ^ (w >> 16)) & 0xFFFF);
}
#endif

float kvk_stream_read(const void *p, size_t bytes) {
#if KVK_X86
    if (kvk_isa == KVK_AVX2) return stream_read_avx2(p, bytes);
#endif
    return stream_read_portable(p, bytes);
}

float kvk_stream_read_portable(const void *p, size_t bytes) { return stream_read_portable(p, bytes); }

// MARK: Prefetch

void kvk_prefetch(const void *p, size_t bytes) {
    const char *c = (const char *)p;
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 2);   // to L2: a whole block at once would overrun L1's miss buffers
}

_Thread_local kvk_plan_state kvk_plan;

void kvk_prefetch_plan(const void *p, size_t bytes) {
    kvk_prefetch_finish();
    kvk_plan.next = (const char *)p;
    kvk_plan.end = (const char *)p + bytes;
}

void kvk_prefetch_finish(void) {
    if (kvk_plan.next < kvk_plan.end) kvk_prefetch(kvk_plan.next, (size_t)(kvk_plan.end - kvk_plan.next));
    kvk_plan.next = kvk_plan.end = NULL;
}

// MARK: Integer multiply-add probe

const char *kvk_int8_isa_name(void) {
    return kvk_vnni512 ? "avx512-vnni vpdpbusd" : kvk_isa == KVK_AVX2 ? "avx2 vpmaddubsw" : "portable";
}

#if KVK_X86
__attribute__((target("avx2"))) static uint64_t int8_probe_avx2(uint64_t iterations, int32_t *sink) {
    const __m256i a = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i b0 = _mm256_set1_epi8(1), b1 = _mm256_set1_epi8(-1), b2 = _mm256_set1_epi8(2), b3 = _mm256_set1_epi8(-2);
    __m256i b4 = _mm256_set1_epi8(5), b5 = _mm256_set1_epi8(-5), b6 = _mm256_set1_epi8(7), b7 = _mm256_set1_epi8(-7);
    __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (uint64_t i = 0; i < iterations; i++) {
        c0 = _mm256_add_epi32(c0, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b0), ones));
        c1 = _mm256_add_epi32(c1, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b1), ones));
        c2 = _mm256_add_epi32(c2, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b2), ones));
        c3 = _mm256_add_epi32(c3, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b3), ones));
        c4 = _mm256_add_epi32(c4, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b4), ones));
        c5 = _mm256_add_epi32(c5, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b5), ones));
        c6 = _mm256_add_epi32(c6, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b6), ones));
        c7 = _mm256_add_epi32(c7, _mm256_madd_epi16(_mm256_maddubs_epi16(a, b7), ones));
        // Keeps the compiler from hoisting the products out of the loop.
        __asm__ volatile("" : "+x"(b0), "+x"(b1), "+x"(b2), "+x"(b3), "+x"(b4), "+x"(b5), "+x"(b6), "+x"(b7));
    }
    __m256i c = _mm256_add_epi32(_mm256_add_epi32(_mm256_add_epi32(c0, c1), _mm256_add_epi32(c2, c3)),
                                 _mm256_add_epi32(_mm256_add_epi32(c4, c5), _mm256_add_epi32(c6, c7)));
    *sink = _mm256_extract_epi32(c, 0);
    return iterations * 8 * 32;
}

__attribute__((target("avx512f,avx512bw,avx512vnni"))) static uint64_t int8_probe_vnni512(uint64_t iterations, int32_t *sink) {
    const __m512i a = _mm512_set1_epi8(3);
    __m512i b0 = _mm512_set1_epi8(1), b1 = _mm512_set1_epi8(-1), b2 = _mm512_set1_epi8(2), b3 = _mm512_set1_epi8(-2);
    __m512i b4 = _mm512_set1_epi8(5), b5 = _mm512_set1_epi8(-5), b6 = _mm512_set1_epi8(7), b7 = _mm512_set1_epi8(-7);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0;
    for (uint64_t i = 0; i < iterations; i++) {
        c0 = _mm512_dpbusd_epi32(c0, a, b0);
        c1 = _mm512_dpbusd_epi32(c1, a, b1);
        c2 = _mm512_dpbusd_epi32(c2, a, b2);
        c3 = _mm512_dpbusd_epi32(c3, a, b3);
        c4 = _mm512_dpbusd_epi32(c4, a, b4);
        c5 = _mm512_dpbusd_epi32(c5, a, b5);
        c6 = _mm512_dpbusd_epi32(c6, a, b6);
        c7 = _mm512_dpbusd_epi32(c7, a, b7);
    }
    __m512i c = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                 _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    *sink = _mm512_reduce_add_epi32(c);
    return iterations * 8 * 64;
}
#endif

uint64_t kvk_int8_madd_probe(uint64_t iterations, int32_t *sink) {
#if KVK_X86
    if (kvk_vnni512) return int8_probe_vnni512(iterations, sink);
    if (kvk_isa == KVK_AVX2) return int8_probe_avx2(iterations, sink);
#endif
    int32_t c[8] = {0};
    volatile int8_t b = -3;
    for (uint64_t i = 0; i < iterations; i++)
        for (int k = 0; k < 8; k++) c[k] += 3 * (int32_t)(b + k);
    *sink = c[0] ^ c[7];
    return iterations * 8;
}

// MARK: Dense f16 attention

enum { BLOCK = 32, MAX_DIM = 256, MAX_GROUP = 8, PREFETCH_BLOCKS = 2 };


static void dense_f16_portable(const float *q, int group, int dim, const uint16_t *keys, const uint16_t *values, size_t tokens,
                               float scale, float *out) {
    for (int g = 0; g < group; g++) {
        float m = -INFINITY, l = 0, acc[MAX_DIM] = {0};
        for (size_t t = 0; t < tokens; t++) {
            float s = 0;
            for (int i = 0; i < dim; i++) s += q[g * dim + i] * half_to_float(keys[t * dim + i]);
            s *= scale;
            float mNew = s > m ? s : m, correction = expf(m - mNew), p = expf(s - mNew);
            l = l * correction + p;
            for (int i = 0; i < dim; i++) acc[i] = acc[i] * correction + p * half_to_float(values[t * dim + i]);
            m = mNew;
        }
        for (int i = 0; i < dim; i++) out[g * dim + i] = acc[i] / l;
    }
}

#if KVK_X86
// e^x for 8 lanes: x = n ln2 + r, |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative
// error below 2e-7), 2^n through the exponent bits. Below -80 it returns 0: a softmax weight
// under e^-80 changes no f32 sum that holds the maximum's weight 1, and a near-denormal weight
// would make every product with it a denormal (a microcode assist each: softmaxes with a wide
// range of scores ran 2x slower before).
__attribute__((target("avx2,fma"))) static inline __m256 exp8(__m256 x) {
    const __m256 keep = _mm256_cmp_ps(x, _mm256_set1_ps(-80.0f), _CMP_GE_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-80.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
}

// Four query heads (q0..q3, padded with zero rows when the group is smaller) over every token.
// Scores of a block are kept as [token][4]; the running maximum, sum and output per head.
__attribute__((target("avx2,fma,f16c"))) static void dense_f16_four(const float *q, int dim, const uint16_t *keys,
                                                                     const uint16_t *values, size_t tokens, float scale,
                                                                     float *acc, float *sums) {
    __attribute__((aligned(32))) float scores[BLOCK * 4];
    __attribute__((aligned(32))) float maxima[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    __m128 l = _mm_setzero_ps();
    const float *q0 = q, *q1 = q + dim, *q2 = q + 2 * dim, *q3 = q + 3 * dim;
    const __m128 vscale = _mm_set1_ps(scale);
    for (size_t base = 0; base < tokens; base += BLOCK) {
        size_t b = tokens - base < BLOCK ? tokens - base : BLOCK;
        // Scores: two key rows at a time against the four heads (eight independent chains);
        // each query chunk is loaded once for both rows.
        __m128 blockMax = _mm_set1_ps(-INFINITY);
        for (size_t t = 0; t < b; t += 2) {
            const uint16_t *k = keys + (base + t) * (size_t)dim;
            const uint16_t *k2 = t + 1 < b ? k + dim : k;   // an odd last row is scored twice, kept once
            // Both streams of the block after next: with keys and values read in turn a block at a
            // time, the hardware prefetcher alone left half of the bandwidth unused.
            if (base + PREFETCH_BLOCKS * BLOCK + t + 1 < tokens) {
                const char *pk = (const char *)(k + PREFETCH_BLOCKS * BLOCK * (size_t)dim);
                const char *pv = (const char *)(values + (base + PREFETCH_BLOCKS * BLOCK + t) * (size_t)dim);
                for (int line = 0; line < 4 * dim; line += 64) {
                    _mm_prefetch(pk + line, _MM_HINT_T0);
                    _mm_prefetch(pv + line, _MM_HINT_T0);
                }
            }
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (int j = 0; j < dim; j += 8) {
                __m256 kc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + j)));
                __m256 kd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k2 + j)));
                __m256 x0 = _mm256_loadu_ps(q0 + j), x1 = _mm256_loadu_ps(q1 + j), x2 = _mm256_loadu_ps(q2 + j), x3 = _mm256_loadu_ps(q3 + j);
                a0 = _mm256_fmadd_ps(x0, kc, a0);
                a1 = _mm256_fmadd_ps(x1, kc, a1);
                a2 = _mm256_fmadd_ps(x2, kc, a2);
                a3 = _mm256_fmadd_ps(x3, kc, a3);
                b0 = _mm256_fmadd_ps(x0, kd, b0);
                b1 = _mm256_fmadd_ps(x1, kd, b1);
                b2 = _mm256_fmadd_ps(x2, kd, b2);
                b3 = _mm256_fmadd_ps(x3, kd, b3);
            }
            __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
            __m128 s = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)), vscale);
            _mm_store_ps(scores + 4 * t, s);
            blockMax = _mm_max_ps(blockMax, s);
            if (t + 1 < b) {
                __m256 g = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
                __m128 s2 = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(g), _mm256_extractf128_ps(g, 1)), vscale);
                _mm_store_ps(scores + 4 * (t + 1), s2);
                blockMax = _mm_max_ps(blockMax, s2);
            }
        }
        for (size_t t = b; t < BLOCK && (t & 1); t++) _mm_store_ps(scores + 4 * t, _mm_set1_ps(-INFINITY));
        // New maxima, the factor that rescales what was accumulated, then the block's weights.
        __m128 mOld = _mm_load_ps(maxima), mNew = _mm_max_ps(mOld, blockMax);
        _mm_store_ps(maxima, mNew);
        __m256 mNew8 = _mm256_set_m128(mNew, mNew);
        __m128 correction = _mm256_castps256_ps128(exp8(_mm256_castps128_ps256(_mm_sub_ps(mOld, mNew))));
        __m256 total = _mm256_setzero_ps();
        for (size_t t = 0; t < b; t += 2) {
            __m256 p = exp8(_mm256_sub_ps(_mm256_load_ps(scores + 4 * t), mNew8));
            if (t + 1 == b) p = _mm256_blend_ps(p, _mm256_setzero_ps(), 0xF0);
            _mm256_store_ps(scores + 4 * t, p);
            total = _mm256_add_ps(total, p);
        }
        l = _mm_add_ps(_mm_mul_ps(l, correction), _mm_add_ps(_mm256_castps256_ps128(total), _mm256_extractf128_ps(total, 1)));
        // Values: each 8-wide slice of the outputs is rescaled once, then gets the block's rows.
        __attribute__((aligned(16))) float c[4];
        _mm_store_ps(c, correction);
        // Two 8-channel slices per pass: eight independent accumulator chains, each weight
        // broadcast once for both.
        for (int j = 0; j < dim; j += 16) {
            const int two = j + 8 < dim;
            const int j2 = two ? j + 8 : j;
            __m256 o0 = _mm256_mul_ps(_mm256_loadu_ps(acc + j), _mm256_set1_ps(c[0]));
            __m256 o1 = _mm256_mul_ps(_mm256_loadu_ps(acc + MAX_DIM + j), _mm256_set1_ps(c[1]));
            __m256 o2 = _mm256_mul_ps(_mm256_loadu_ps(acc + 2 * MAX_DIM + j), _mm256_set1_ps(c[2]));
            __m256 o3 = _mm256_mul_ps(_mm256_loadu_ps(acc + 3 * MAX_DIM + j), _mm256_set1_ps(c[3]));
            __m256 p0 = _mm256_mul_ps(_mm256_loadu_ps(acc + j2), _mm256_set1_ps(c[0]));
            __m256 p1 = _mm256_mul_ps(_mm256_loadu_ps(acc + MAX_DIM + j2), _mm256_set1_ps(c[1]));
            __m256 p2 = _mm256_mul_ps(_mm256_loadu_ps(acc + 2 * MAX_DIM + j2), _mm256_set1_ps(c[2]));
            __m256 p3 = _mm256_mul_ps(_mm256_loadu_ps(acc + 3 * MAX_DIM + j2), _mm256_set1_ps(c[3]));
            const uint16_t *v = values + base * (size_t)dim + j;
            for (size_t t = 0; t < b; t++, v += dim) {
                __m256 vc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
                __m256 vd = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + (j2 - j))));
                __m256 w0 = _mm256_broadcast_ss(scores + 4 * t), w1 = _mm256_broadcast_ss(scores + 4 * t + 1);
                __m256 w2 = _mm256_broadcast_ss(scores + 4 * t + 2), w3 = _mm256_broadcast_ss(scores + 4 * t + 3);
                o0 = _mm256_fmadd_ps(w0, vc, o0);
                o1 = _mm256_fmadd_ps(w1, vc, o1);
                o2 = _mm256_fmadd_ps(w2, vc, o2);
                o3 = _mm256_fmadd_ps(w3, vc, o3);
                p0 = _mm256_fmadd_ps(w0, vd, p0);
                p1 = _mm256_fmadd_ps(w1, vd, p1);
                p2 = _mm256_fmadd_ps(w2, vd, p2);
                p3 = _mm256_fmadd_ps(w3, vd, p3);
            }
            // With one slice left (dim an odd multiple of 8), p duplicates o: store o last.
            _mm256_storeu_ps(acc + j2, p0);
            _mm256_storeu_ps(acc + MAX_DIM + j2, p1);
            _mm256_storeu_ps(acc + 2 * MAX_DIM + j2, p2);
            _mm256_storeu_ps(acc + 3 * MAX_DIM + j2, p3);
            _mm256_storeu_ps(acc + j, o0);
            _mm256_storeu_ps(acc + MAX_DIM + j, o1);
            _mm256_storeu_ps(acc + 2 * MAX_DIM + j, o2);
            _mm256_storeu_ps(acc + 3 * MAX_DIM + j, o3);
        }
    }
    _mm_storeu_ps(sums, l);
}
#endif

/// The sizes both variants take (-1 if not), and the empty range (0 after zeroing the output);
/// 1 when there is work to do.
static int dense_f16_precheck(int group, int dim, size_t tokens, float *output) {
    if (group < 1 || group > MAX_GROUP || dim < 8 || dim > MAX_DIM || dim % 8 != 0) return -1;
    if (tokens == 0) {
        memset(output, 0, sizeof(float) * (size_t)(group * dim));
        return 0;
    }
    return 1;
}

int kvk_dense_f16_attention(const float *queries, int group, int dim, const uint16_t *keys, const uint16_t *values,
                            size_t tokens, float scale, float *output) {
    int check = dense_f16_precheck(group, dim, tokens, output);
    if (check <= 0) return check;
#if KVK_X86
    if (kvk_isa == KVK_AVX2) {
        for (int g0 = 0; g0 < group; g0 += 4) {
            // Four heads at a time; missing ones are zero queries whose results are dropped.
            __attribute__((aligned(32))) float q[4 * MAX_DIM] = {0}, acc[4 * MAX_DIM] = {0}, sums[4];
            int heads = group - g0 < 4 ? group - g0 : 4;
            memcpy(q, queries + g0 * dim, sizeof(float) * (size_t)(heads * dim));
            if (heads < 4) memset(q + heads * dim, 0, sizeof(float) * (size_t)((4 - heads) * dim));
            // q rows are dim apart inside dense_f16_four; acc rows MAX_DIM apart.
            dense_f16_four(q, dim, keys, values, tokens, scale, acc, sums);
            for (int g = 0; g < heads; g++)
                for (int i = 0; i < dim; i++) output[(g0 + g) * dim + i] = acc[g * MAX_DIM + i] / sums[g];
        }
        return 0;
    }
#endif
    dense_f16_portable(queries, group, dim, keys, values, tokens, scale, output);
    return 0;
}

int kvk_dense_f16_attention_portable(const float *queries, int group, int dim, const uint16_t *keys, const uint16_t *values,
                                     size_t tokens, float scale, float *output) {
    int check = dense_f16_precheck(group, dim, tokens, output);
    if (check <= 0) return check;
    dense_f16_portable(queries, group, dim, keys, values, tokens, scale, output);
    return 0;
}
