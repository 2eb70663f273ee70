// Register-blocked building blocks shared by the linear and linear + squared-loss kernels.
//
// All matrices are row-major and contiguous. A "row block" is up to kRows consecutive rows of
// the input X (n × d); weights W are (o × d), so both operands of a dot product are contiguous
// along d and the inner loops vectorise (`omp simd` allows the reassociation a vector
// reduction needs without -ffast-math, which would break NaN / Inf propagation).
#pragma once

#include "common.h"

namespace fastml {

constexpr int kRows = 4;  // rows per micro-tile: 4 x-rows share each loaded weight vector

// Asks for the next row block while this one is computed: the micro-tile reads 4 rows 1 row
// apart at once, a pattern the hardware prefetcher follows less well than one sequential stream.
template <typename T>
inline void prefetch_rows(const T* begin, index_t count) {
    constexpr index_t kLine = 64 / sizeof(T);
    for (index_t i = 0; i < count; i += kLine) __builtin_prefetch(begin + i, 0, 3);
}

// out[r * out_stride + j] = bias[j] + dot(x[r], w[j]) for r < R, j < o.
template <typename T, int R>
inline void dot_rows(const T* x, index_t d, const T* w, const T* bias, index_t o, T* out,
                     index_t out_stride) {
    const T* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + r * d;
    for (index_t j = 0; j < o; ++j) {
        const T* wj = w + j * d;
        T acc[R];
        for (int r = 0; r < R; ++r) acc[r] = T(0);
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
template <typename T>
inline void accumulate_outer(const T* coef, const T* x, index_t rows, index_t d, index_t o, T* acc) {
    index_t r = 0;
    for (; r + kRows <= rows; r += kRows) {
        const T *x0 = x + r * d, *x1 = x0 + d, *x2 = x1 + d, *x3 = x2 + d;
        const T* c = coef + r * o;
        for (index_t j = 0; j < o; ++j) {
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
