// Direct-convolution building blocks shared by conv2d.cpp and conv2d_relu_max_pool2d.cpp.
//
// Images are first copied into zero-padded planes (pad_planes), so the inner loops run without
// bounds checks. Weights are packed so that the kKB output channels a tile computes sit side by
// side for each (input channel, r, s) (pack_weights). A tile is kKB output channels × NV SIMD
// vectors of consecutive output columns of one output row: for each (input channel, r, s) it
// loads NV vectors of input and multiplies them by kKB broadcast weights — kKB · NV FMAs per NV
// loads, the accumulators held in registers (8 × 2 vectors = 16 of AVX-512's 32; AVX2's 16
// registers hold 8 × 1: kRowVectors).
#pragma once

#include <algorithm>
#include <vector>

#include "common.h"
#include "simd.h"

namespace fastml {

constexpr index_t kKB = 8;  // output channels per tile
// The most vectors of output columns a tile takes (NV): kKB accumulators and one input vector
// each, and the broadcast weight.
constexpr int kRowVectors = tile_columns(kKB, 1, 2);

// Sizes of one convolution: input (n, c, h, w), weight (k, c / groups, r, s), output (n, k, oh, ow).
struct ConvShape {
    index_t n, c, h, w, k, r, s, sh, sw, ph, pw, dh, dw, groups, oh, ow;
    index_t cg() const { return c / groups; }   // input channels per group
    index_t kg() const { return k / groups; }   // output channels per group
    index_t kblocks() const { return (kg() + kKB - 1) / kKB; }
    // The padded planes a forward pass reads: every tap of every output inside, plus the
    // columns a full last vector of outputs reads past the row (they land in the next row, or
    // in slack at the end, and are discarded).
    index_t hp() const { return std::max(h + 2 * ph, (oh - 1) * sh + (r - 1) * dh + 1); }
    index_t wp() const { return std::max(w + 2 * pw, (ow - 1) * sw + (s - 1) * dw + 1); }
};

// dst (channels, hp, wp) = the planes src (channels, h, w) placed at row `top`, column `left`
// (either may be negative: cropped), spread by (up_h, up_w) (element (i, j) of src lands at
// (top + i·up_h, left + j·up_w); the zeros between are a strided convolution's transposed input),
// zero elsewhere.
template <typename T>
void pad_planes(const T* src, index_t channels, index_t h, index_t w, index_t top, index_t left, index_t up_h,
                index_t up_w, index_t hp, index_t wp, T* dst) {
    for (index_t ch = 0; ch < channels; ++ch) {
        T* plane = dst + ch * hp * wp;
        std::fill(plane, plane + hp * wp, T(0));
        for (index_t i = 0; i < h; ++i) {
            const index_t row = top + i * up_h;
            if (row < 0 || row >= hp) continue;
            const T* in = src + (ch * h + i) * w;
            T* out = plane + row * wp;
            if (up_w == 1) {
                const index_t j0 = std::max<index_t>(0, -left), j1 = std::min(w, wp - left);
                if (j1 > j0) std::copy(in + j0, in + j1, out + left + j0);
            } else {
                for (index_t j = 0; j < w; ++j) {
                    const index_t col = left + j * up_w;
                    if (col >= 0 && col < wp) out[col] = in[j];
                }
            }
        }
    }
}

// packed[block][i][r][s][kKB] = weight(block · kKB + lane, i, r, s) for `outs` output channels
// (zero past the last), `ins` input channels. weight(o, i, r, s) is a callable.
template <typename T, typename Weight>
std::vector<T> pack_weights(index_t outs, index_t ins, index_t r, index_t s, Weight&& weight) {
    const index_t blocks = (outs + kKB - 1) / kKB;
    std::vector<T> packed(blocks * ins * r * s * kKB, T(0));
    for (index_t o = 0; o < outs; ++o)
        for (index_t i = 0; i < ins; ++i)
            for (index_t a = 0; a < r; ++a)
                for (index_t b = 0; b < s; ++b)
                    packed[((((o / kKB) * ins + i) * r + a) * s + b) * kKB + o % kKB] = weight(o, i, a, b);
    return packed;
}

// acc[o][v] lane l = Σ_{i, a, b} w[o, i, a, b] · x[i, a·dh, (v·W + l)·sw + b·dw] for one tile: x
// points at the tile's first input (its output row's top-left tap) in padded planes of
// plane_size elements and rows of wp; w at the tile's packed weights ([ins][r][s][kKB]).
template <typename T, int NV, bool kUnitStride>
inline void conv_tile(const T* x, index_t plane_size, index_t wp, index_t sw, const T* w, index_t ins, index_t r,
                      index_t s, index_t dh, index_t dw, typename Simd<T>::vec (&acc)[kKB][NV]) {
    using S = Simd<T>;
    using V = typename S::vec;
    zero_tile(acc);
    for (index_t i = 0; i < ins; ++i) {
        for (index_t a = 0; a < r; ++a) {
            const T* row = x + i * plane_size + a * dh * wp;
            for (index_t b = 0; b < s; ++b, w += kKB) {
                const T* at = row + b * dw;
                V in[NV];
#pragma GCC unroll 4
                for (int v = 0; v < NV; ++v) {
                    if constexpr (kUnitStride) {
                        in[v] = S::load(at + v * S::kWidth);
                    } else {
                        for (index_t l = 0; l < S::kWidth; ++l) in[v][l] = at[(v * S::kWidth + l) * sw];
                    }
                }
#pragma GCC unroll 8
                for (int o = 0; o < kKB; ++o)
#pragma GCC unroll 4
                    for (int v = 0; v < NV; ++v) acc[o][v] += in[v] * w[o];
            }
        }
    }
}

// One output row of one block of kKB output channels: body(o, col0, cols, acc_o) receives, per
// tile of NV vectors starting at output column col0 (cols of them real), the accumulated
// correlation of output channel lane o. x: the padded planes of the group's input channels.
template <typename T, int NV, typename Body>
inline void conv_row(const T* x, const ConvShape& cs, index_t hp, index_t wp, const T* w_block, index_t row,
                     Body&& body) {
    using S = Simd<T>;
    constexpr index_t kCols = NV * S::kWidth;
    const T* base = x + row * cs.sh * wp;
    for (index_t col0 = 0; col0 < cs.ow; col0 += kCols) {
        typename S::vec acc[kKB][NV];
        if (cs.sw == 1) {
            conv_tile<T, NV, true>(base + col0, hp * wp, wp, 1, w_block, cs.cg(), cs.r, cs.s, cs.dh, cs.dw, acc);
        } else {
            conv_tile<T, NV, false>(base + col0 * cs.sw, hp * wp, wp, cs.sw, w_block, cs.cg(), cs.r, cs.s, cs.dh,
                                    cs.dw, acc);
        }
        body(col0, std::min(kCols, cs.ow - col0), acc);
    }
}

// dst[0, cols) = activation(tile + shift) for one output channel's tile of NV vectors: whole
// vectors stored as such, a partial last tile lane by lane. activation takes a vector.
template <typename V, int NV, typename T, typename Activation>
inline void store_tile_row(const V (&tile)[NV], T shift, index_t cols, T* dst, Activation&& activation) {
    constexpr index_t kWidth = Simd<T>::kWidth;
    for (int v = 0; v < NV; ++v) {
        const V z = activation(tile[v] + shift);
        if (cols >= (v + 1) * kWidth) {
            Simd<T>::store(dst + v * kWidth, z);
        } else {
            for (index_t l = 0; l < cols - v * kWidth; ++l) dst[v * kWidth + l] = z[l];
            return;
        }
    }
}

// Elements of padded planes, with slack for the last vectors' reads past the end.
template <typename T>
inline index_t padded_size(index_t planes, index_t hp, index_t wp, index_t sw) {
    return planes * hp * wp + 2 * Simd<T>::kWidth * std::max<index_t>(sw, 1) + wp;
}

// The kernels' size vector (n, c, h, w, k, r, s, stride h, stride w, padding h, padding w,
// dilation h, dilation w, groups, oh, ow) as a ConvShape.
inline ConvShape conv_shape(const std::vector<index_t>& d) {
    return {d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7], d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]};
}

