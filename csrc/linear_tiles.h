// Register-blocked building blocks shared by the linear and linear + squared-loss kernels.
//
// All matrices are row-major and contiguous. A "row block" is up to kRows consecutive rows of
// the input X (n × d); weights W are (o × d), so both operands of a dot product are contiguous
// along d and the inner loops vectorise (`omp simd` allows the reassociation a vector
// reduction needs without -ffast-math, which would break NaN / Inf propagation).
#pragma once

#include <cstring>

#include "common.h"

namespace fastml {

// One 64-byte SIMD vector through GCC / Clang vector extensions (16 floats or 8 doubles; the
// compiler splits it into halves or quarters where the machine's vectors are narrower). Used
// where `omp simd reduction` would spill its accumulators to the stack instead of registers.
template <typename T>
struct Simd {
    typedef T vec __attribute__((vector_size(64)));
    static constexpr index_t kWidth = 64 / index_t(sizeof(T));
    static vec load(const T* p) {
        vec v;
        std::memcpy(&v, p, sizeof(vec));  // an unaligned vector load
        return v;
    }
    static T sum(vec v) {
        T s = 0;
        for (index_t i = 0; i < kWidth; ++i) s += v[i];
        return s;
    }
};

// dots[r][c] = dot(x[r], w[c]) for R rows of x and C consecutive rows of w (row length d):
// R·C vector accumulators stay in registers (fully unrolled, constant indices), each loaded x
// vector serves C outputs and each weight vector R rows.
template <typename T, int R, int C>
inline void dot_tile(const T* const* x, const T* w, index_t d, T (&dots)[R][C]) {
    using S = Simd<T>;
    using V = typename S::vec;
    V acc[R][C];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) acc[r][c] = V{};
    index_t k = 0;
    for (; k + S::kWidth <= d; k += S::kWidth) {
        V wv[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) wv[c] = S::load(w + c * d + k);
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const V xv = S::load(x[r] + k);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            T a = S::sum(acc[r][c]);
            for (index_t kk = k; kk < d; ++kk) a += x[r][kk] * w[c * d + kk];
            dots[r][c] = a;
        }
}

constexpr int kRows = 4;  // rows per micro-tile: 4 x-rows share each loaded weight vector

// Asks for the next row block while this one is computed: the micro-tile reads 4 rows 1 row
// apart at once, a pattern the hardware prefetcher follows less well than one sequential stream.
template <typename T>
inline void prefetch_rows(const T* begin, index_t count) {
    constexpr index_t kLine = 64 / sizeof(T);
    for (index_t i = 0; i < count; i += kLine) __builtin_prefetch(begin + i, 0, 3);
}

// out[r * out_stride + j] = bias[j] + dot(x[r], w[j]) for r < R, j < o.
//
// Four rows take four outputs at a time (dot_tile<4, 4>: 16 accumulators, enough independent
// FMAs to cover their latency). A 4 x 1 `omp simd` tile holds only 4 and ran at ~0.9x torch's
// oneDNN at 256 x 784 x 256; a 4 x 2 `omp simd` tile spilled its 8 accumulators to the stack.
// The remaining outputs (o % 4) take the 4 x 1 tile, as does linear regression's o = 1, which
// is memory-bound anyway.
template <typename T, int R>
inline void dot_rows(const T* x, index_t d, const T* w, const T* bias, index_t o, T* out,
                     index_t out_stride) {
    const T* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + r * d;
    index_t j = 0;
    if constexpr (R == 4) {
        for (; j + 4 <= o; j += 4) {
            T dots[4][4];
            dot_tile<T, 4, 4>(xr, w + j * d, d, dots);
            for (int c = 0; c < 4; ++c) {
                const T b = bias ? bias[j + c] : T(0);
                for (int r = 0; r < 4; ++r) out[r * out_stride + j + c] = dots[r][c] + b;
            }
        }
    }
    for (; j < o; ++j) {
        const T* wj = w + j * d;
        T acc[R];
        if constexpr (R == 4) {
            T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (index_t k = 0; k < d; ++k) {
                const T wk = wj[k];
                a0 += xr[0][k] * wk;
                a1 += xr[1][k] * wk;
                a2 += xr[2][k] * wk;
                a3 += xr[3][k] * wk;
            }
            acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
        } else {
            for (int r = 0; r < R; ++r) {
                T a = 0;
#pragma omp simd reduction(+ : a)
                for (index_t k = 0; k < d; ++k) a += xr[r][k] * wj[k];
                acc[r] = a;
            }
        }
        const T b = bias ? bias[j] : T(0);
        for (int r = 0; r < R; ++r) out[r * out_stride + j] = acc[r] + b;
    }
}

