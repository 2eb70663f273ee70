// The build target's SIMD vector (GCC / Clang vector extensions), and the size of its register
// file, shared by the register-tiled kernels (linear_tiles.h, distance_tiles.h, conv_*tiles.h).
//
// Both come from the target the file is compiled for (-march), never from one machine's tuning:
// AVX-512 has 32 registers of 64 bytes, AVX / AVX2 16 of 32 bytes, SSE2 16 of 16 bytes. A tile
// sizes its accumulators from kVectorRegisters (tile_columns below). Tiles laid out for AVX-512,
// built for AVX2 with 64-byte vectors, each vector a pair of registers, needed twice the register
// file and spilled: the fused linear + squared loss at 65536 x 256 -> 8 ran 9x slower than numba's
// loop on a Zen 3.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "common.h"

namespace fastml {

#if defined(__AVX512F__)
constexpr index_t kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr index_t kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#elif defined(__aarch64__)
constexpr index_t kVectorBytes = 16;  // NEON
constexpr int kVectorRegisters = 32;
#else
constexpr index_t kVectorBytes = 16;  // SSE2, the x86-64 baseline, and anything else
constexpr int kVectorRegisters = 16;
#endif

// The most columns (at most `most`, at least 1) a register tile can have on this target, where
// each column holds `rows` accumulators and one loaded operand, and `fixed` more registers hold
// the rest (a broadcast value): rows·cols + cols + fixed <= kVectorRegisters.
constexpr int tile_columns(int rows, int fixed, int most) {
    const int cols = (kVectorRegisters - fixed) / (rows + 1);
    return cols < 1 ? 1 : (cols > most ? most : cols);
}

// One register's worth: 16 floats or 8 doubles with AVX-512, 8 or 4 with AVX2. Used where
// `omp simd reduction` would spill its accumulators to the stack instead of registers.
template <typename T>
struct Simd {
    typedef T vec __attribute__((vector_size(kVectorBytes)));
    static constexpr index_t kWidth = kVectorBytes / index_t(sizeof(T));
    static vec load(const T* p) {
        vec v;
        std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
        return v;
    }
    static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
    // x in every lane: one vbroadcast from memory with AVX. Not `vec{} + x`, which is 0 + x: the
    // compiler must compute that sum (it turns -0 into +0) and then splat it, an add and a
    // shuffle on every broadcast of a tile's inner loop (GCC's lane loop splats via 128 bits).
    static vec broadcast(T x) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) return reinterpret_cast<vec>(_mm512_set1_ps(x));
        else return reinterpret_cast<vec>(_mm512_set1_pd(x));
#elif defined(__AVX__)
        if constexpr (sizeof(T) == 4) return reinterpret_cast<vec>(_mm256_set1_ps(x));
        else return reinterpret_cast<vec>(_mm256_set1_pd(x));
#else
        vec v;
        for (index_t i = 0; i < kWidth; ++i) v[i] = x;
        return v;
#endif
    }
    // Whether every lane is greater than x (a NaN lane is not). One compare into a mask and one
    // test with AVX-512 or AVX; GCC's generic lane loop costs a dozen more.
    static bool all_greater(vec v, T x) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) {
            return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(x), _CMP_GT_OQ) == 0xFFFF;
        } else {
            return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(v), _mm512_set1_pd(x), _CMP_GT_OQ) == 0xFF;
        }
#elif defined(__AVX__)
        if constexpr (sizeof(T) == 4) {
            return _mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(v), _mm256_set1_ps(x), _CMP_GT_OQ)) == 0xFF;
        } else {
            return _mm256_movemask_pd(_mm256_cmp_pd(reinterpret_cast<__m256d>(v), _mm256_set1_pd(x), _CMP_GT_OQ)) == 0xF;
        }
#else
        bool all = true;
        for (index_t i = 0; i < kWidth; ++i) all &= v[i] > x;
        return all;
