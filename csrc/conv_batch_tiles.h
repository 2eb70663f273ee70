// Direct convolution with the batch innermost, for small images with a large batch (LeNet's
// second layer: 10 × 10 outputs, batch 256).
//
// conv_tiles.h runs its SIMD vectors along an output row, so a row of 10 outputs fills 10 of 16
// float lanes. Here the planes are stored batch-innermost, (image block, channel, row, column,
// lane) with the lane the image within a block of kWidth images, and a vector holds one position
// of kWidth images: every lane is useful whatever the plane's size. A tile is kKB output
// channels × P output positions of a row: per (input channel, r, s), P vector loads and kKB
// broadcast weights (packed as conv_tiles.h's pack_weights) feed kKB · P FMAs. The weight
// gradient's tile multiplies kKB output-gradient vectors by P input vectors, the lanes (images)
// summed once at the end.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "conv_tiles.h"
#include "linear_tiles.h"

namespace fastml {

// Whether to run a convolution of n images in the batch-innermost layout: when the batch fills
// the lanes (at least one vector of images, and no more than an eighth of the last vector empty).
// Measured on Zen 4 against conv_tiles.h's row vectors, it was as fast or faster at every size
// tried, whatever the planes' width (VGG's 56 × 56 included), by 3× to 8× for LeNet's fused blocks.
template <typename T>
inline bool batch_layout_pays(index_t n) {
    constexpr index_t L = Simd<T>::kWidth;
    const index_t batch_lanes = (n + L - 1) / L * L;
    return n >= L && 8 * n >= 7 * batch_lanes;
}

// dst (blocks of kWidth images, channels, hp, wp, lane) = the planes of src (n, channels, h, w)
// with element (i, j) at (top + i·up_h, left + j·up_w) (cropped where outside), zero elsewhere
// and in the lanes of images past n. As pad_planes, for the batch-innermost layout.
template <typename T>
void to_batch_planes(const T* src, index_t n, index_t channels, index_t h, index_t w, index_t top, index_t left,
                     index_t up_h, index_t up_w, index_t hp, index_t wp, T* dst, int threads) {
    constexpr index_t L = Simd<T>::kWidth;
    const index_t blocks = (n + L - 1) / L;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t task = 0; task < blocks * channels; ++task) {
        const index_t block = task / channels, ch = task % channels;
        T* plane = dst + task * hp * wp * L;
        std::fill(plane, plane + hp * wp * L, T(0));
        for (index_t l = 0; l < L && block * L + l < n; ++l) {
            const T* in = src + ((block * L + l) * channels + ch) * h * w;
            for (index_t i = 0; i < h; ++i) {
                const index_t row = top + i * up_h;
                if (row < 0 || row >= hp) continue;
                for (index_t j = 0; j < w; ++j) {
                    const index_t col = left + j * up_w;
                    if (col >= 0 && col < wp) plane[(row * wp + col) * L + l] = in[i * w + j];
                }
            }
        }
    }
}

// Elements of batch planes for n images of `channels` planes hp × wp.
template <typename T>
inline index_t batch_planes_size(index_t n, index_t channels, index_t hp, index_t wp) {
    constexpr index_t L = Simd<T>::kWidth;
    return (n + L - 1) / L * channels * hp * wp * L;
}

// The input x (n, c, h, w) as padded batch planes (forward and weight gradient).
template <typename T>
Uninitialized<T> batch_input(const T* x, const ConvShape& cs, index_t hp, index_t wp, int threads) {
    Uninitialized<T> planes(batch_planes_size<T>(cs.n, cs.c, hp, wp));  // to_batch_planes writes every element
    to_batch_planes(x, cs.n, cs.c, cs.h, cs.w, cs.ph, cs.pw, 1, 1, hp, wp, planes.data(), threads);
    return planes;
}

// The part of batch planes that can hold nonzero values: rows [top, bottom), columns [left,
// right). A tap whose every read falls outside it adds only zeros, and is skipped: a padded
// input's border, or the border of an output gradient spread for its input gradient (LeNet's
// second layer: 10 x 10 gradients in 14 x 14 planes, so half of a 5 x 5 kernel's taps read
// zeros on average).
struct PlaneWindow {
    index_t top, bottom, left, right;
};