// Calls dot_rows on every row of x (rows × d), kRows at a time, the tail one row at a time.
template <typename T>
inline void dot_block(const T* x, index_t rows, index_t d, const T* w, const T* bias, index_t o,
                      T* out) {
    index_t r = 0;
    for (; r + kRows <= rows; r += kRows) dot_rows<T, kRows>(x + r * d, d, w, bias, o, out + r * o, o);
    for (; r < rows; ++r) dot_rows<T, 1>(x + r * d, d, w, bias, o, out + r * o, o);
}

// acc[j] += sum_r coef[r * o + j] * x[r] for every output j (acc is o × d): the weight
// gradient of a row block, coef being the block's (rows × o) gradient of the prediction.
// Two outputs at a time share each loaded x vector (4 rows: 4 loads feed 8 FMAs).
template <typename T>
inline void accumulate_outer(const T* coef, const T* x, index_t rows, index_t d, index_t o, T* acc) {
    index_t r = 0;
    for (; r + kRows <= rows; r += kRows) {
        const T *x0 = x + r * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
        const T* c = coef + r * o;
        index_t j = 0;
        for (; j + 2 <= o; j += 2) {
            const T c00 = c[j], c10 = c[o + j], c20 = c[2 * o + j], c30 = c[3 * o + j];
            const T c01 = c[j + 1], c11 = c[o + j + 1], c21 = c[2 * o + j + 1], c31 = c[3 * o + j + 1];
            T *a0 = acc + j * d, *a1 = a0 + d;
#pragma omp simd
            for (index_t k = 0; k < d; ++k) {
                const T v0 = x0[k], v1 = x1[k], v2 = x2[k], v3 = x3[k];
                a0[k] += c00 * v0 + c10 * v1 + c20 * v2 + c30 * v3;
                a1[k] += c01 * v0 + c11 * v1 + c21 * v2 + c31 * v3;
            }
        }
        for (; j < o; ++j) {
            const T c0 = c[j], c1 = c[o + j], c2 = c[2 * o + j], c3 = c[3 * o + j];
            T* aj = acc + j * d;
#pragma omp simd
            for (index_t k = 0; k < d; ++k) aj[k] += c0 * x0[k] + c1 * x1[k] + c2 * x2[k] + c3 * x3[k];
        }
    }
    for (; r < rows; ++r) {
        const T* xr = x + r * d;
        for (index_t j = 0; j < o; ++j) {
            const T c = coef[r * o + j];
            T* aj = acc + j * d;
#pragma omp simd
            for (index_t k = 0; k < d; ++k) aj[k] += c * xr[k];
        }
    }
}

// Adds the per-thread partial sums parts[t] (each `count` long) into out, scaled; the threads
// are summed in a fixed order so that results do not depend on scheduling.
template <typename T>
inline void reduce_partials(const T* parts, int nparts, index_t count, T scale, T* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (count > 4096)
    for (index_t i = 0; i < count; ++i) {
        T s = 0;
        for (int t = 0; t < nparts; ++t) s += parts[t * count + i];
        out[i] = s * scale;
    }
}

}  // namespace fastml
