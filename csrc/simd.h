// One 64-byte SIMD vector through GCC / Clang vector extensions, shared by the register-tiled
// kernels (linear_tiles.h, distance_tiles.h).
#pragma once

#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "common.h"

namespace fastml {

// 16 floats or 8 doubles; the compiler splits it into halves or quarters where the machine's
// vectors are narrower. Used where `omp simd reduction` would spill its accumulators to the
// stack instead of registers.
template <typename T>
struct Simd {
    typedef T vec __attribute__((vector_size(64)));
    static constexpr index_t kWidth = 64 / index_t(sizeof(T));
    static vec load(const T* p) {
        vec v;
        std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
        return v;
    }
    static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
    static vec broadcast(T x) { return vec{} + x; }
    // Whether every lane is greater than x (a NaN lane is not). One compare into a mask
    // register and one test with AVX-512; GCC's generic lane loop costs a dozen more.
    static bool all_greater(vec v, T x) {
#if defined(__AVX512F__)
        if constexpr (sizeof(T) == 4) {
            return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(v), _mm512_set1_ps(x), _CMP_GT_OQ) == 0xFFFF;
        } else {
            return _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(v), _mm512_set1_pd(x), _CMP_GT_OQ) == 0xFF;
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
};

// Zeroes a tile of vector accumulators (unrolled: constant indices keep it in registers).
template <typename V, int R, int C>
inline void zero_tile(V (&tile)[R][C]) {
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) tile[r][c] = V{};
}

}  // namespace fastml
