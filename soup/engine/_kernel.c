/* The fused weighted-mean kernel of soup (see soup/engine/kernel.py, which loads this library with ctypes).
 *
 * Built by setup.py as an optional extension, never at run time. Each loop is compiled more than
 * once: for the baseline of the architecture (x86-64: SSE2) and, on x86-64 with GCC or clang, for
 * AVX2 and AVX-512; the caller passes a level and soup_level_supported() says which levels this CPU
 * (and OS) can run, so a library built on one machine and loaded on another never dies with SIGILL.
 * Every variant does the same IEEE operations as torch's separate ops: the product and the sum are
 * each rounded to the accumulator's type, float32 or float64 (the build passes -ffp-contract=off and
 * no target enables FMA contraction, so no fused multiply-add), and the bfloat16 cast rounds to
 * nearest even like torch (from a float64 accumulator through float32, as torch does: two roundings).
 */

/* an empty Python module, so `import soup.engine._kernel` works too where Python's headers were found (they
 * come first, as Python asks); without them the library still builds and ctypes loads it */
#if defined(__has_include)
#if __has_include(<Python.h>)
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define SOUP_PYTHON_MODULE 1
#endif
#endif

#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(_WIN32)
#define SOUP_EXPORT __declspec(dllexport)
#else
#define SOUP_EXPORT __attribute__((visibility("default")))
#endif

#if defined(__GNUC__)
#define SOUP_INLINE static inline __attribute__((always_inline))
#define SOUP_RESTRICT __restrict__
#else
#define SOUP_INLINE static __forceinline
#define SOUP_RESTRICT __restrict
#endif

#if defined(__x86_64__) && defined(__GNUC__)  /* GCC and clang; other compilers and CPUs: baseline only */
#define SOUP_X86 1
#endif

/* ------------------------------------------------------------------------------------------------
 * the loops, written once; each variant below inlines them under its own target ISA */

SOUP_INLINE float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

