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

/// Asks the core to bring `bytes` bytes at `p` into its caches (one prefetch per 64-byte line;
/// a hint: never faults, whatever the address). Attention calls it for the blocks it will read
/// next, which lie too far apart for the hardware prefetchers to follow.
void kvk_prefetch(const void *p, size_t bytes);

/// Sets the calling thread's prefetch plan to `bytes` bytes at `p` (the blocks attention reads
/// next), first finishing the previous plan. The kernels of rows.c and int_codes.c then prefetch
/// as many bytes of the plan as they read of their own input, spreading the misses over their
/// arithmetic; `kvk_prefetch_finish` prefetches whatever they left (kernels written elsewhere
/// leave all of it) and clears the plan. Hints only: nothing here faults.
void kvk_prefetch_plan(const void *p, size_t bytes);
void kvk_prefetch_finish(void);

/// The portable variants, whatever the CPU (tests compare them with the dispatched ones).
float kvk_stream_read_portable(const void *p, size_t bytes);
int kvk_dense_f16_attention_portable(const float *queries, int group, int dim, const uint16_t *keys, const uint16_t *values,
                                     size_t tokens, float scale, float *output);

// MARK: Attention products over plain rows (rows.c)

/// Whether `kvk_rows_scores` and `kvk_rows_accumulate` run here (AVX2 + FMA + F16C).
int kvk_rows_available(void);
/// The variant the row kernels run with `isa` 0: 1 AVX2 + FMA + F16C (three rows per step, 16
/// channels per pass), 2 the same with AVX-512 VL's 32 registers (four rows, 32 channels), on
/// the machines of cpu_tier.h's tier 2 (VL, BW and VNNI, as the int kernels); 0 none. Every
/// row entry point takes `isa` (0: this one; 1 or 2: that variant, -1 when the machine lacks
/// it), so tests can hold each variant to the same bits.
int kvk_rows_isa(void);

/// Scores of `count` rows of `dim` elements (`type` 0 f32, 1 IEEE f16, 2 bf16; row t at
/// rows + t * dim * width, any alignment) for `group` query heads (queries[g * dim + i]):
///     out[g * stride + t] = sum over 8-channel chunks, in order, of fused multiply-adds,
/// lanes reduced as ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)): bit for bit what the
/// Swift TileKernels.scores give over the rows widened to f32. `dim` a multiple of 8. Returns 0,
/// or -1 (nothing written) when unsupported here.
int kvk_rows_scores(const void *rows, int type, int dim, size_t count, const float *queries, int group, float *out, size_t stride,
                    int isa);

/// acc[g * dim + c] += weights[g * stride + t] * row t [c] for t = 0 ..< count in order, one fused
/// multiply-add each: bit for bit TileKernels.accumulate. Returns 0 or -1 as above.
int kvk_rows_accumulate(const void *rows, int type, int dim, size_t count, const float *weights, size_t stride, int group, float *acc,
                        int isa);

/// The nsn scheme's codes read as rows (rows.c): `count` tokens of dim / 8 pieces, each piece one
/// code byte (bits 1: codeword book[code]) or a sign byte then a magnitude byte (bits 2: codeword
/// book[magnitude] with lane j's sign bit flipped by bit j of the sign byte; `signs` holds the
/// 256 x 8 masks). `book` is the 256 x 8 codebook. Scores are the plain dot products
/// out[g * stride + t] = queries[g] . codewords(t) (the caller applies the token's norms);
/// accumulation adds weights[g * stride + t] times the codewords to acc[g * dim ...], in token
/// order. The same operations as kvk_rows_scores / kvk_rows_accumulate over the decoded
/// codewords. Returns 0, or -1 when unsupported here (no AVX2 + FMA, or dim not a multiple of 8).
int kvk_nsn_dots(const uint8_t *codes, int bits, int dim, size_t count, const float *book, const uint32_t *signs, const float *queries,
                 int group, float *out, size_t stride, int isa);
int kvk_nsn_accumulate(const uint8_t *codes, int bits, int dim, size_t count, const float *book, const uint32_t *signs,
                       const float *weights, size_t stride, int group, float *acc, int isa);

/// For 1-bit nsn codes: a table of every query piece's dot product with every codeword, so a
/// token's score is one lookup per piece (`kvk_nsn_lut_dots`) instead of eight multiply-adds
/// per head. `lut` holds `kvk_nsn_lut_floats(group, dim)` floats: for each four heads, piece s and
/// codeword e, the four heads' dot products. Building it costs 256 x dim multiply-adds per head
/// (worth it over about a thousand tokens). The scores are the dots of `kvk_nsn_dots` summed in
/// another order (pieces, two chains), so they differ from them by float rounding only.
size_t kvk_nsn_lut_floats(int group, int dim);
int kvk_nsn_lut(const float *book, const float *queries, int group, int dim, float *lut);
int kvk_nsn_lut_dots(const uint8_t *codes, int dim, size_t count, const float *lut, int group, float *out, size_t stride);