#endif
    }
    static T sum(vec v) {
        T s = 0;
        for (index_t i = 0; i < kWidth; ++i) s += v[i];
        return s;
    }
    // The sum of the lanes by halving: log2(kWidth) dependent adds rather than sum's chain of
    // kWidth (which GCC keeps in lane order without -ffast-math, each lane extracted by its own
    // shuffle). For short rows, where the sum is a large part of each row's work, and for tiles
    // that end in many sums (linear_tiles.h's dot_tile). Builds without AVX take sum's lane order.
    static T sum_by_halves(vec v) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) return _mm512_reduce_add_ps(reinterpret_cast<__m512>(v));
        else return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v));
#elif defined(__AVX__)
        if constexpr (sizeof(T) == 4) {
            const __m256 x = reinterpret_cast<__m256>(v);
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        } else {
            const __m256d x = reinterpret_cast<__m256d>(v);
            const __m128d h = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
            return _mm_cvtsd_f64(_mm_add_sd(h, _mm_unpackhi_pd(h, h)));
        }
#else
        return sum(v);
#endif
    }
    // The first `count` (<= kWidth) elements at p in the first lanes, `fill` in the others, and
    // the converse store; neither touches memory past p + count. One masked load or store with
    // AVX-512, a masked move with AVX; a memcpy of variable length otherwise (a library call:
    // on a row of 10 classes, four of them cost more than the row's arithmetic).
    static vec load_first(const T* p, index_t count, T fill) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) {
            return reinterpret_cast<vec>(_mm512_mask_loadu_ps(_mm512_set1_ps(fill), __mmask16((1u << count) - 1), p));
        } else {
            return reinterpret_cast<vec>(_mm512_mask_loadu_pd(_mm512_set1_pd(fill), __mmask8((1u << count) - 1), p));
        }
#elif defined(__AVX__)
        const __m256i valid = first_lanes(count);
        if constexpr (sizeof(T) == 4) {
            return reinterpret_cast<vec>(_mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, valid),
                                                          _mm256_castsi256_ps(valid)));
        } else {
            return reinterpret_cast<vec>(_mm256_blendv_pd(_mm256_set1_pd(fill), _mm256_maskload_pd(p, valid),
                                                          _mm256_castsi256_pd(valid)));
        }
#else
        vec v = broadcast(fill);
        std::memcpy(&v, p, size_t(count) * sizeof(T));
        return v;
#endif
    }
    static void store_first(T* p, index_t count, vec v) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) {
            _mm512_mask_storeu_ps(p, __mmask16((1u << count) - 1), reinterpret_cast<__m512>(v));
        } else {
            _mm512_mask_storeu_pd(p, __mmask8((1u << count) - 1), reinterpret_cast<__m512d>(v));
        }
#elif defined(__AVX__)
        const __m256i valid = first_lanes(count);
        if constexpr (sizeof(T) == 4) {
            _mm256_maskstore_ps(p, valid, reinterpret_cast<__m256>(v));
        } else {
            _mm256_maskstore_pd(p, valid, reinterpret_cast<__m256d>(v));
        }
#else
        std::memcpy(p, &v, size_t(count) * sizeof(T));
#endif
    }
    // The largest lane and the sum of the lanes widened to double, by halving (log2(kWidth)
    // steps, not a chain of kWidth dependent operations). Intrinsics where there are vectors:
    // halves taken by memcpy made GCC keep the caller's accumulator on the stack through its
    // loop (a store and a reload per vector: cross-entropy rows of 1000 classes ran 1.4x slower).
    // A NaN lane may or may not win the max: callers keep NaN out of the lanes they reduce.
    static T max_lanes(vec v) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
        else return _mm512_reduce_max_pd(reinterpret_cast<__m512d>(v));
#elif defined(__AVX__)
        if constexpr (sizeof(T) == 4) {
            const __m256 x = reinterpret_cast<__m256>(v);
            __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
            m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        } else {
            const __m256d x = reinterpret_cast<__m256d>(v);
            const __m128d m = _mm_max_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
            return _mm_cvtsd_f64(_mm_max_sd(m, _mm_unpackhi_pd(m, m)));
        }
