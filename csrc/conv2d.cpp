// 2-D convolution (cross-correlation, as torch.nn.Conv2d) and its three gradients, on the
// register tiles of conv_tiles.h.
//
// Forward: the input is copied once into zero-padded planes, then OpenMP splits (image, group,
// block of 8 output channels, output row) between threads; each runs tiles of 8 channels × 16 or
// 32 columns over every (input channel, r, s).
// grad_input: the same correlation, run on the output gradient (spread by the stride and padded
// by the kernel's reach) with the weights flipped and the channel axes swapped.
// grad_weight: per image and group, the output gradient times the image's im2col matrix (a dot
// product tile), partial sums per thread added in a fixed order; grad_bias: per output channel.
// Small images in a large batch (rows that would leave SIMD lanes empty) take the batch-innermost
// layout of conv_batch_tiles.h instead, for all three.
#include <vector>

#include "conv_batch_tiles.h"
#include "conv_tiles.h"
#include "kernels.h"
#include "linear_tiles.h"

namespace fastml {

namespace {

constexpr index_t kImagePositions = 4096;  // output positions per grad_weight dot product, at least

// out (n, outs, oh, ow) = correlation of the padded planes x (n, ins, hp, wp) with the packed
// weights of every group (groups × blocks × [ins / groups][r][s][kKB]), plus bias (or none).
// cs: ins = cs.c, outs = cs.k, output cs.oh × cs.ow, stride (cs.sh, cs.sw), dilation (cs.dh, cs.dw).
template <typename T, int NV>
void correlate(const T* x, index_t hp, index_t wp, const T* packed, const T* bias, const ConvShape& cs, T* out,
               int threads) {
    const index_t kg = cs.kg(), blocks = cs.kblocks(), weights_per_block = cs.cg() * cs.r * cs.s * kKB;
    const index_t tasks = cs.n * cs.groups * blocks * cs.oh;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t task = 0; task < tasks; ++task) {
        const index_t row = task % cs.oh, block = task / cs.oh % blocks, g = task / cs.oh / blocks % cs.groups,
                      img = task / cs.oh / blocks / cs.groups;
        const T* xg = x + (img * cs.c + g * cs.cg()) * hp * wp;
        const T* wb = packed + (g * blocks + block) * weights_per_block;
        const index_t first = g * kg + block * kKB, count = std::min(kKB, kg - block * kKB);
        conv_row<T, NV>(xg, cs, hp, wp, wb, row, [&](index_t col0, index_t cols, const auto& acc) {
            for (index_t o = 0; o < count; ++o) {
                store_tile_row(acc[o], bias ? bias[first + o] : T(0), cols,
                               out + ((img * cs.k + first + o) * cs.oh + row) * cs.ow + col0, [](auto z) { return z; });
            }
        });
    }
}

template <typename T>
void correlate_any(const T* x, index_t hp, index_t wp, const T* packed, const T* bias, const ConvShape& cs, T* out,
                   int threads) {
    if (cs.ow <= Simd<T>::kWidth) {  // one vector covers the row
        correlate<T, 1>(x, hp, wp, packed, bias, cs, out, threads);
    } else {
        correlate<T, kRowVectors>(x, hp, wp, packed, bias, cs, out, threads);
    }
}

int conv_threads(const ConvShape& cs, int nthreads) {
    return threads_for(cs.n * cs.k * cs.oh * cs.ow * cs.cg() * cs.r * cs.s, nthreads);
}

}  // namespace

template <typename T>
void conv2d_forward(address_t x_, address_t w_, address_t b_, const std::vector<index_t>& dims, address_t out_,
                    int nthreads) {
    const ConvShape cs = conv_shape(dims);
    const int threads = conv_threads(cs, nthreads);
    const index_t hp = cs.hp(), wp = cs.wp();
    const auto packed = packed_weights(as_ptr<const T>(w_), cs, false);
    if (batch_layout_pays<T>(cs.n)) {
        const auto planes = batch_input(as_ptr<const T>(x_), cs, hp, wp, threads);
        const PlaneWindow window = placed_window(cs.ph, cs.pw, cs.h, cs.w, 1, 1, hp, wp);
        batch_correlate(planes.data(), hp, wp, window, packed.data(), as_ptr<const T>(b_), cs, as_ptr<T>(out_), threads);
        return;
    }
    const auto padded = padded_input(as_ptr<const T>(x_), cs, hp, wp, threads);
    correlate_any(padded.data(), hp, wp, packed.data(), as_ptr<const T>(b_), cs, as_ptr<T>(out_), threads);
}