/// The nsn scheme's per-token norm arithmetic over a block, vectorised, with the operations of
/// its Swift loops (so the same bits): out[q * n + i] = weights[q * stride + i] * (n1[i] * (n2[i]
/// * invRoot)) (the value weights), and scores[q * stride + i] = (n1[i] * n2[i]) * scores[q *
/// stride + i] + meanTerms[q] * n1[i] (the key scores from the codeword dots). Return 0, or -1
/// when unsupported here (no AVX2 + FMA + F16C).
int kvk_nsn_token_weights(const float *weights, size_t stride, int group, const float *n1, const float *n2, float invRoot, size_t n,
                          float *out);
int kvk_nsn_norm_scores(float *scores, size_t stride, int group, const float *n1, const float *n2, const float *meanTerms, size_t n);

/// The orthonormal Walsh-Hadamard transform of `size` floats at `x` in place (size a power of two,
/// at least 8): stages h = 1, 2, 4, ... turn each pair (j, j + h) into (a + b, a - b), then every
/// element is multiplied by `norm` (1 / sqrt(size)). Bit for bit the nsn scheme's Swift loop.
/// Returns 0, or -1 (nothing done) when unsupported here.
int kvk_hadamard(float *x, int size, float norm);

/// RowKernels.dot, axpy and widenFloat16 with the same operations (so the same bits): for a
/// Swift build without -target-cpu, where SIMD arithmetic compiles to calls. Only where
/// kvk_rows_available() (otherwise they do nothing).
float kvk_dot(const float *a, const float *b, size_t n);
void kvk_axpy(float alpha, const float *x, float *y, size_t n);
void kvk_widen_f16(const void *src, float *dst, size_t n);

// MARK: The polar scheme's keys (polar.c)

/// cpu_tier.h's tier here: 2 runs both polar kernels (the scores with AVX-512 VL's 32 registers
/// and two-table permutes, the decoder with AVX2), 1 only the decoder, 0 neither.
int kvk_polar_isa(void);

/// Rows [t0, t0 + count) of a polar block decoded to f32 (out: count x 2 * pairs floats), bit for
/// bit what PolarScheme's vector decoder gives: angle and radius codes of 1-4 or 8 bits (the bit
/// streams at `block` and block + radiusSection), f16 radius scales and offsets per run of
/// `radiusGroup` tokens and pair (run-major), `table` the 2^angleBits (cos, sin) pairs. `layout`
/// says where pair j's x and y go: 0 dims (2j, 2j + 1), 1 (j, j + pairs), 2 the scoring layout
/// (pairs 8k ..< 8k + 8: their x at 16k ..< 16k + 8, their y at 16k + 8 ..< 16k + 16). pairs a
/// multiple of 8, at most 256. Reads up to 4 bytes past a stream's last code, as the Swift decoder
/// does (the next section follows). Returns 0, or -1 (nothing written) when unsupported here.
int kvk_polar_decode(const uint8_t *block, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                     size_t scalesOffset, size_t offsetsOffset, const float *table, int layout, size_t t0, size_t count, float *out);

/// Scores of tokens [t0, t0 + count) of a polar block (arguments as kvk_polar_decode) for `group`
/// query heads given in the scoring layout (queries[g * 2 * pairs ...]), without a tile:
/// out[g * stride + t] is bit for bit kvk_rows_scores over the rows decoded with layout 2 (and
/// the Swift tile kernels over the Swift decoder's rows). Returns 0, or -1 (nothing written)
/// where it does not run (kvk_polar_isa() below 2, or arguments the decoder does not take).
int kvk_polar_scores(const uint8_t *block, int angleBits, int radiusBits, int pairs, int radiusGroup, size_t radiusSection,
                     size_t scalesOffset, size_t offsetsOffset, const float *table, size_t t0, size_t count, const float *queries,
                     int group, float *out, size_t stride);

// MARK: The svdq scheme's keys (svdq.c)

