// Eight codes of a little-endian bit stream as 32-bit lanes, shared by the decoders that read
// codes of 1-4 or 8 bits eight at a time (polar.c, svdq.c, int_codes.c's tile decoder). Included
// inside each file's target("avx2,...") region, so it compiles with the same instructions.
#ifndef KVK_CODES8_H
#define KVK_CODES8_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/// Codes index ..< index + 8 (index a multiple of 8, so they start on a byte) of `bits` bits (1-4
/// or 8) of the bit stream at `p`: one 4-byte load (8 bytes for 8-bit codes), per-lane shifts.
/// The caller makes sure the 4 (or 8) bytes lie in its buffer: for narrow codes that is more than
/// the codes themselves.
static inline __attribute__((always_inline)) __m256i codes8(const uint8_t *p, size_t index, const int bits) {
    const uint8_t *at = p + ((index * (size_t)bits) >> 3);
    if (bits == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)at));
    uint32_t word;
    memcpy(&word, at, 4);
    const __m256i shifts = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(bits));
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)word), shifts), _mm256_set1_epi32((1 << bits) - 1));
}

#endif