// The taps [lo, hi) of a kernel row or column of `taps` (dilation `dil`) under which at least one
// of a tile's positions reads inside [begin, end), its positions' first taps landing at plane
// indices first .. last. lo >= hi: none.
inline void taps_inside(index_t first, index_t last, index_t begin, index_t end, index_t dil, index_t taps,
                        index_t& lo, index_t& hi) {
    lo = begin > last ? (begin - last + dil - 1) / dil : 0;
    hi = end - 1 >= first ? std::min(taps, (end - 1 - first) / dil + 1) : 0;
}

// acc[o][p] = Σ_{i, a, b} w[o, i, a, b] · x[i, a·dh, p·sw + b·dw] (vectors of images) for C
// output channels of a block (w and acc at the first of them; acc's other rows left alone) and P
// positions, over
// taps a in [a0, a1) and b in [b0, b1) of the r × s kernel: x points at the tile's first tap in
// batch planes; steps are in elements (plane: one channel's plane; row_step: dh rows; tap_step:
// dw columns; col_step: sw columns); w at the block's packed weights ([ins][r][s][kKB]).
// (The sums are a local tile, copied to acc at the end: accumulating in acc itself, which the
// compiler must assume the input pointers may alias, kept them in memory wherever the tile was
// not inlined, 2.5x slower.) add: acc[o][p] += the sums, for a slice of the input channels.
template <typename T, int C, int P>
inline void batch_conv_tile(const T* x, index_t plane, index_t row_step, index_t tap_step, index_t col_step,
                            const T* w, index_t ins, index_t r, index_t s, index_t a0, index_t a1, index_t b0,
                            index_t b1, typename Simd<T>::vec (*acc)[P], bool add = false) {
    using S = Simd<T>;
    using V = typename S::vec;
    V sum[C][P];
    zero_tile(sum);
    for (index_t i = 0; i < ins; ++i) {
        for (index_t a = a0; a < a1; ++a) {
            const T* row = x + i * plane + a * row_step;
            const T* wa = w + ((i * r + a) * s) * kKB;
            for (index_t b = b0; b < b1; ++b) {
                const T* at = row + b * tap_step;
                const T* wb = wa + b * kKB;
                V in[P];
#pragma GCC unroll 4
                for (int p = 0; p < P; ++p) in[p] = S::load(at + p * col_step);
#pragma GCC unroll 8
                for (int o = 0; o < C; ++o)
#pragma GCC unroll 4
                    for (int p = 0; p < P; ++p) sum[o][p] += in[p] * wb[o];
            }
        }
    }
#pragma GCC unroll 8
    for (int o = 0; o < C; ++o)
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) acc[o][p] = add ? acc[o][p] + sum[o][p] : sum[o][p];
}

// f(std::integral_constant<int, n>) for a count n of 1 .. 8 (8 for anything larger): a loop
// bound made a template argument, so the tile it sizes is unrolled and held in registers. The
// batch layout's blocks of kKB channels take it (a block with fewer channels than kKB, the input
// gradient of LeNet's second layer: 6 in a block of 8, runs a tile of exactly those, not kKB FMAs
// per tap of which some multiply zero weights), as do the sparse weight gradient's blocks of
// kernel rows (conv2d_relu_max_pool2d.cpp).
template <typename F>
inline void with_count_up_to_8(index_t count, F&& f) {
    switch (count) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 7: f(std::integral_constant<int, 7>{}); break;
        default: f(std::integral_constant<int, 8>{}); break;
    }
}

// Positions (forward) or taps (weight gradient) a batch-layout tile of `channels` output channels
// takes at once: channels × P accumulators, P input vectors and the broadcast weight or gradient
// vector, with two registers to spare (an AVX2 tile of 6 channels x 2 positions, 15 registers, had
// one accumulator spilled where it was inlined: LeNet's input gradient 1.35x slower). For a full
// block of kKB channels: 3 with AVX-512's 32 registers, 1 with AVX2's 16.
constexpr int batch_taps(int channels) { return tile_columns(channels, 3, 3); }
constexpr int kBatchTaps = batch_taps(kKB);

// Independent FMA chains a tile needs to keep the FMA units busy: 2 pipes x 4 cycles' latency on
// the x86-64 cores since Haswell and Zen 2 (AVX2 and AVX-512 alike).
constexpr int kFmaChains = 8;