template <typename T>
void conv2d_backward_input(address_t grad_, address_t w_, const std::vector<index_t>& dims, address_t grad_x_,
                           int nthreads) {
    const ConvShape cs = conv_shape(dims);
    const int threads = conv_threads(cs, nthreads);
    // grad_x[c, i, j] = Σ g_up[k, i + a'·dh − top, j + b'·dw − left] · w[k, c, r − 1 − a', s − 1 − b']
    // with g_up the gradient spread by the stride: a stride-1 correlation with h × w outputs.
    const index_t top = (cs.r - 1) * cs.dh - cs.ph, left = (cs.s - 1) * cs.dw - cs.pw;
    const index_t hp = cs.h + (cs.r - 1) * cs.dh, wp = cs.w + (cs.s - 1) * cs.dw;
    const T* grad = as_ptr<const T>(grad_);
    const auto packed = packed_weights(as_ptr<const T>(w_), cs, true);
    const ConvShape transposed{cs.n, cs.k, hp, wp, cs.c, cs.r, cs.s, 1, 1, 0, 0, cs.dh, cs.dw, cs.groups, cs.h, cs.w};
    if (batch_layout_pays<T>(cs.n)) {
        Uninitialized<T> planes(batch_planes_size<T>(cs.n, cs.k, hp, wp));  // written whole below
        to_batch_planes(grad, cs.n, cs.k, cs.oh, cs.ow, top, left, cs.sh, cs.sw, hp, wp, planes.data(), threads);
        const PlaneWindow window = placed_window(top, left, cs.oh, cs.ow, cs.sh, cs.sw, hp, wp);
        batch_correlate<T>(planes.data(), hp, wp, window, packed.data(), nullptr, transposed, as_ptr<T>(grad_x_),
                           threads);
        return;
    }
    std::vector<T> spread(padded_size<T>(cs.n * cs.k, hp, wp, 1));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t p = 0; p < cs.n * cs.k; ++p)
        pad_planes(grad + p * cs.oh * cs.ow, 1, cs.oh, cs.ow, top, left, cs.sh, cs.sw, hp, wp,
                   spread.data() + p * hp * wp);
    correlate_any<T>(spread.data(), hp, wp, packed.data(), nullptr, transposed, as_ptr<T>(grad_x_), threads);
}