#else
        T m = v[0];
        for (index_t i = 1; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
        return m;
#endif
    }
    static double sum_lanes_in_double(vec v) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) {
            const __m512 x = reinterpret_cast<__m512>(v);
            const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
            return _mm512_reduce_add_pd(_mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), _mm512_cvtps_pd(hi)));
        } else {
            return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(v));
        }
#elif defined(__AVX__)
        __m256d wide;
        if constexpr (sizeof(T) == 4) {
            const __m256 x = reinterpret_cast<__m256>(v);
            wide = _mm256_add_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(x)), _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
        } else {
            wide = reinterpret_cast<__m256d>(v);
        }
        const __m128d s = _mm_add_pd(_mm256_castpd256_pd128(wide), _mm256_extractf128_pd(wide, 1));
        return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
#else
        double s = 0.0;
        for (index_t i = 0; i < kWidth; ++i) s += double(v[i]);
        return s;
#endif
    }

   private:
#if defined(__AVX__) && !defined(__AVX512F__)
    // All bits set in the T-sized lanes [0, count), clear in the others (the masked moves and
    // the blend read each lane's sign bit).
    static __m256i first_lanes(index_t count) {
        typedef typename std::conditional<sizeof(T) == 4, std::int32_t, std::int64_t>::type I;
        typedef I ivec __attribute__((vector_size(kVectorBytes)));
        ivec lane;
        for (index_t l = 0; l < kWidth; ++l) lane[l] = I(l);
        return reinterpret_cast<__m256i>(lane < I(count));
    }
#endif
};

// A vector of at most 32 bytes (8 floats, 4 doubles): half an AVX-512 register, else Simd's own.
// For rows of a few elements, which 16 float lanes would mostly pad: LeNet's 5-tap kernel rows
// in the sparse weight gradient (conv2d_relu_max_pool2d.cpp) fill 5 of 8 lanes, not 5 of 16.
#if defined(__AVX512F__)
template <typename T>
struct NarrowSimd {
    static constexpr index_t kBytes = 32;
    typedef T vec __attribute__((vector_size(kBytes)));
    static constexpr index_t kWidth = kBytes / index_t(sizeof(T));
    static vec load(const T* p) {
        vec v;
        std::memcpy(&v, p, sizeof(vec));
        return v;
    }
    static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
    static vec broadcast(T x) {  // (one vbroadcast, as Simd's)
        if constexpr (sizeof(T) == 4) return reinterpret_cast<vec>(_mm256_set1_ps(x));
        else return reinterpret_cast<vec>(_mm256_set1_pd(x));
    }
};
#else
template <typename T>
using NarrowSimd = Simd<T>;
#endif

// Makes the compiler hold v in a register from here on. GCC otherwise may fold a loaded operand
// into each FMA that uses it as a memory operand, one load per use, and a tile's loads, not its
// FMAs, then bound it: on a Zen 3 (two 256-bit loads a cycle) the dot, outer-product and combine
// tiles of linear_tiles.h ran 1.3x to 1.7x faster with their operands pinned. Pin a plain local,
// then copy it into the tile's array: pinning an array element itself kept GCC from holding the
// tile's arrays in registers where the tile was inlined into a larger loop (linear + squared
// loss), and its accumulators went to the stack, 25% slower. The "v" constraint names one vector
// register, which V is with AVX and AVX-512 (simd.h's width), "w" a NEON one; an SSE2 build
// leaves GCC its own choice (and has no FMA to fuse a product into).
template <typename V>
inline void keep_in_register(V& v) {
#if defined(__AVX__)
    __asm__("" : "+v"(v));
#elif defined(__aarch64__)
    __asm__("" : "+w"(v));  // (a NEON register)
#else
    (void)v;
#endif
}

// Zeroes a tile of vector accumulators (unrolled: constant indices keep it in registers).
template <typename V, int R, int C>
inline void zero_tile(V (&tile)[R][C]) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) tile[r][c] = V{};
}

}  // namespace fastml