// The channels of a block's first sub-tile: all of them, or, where channels × batch_taps(channels)
// accumulators are too few chains and half the channels at their positions make more, the first
// half (the rest are the second sub-tile, at the first's positions). With AVX2, a block of 6 (the
// input gradient of LeNet's second layer) runs 3 + 3 channels x 3 positions (9 chains each), not
// 6 x 1 (6 chains, latency-bound).
constexpr int first_sub_channels(int channels) {
    const int half = (channels + 1) / 2;
    return channels * batch_taps(channels) < kFmaChains && half * batch_taps(half) > channels * batch_taps(channels)
               ? half
               : channels;
}

// Input channels a batch-layout tile takes per pass: as many as keep the vectors it reads (P
// positions under an r x s kernel, in every one of those channels) in half of the L1, so that the
// next tile, which reads most of the same vectors, finds them there. Past that, each tile read
// them from the L2: VGG's 3x3 convolution of 64 channels ran at 73 GFLOP/s on a 2-core Ice Lake
// (48 KiB L1) where one of 32 channels ran at 108, and at 0.43x torch's. A convolution with
// more channels sums them in passes of this many (batch_conv_row).
template <typename T>
inline index_t batch_channel_pass(const ConvShape& cs, index_t kernel_rows, int positions) {
    const index_t vectors_per_row = (positions - 1) * cs.sw + (cs.s - 1) * cs.dw + 1;
    const index_t bytes = std::max<index_t>(1, kernel_rows) * vectors_per_row * index_t(sizeof(typename Simd<T>::vec));
    return std::max<index_t>(1, cache_sizes().l1d / 2 / bytes);
}

// One output row of one block of kKB output channels in the batch layout: body(col, count, acc)
// receives each tile's accumulators (count positions from column col, or 1 for the last ones;
// acc[o] for the block's first `channels` channels). x: batch planes of the group's input
// channels for one block of images, nonzero only inside `window` (taps reading only outside it
// are skipped). Where the group has more input channels than batch_channel_pass allows, the row
// is summed in passes over slices of them, each tile's partial sums kept in `partial` (a
// caller's scratch of kKB x ow vectors, which it may reuse from row to row) between passes.
template <typename T, typename Body>
inline void batch_conv_row(const T* x, const ConvShape& cs, index_t hp, index_t wp, const PlaneWindow& window,
                           const T* w_block, index_t channels, index_t row, std::vector<typename Simd<T>::vec>& partial,
                           Body&& body) {
    using V = typename Simd<T>::vec;
    constexpr index_t L = Simd<T>::kWidth;
    const index_t plane = hp * wp * L, row_step = cs.dh * wp * L, tap_step = cs.dw * L, col_step = cs.sw * L;
    const T* base = x + row * cs.sh * wp * L;
    index_t a0, a1;
    taps_inside(row * cs.sh, row * cs.sh, window.top, window.bottom, cs.dh, cs.r, a0, a1);
    static_assert(kKB == 8, "a block's channel counts are with_count_up_to_8's");
    with_count_up_to_8(channels, [&](auto block_channels) {
        constexpr int C = decltype(block_channels)::value, C1 = first_sub_channels(C), P = batch_taps(C1);
        const index_t ins = cs.cg(), pass = batch_channel_pass<T>(cs, a1 - a0, P);
        // the tile at col over input channels [first, first + count_in), added to acc if add
        auto tile = [&](auto positions, index_t col, index_t first, index_t count_in, bool add, auto acc) {
            constexpr int count = decltype(positions)::value;
            index_t b0, b1;
            taps_inside(col * cs.sw, (col + count - 1) * cs.sw, window.left, window.right, cs.dw, cs.s, b0, b1);
            const T* at = base + col * col_step + first * plane;
            const T* w = w_block + first * cs.r * cs.s * kKB;
            batch_conv_tile<T, C1, count>(at, plane, row_step, tap_step, col_step, w, count_in, cs.r, cs.s, a0, a1, b0,
                                          b1, acc, add);
            if constexpr (C1 < C)
                batch_conv_tile<T, C - C1, count>(at, plane, row_step, tap_step, col_step, w + C1, count_in, cs.r,
                                                  cs.s, a0, a1, b0, b1, acc + C1, add);
        };
        // f(positions, col) for each tile of the row: P positions at a time, the last ones singly
        auto each_tile = [&](auto&& f) {
            index_t col = 0;
            for (; col + P <= cs.ow; col += P) f(std::integral_constant<int, P>{}, col);
            for (; col < cs.ow; ++col) f(std::integral_constant<int, 1>{}, col);
        };
        if (pass < ins) partial.resize(kKB * cs.ow);
        // Pass after pass over slices of the input channels (one pass where they all fit), each
        // adding to the tiles' sums of the passes before it, kept in partial between passes; the
        // last pass hands the sums to body. (At least one pass: a group of no channels gives body
        // zero sums.)
        for (index_t first = 0;; first += pass) {
            const index_t count_in = std::min(pass, ins - first);
            const bool last = first + count_in >= ins;
            each_tile([&](auto positions, index_t col) {
                constexpr int count = decltype(positions)::value;
                V acc[kKB][count];
                if (first > 0)
                    for (int o = 0; o < C; ++o)
                        for (int p = 0; p < count; ++p) acc[o][p] = partial[o * cs.ow + col + p];
                tile(positions, col, first, count_in, first > 0, acc);
                if (last) {
                    body(col, count, acc);
                } else {
                    for (int o = 0; o < C; ++o)
                        for (int p = 0; p < count; ++p) partial[o * cs.ow + col + p] = acc[o][p];
                }
            });
            if (last) break;
        }
    });
}

