// Direct convolution of a channels-last (N, H, W, C) input whose groups are small: depthwise
// (one input and one output channel per group) and grouped (a few of each, as RegNet's and
// ResNeXt's 8- to 64-channel groups), into a channels-last (N, OH, OW, K) output, + bias, then
// ReLU if asked.
//
// Why: such a convolution does R·S multiply-adds per output per input channel of its group, 9 to
// 200 where a dense one does hundreds to thousands, so it moves about as many bytes as it
// computes flops, and a library's per-call set-up and blocking for large matrix products are
// most of its time at small images (oneDNN: 5 to 30 GFLOP/s at 4x4 to 7x7 on a 2-core Zen 3).
// Here one pass reads each input row R times from L1 and writes each output once.
//
// Layouts (the Python side packs the weight once per weight version):
//   depthwise: weight (R, S, C), a tap's C weights contiguous: vectors over channels, each
//              output vector the sum of R·S input vectors times weight vectors;
//   grouped:   weight (G, R, S, C/G, K/G), a tap's and input channel's K/G outputs contiguous:
//              vectors over a group's output channels, each input value broadcast.
// A thread takes whole output rows (image, oh). A row is swept in blocks of kColumns output
// columns held in registers: a block whose taps all fall inside the image addresses each tap's
// pixels by column strides; a border block reads them from a table filled once per block, taps in
// the padding pointing at zeros (so a weight with an inf or NaN is left to torch: 0 · inf). Channel
// counts that are not a multiple of the vector take one last vector that overlaps the one before
// (the overlapping outputs are computed and stored twice, the same values), so no lane is masked;
// narrower than one vector, a narrower vector or plain scalars.
//
// Depthwise backward: the input's gradient runs the same blocks on the output gradient, the
// pixel table holding for each input column the output pixel each tap reached it from; the
// weight's gradient sums each tap's products over the rows a thread takes, in registers.
#include <cstring>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace fastml {
namespace {

// N lanes of T: a GCC vector (N > 1) or T itself (N == 1), with what the loops below need.
template <typename T, int N>
struct Lanes {
    typedef T vec __attribute__((vector_size(N * sizeof(T))));
    static vec load(const T* p) {
        vec v;
        std::memcpy(&v, p, sizeof(vec));
        return v;
    }
    static void store(T* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }
    static vec broadcast(T x) {
        if constexpr (N * sizeof(T) == kVectorBytes) {
            return Simd<T>::broadcast(x);  // one vbroadcast (see simd.h)
        } else {
            vec v;
            for (int i = 0; i < N; ++i) v[i] = x;
            return v;
        }
    }
    static vec relu(vec v) {
        const vec zero = vec{};
        return v < zero ? zero : v;  // NaN < 0 is false: a NaN stays NaN, as torch's relu keeps it
    }
};

template <typename T>
struct Lanes<T, 1> {
    typedef T vec;
    static vec load(const T* p) { return *p; }
    static void store(T* p, vec v) { *p = v; }
    static vec broadcast(T x) { return x; }
    static vec relu(vec v) { return v < T(0) ? T(0) : v; }
};

// Output columns per register block: enough independent accumulators to cover the FMA latency
// (4-5 cycles, 2 units) with the weights and one operand still in registers on 16-register AVX2.
constexpr int kColumns = 8;

struct Geometry {
    index_t h, w, c, k, groups, r, s, sh, sw, ph, pw, dh, dw, oh, ow;
};

// Where column j of a block reads its input pixel for a tap: from a table computed once per block
// (any block), or, for a block whose every tap is inside the image, each tap's first pixel plus j
// strides (no table to fill: at 32 channels filling it cost as much as the arithmetic).
template <typename T, int Columns>
struct TablePixels {
    const T* const* table;  // [tap][j]
    const T* at(index_t tap, int j) const { return table[tap * Columns + j]; }
};

template <typename T>
struct StridedPixels {
    const T* const* first;  // [tap]
    index_t step;
    const T* at(index_t tap, int j) const { return first[tap] + j * step; }
};

// One block of `count` <= Columns output columns of one output row: channels [ch, ch + N)
// (depthwise) or output channels [ch, ch + N) of group `grp` (grouped). `pixels.at(tap, j)` is
// where column j's input pixel for the tap starts (a zero pixel in the padding and past
// `count`), so the loops here only load, multiply and add. R, S: the kernel's size where known
// at compile time (its taps unrolled), else 0 (read from g).
template <typename T, int N, int Columns, int R, int S, bool Depthwise, typename Pixels>
inline void block(const Geometry& g, Pixels pixels, const T* weight, const T* bias, bool relu, index_t count,
                  index_t grp, index_t ch, T* out) {
    using L = Lanes<T, N>;
    const index_t taps = (R ? R : g.r) * (S ? S : g.s);
    const index_t cpg = Depthwise ? 1 : g.c / g.groups, kpg = Depthwise ? 1 : g.k / g.groups;
    const index_t first_in = Depthwise ? ch : grp * cpg, first_out = Depthwise ? ch : grp * kpg + ch;
    typename L::vec acc[Columns];
    const typename L::vec start = bias ? L::load(bias + first_out) : typename L::vec{};
    for (int j = 0; j < Columns; ++j) acc[j] = start;
    for (index_t tap = 0; tap < taps; ++tap) {
        if constexpr (Depthwise) {
            const typename L::vec wv = L::load(weight + tap * g.c + ch);
            for (int j = 0; j < Columns; ++j) acc[j] += L::load(pixels.at(tap, j) + first_in) * wv;
        } else {
            const T* tap_weight = weight + (grp * taps + tap) * cpg * kpg + ch;
            for (index_t cc = 0; cc < cpg; ++cc) {
                const typename L::vec wv = L::load(tap_weight + cc * kpg);
                for (int j = 0; j < Columns; ++j) acc[j] += L::broadcast(pixels.at(tap, j)[first_in + cc]) * wv;
            }
        }
    }
    for (int j = 0; j < Columns; ++j) {
        if (Columns == 1 || j < count) L::store(out + j * g.k + first_out, relu ? L::relu(acc[j]) : acc[j]);
    }
}

// Offsets [0, n) in steps of N, the last one moved back to n - N (overlapping) where N does not
// divide n; `each(offset)` for every one. n >= N.
template <int N, typename F>
inline void overlapping_vectors(index_t n, F each) {
    index_t at = 0;
    for (; at + N <= n; at += N) each(at);
    if (at < n) each(n - N);
}

// Every channel vector (and group) of one block of output columns from x0.
template <typename T, int N, int Columns, int R, int S, bool Depthwise, typename Pixels>
inline void block_channels(const Geometry& g, Pixels pixels, const T* weight, const T* bias, bool relu,
                           index_t count, T* out) {
    const index_t groups = Depthwise ? 1 : g.groups;
    for (index_t grp = 0; grp < groups; ++grp) {
        overlapping_vectors<N>(Depthwise ? g.c : g.k / g.groups, [&](index_t ch) {
            block<T, N, Columns, R, S, Depthwise>(g, pixels, weight, bias, relu, count, grp, ch, out);
        });
    }
}

// One row of `columns` outputs. Column blocks are outermost, so the input a block reads (R rows
// of about kColumns·stride pixels, every channel) stays in L1 for all its channel vectors, and
// the next block shares most of it: channels outermost re-read R whole input rows per vector of
// channels (48 KB per pass at 28 pixels of 144 channels, from L2: 20x slower). Blocks inside
// [inside_from, inside_to), every tap's input in the image, read `first(i, t, x0)` (tap (i, t)'s
// pixel for column x0) plus j·step; the others a table of `locate(i, t, x)` (null: a zero pixel),
// computed once for all the block's channel vectors and groups.
template <typename T, int N, int R, int S, bool Depthwise, typename Locate, typename First>
inline void sweep_row(const Geometry& g, index_t columns, Locate locate, index_t inside_from, index_t inside_to,
                      First first, index_t step, const T* zeros, const T* weight, const T* bias, bool relu,
                      const T** pixels, T* out) {
    const index_t r = R ? R : g.r, s = S ? S : g.s;
    auto table_blocks = [&](index_t from, index_t to) {
        for (index_t x0 = from; x0 < to; x0 += kColumns) {
            const index_t count = std::min<index_t>(kColumns, to - x0);
            auto run = [&](auto width) {
                constexpr int Columns = decltype(width)::value;
                for (index_t i = 0; i < r; ++i) {
                    for (index_t t = 0; t < s; ++t) {
                        const T** pixel = pixels + (i * s + t) * Columns;
                        for (int j = 0; j < Columns; ++j) {
                            const T* at = j < count ? locate(i, t, x0 + j) : nullptr;
                            pixel[j] = at ? at : zeros;
                        }
                    }
                }
                block_channels<T, N, Columns, R, S, Depthwise>(g, TablePixels<T, Columns>{pixels}, weight, bias,
                                                               relu, count, out + x0 * g.k);
            };
            if (count > 4) run(std::integral_constant<int, kColumns>{});
            else if (count > 2) run(std::integral_constant<int, 4>{});
            else if (count > 1) run(std::integral_constant<int, 2>{});
            else run(std::integral_constant<int, 1>{});
        }
    };
    // Blocks start at column 0 (aligned to the inside range instead, the first border column
    // would be a block of one column: one chain of dependent multiply-adds, as slow as 8 columns)
    index_t x0 = 0;
    while (x0 < columns) {
        if (x0 >= inside_from && x0 + kColumns <= inside_to) {
            for (index_t i = 0; i < r; ++i) {
                for (index_t t = 0; t < s; ++t) pixels[i * s + t] = first(i, t, x0);
            }
            block_channels<T, N, kColumns, R, S, Depthwise>(g, StridedPixels<T>{pixels, step}, weight, bias, relu,
                                                            kColumns, out + x0 * g.k);
        } else {
            table_blocks(x0, std::min(x0 + kColumns, columns));
        }
        x0 += kColumns;
    }
}

// sweep_row with the kernel's size as template arguments where it is a common one.
template <typename T, int N, bool Depthwise, typename Locate, typename First>
inline void sweep_row_sized(const Geometry& g, index_t columns, Locate locate, index_t inside_from,
                            index_t inside_to, First first, index_t step, const T* zeros, const T* weight,
                            const T* bias, bool relu, const T** pixels, T* out) {
    if (g.r == 3 && g.s == 3) {
        sweep_row<T, N, 3, 3, Depthwise>(g, columns, locate, inside_from, inside_to, first, step, zeros, weight, bias,
                                         relu, pixels, out);
    } else if (Depthwise && g.r == 5 && g.s == 5) {
        sweep_row<T, N, 5, 5, Depthwise>(g, columns, locate, inside_from, inside_to, first, step, zeros, weight, bias,
                                         relu, pixels, out);
    } else {
        sweep_row<T, N, 0, 0, Depthwise>(g, columns, locate, inside_from, inside_to, first, step, zeros, weight, bias,
                                         relu, pixels, out);
    }
}

// The widest lane count this build has that fits `n` channels: one full vector, a half, a
// quarter, else scalars; then `run` with it as a template argument.
template <typename T, typename F>
inline void with_lanes(index_t n, F run) {
    constexpr int full = int(kVectorBytes / sizeof(T));
    if (n >= full) run(std::integral_constant<int, full>{});
    else if constexpr (full >= 4) {
        if (n >= full / 2) run(std::integral_constant<int, full / 2>{});
        else if (n >= full / 4) run(std::integral_constant<int, full / 4>{});
        else run(std::integral_constant<int, 1>{});
    } else {
        run(std::integral_constant<int, 1>{});
    }
}

// Lane `lane` of a vector (or the scalar itself).
template <typename T, int N>
inline T lane_of(typename Lanes<T, N>::vec v, int lane) {
    if constexpr (N == 1) {
        (void)lane;
        return v;
    } else {
        return v[lane];
    }
}

}  // namespace