/// What the svdq key scores need of a scheme's layout, computed once: for blocks of blockBytes and
/// `tokens` tokens (a multiple of 8), rank f16 scales then rank f16 offsets first, channel c of
/// width channelBits[c] (0: not stored, 1-6, 8 or 16) with its codes at streamOffsets[c]. Writes
/// kvk_svdq_plan_ints(rank) int64s at `plan`. Returns 0, or -1 if a width is not one of these,
/// rank is above 512, or a channel's codes would leave the block.
size_t kvk_svdq_plan_ints(int rank);
int kvk_svdq_plan(size_t blockBytes, int rank, const intptr_t *channelBits, const intptr_t *streamOffsets, size_t tokens, int64_t *plan);

/// Scores of tokens [t0, t0 + count) (t0 and count multiples of 8) of an svdq block laid out as
/// `plan` says, bit for bit what SVDqScheme.scores computes for whole vectors of eight tokens:
/// scores[g * stride + (t - t0)] = sum over stored channels c, in order, of state[g][c] * latent
/// (fused), latent = scale_c * code + offset_c (f16 channels: the value); `state` holds `group`
/// rows of `rank` projected queries. Never reads outside the block. Returns 0, or -1 (nothing
/// written) when unsupported here or when the block or range is not the plan's.
int kvk_svdq_scores(const uint8_t *block, size_t blockBytes, const int64_t *plan, size_t t0, size_t count, const float *state, int group,
                    float *scores, size_t stride);

// MARK: Weight products on 8-bit activations (weights.c)

enum { KVK_WEIGHTS_Q8_0 = 0, KVK_WEIGHTS_Q4_0 = 1, KVK_WEIGHTS_Q4_1 = 2 };

/// The variant `kvk_weight_dots` runs: 2 AVX-512 VL + VNNI (vpdpbusd), 1 AVX2 (vpmaddubsw +
/// vpmaddwd), 0 portable C; and its name.
int kvk_weights_isa(void);
const char *kvk_weights_isa_name(void);

/// Quantizes `cols` floats (a multiple of 32) to int8 per 32-element block, as llama.cpp's
/// Q8 activations: step[b] = max|x| / 127, q = round-to-nearest-even(x / step) within +-127,
/// sum[b] = step[b] * sum of the codes. Step and sum are 0 for an all-zero block or one with an
/// infinity (its codes are then 0, the infinities' 127); NaN is left out of the max and coded 127.
void kvk_quantize_q8(const float *x, int cols, int8_t *q, float *step, float *sum);
/// `kvk_quantize_q8` in one variant (as `kvk_weight_dots_variant`; every variant gives the same
/// bytes), for tests; -1 when this machine cannot run it.
int kvk_quantize_q8_variant(int variant, const float *x, int cols, int8_t *q, float *step, float *sum);

/// out[t * outStride + r] = row_r . x_t for `rowCount` rows (row r at rows + r * rowBytes, each
/// `blocks` ggml blocks of 32 weights in `encoding`: Q8_0 f16 d, 32 int8; Q4_0 f16 d, 16 bytes
/// of nibbles; Q4_1 f16 d, f16 m, 16 bytes) and `count` quantized inputs (input t: codes at
/// xq + t * xStride, steps and sums at xd/xs + t * xStride / 32). Integer products per block,
/// scaled in f32 (weights.c says exactly how); a row's result does not depend on which other
/// rows and inputs are in the call, and every variant gives the same bits.
void kvk_weight_dots(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq, const float *xd,
                     const float *xs, int count, size_t xStride, float *out, size_t outStride);
/// out[t * outStride + r] = row_r . x_t with f32 inputs `x` (input t at x + t * xStride), the
/// exact arithmetic of the runner's default path (Swift `WeightMatrix.blockDot1/4`, bit for bit:
/// weights expanded to f32, two fused accumulators of eight, lanes summed in order). Returns -1, and
/// writes nothing, where the machine lacks AVX2 + FMA + F16C (the Swift path runs there).
int kvk_weight_dots_f32(int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const float *x, int count, size_t xStride,
                        float *out, size_t outStride);
/// `kvk_weight_dots` in one variant (0 portable, 1 AVX2, 2 VNNI; see `kvk_weights_isa`), for
/// tests; -1 (and nothing written) when this machine cannot run it.
int kvk_weight_dots_variant(int variant, int encoding, const void *rows, size_t rowBytes, int rowCount, int blocks, const int8_t *xq,
                            const float *xd, const float *xs, int count, size_t xStride, float *out, size_t outStride);

// MARK: Online softmax (softmax.c)

/// Whether `kvk_softmax_absorb` runs here (AVX2).
int kvk_softmax_available(void);

