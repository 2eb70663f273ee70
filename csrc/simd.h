// One 64-byte SIMD vector through GCC / Clang vector extensions, shared by the register-tiled
// kernels (linear_tiles.h, distance_tiles.h).
#pragma once

#include <cstring>

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
    static T sum(vec v) {
        T s = 0;
        for (index_t i = 0; i < kWidth; ++i) s += v[i];
        return s;
    }
};

}  // namespace fastml
