// 2-D max pooling over (planes, H, W) contiguous input, with torch's indices (the flat position
// ih·W + iw of each maximum in its input plane) for backward and max_unpool2d.
//
// Window order and ties as torch: rows then columns; a value replaces the running maximum when
// it is greater or NaN, so ties keep the first and a NaN window reports its last NaN. A window
// of -inf reports its first element inside the input; padding takes no part. OpenMP over planes
// and output rows.
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"

namespace fastml {

namespace {

// The window taps along one dimension that fall inside [0, size): the first tap index and one
// past the last, for a window starting at `start` with `taps` taps `dilation` apart.
inline void inside_taps(index_t start, index_t taps, index_t dilation, index_t size, index_t& first, index_t& last) {
    first = start >= 0 ? 0 : (-start + dilation - 1) / dilation;
    last = start + (taps - 1) * dilation < size ? taps : (size - 1 - start) / dilation + 1;
    if (last < first) last = first;
}

// take ? a : b on the bit patterns, so the compiler emits no branch.
template <typename T>
inline T select_bits(bool take, T a, T b) {
    using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    Bits x, y;
    std::memcpy(&x, &a, sizeof(T));
    std::memcpy(&y, &b, sizeof(T));
    const Bits mask = Bits(0) - Bits(take);
    const Bits r = (x & mask) | (y & ~mask);
    T out;
    std::memcpy(&out, &r, sizeof(T));
    return out;
}

}  // namespace

// Two passes per output row, so the work with the most taps runs on contiguous memory:
//   1. down the window's rows, column by column over the whole input row: each column's
//      maximum and the row it came from (kh taps, a loop GCC vectorises: selects, no branch);
//   2. across the window's columns, output by output, on those column maxima (kw taps).
// The taps per output go from kh·kw scalar steps to kw, plus kh vector steps per 8 or 16 columns:
// at 3x3 stride 2 (the ResNet stem) about 3x less scalar work than one pass over the window.
//
// The result is torch's, ties and NaN included. Torch walks the window row by row, replacing its
// maximum on "greater or NaN", which keeps the first maximum in row-major order, or the last NaN.
// Pass 1 keeps each column's first maximum row (or its last NaN row); pass 2 keeps, among columns,
// the greater value, on equal values the earlier row (so the row-major first), and among NaN
// columns the later row (so the row-major last NaN, later columns winning within a row).
template <typename T>
void max_pool2d_forward(address_t x, index_t planes, index_t h, index_t w, index_t oh, index_t ow, index_t kh,
                        index_t kw, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh, index_t dw,
                        address_t out, address_t indices, int nthreads) {
    const T* in = as_ptr<const T>(x);
    T* o = as_ptr<T>(out);
    index_t* idx = as_ptr<index_t>(indices);
    const int threads = threads_for(planes * oh * (ow * kw + w * kh), nthreads);
    // Each output column's taps inside the input, computed once rather than per plane and row.
    std::vector<index_t> col_first(ow), col_last(ow);
    for (index_t c = 0; c < ow; ++c) inside_taps(c * sw - pw, kw, dw, w, col_first[c], col_last[c]);
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> column_max(w);
        std::vector<std::int32_t> column_row(w);  // rows fit in 32 bits: twice the lanes of index_t
#pragma omp for collapse(2) schedule(static)
        for (index_t p = 0; p < planes; ++p) {
            for (index_t r = 0; r < oh; ++r) {
                const T* plane = in + p * h * w;
                const index_t row0 = r * sh - ph;
                index_t i0, i1;
                inside_taps(row0, kh, dh, h, i0, i1);
                T* out_row = o + (p * oh + r) * ow;
                index_t* idx_row = idx + (p * oh + r) * ow;
                if (i0 >= i1) {  // no row of the window inside the input: -1 (backward passes it over)
                    for (index_t c = 0; c < ow; ++c) {
                        out_row[c] = -std::numeric_limits<T>::infinity();
                        idx_row[c] = -1;
                    }
                    continue;
                }
                T* cmax = column_max.data();
                std::int32_t* crow = column_row.data();
                {
                    const std::int32_t first = static_cast<std::int32_t>(row0 + i0 * dh);
                    const T* src = plane + first * w;
                    for (index_t c = 0; c < w; ++c) {
                        cmax[c] = src[c];
                        crow[c] = first;
                    }
                }
                for (index_t i = i0 + 1; i < i1; ++i) {
                    const std::int32_t row = static_cast<std::int32_t>(row0 + i * dh);
                    const T* src = plane + row * w;
                    for (index_t c = 0; c < w; ++c) {
                        const T v = src[c];
                        const bool take = (v > cmax[c]) | (v != v);
                        cmax[c] = take ? v : cmax[c];
                        crow[c] = take ? row : crow[c];
                    }
                }
                for (index_t c = 0; c < ow; ++c) {
                    const index_t col0 = c * sw - pw, j0 = col_first[c], j1 = col_last[c];
                    if (j0 >= j1) {
                        out_row[c] = -std::numeric_limits<T>::infinity();
                        idx_row[c] = -1;
                        continue;
                    }
                    index_t best_col = col0 + j0 * dw;
                    T best = cmax[best_col];
                    std::int32_t best_row = crow[best_col];
                    for (index_t j = j0 + 1; j < j1; ++j) {
                        const index_t col = col0 + j * dw;
                        const T v = cmax[col];
                        const std::int32_t row = crow[col];
                        const bool v_nan = v != v, best_nan = best != best;
                        const bool take = v_nan ? ((!best_nan) | (row >= best_row))
                                                : (!best_nan & ((v > best) | ((v == best) & (row < best_row))));
                        best = select_bits(take, v, best);
                        best_row = take ? row : best_row;
                        best_col = take ? col : best_col;
                    }
                    out_row[c] = best;
                    idx_row[c] = static_cast<index_t>(best_row) * w + best_col;
                }
            }
        }
    }
}

// grad_input (planes, h·w) = 0, then grad (planes, outputs) added at each output's index, in
// output order within a plane (deterministic where windows overlap).
template <typename T>
void max_pool2d_backward(address_t grad, address_t indices, index_t planes, index_t outputs, index_t inputs,
                         address_t grad_input, int nthreads) {
    const T* g = as_ptr<const T>(grad);
    const index_t* idx = as_ptr<const index_t>(indices);
    T* gi = as_ptr<T>(grad_input);
    const int threads = threads_for(planes * (outputs + inputs), nthreads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t p = 0; p < planes; ++p) {
        T* plane = gi + p * inputs;
        for (index_t i = 0; i < inputs; ++i) plane[i] = T(0);
        for (index_t o = 0; o < outputs; ++o) {
            const index_t at = idx[p * outputs + o];
            if (at >= 0) plane[at] += g[p * outputs + o];
        }
    }
}

template void max_pool2d_forward<float>(address_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                        index_t, index_t, index_t, index_t, index_t, index_t, address_t, address_t,
                                        int);
template void max_pool2d_forward<double>(address_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                         index_t, index_t, index_t, index_t, index_t, index_t, address_t, address_t,
                                         int);
template void max_pool2d_backward<float>(address_t, address_t, index_t, index_t, index_t, address_t, int);
template void max_pool2d_backward<double>(address_t, address_t, index_t, index_t, index_t, address_t, int);

}  // namespace fastml