SOUP_INLINE uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* acc = x * w (first) or acc = acc + x * w; x is bf16 (kind 0) or f32 (kind 1) */
SOUP_INLINE void accumulate_body(float *SOUP_RESTRICT acc, const void *SOUP_RESTRICT x, int kind, float w,
                                 int64_t n, int first) {
    if (kind == 0) {
        const uint16_t *SOUP_RESTRICT b = (const uint16_t *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = bf16_to_f32(b[i]) * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + bf16_to_f32(b[i]) * w;
    } else {
        const float *SOUP_RESTRICT f = (const float *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = f[i] * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + f[i] * w;
    }
}

/* out (bf16) = round_to_nearest_even(acc), NaN -> 0x7fc0; returns the number of non-finite values */
SOUP_INLINE int64_t finish_bf16_body(const float *SOUP_RESTRICT acc, uint16_t *SOUP_RESTRICT out, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = f32_bits(acc[i]);
        bad += (u & 0x7f800000u) == 0x7f800000u;
        uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
        out[i] = ((u & 0x7fffffffu) > 0x7f800000u) ? (uint16_t)0x7fc0u : (uint16_t)(r >> 16);
    }
    return bad;
}

/* the number of non-finite values in acc (float32 output needs no cast) */
SOUP_INLINE int64_t count_nonfinite_body(const float *SOUP_RESTRICT acc, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += (f32_bits(acc[i]) & 0x7f800000u) == 0x7f800000u;
    return bad;
}

/* the float64 accumulator (float32 inputs, or any input beside them): the same loops in double */

SOUP_INLINE uint64_t f64_bits(double d) { uint64_t u; memcpy(&u, &d, 8); return u; }

/* acc = (double)x * w (first) or acc = acc + (double)x * w; x is bf16 (kind 0) or f32 (kind 1) */
SOUP_INLINE void accumulate64_body(double *SOUP_RESTRICT acc, const void *SOUP_RESTRICT x, int kind, double w,
                                   int64_t n, int first) {
    if (kind == 0) {
        const uint16_t *SOUP_RESTRICT b = (const uint16_t *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = (double)bf16_to_f32(b[i]) * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + (double)bf16_to_f32(b[i]) * w;
    } else {
        const float *SOUP_RESTRICT f = (const float *)x;
        if (first) for (int64_t i = 0; i < n; i++) acc[i] = (double)f[i] * w;
        else       for (int64_t i = 0; i < n; i++) acc[i] = acc[i] + (double)f[i] * w;
    }
}

/* out = cast(acc): float32 (kind 1, round to nearest) or bfloat16 (kind 0: to float32, then as
 * finish_bf16 — torch's double -> bfloat16 goes through float too); returns the number of
 * non-finite values of acc (a finite acc that overflows the output is the caller's check) */
SOUP_INLINE int64_t finish64_body(const double *SOUP_RESTRICT acc, void *SOUP_RESTRICT out, int kind, int64_t n) {
    int64_t bad = 0;
    if (kind == 1) {
        float *SOUP_RESTRICT f = (float *)out;
        for (int64_t i = 0; i < n; i++) {
            bad += (f64_bits(acc[i]) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
            f[i] = (float)acc[i];
        }
    } else {
        uint16_t *SOUP_RESTRICT b = (uint16_t *)out;
        for (int64_t i = 0; i < n; i++) {
            bad += (f64_bits(acc[i]) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
            uint32_t u = f32_bits((float)acc[i]);
            uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
            b[i] = ((u & 0x7fffffffu) > 0x7f800000u) ? (uint16_t)0x7fc0u : (uint16_t)(r >> 16);
        }
    }
    return bad;
}

/* the number of non-finite values in a float64 acc (float64 output needs no cast) */
SOUP_INLINE int64_t count_nonfinite64_body(const double *SOUP_RESTRICT acc, int64_t n) {
    int64_t bad = 0;
    for (int64_t i = 0; i < n; i++) bad += (f64_bits(acc[i]) & 0x7ff0000000000000ull) == 0x7ff0000000000000ull;
    return bad;
}

/* ------------------------------------------------------------------------------------------------
 * the variants: level 0 is the baseline, compiled with the build's flags (no -march) */

typedef void (*accumulate_fn)(float *, const void *, int, float, int64_t, int);
typedef int64_t (*finish_bf16_fn)(const float *, uint16_t *, int64_t);
typedef int64_t (*count_nonfinite_fn)(const float *, int64_t);
typedef void (*accumulate64_fn)(double *, const void *, int, double, int64_t, int);
typedef int64_t (*finish64_fn)(const double *, void *, int, int64_t);
typedef int64_t (*count_nonfinite64_fn)(const double *, int64_t);

#define SOUP_VARIANT(NAME, TARGET)                                                                         \
    TARGET static void accumulate_##NAME(float *acc, const void *x, int kind, float w, int64_t n, int first) \
    { accumulate_body(acc, x, kind, w, n, first); }                                                        \
    TARGET static int64_t finish_bf16_##NAME(const float *acc, uint16_t *out, int64_t n)                   \
    { return finish_bf16_body(acc, out, n); }                                                              \
    TARGET static int64_t count_nonfinite_##NAME(const float *acc, int64_t n)                              \
    { return count_nonfinite_body(acc, n); }                                                               \
    TARGET static void accumulate64_##NAME(double *acc, const void *x, int kind, double w, int64_t n,      \
                                           int first)                                                      \
    { accumulate64_body(acc, x, kind, w, n, first); }                                                      \
    TARGET static int64_t finish64_##NAME(const double *acc, void *out, int kind, int64_t n)               \
    { return finish64_body(acc, out, kind, n); }                                                           \
    TARGET static int64_t count_nonfinite64_##NAME(const double *acc, int64_t n)                           \
    { return count_nonfinite64_body(acc, n); }

SOUP_VARIANT(baseline, )
#if defined(SOUP_X86)
/* no "fma" in these targets: the products and sums must stay separately rounded */
SOUP_VARIANT(avx2, __attribute__((target("avx2"))))
SOUP_VARIANT(avx512, __attribute__((target("avx512f,avx512bw"))))
#endif

static const struct {
    const char *name;
    accumulate_fn accumulate;
    finish_bf16_fn finish_bf16;
    count_nonfinite_fn count_nonfinite;
    accumulate64_fn accumulate64;
    finish64_fn finish64;
    count_nonfinite64_fn count_nonfinite64;
} VARIANTS[] = {
#define SOUP_ROW(NAME) {#NAME, accumulate_##NAME, finish_bf16_##NAME, count_nonfinite_##NAME, \
                        accumulate64_##NAME, finish64_##NAME, count_nonfinite64_##NAME}
    SOUP_ROW(baseline),
#if defined(SOUP_X86)
    SOUP_ROW(avx2),
    SOUP_ROW(avx512),
#endif
#undef SOUP_ROW
};
#define SOUP_LEVELS ((int)(sizeof VARIANTS / sizeof VARIANTS[0]))

/* ------------------------------------------------------------------------------------------------
 * the exported functions (plain C, called through ctypes) */

/* 1 when this CPU and OS run variant `level` (0 always does) */
SOUP_EXPORT int soup_level_supported(int level) {
    if (level == 0) return 1;
    if (level < 0 || level >= SOUP_LEVELS) return 0;
#if defined(SOUP_X86)
    __builtin_cpu_init();  /* also checks that the OS saves the wider registers (XCR0) */
    if (level == 1) return __builtin_cpu_supports("avx2") != 0;
    if (level == 2) return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#endif
    return 0;
}

/* the name of variant `level` ("baseline", "avx2", "avx512"), NULL past the last one */
SOUP_EXPORT const char *soup_level_name(int level) {
    return level >= 0 && level < SOUP_LEVELS ? VARIANTS[level].name : (const char *)0;
}

/* an unsupported level runs the baseline: whatever the caller passes, no illegal instruction */
static int checked(int level) { return soup_level_supported(level) ? level : 0; }

SOUP_EXPORT void soup_accumulate(int level, float *acc, const void *x, int kind, float w, int64_t n, int first) {
    VARIANTS[checked(level)].accumulate(acc, x, kind, w, n, first);
}

SOUP_EXPORT int64_t soup_finish_bf16(int level, const float *acc, uint16_t *out, int64_t n) {
    return VARIANTS[checked(level)].finish_bf16(acc, out, n);
}

SOUP_EXPORT int64_t soup_count_nonfinite(int level, const float *acc, int64_t n) {
    return VARIANTS[checked(level)].count_nonfinite(acc, n);
}

SOUP_EXPORT void soup_accumulate64(int level, double *acc, const void *x, int kind, double w, int64_t n, int first) {
    VARIANTS[checked(level)].accumulate64(acc, x, kind, w, n, first);
}

SOUP_EXPORT int64_t soup_finish64(int level, const double *acc, void *out, int kind, int64_t n) {
    return VARIANTS[checked(level)].finish64(acc, out, kind, n);
}

SOUP_EXPORT int64_t soup_count_nonfinite64(int level, const double *acc, int64_t n) {
    return VARIANTS[checked(level)].count_nonfinite64(acc, n);
}

#if defined(SOUP_PYTHON_MODULE)
static struct PyModuleDef soup_kernel_module = {
    PyModuleDef_HEAD_INIT, .m_name = "_kernel", .m_doc = "soup's fused CPU kernel, loaded with ctypes by soup.engine.kernel",
    .m_size = -1,
};
PyMODINIT_FUNC PyInit__kernel(void) { return PyModule_Create(&soup_kernel_module); }
#endif