// The input x (n, c, h, w) as padded planes (n · c, hp, wp), copied in parallel.
template <typename T>
std::vector<T> padded_input(const T* x, const ConvShape& cs, index_t hp, index_t wp, int threads) {
    std::vector<T> padded(padded_size<T>(cs.n * cs.c, hp, wp, cs.sw));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t p = 0; p < cs.n * cs.c; ++p)
        pad_planes(x + p * cs.h * cs.w, 1, cs.h, cs.w, cs.ph, cs.pw, 1, 1, hp, wp, padded.data() + p * hp * wp);
    return padded;
}

// The weights w (k, c / groups, r, s) packed for the tiles, group after group: as they are
// (forward), or transposed, input and output channels swapped and the window flipped (the
// gradient of the input is that correlation of the output gradient).
template <typename T>
std::vector<T> packed_weights(const T* w, const ConvShape& cs, bool transposed) {
    const index_t kg = cs.kg(), cg = cs.cg(), r = cs.r, s = cs.s;
    std::vector<T> all;
    for (index_t g = 0; g < cs.groups; ++g) {
        const T* wg = w + g * kg * cg * r * s;
        const auto packed = pack_weights<T>(transposed ? cg : kg, transposed ? kg : cg, r, s,
                                            [&](index_t o, index_t i, index_t a, index_t b) {
            return transposed ? wg[((i * cg + o) * r + (r - 1 - a)) * s + (s - 1 - b)]
                              : wg[((o * cg + i) * r + a) * s + b];
        });
        all.insert(all.end(), packed.begin(), packed.end());
    }
    return all;
}

}  // namespace fastml