/// One step of the online softmax over `count` scores per query head (row g at scores +
/// g * stride), in place: the scores become exp(s - max) with the running max of head g, the
/// running sum grows by their sum, and both accumulators (group x dim) are rescaled when the
/// max grows. The same arithmetic as Swift's OnlineSoftmax.absorb. Returns 0, or -1 when the
/// CPU lacks AVX2 (the caller then runs its own).
int kvk_softmax_absorb(float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum, float *blockAcc,
                       float *tailAcc, int dim);
/// The variant `kvk_softmax_absorb` runs here: 1 AVX2 + FMA, 2 the same with AVX-512 F + DQ
/// (sixteen exps per instruction), 0 none. `kvk_softmax_absorb_variant` runs variant `isa` (0:
/// this machine's) and returns -1, writing nothing, where the machine lacks it; every variant
/// gives the same bits (tests hold each to the Swift loop).
int kvk_softmax_isa(void);
int kvk_softmax_absorb_variant(int isa, float *scores, size_t stride, size_t count, int group, float *runMax, float *runSum,
                               float *blockAcc, float *tailAcc, int dim);

// MARK: Attention over int codes (int_codes.c)

/// Which variant of the integer-code kernels runs here: 2 AVX-512 VL + VNNI (`vpdpbusd` on
/// 256-bit registers), 1 AVX2 (`vpmaddubsw` + `vpmaddwd`), 0 none (the caller's own path).
/// Both variants compute the same integers and the same float operations: bit-identical results.
int kvk_int_codes_isa(void);
const char *kvk_int_codes_isa_name(void);

/// Whether `kvk_int_channel_scores` runs here for `bits`-bit codes of `dim` channels: bits 1,
/// 2 or 4; a row of codes a multiple of 16 bytes, one or an even number of 16-byte chunks;
/// dim at most 256.
int kvk_int_channel_supported(int bits, int dim);
/// Whether `kvk_int_token_accumulate` runs here: as above, and groups of `groupSize` channels
/// that divide dim, are whole 16-byte chunks of codes, and number at most 8 per token.
int kvk_int_token_supported(int bits, int dim, int groupSize);

/// Scores of tokens [t0, t0 + count) of a sealed int block with per-channel groups over runs
/// of `runTokens` tokens (Spec, scheme int, grouping 1): codes = the block's first row,
/// scales and offsets = its f16 arrays (any alignment, index run * dim + channel). queries =
/// `group` rows of `dim` floats, already scaled. Writes
///     scores[g * stride + (t - t0)] ~= sum_c queries[g][c] * (scale_c * code_tc + offset_c)
/// with q * scale quantized to int8 per query head and run. `isa` 0 picks the best variant, 1 or
/// 2 asks for one (tests). Returns 0, or -1 if the sizes or the variant are not supported here.
int kvk_int_channel_scores(const uint8_t *codes, const void *scales, const void *offsets, int bits, int dim, int runTokens, size_t t0,
                           size_t count, const float *queries, int group, float *scores, size_t stride, int isa);

/// Adds sum over t in [t0, t0 + count) of weights[g * stride + (t - t0)] * v_t to `acc`
/// (`group` rows of `dim` floats) for a sealed int block with per-token groups of `groupSize`
/// channels (scales and offsets indexed token * (dim / groupSize) + group), the weights times
/// the scales quantized to u8 per query head, group and 64 tokens. `acc` is in slot order: slot
/// i holds channel channelOfSlot[i] of `kvk_int_token_layout`. Returns 0 or -1 as above.
int kvk_int_token_accumulate(const uint8_t *codes, const void *scales, const void *offsets, int bits, int dim, int groupSize, size_t t0,
                             size_t count, const float *weights, size_t stride, int group, float *acc, int isa);

/// Rows [t0, t0 + n) of an int block decoded to f32 (tile rows `rowStride` floats apart), bit for
/// bit IntScheme's vector decoder: value = fma(code, scale, offset), codes of 1-4 or 8 bits, f16
/// scales and offsets per run of `groupSize` tokens and channel (channelGrouping), or per token
/// and group of `groupSize` channels (a multiple of 8). Never reads outside blockBytes. Returns
/// 0, or -1 (nothing written) when unsupported here or when the rows' bytes leave the block.
int kvk_int_decode(const uint8_t *block, size_t blockBytes, int bits, int dim, int channelGrouping, int groupSize, size_t scalesOffset,
                   size_t offsetsOffset, size_t t0, size_t n, float *tile, size_t rowStride);

/// The channel each accumulator slot of `kvk_int_token_accumulate` holds (`dim` entries).
int kvk_int_token_layout(int bits, int dim, int32_t *channelOfSlot);

#ifdef __cplusplus
}
#endif

#endif
