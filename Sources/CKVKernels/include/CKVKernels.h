// Hot loops that need instructions Swift cannot select per function (F16C conversions, FMA and
// AVX2 in a binary built for baseline x86-64), compiled here with per-function target
// attributes and chosen at run time with __builtin_cpu_supports. Each entry point has a portable
// C path for other machines. Swift owns every buffer and passes raw pointers; nothing here
// allocates, reads a file or keeps state besides the one-time dispatch.
#ifndef CKVKERNELS_H
#define CKVKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// The instruction set the dispatcher chose: "avx2+fma+f16c" or "portable".
const char *kvk_isa_name(void);

/// Reads `bytes` bytes at `p` (any alignment; a multiple of 256) as fast as the core can
/// stream them: eight independent vector accumulators, unrolled over 256 bytes. Returns a value
/// that depends on every byte, so the loop cannot be removed. The bandwidth probe of
/// `kvpack bench`.
float kvk_stream_read(const void *p, size_t bytes);

/// The integer multiply-add probe of `kvpack bench`: `iterations` rounds of eight independent
/// chains of unsigned-by-signed byte products summed into 32-bit lanes, with the widest
/// instruction the CPU has: AVX-512 VNNI `vpdpbusd` on 512-bit registers (64 products per
/// instruction), else AVX2 `vpmaddubsw` + `vpmaddwd` + `vpaddd` (32 per step), else portable C.
/// Returns the number of byte products computed (time it to get the rate); `*sink` receives a
/// value that depends on every chain. `kvk_int8_isa_name` says which variant ran.
uint64_t kvk_int8_madd_probe(uint64_t iterations, int32_t *sink);
const char *kvk_int8_isa_name(void);

/// Dense attention of one KV head over f16 rows, the yardstick the schemes are compared with:
/// `group` query vectors of `dim` floats (queries[g * dim + i]), `tokens` key and value rows of
/// `dim` IEEE half floats each (keys[t * dim + i]), scale s:
///     output[g] = sum_t softmax_t(s * q_g . k_t) * v_t
/// in one pass over the rows, blocks of 32 tokens, an online softmax per query head, every
/// query head of the group scored against each key row as it is loaded. `dim` must be a
/// multiple of 8 and at most 256, `group` at most 8. Returns 0, or -1 for unsupported sizes.
int kvk_dense_f16_attention(const float *queries, int group, int dim, const uint16_t *keys, const uint16_t *values,
                            size_t tokens, float scale, float *output);

/// The portable variants, whatever the CPU (tests compare them with the dispatched ones).
float kvk_stream_read_portable(const void *p, size_t bytes);
int kvk_dense_f16_attention_portable(const float *queries, int group, int dim, const uint16_t *keys, const uint16_t *values,
                                     size_t tokens, float scale, float *output);

#ifdef __cplusplus
}
#endif

#endif