// The window of batch planes made by to_batch_planes from h × w planes placed at (top, left)
// with steps (up_h, up_w), cropped to hp × wp.
inline PlaneWindow placed_window(index_t top, index_t left, index_t h, index_t w, index_t up_h, index_t up_w,
                                 index_t hp, index_t wp) {
    return {std::max<index_t>(top, 0), std::min(hp, top + (h - 1) * up_h + 1), std::max<index_t>(left, 0),
            std::min(wp, left + (w - 1) * up_w + 1)};
}

// Whether a batch-layout pass over a group's tasks (block of output channels x output row) takes
// each row's channel blocks one after another, rather than each block's rows. Rows outermost
// reads the input rows under an output row once for every block, while they are in the L2, and
// the group's packed weights once per row: it pays where those weights stay in half the L2 and an
// image block's input planes do not (each block's sweep over the rows fetched the planes again
// from beyond the L2: on a 2-core Ice Lake, VGG's 3x3 layer of 64 channels at 56 x 56, batch 64,
// ran 1.6x faster rows outermost, ResNet's 3x3 layers of 64 and 128 channels at batch 16 1.2x;
// with 256 channels at 14 x 14, 2.4 MB of weights, 0.98x, and 0.91x with 512 at 7 x 7).
template <typename T>
inline bool batch_rows_outermost(const ConvShape& cs, index_t hp, index_t wp) {
    const index_t half_l2 = cache_sizes().l2 / 2;
    const index_t weight_bytes = cs.cg() * cs.r * cs.s * cs.kblocks() * kKB * index_t(sizeof(T));
    const index_t input_bytes = cs.cg() * hp * wp * Simd<T>::kWidth * index_t(sizeof(T));
    return weight_bytes <= half_l2 && input_bytes > half_l2;
}

// A batch-layout task's block of images, group, block of output channels and (output or pooled)
// row: within an image block and a group, tasks run the rows fastest, or the channel blocks where
// rows_outer (batch_rows_outermost).
struct BatchTask {
    index_t ib, g, block, row;
};

inline BatchTask batch_task(index_t task, index_t rows, index_t blocks, index_t groups, bool rows_outer) {
    const index_t within = task % (rows * blocks), rest = task / (rows * blocks);
    return {rest / groups, rest % groups, rows_outer ? within % blocks : within / rows,
            rows_outer ? within / blocks : within % rows};
}

