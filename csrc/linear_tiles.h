// Register-blocked building blocks shared by the linear and linear + squared-loss kernels.
//
// All matrices are row-major and contiguous. A "row block" is up to kRows consecutive rows of
// the input X (n × d); weights W are (o × d), so both operands of a dot product are contiguous
// along d and the inner loops vectorise (`omp simd` allows the reassociation a vector
// reduction needs without -ffast-math, which would break NaN / Inf propagation).
#pragma once

#include "common.h"
#include "simd.h"

namespace fastml {

// dots[r][c] = dot(x[r], w[c]) for R rows of x and C consecutive rows of w (row length d):
// R·C vector accumulators stay in registers (fully unrolled, constant indices), each loaded x
// vector serves C outputs and each weight vector R rows.
template <typename T, int R, int C>
inline void dot_tile(const T* const* x, const T* w, index_t d, T (&dots)[R][C]) {
    using S = Simd<T>;
    using V = typename S::vec;
    V acc[R][C];
    zero_tile(acc);
    index_t k = 0;
    for (; k + S::kWidth <= d; k += S::kWidth) {
        V wv[C];
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) {
            V wc = S::load(w + c * d + k);
            keep_in_register(wc);
            wv[c] = wc;
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            V xv = S::load(x[r] + k);
            keep_in_register(xv);
#pragma GCC unroll 16
            for (int c = 0; c < C; ++c) acc[r][c] += xv * wv[c];
        }
    }
    // Each accumulator's lanes by halving (Simd::sum_by_halves, with AVX): in lane order, the 20
    // sums of an AVX-512 4 x 5 tile were 16-long chains of extracts and adds, and the tile's dot
    // products took 1.25x to 1.34x as long (softmax regression's 784 features: 49 vectors a sum).
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) {
            T a = S::sum_by_halves(acc[r][c]);
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

// Weight rows a dot_tile of kRows x-rows takes at once: 5 with AVX-512 (20 accumulators, 5
// weight vectors and the x vector: 26 of its 32 registers), 2 with AVX2's 16 registers. Five
// rather than four: softmax regression's ten classes are two whole tiles, and each loaded vector
// serves more FMAs (its forward pass took 6% less time on an Ice Lake Xeon).
constexpr int kDotCols = tile_columns(kRows, 2, 5);

// out[r * out_stride + j + c] = bias[j + c] + dot(x[r], w[j + c]) for kRows rows r and c < C.
template <typename T, int C>
inline void dot_tile_out(const T* const* xr, const T* w, index_t d, const T* bias, index_t j, T* out,
                         index_t out_stride) {
    T dots[kRows][C];
    dot_tile<T, kRows, C>(xr, w + j * d, d, dots);
    for (int c = 0; c < C; ++c) {
        const T b = bias ? bias[j + c] : T(0);
        for (int r = 0; r < kRows; ++r) out[r * out_stride + j + c] = dots[r][c] + b;
    }
}

// The last o - j outputs, fewer than kDotCols, on one dot_tile_out where they are at least two:
// returns the first output left (o, or j where one is left).
template <typename T, int C>
inline index_t dot_tile_rest(const T* const* xr, const T* w, index_t d, const T* bias, index_t j, index_t o,
                             T* out, index_t out_stride) {
    if constexpr (C < 2) {
        return j;
    } else {
        if (o - j != C) return dot_tile_rest<T, C - 1>(xr, w, d, bias, j, o, out, out_stride);
        dot_tile_out<T, C>(xr, w, d, bias, j, out, out_stride);
        return o;
    }
}

// out[r * out_stride + j] = bias[j] + dot(x[r], w[j]) for r < R, j < o.
//
// Four rows take kDotCols outputs at a time (dot_tile<4, kDotCols>: enough independent FMAs to
// cover their latency). A 4 x 1 `omp simd` tile holds only 4 and ran at ~0.9x torch's oneDNN at
// 256 x 784 x 256 on AVX-512; a 4 x 2 `omp simd` tile spilled its 8 accumulators to the stack.
// Two to kDotCols - 1 remaining outputs take one dot_tile as wide (softmax regression's forward
// pass took 10% less time than on two 4 x 1 tiles on an Ice Lake Xeon); a last one takes the
// 4 x 1 tile, as does linear regression's o = 1, which is memory-bound anyway.
template <typename T, int R>
inline void dot_rows(const T* x, index_t d, const T* w, const T* bias, index_t o, T* out,
                     index_t out_stride) {
    const T* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + r * d;
    index_t j = 0;
    if constexpr (R == kRows) {
        for (; j + kDotCols <= o; j += kDotCols) dot_tile_out<T, kDotCols>(xr, w, d, bias, j, out, out_stride);
        j = dot_tile_rest<T, kDotCols - 1>(xr, w, d, bias, j, o, out, out_stride);
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

// acc[j, k .. k + K·W) += sum_r coef[r * o + j] * x[r, k .. k + K·W) for outputs j .. j + C:
// a C × K tile of vector accumulators stays in registers over all the rows, then is added to
// acc once (the loop is FMA-bound, not bound by loading and storing acc for every row).
template <typename T, int C, int K>
inline void outer_tile(const T* coef, index_t o, const T* x, index_t d, index_t rows, index_t j, index_t k,
                       T* acc) {
    using S = Simd<T>;
    using V = typename S::vec;
    V a[C][K];
    zero_tile(a);
    for (index_t r = 0; r < rows; ++r) {
        const T* xr = x + r * d + k;
        V xv[K];
#pragma GCC unroll 16
        for (int kk = 0; kk < K; ++kk) {
            V xk = S::load(xr + kk * S::kWidth);
            keep_in_register(xk);
            xv[kk] = xk;
        }
#pragma GCC unroll 16
        for (int c = 0; c < C; ++c) {
            const V cv = S::broadcast(coef[r * o + j + c]);
#pragma GCC unroll 16
            for (int kk = 0; kk < K; ++kk) a[c][kk] += cv * xv[kk];
        }
    }
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c)
#pragma GCC unroll 16
        for (int kk = 0; kk < K; ++kk) {
            T* p = acc + (j + c) * d + k + kk * S::kWidth;
            S::store(p, S::load(p) + a[c][kk]);
        }
}

// Vectors of x an outer_tile of 4 outputs takes at once: 4 with AVX-512 (16 accumulators, 4 x
// vectors and the broadcast coefficient: 21 of 32 registers), 2 with AVX2 (11 of 16). With 2 on
// AVX-512 each row's four broadcasts and two loads fed only eight FMAs: softmax regression's
// weight-gradient pass took 14% less time with 4 on an Ice Lake Xeon.
constexpr int kOuterVectors = tile_columns(4, 2, 4);

// acc[j] += sum_r coef[r * o + j] * x[r] for every output j (acc is o × d, x is rows × d): the
// weight gradient of a row block, coef being the block's (rows × o) gradient of the prediction.
// The block's sum is formed in registers and added to acc once per block, so acc holds a sum of
// per-block partials (closer to pairwise summation than adding row by row).
template <typename T>
inline void accumulate_outer(const T* coef, const T* x, index_t rows, index_t d, index_t o, T* acc) {
    constexpr index_t W = Simd<T>::kWidth;
    index_t k = 0;
    // A single output (linear regression's o = 1) takes four vectors at a time: each accumulator
    // is a chain of dependent FMAs down the block's rows, and two chains left the FMA units idle
    // for most of their latency (9 registers with four: AVX2's 16 hold them). On an Ice Lake
    // Xeon the kernel's pass at 65536 x 256 -> 1 took 4% less time.
    if (o == 1)
        for (; k + 4 * W <= d; k += 4 * W) outer_tile<T, 1, 4>(coef, o, x, d, rows, 0, k, acc);
    for (; k + kOuterVectors * W <= d; k += kOuterVectors * W) {
        index_t j = 0;
        for (; j + 4 <= o; j += 4) outer_tile<T, 4, kOuterVectors>(coef, o, x, d, rows, j, k, acc);
        // the last o % 4 outputs two at a time: each pass over the rows reloads their x vectors
        for (; j + 2 <= o; j += 2) outer_tile<T, 2, kOuterVectors>(coef, o, x, d, rows, j, k, acc);
        for (; j < o; ++j) outer_tile<T, 1, kOuterVectors>(coef, o, x, d, rows, j, k, acc);
    }
    for (; k + W <= d; k += W) {
        index_t j = 0;
        for (; j + 4 <= o; j += 4) outer_tile<T, 4, 1>(coef, o, x, d, rows, j, k, acc);
        for (; j < o; ++j) outer_tile<T, 1, 1>(coef, o, x, d, rows, j, k, acc);
    }
    if (k < d) {  // the last d % W columns
        for (index_t j = 0; j < o; ++j) {
            T* aj = acc + j * d;
            for (index_t kk = k; kk < d; ++kk) {
                T sum = 0;
                for (index_t r = 0; r < rows; ++r) sum += coef[r * o + j] * x[r * d + kk];
                aj[kk] += sum;
            }
        }
    }
}

// out[r, k .. k + K·W) = sum_j coef[r * o + j] * w[j, k .. k + K·W) for R rows: an R × K tile of
// vector accumulators over every output j, stored once. Each loaded weight vector serves R rows,
// each broadcast coefficient K vectors, and out is written once, never zeroed first or re-read.
template <typename T, int R, int K>
inline void combine_tile(const T* coef, index_t o, const T* w, index_t d, index_t k, T* out) {
    using S = Simd<T>;
    using V = typename S::vec;
    V a[R][K];
    zero_tile(a);
    for (index_t j = 0; j < o; ++j) {
        V wv[K];
#pragma GCC unroll 16
        for (int kk = 0; kk < K; ++kk) {
            V wk = S::load(w + j * d + k + kk * S::kWidth);
            keep_in_register(wk);  // loaded once for R rows, not folded into each FMA
            wv[kk] = wk;
        }
#pragma GCC unroll 16
        for (int r = 0; r < R; ++r) {
            const V cv = S::broadcast(coef[r * o + j]);
#pragma GCC unroll 16
            for (int kk = 0; kk < K; ++kk) a[r][kk] += cv * wv[kk];
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 16
        for (int kk = 0; kk < K; ++kk) S::store(out + r * d + k + kk * S::kWidth, a[r][kk]);
}

// Vectors of a row a combine_tile of 4 rows takes at once: as kOuterVectors, 4 with AVX-512 and
// 2 with AVX2 (softmax regression's input-gradient pass took 16% less time with 4 than with 2 on
// an Ice Lake Xeon).
constexpr int kCombineVectors = tile_columns(4, 2, 4);

// R rows of combine_rows: register tiles across d, then the last d % W columns one by one.
template <typename T, int R>
inline void combine_row_group(const T* coef, index_t o, const T* w, index_t d, T* out) {
    constexpr index_t W = Simd<T>::kWidth;
    index_t k = 0;
    for (; k + kCombineVectors * W <= d; k += kCombineVectors * W)
        combine_tile<T, R, kCombineVectors>(coef, o, w, d, k, out);
    for (; k + W <= d; k += W) combine_tile<T, R, 1>(coef, o, w, d, k, out);
    for (; k < d; ++k)
        for (int r = 0; r < R; ++r) {
            T sum = 0;
            for (index_t j = 0; j < o; ++j) sum += coef[r * o + j] * w[j * d + k];
            out[r * d + k] = sum;
        }
}

// out[r] = sum_j coef[r * o + j] * w[j] for r < rows (out is rows × d, w is o × d): the input
// gradient of a row block, four rows at a time (combine_tile), the last rows % 4 one at a time.
template <typename T>
inline void combine_rows(const T* coef, index_t rows, index_t o, const T* w, index_t d, T* out) {
    index_t r = 0;
    for (; r + 4 <= rows; r += 4) combine_row_group<T, 4>(coef + r * o, o, w, d, out + r * d);
    for (; r < rows; ++r) combine_row_group<T, 1>(coef + r * o, o, w, d, out + r * d);
}

// out[i] = scale · Σ_t parts[t · count + i] for i in [begin, end): the per-thread partial sums
// (each `count` long) added in a fixed order, so that results do not depend on scheduling.
template <typename T>
inline void reduce_partials_range(const T* parts, int nparts, index_t count, T scale, T* out, index_t begin,
                                  index_t end) {
    for (index_t i = begin; i < end; ++i) {
        T s = 0;
        for (int t = 0; t < nparts; ++t) s += parts[t * count + i];
        out[i] = s * scale;
    }
}

// reduce_partials_range over all of out, by its own team of threads where count is large.
template <typename T>
inline void reduce_partials(const T* parts, int nparts, index_t count, T scale, T* out, int nthreads) {
    const int threads = count > 4096 ? nthreads : 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        index_t begin, end;
        split_range(count, omp_get_num_threads(), omp_get_thread_num(), begin, end);
        reduce_partials_range(parts, nparts, count, scale, out, begin, end);
    }
}

}  // namespace fastml