// grad_w (k, c / groups, r, s) and grad_b (k,) (either 0: not wanted) from grad (n, k, oh, ow).
template <typename T>
void conv2d_backward_weight(address_t grad_, address_t x_, const std::vector<index_t>& dims, address_t grad_w_,
                            address_t grad_b_, int nthreads) {
    const ConvShape cs = conv_shape(dims);
    const int threads = conv_threads(cs, nthreads);
    const T* grad = as_ptr<const T>(grad_);
    const index_t outputs = cs.oh * cs.ow;
    if (grad_b_) {
        T* grad_b = as_ptr<T>(grad_b_);
#pragma omp parallel for schedule(static) num_threads(threads)
        for (index_t ko = 0; ko < cs.k; ++ko) {
            T total = 0;
            for (index_t img = 0; img < cs.n; ++img) {
                const T* g = grad + (img * cs.k + ko) * outputs;
                T part = 0;
#pragma omp simd reduction(+ : part)
                for (index_t q = 0; q < outputs; ++q) part += g[q];
                total += part;
            }
            grad_b[ko] = total;
        }
    }
    if (!grad_w_) return;
    if (batch_layout_pays<T>(cs.n)) {
        const index_t hp = cs.hp(), wp = cs.wp();
        const auto planes = batch_input(as_ptr<const T>(x_), cs, hp, wp, threads);
        const index_t rows = gradient_plane_rows(cs.oh, cs.ow);
        Uninitialized<T> grads(batch_planes_size<T>(cs.n, cs.k, rows, cs.ow));  // written whole below
        to_batch_planes(grad, cs.n, cs.k, cs.oh, cs.ow, 0, 0, 1, 1, rows, cs.ow, grads.data(), threads);
        batch_weight_gradient(grads.data(), cs.ow, rows * cs.ow * Simd<T>::kWidth, planes.data(), hp, wp, cs,
                              as_ptr<T>(grad_w_), threads);
        return;
    }
    // grad_w (per group) = G (kg × positions) · im2col(x)ᵀ, both operands contiguous along the
    // positions: the form of linear_tiles.h's dot_block. Small images are taken several at a
    // time (G's rows gathered beside their im2col columns), so each dot product runs over a few
    // thousand positions rather than LeNet's 100, which left dot_block mostly horizontal sums.
    // Threads take images and keep partial sums, added in a fixed order.
    const index_t hp = cs.hp(), wp = cs.wp(), cg = cs.cg(), kg = cs.kg(), taps = cg * cs.r * cs.s;
    const index_t batch = std::max<index_t>(1, kImagePositions / std::max<index_t>(outputs, 1));
    const T* x = as_ptr<const T>(x_);
    const int parts = static_cast<int>(std::min<index_t>(threads, std::max<index_t>(cs.n, 1)));
    std::vector<T> partial(index_t(parts) * cs.k * taps, T(0));
#pragma omp parallel num_threads(parts)
    {
        const int t = omp_get_thread_num();
        index_t first, last;
        split_range(cs.n, parts, t, first, last);
        const index_t span = std::min(batch, std::max<index_t>(last - first, 1)) * outputs;
        std::vector<T> planes(padded_size<T>(cg, hp, wp, cs.sw)), columns(taps * span), rows(kg * span),
            dots(kg * taps);
        T* mine = partial.data() + index_t(t) * cs.k * taps;
        for (index_t img0 = first; img0 < last; img0 += batch) {
            const index_t images = std::min(batch, last - img0), width = images * outputs;
            for (index_t g = 0; g < cs.groups; ++g) {
                for (index_t e = 0; e < images; ++e) {
                    const index_t img = img0 + e;
                    pad_planes(x + (img * cs.c + g * cg) * cs.h * cs.w, cg, cs.h, cs.w, cs.ph, cs.pw, 1, 1, hp, wp,
                               planes.data());
                    for (index_t i = 0; i < cg; ++i)
                        for (index_t a = 0; a < cs.r; ++a)
                            for (index_t b = 0; b < cs.s; ++b) {
                                T* dst = columns.data() + ((i * cs.r + a) * cs.s + b) * width + e * outputs;
                                const T* src = planes.data() + i * hp * wp + a * cs.dh * wp + b * cs.dw;
                                for (index_t row = 0; row < cs.oh; ++row) {
                                    const T* in = src + row * cs.sh * wp;
                                    if (cs.sw == 1) {
                                        std::copy(in, in + cs.ow, dst + row * cs.ow);
                                    } else {
                                        for (index_t col = 0; col < cs.ow; ++col)
                                            dst[row * cs.ow + col] = in[col * cs.sw];
                                    }
                                }
                            }
                    for (index_t o = 0; o < kg; ++o) {
                        const T* src = grad + (img * cs.k + g * kg + o) * outputs;
                        std::copy(src, src + outputs, rows.data() + o * width + e * outputs);
                    }
                }
                dot_block(rows.data(), kg, width, columns.data(), static_cast<const T*>(nullptr), taps, dots.data());
                T* acc = mine + g * kg * taps;
                for (index_t e = 0; e < kg * taps; ++e) acc[e] += dots[e];
            }
        }
    }
    reduce_partials(partial.data(), parts, cs.k * taps, T(1), as_ptr<T>(grad_w_), threads);
}

#define FASTML_CONV2D(T)                                                                                            \
    template void conv2d_forward<T>(address_t, address_t, address_t, const std::vector<index_t>&, address_t, int); \
    template void conv2d_backward_input<T>(address_t, address_t, const std::vector<index_t>&, address_t, int);     \
    template void conv2d_backward_weight<T>(address_t, address_t, const std::vector<index_t>&, address_t, address_t, \
                                            int);
FASTML_CONV2D(float)
FASTML_CONV2D(double)
#undef FASTML_CONV2D

}  // namespace fastml