// out (n, outs, oh, ow) = correlation of batch planes x (blocks, ins, hp, wp, lane; nonzero only
// inside `window`) with the packed weights of every group, plus bias (or none). A task's row of
// result vectors is kept in a scratch [channel][column] of vectors, then written image by image
// as whole rows: a lane at a time straight from the tiles wrote 3 elements per image and per
// cache line (conv2d alone at VGG's size: 188 ms against the fused block's 148).
template <typename T>
void batch_correlate(const T* x, index_t hp, index_t wp, const PlaneWindow& window, const T* packed, const T* bias,
                     const ConvShape& cs, T* out, int threads) {
    using V = typename Simd<T>::vec;
    constexpr index_t L = Simd<T>::kWidth;
    const index_t kg = cs.kg(), blocks = cs.kblocks(), weights_per_block = cs.cg() * cs.r * cs.s * kKB;
    const index_t image_blocks = (cs.n + L - 1) / L, outputs = cs.oh * cs.ow;
    const index_t tasks = image_blocks * cs.groups * blocks * cs.oh;
    const bool rows_outer = batch_rows_outermost<T>(cs, hp, wp);
#pragma omp parallel num_threads(threads)
    {
        std::vector<V> scratch(kKB * cs.ow), partial;
#pragma omp for schedule(static)
        for (index_t task = 0; task < tasks; ++task) {
            const auto [ib, g, block, row] = batch_task(task, cs.oh, blocks, cs.groups, rows_outer);
            const T* xg = x + (ib * cs.c + g * cs.cg()) * hp * wp * L;
            const T* wb = packed + (g * blocks + block) * weights_per_block;
            const index_t first = g * kg + block * kKB, count = std::min(kKB, kg - block * kKB);
            const index_t images = std::min(L, cs.n - ib * L);
            batch_conv_row<T>(xg, cs, hp, wp, window, wb, count, row, partial,
                              [&](index_t col, index_t cols, const auto& acc) {
                for (index_t o = 0; o < count; ++o)
                    for (index_t p = 0; p < cols; ++p) scratch[o * cs.ow + col + p] = acc[o][p];
            });
            for (index_t l = 0; l < images; ++l)
                for (index_t o = 0; o < count; ++o) {
                    const T shift = bias ? bias[first + o] : T(0);
                    T* dst = out + ((ib * L + l) * cs.k + first + o) * outputs + row * cs.ow;
                    const V* src = scratch.data() + o * cs.ow;
                    for (index_t col = 0; col < cs.ow; ++col) dst[col] = src[col][l] + shift;
                }
        }
    }
}

// acc[o][p] = Σ over the band's positions of grad[o] · x[tap p] (vectors of images) for the
// first `count` of kKB output channels and P taps of one kernel row. gz: the block's first
// channel's gradient at the band's first position (rows grad_row positions apart, channels
// `pitch` elements apart); xi: the
// input under the first tap at the band's first row. kKB × P accumulators, P inputs and one
// gradient vector at a time: 28 of AVX-512's 32 registers with P = 3 (kBatchTaps).
template <typename T, int P, bool kFullBlock>
inline void weight_tile(const T* gz, index_t grad_row, index_t pitch, const T* xi, const ConvShape& cs, index_t wp,
                        index_t rows, index_t count, typename Simd<T>::vec (&acc)[kKB][P]) {
    using S = Simd<T>;
    using V = typename S::vec;
    constexpr index_t L = S::kWidth;
    zero_tile(acc);
    for (index_t row = 0; row < rows; ++row) {
        for (index_t col = 0; col < cs.ow; ++col) {
            const T* in = xi + (row * cs.sh * wp + col * cs.sw) * L;
            const T* g = gz + (row * grad_row + col) * L;
            V xs[P];
#pragma GCC unroll 3
            for (int p = 0; p < P; ++p) xs[p] = S::load(in + p * cs.dw * L);
#pragma GCC unroll 8
            for (int o = 0; o < kKB; ++o) {
                if (!kFullBlock && o >= count) break;  // past this block's last channel
                V gv = S::load(g + o * pitch);
                keep_in_register(gv);  // (simd.h) else loaded again by each of the P FMAs
#pragma GCC unroll 3
                for (int p = 0; p < P; ++p) acc[o][p] += gv * xs[p];
            }
        }
    }
}

// Rows of the output gradient's batch planes: oh, plus one unused row where oh · ow is a
// multiple of 64 positions. Otherwise the kKB channels a weight tile reads at once lie a
// multiple of 4 KiB apart and share L1 sets (VGG's 56 × 56: grad_weight ran 2× slower).
inline index_t gradient_plane_rows(index_t oh, index_t ow) { return oh + (oh * ow % 64 == 0 ? 1 : 0); }