template <typename T>
void grouped_conv_forward(address_t x_address, index_t n, index_t h, index_t w, index_t c, address_t weight_address,
                          address_t bias_address, index_t k, index_t groups, index_t r, index_t s, index_t sh,
                          index_t sw, index_t ph, index_t pw, index_t dh, index_t dw, index_t oh, index_t ow,
                          bool relu, address_t y_address, int nthreads) {
    const T* x = as_ptr<const T>(x_address);
    const T* weight = as_ptr<const T>(weight_address);
    const T* bias = bias_address ? as_ptr<const T>(bias_address) : nullptr;
    T* y = as_ptr<T>(y_address);
    const std::vector<T> zeros(static_cast<size_t>(w * c), T(0));  // a row of zero pixels: the padding's rows
    const Geometry g{h, w, c, k, groups, r, s, sh, sw, ph, pw, dh, dw, oh, ow};
    // the output columns [inside_from, inside_to) whose every tap's input column is inside the image
    const index_t inside_from = std::min(ow, (pw + sw - 1) / sw);
    const index_t last = w - 1 + pw - (s - 1) * dw;
    const index_t inside_to = last < 0 ? inside_from : std::max(inside_from, std::min(ow, last / sw + 1));
    const bool depthwise = c == groups && k == groups;
    const index_t kpg = k / groups;
    const index_t rows_out = n * oh;
    const index_t work = rows_out * ow * k * (c / groups) * r * s;
#pragma omp parallel num_threads(threads_for(work, nthreads))
    {
        std::vector<const T*> window(static_cast<size_t>(r));
        std::vector<const T*> pixels(static_cast<size_t>(r * s * kColumns));
#pragma omp for schedule(static)
        for (index_t task = 0; task < rows_out; ++task) {
            const index_t image = task / oh, oy = task % oh;
            for (index_t i = 0; i < r; ++i) {
                const index_t iy = oy * sh - ph + i * dh;
                window[i] = iy >= 0 && iy < h ? x + (image * h + iy) * w * c : nullptr;
            }
            T* out = y + task * ow * k;
            // tap (i, t) of output column x reads input column x·sw - pw + t·dw of row i
            auto locate = [&](index_t i, index_t t, index_t x) -> const T* {
                const index_t ix = x * sw - pw + t * dw;
                return window[i] && ix >= 0 && ix < w ? window[i] + ix * c : nullptr;
            };
            auto first = [&](index_t i, index_t t, index_t x0) -> const T* {
                return (window[i] ? window[i] : zeros.data()) + (x0 * sw - pw + t * dw) * c;
            };
            const index_t step = sw * c;
            with_lanes<T>(depthwise ? c : kpg, [&](auto lanes) {
                constexpr int N = decltype(lanes)::value;
                const T** p = pixels.data();
                const T* z = zeros.data();
                if (depthwise) {
                    sweep_row_sized<T, N, true>(g, ow, locate, inside_from, inside_to, first, step, z, weight, bias,
                                                relu, p, out);
                } else {
                    sweep_row_sized<T, N, false>(g, ow, locate, inside_from, inside_to, first, step, z, weight, bias,
                                                 relu, p, out);
                }
            });
        }
    }
}

