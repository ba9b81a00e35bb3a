// The instruction-set tier of the integer-code kernels (int_codes.c) and the weight products
// (weights.c), which run the same variants: 2 AVX-512 VL + BW + VNNI (vpdpbusd on 256-bit
// registers), 1 AVX2 + FMA + F16C, 0 neither (their portable or Swift paths). Each file asks
// once, from its load-time constructor.
#ifndef KVK_CPU_TIER_H
#define KVK_CPU_TIER_H

enum { KVK_TIER_NONE = 0, KVK_TIER_AVX2 = 1, KVK_TIER_VNNI = 2 };

static inline int kvk_cpu_tier(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))) return KVK_TIER_NONE;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return KVK_TIER_VNNI;
    return KVK_TIER_AVX2;
#else
    return KVK_TIER_NONE;
#endif
}

#endif