// grad_w (k, c / groups, r, s) = Σ over images and output positions of grad · input, from batch
// planes of the output gradient (position (row, col) of channel k of image block ib at
// grad + ib·k·pitch + k·pitch + (row·grad_row + col)·kWidth: planes of conv2d_backward_weight's
// gradient_plane_rows × ow, or the fused backward's padded ones) and x (blocks, c, hp, wp, lane). The positions are cut
// into chunks (one block of images, a band of output rows) so a block of kKB channels of the
// gradient over the band (an eighth of the L2: 128 KiB, 256 positions of AVX-512 vectors on a
// 1 MiB L2, where that was measured best) stays in L2 while every (input channel, kernel row)
// multiplies it, by tiles of kKB channels × kBatchTaps taps.
// Threads take chunks and keep partial sums, added in a fixed order.
template <typename T>
void batch_weight_gradient(const T* grad, index_t grad_row, index_t pitch, const T* x, index_t hp, index_t wp,
                           const ConvShape& cs, T* grad_w, int threads) {
    using S = Simd<T>;
    using V = typename S::vec;
    constexpr index_t L = S::kWidth;
    constexpr int P = kBatchTaps;
    const index_t kg = cs.kg(), cg = cs.cg(), blocks = cs.kblocks(), image_blocks = (cs.n + L - 1) / L;
    const index_t weights = cs.k * cg * cs.r * cs.s;
    const index_t band_positions = std::max<index_t>(16, cache_sizes().l2 / 8 / (kKB * index_t(sizeof(V))));
    const index_t band = std::max<index_t>(1, band_positions / std::max<index_t>(cs.ow, 1));
    const index_t bands = (cs.oh + band - 1) / band, chunks = image_blocks * bands;
    const int parts = static_cast<int>(std::max<index_t>(1, std::min<index_t>(threads, chunks)));
    std::vector<T> partial(index_t(parts) * weights, T(0));
#pragma omp parallel num_threads(parts)
    {
        const int t = omp_get_thread_num();
        index_t first_chunk, last_chunk;
        split_range(chunks, parts, t, first_chunk, last_chunk);
        T* mine = partial.data() + index_t(t) * weights;
        for (index_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
            const index_t ib = chunk / bands, row0 = chunk % bands * band, rows = std::min(cs.oh, row0 + band) - row0;
            for (index_t g = 0; g < cs.groups; ++g)
                for (index_t block = 0; block < blocks; ++block) {
                    const index_t first = g * kg + block * kKB, count = std::min(kKB, kg - block * kKB);
                    const T* gz = grad + (ib * cs.k + first) * pitch + row0 * grad_row * L;
                    for (index_t i = 0; i < cg; ++i)
                        for (index_t a = 0; a < cs.r; ++a) {
                            const T* xa = x + ((ib * cs.c + g * cg + i) * hp + row0 * cs.sh + a * cs.dh) * wp * L;
                            T* dst = mine + (((first * cg + i) * cs.r + a) * cs.s);
                            // (each tile's lane sums by halving: in lane order they were chains
                            // of extracts and adds as long as a vector)
                            auto add = [&](const auto& acc, index_t b0, index_t taps) {
                                for (index_t o = 0; o < count; ++o)
                                    for (index_t p = 0; p < taps; ++p)
                                        dst[o * cg * cs.r * cs.s + b0 + p] += S::sum_by_halves(acc[o][p]);
                            };
                            index_t b0 = 0;
                            for (; b0 + P <= cs.s; b0 += P) {
                                V acc[kKB][P];
                                const T* xb = xa + b0 * cs.dw * L;
                                if (count == kKB)
                                    weight_tile<T, P, true>(gz, grad_row, pitch, xb, cs, wp, rows, count, acc);
                                else
                                    weight_tile<T, P, false>(gz, grad_row, pitch, xb, cs, wp, rows, count, acc);
                                add(acc, b0, P);
                            }
                            for (; b0 < cs.s; ++b0) {  // the row's last s % P taps, one at a time
                                V acc[kKB][1];
                                const T* xb = xa + b0 * cs.dw * L;
                                weight_tile<T, 1, false>(gz, grad_row, pitch, xb, cs, wp, rows, count, acc);
                                add(acc, b0, 1);
                            }
                        }
                }
        }
    }
    reduce_partials(partial.data(), parts, weights, T(1), grad_w, threads);
}

}  // namespace fastml