// Depthwise, the gradient with respect to the input: each input pixel gathers, for every tap
// (i, t), the output gradient at the output pixel whose tap (i, t) read it (where the strides
// and the image leave one), times that tap's weight: the forward's blocks on the gradient, only
// the pixel addresses computed otherwise. Rows of the input gradient split over threads, so no
// two threads write one value. grad (n, oh, ow, c) → grad_x (n, h, w, c); weight packed (r, s, c).
template <typename T>
void depthwise_conv_backward_input(address_t grad_address, index_t n, index_t h, index_t w, index_t c,
                                   address_t weight_address, index_t r, index_t s, index_t sh, index_t sw, index_t ph,
                                   index_t pw, index_t dh, index_t dw, index_t oh, index_t ow,
                                   address_t grad_x_address, int nthreads) {
    const T* grad = as_ptr<const T>(grad_address);
    const T* weight = as_ptr<const T>(weight_address);
    T* grad_x = as_ptr<T>(grad_x_address);
    const std::vector<T> zeros(static_cast<size_t>(c), T(0));
    const Geometry g{oh, ow, c, c, c, r, s, sh, sw, ph, pw, dh, dw, h, w};
    const index_t rows_in = n * h;
    // the output column whose tap t reads input column x, or -1: the same for every row, so the
    // divisions by the stride are done once here, not for every block's pixel (where they took
    // twice the block's arithmetic)
    std::vector<index_t> column(static_cast<size_t>(s * w));
    for (index_t t = 0; t < s; ++t) {
        for (index_t x = 0; x < w; ++x) {
            const index_t from = x + pw - t * dw;
            column[t * w + x] = from >= 0 && from % sw == 0 && from / sw < ow ? from / sw : -1;
        }
    }
#pragma omp parallel num_threads(threads_for(rows_in * w * c * r * s, nthreads))
    {
        std::vector<const T*> window(static_cast<size_t>(r));
        std::vector<const T*> pixels(static_cast<size_t>(r * s * kColumns));
#pragma omp for schedule(static)
        for (index_t task = 0; task < rows_in; ++task) {
            const index_t image = task / h, iy = task % h;
            for (index_t i = 0; i < r; ++i) {  // the output row whose tap row i reads input row iy
                const index_t from = iy + ph - i * dh;
                const bool hit = from >= 0 && from % sh == 0 && from / sh < oh;
                window[i] = hit ? grad + (image * oh + from / sh) * ow * c : nullptr;
            }
            auto locate = [&](index_t i, index_t t, index_t x) -> const T* {
                const index_t ox = column[t * w + x];
                return window[i] && ox >= 0 ? window[i] + ox * c : nullptr;
            };
            auto unused = [](index_t, index_t, index_t) -> const T* { return nullptr; };
            with_lanes<T>(c, [&](auto lanes) {
                constexpr int N = decltype(lanes)::value;
                // (no strided blocks: which taps reach an input pixel depends on its column's phase)
                sweep_row_sized<T, N, true>(g, w, locate, 0, 0, unused, 0, zeros.data(), weight, nullptr, false,
                                            pixels.data(), grad_x + task * w * c);
            });
        }
    }
}

// Depthwise, the gradient with respect to the weight: for each channel and tap, the sum over
// every output pixel of its gradient times the input pixel that tap read. Rows of the output
// split over threads, each summing into its own (r, s, c) buffer, which are added at the end.
// Per row and vector of channels, the sums of the taps whose input row is inside the image stay
// in registers over the row's interior columns (every tap's input inside), each gradient vector
// loaded once for them; the few border columns add their inside taps one by one. A tap in the
// padding is skipped, never read as a zero: 0 · inf in the gradient would be NaN where torch's
// sum has no such term.
template <typename T, int N, int K>
inline void weight_taps(const T* grad_row, const T* const* tap_inputs, index_t from, index_t to, index_t step,
                        index_t c, index_t ch, T* const* tap_sums) {
    using L = Lanes<T, N>;
    typename L::vec acc[K] = {};
    for (index_t x = from; x < to; ++x) {
        const typename L::vec gv = L::load(grad_row + x * c + ch);
        for (int q = 0; q < K; ++q) acc[q] += gv * L::load(tap_inputs[q] + x * step + ch);
    }
    // an overlapping last vector (ch not a multiple of N) adds only the lanes the one before did not
    const int fresh = N == 1 || ch % N == 0 ? 0 : int(N - c % N);
    for (int q = 0; q < K; ++q) {
        T* sum = tap_sums[q] + ch;
        if (fresh == 0) {
            L::store(sum, L::load(sum) + acc[q]);
        } else {
            for (int lane = fresh; lane < N; ++lane) sum[lane] += lane_of<T, N>(acc[q], lane);
        }
    }
}

template <typename T>
void depthwise_conv_backward_weight(address_t x_address, address_t grad_address, index_t n, index_t h, index_t w,
                                    index_t c, index_t r, index_t s, index_t sh, index_t sw, index_t ph, index_t pw,
                                    index_t dh, index_t dw, index_t oh, index_t ow, address_t grad_w_address,
                                    int nthreads) {
    const T* x = as_ptr<const T>(x_address);
    const T* grad = as_ptr<const T>(grad_address);
    T* grad_w = as_ptr<T>(grad_w_address);
    const index_t taps = r * s, rows_out = n * oh, step = sw * c;
    const int threads = threads_for(rows_out * ow * c * taps, nthreads);
    std::vector<T> partial(static_cast<size_t>(threads * taps * c), T(0));
    // the output columns [inside_from, inside_to) whose every tap's input column is inside the image
    const index_t inside_from = std::min(ow, (pw + sw - 1) / sw);
    const index_t last = w - 1 + pw - (s - 1) * dw;
    const index_t inside_to = last < 0 ? inside_from : std::max(inside_from, std::min(ow, last / sw + 1));
#pragma omp parallel num_threads(threads)
    {
        T* sums = partial.data() + omp_get_thread_num() * taps * c;
        std::vector<const T*> tap_inputs(static_cast<size_t>(taps));  // tap's input for column 0 (x·step on)
        std::vector<T*> tap_sums(static_cast<size_t>(taps));
#pragma omp for schedule(static)
        for (index_t task = 0; task < rows_out; ++task) {
            const index_t image = task / oh, oy = task % oh;
            index_t inside = 0;  // the taps whose input row is inside the image, in tap order
            for (index_t i = 0; i < r; ++i) {
                const index_t iy = oy * sh - ph + i * dh;
                if (iy < 0 || iy >= h) continue;
                for (index_t t = 0; t < s; ++t) {
                    tap_inputs[inside] = x + ((image * h + iy) * w + t * dw - pw) * c;  // (column 0's: may be outside)
                    tap_sums[inside++] = sums + (i * s + t) * c;
                }
            }
            const T* grad_row = grad + task * ow * c;
            with_lanes<T>(c, [&](auto lanes) {
                constexpr int N = decltype(lanes)::value;
                overlapping_vectors<N>(c, [&](index_t ch) {
                    for (index_t first = 0; first < inside; first += 9) {
                        const T* const* in = tap_inputs.data() + first;
                        T* const* out = tap_sums.data() + first;
                        const index_t a = inside_from, b = inside_to;
                        switch (std::min<index_t>(9, inside - first)) {
                            case 9: weight_taps<T, N, 9>(grad_row, in, a, b, step, c, ch, out); break;
                            case 8: weight_taps<T, N, 8>(grad_row, in, a, b, step, c, ch, out); break;
                            case 7: weight_taps<T, N, 7>(grad_row, in, a, b, step, c, ch, out); break;
                            case 6: weight_taps<T, N, 6>(grad_row, in, a, b, step, c, ch, out); break;
                            case 5: weight_taps<T, N, 5>(grad_row, in, a, b, step, c, ch, out); break;
                            case 4: weight_taps<T, N, 4>(grad_row, in, a, b, step, c, ch, out); break;
                            case 3: weight_taps<T, N, 3>(grad_row, in, a, b, step, c, ch, out); break;
                            case 2: weight_taps<T, N, 2>(grad_row, in, a, b, step, c, ch, out); break;
                            default: weight_taps<T, N, 1>(grad_row, in, a, b, step, c, ch, out); break;
                        }
                    }
                });
            });
            // the border columns, each tap whose input column is inside
            for (index_t xo = 0; xo < ow; xo = xo + 1 == inside_from ? std::max(inside_to, xo + 1) : xo + 1) {
                if (xo >= inside_from && xo < inside_to) continue;
                const T* g = grad_row + xo * c;
                for (index_t q = 0; q < inside; ++q) {
                    const index_t t = (tap_sums[q] - sums) / c % s;
                    const index_t ix = xo * sw - pw + t * dw;
                    if (ix < 0 || ix >= w) continue;
                    const T* in = tap_inputs[q] + xo * step;
                    T* sum = tap_sums[q];
#pragma omp simd
                    for (index_t ch = 0; ch < c; ++ch) sum[ch] += g[ch] * in[ch];
                }
            }
        }
    }
    for (index_t e = 0; e < taps * c; ++e) {
        T total = 0;
        for (int th = 0; th < threads; ++th) total += partial[th * taps * c + e];
        grad_w[e] = total;
    }
}

template void grouped_conv_forward<float>(address_t, index_t, index_t, index_t, index_t, address_t, address_t,
                                          index_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                          index_t, index_t, index_t, index_t, bool, address_t, int);
template void grouped_conv_forward<double>(address_t, index_t, index_t, index_t, index_t, address_t, address_t,
                                           index_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                           index_t, index_t, index_t, index_t, bool, address_t, int);

template void depthwise_conv_backward_input<float>(address_t, index_t, index_t, index_t, index_t, address_t, index_t,
                                                   index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                                   index_t, index_t, address_t, int);
template void depthwise_conv_backward_input<double>(address_t, index_t, index_t, index_t, index_t, address_t, index_t,
                                                    index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                                    index_t, index_t, address_t, int);
template void depthwise_conv_backward_weight<float>(address_t, address_t, index_t, index_t, index_t, index_t, index_t,
                                                    index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                                    index_t, index_t, address_t, int);
template void depthwise_conv_backward_weight<double>(address_t, address_t, index_t, index_t, index_t, index_t, index_t,
                                                     index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                                     index_t, index_t, address_t, int);

}  // namespace fastml
