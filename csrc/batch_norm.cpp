// Batch normalisation over the batch's own statistics (training mode), with an optional ReLU
// fused in: semantics in fastml/ops/batch_norm/reference.py.
//
// x is seen as (n, c, l), l = H·W, in one of torch's two layouts:
//   contiguous (NCHW):    element (i, ch, p) at (i·c + ch)·l + p: planes of l values per channel;
//   channels-last (NHWC): element (i, ch, p) at (i·l + p)·c + ch: rows of c values.
// Either way the flat range [0, n·c·l) is split evenly between threads, so a batch of one image
// with few channels keeps both cores busy as well as a large batch does.
//
// Memory passes (what bounds these kernels: a few flops per element):
//   forward:  statistics (read x), then normalise (+ ReLU) (read x, write out): 2 reads, 1 write.
//             torch's own runs mean and variance as two passes, normalises in a third, and a
//             separate ReLU reads and writes once more: 4 reads, 2 writes.
//   backward: Σg and Σg·(x − mean) per channel (read grad, x), then grad_input (read grad, x,
//             write): 4 reads, 1 write; the ReLU's mask is recomputed from x, never stored.
//             torch's ReLU backward then batch-norm backward: 6 reads, 2 writes.
//
// Sums: per thread, per channel, in double, fed by partial sums in T over short runs (kRun
// values), so float32 rounding stays that of a short sum. The variance is summed around a shift
// per channel (the channel's first value in the batch), which keeps E[d²] − E[d]² from cancelling
// when the mean is large against the spread. Threads' sums combine in a fixed order:
// deterministic for a given thread count.
#include <cmath>
#include <vector>

#include "kernels.h"

namespace fastml {

namespace {

constexpr index_t kRun = 256;  // values a T partial sum takes before it is added to the double one

// x · a + b (common.h's multiply_add): forward's output and backward's ReLU mask go through this
// one function, so they see the same value bit for bit.
template <typename T>
inline T affine(T x, T a, T b) {
    return multiply_add(x, a, b);
}

// The per-channel scale and shift of forward's formula: scale = invstd · weight, shift = bias −
// mean · scale (weight 1, bias 0 where absent), rounded in T as reference.affine rounds them.
template <typename T>
void channel_affine(const T* stats, const T* weight, const T* bias, index_t c, T* scale, T* shift) {
    const T *mean = stats, *invstd = stats + 2 * c;
    for (index_t ch = 0; ch < c; ++ch) {
        scale[ch] = weight ? invstd[ch] * weight[ch] : invstd[ch];
        const T product = mean[ch] * scale[ch];
        shift[ch] = bias ? bias[ch] - product : -product;
    }
}

// Calls body(ch, begin, len) for each piece of one plane in thread t's share of the flat range
// [0, n·c·l) of a contiguous (NCHW) tensor: `begin` is the flat index of the piece's first value.
template <typename Body>
void for_plane_pieces(index_t planes, index_t c, index_t l, int threads, int t, Body&& body) {
    index_t begin, end;
    split_range(planes * l, threads, t, begin, end);
    while (begin < end) {
        const index_t plane = begin / l, offset = begin - plane * l;
        const index_t len = std::min(l - offset, end - begin);
        body(plane % c, begin, len);
        begin += len;
    }
}

// Adds the threads' double sums (threads × width, row-major) into the first row, in order.
inline void combine_threads(std::vector<double>& sums, int threads, index_t width) {
    for (int t = 1; t < threads; ++t)
        for (index_t j = 0; j < width; ++j) sums[j] += sums[t * width + j];
}

// Per-channel Σ(x − shift) and Σ(x − shift)² into sums[t·2c + ch] and sums[t·2c + c + ch].
template <typename T>
void shifted_sums(const T* x, index_t n, index_t c, index_t l, bool channels_last, const T* shift, int threads,
                  std::vector<double>& sums) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        double* sum = sums.data() + t * 2 * c;
        double* squares = sum + c;
        std::fill(sum, sum + 2 * c, 0.0);
        if (channels_last) {
            Uninitialized<T> part(2 * c);
            T *part_sum = part.data(), *part_squares = part.data() + c;
            index_t begin, end;
            split_range(n * l, threads, t, begin, end);
            for (index_t run = begin; run < end; run += kRun) {
                std::fill(part_sum, part_sum + 2 * c, T(0));
                for (index_t row = run; row < std::min(end, run + kRun); ++row) {
                    const T* xr = x + row * c;
#pragma omp simd
                    for (index_t ch = 0; ch < c; ++ch) {
                        const T d = xr[ch] - shift[ch];
                        part_sum[ch] += d;
                        part_squares[ch] += d * d;
                    }
                }
                for (index_t ch = 0; ch < c; ++ch) {
                    sum[ch] += part_sum[ch];
                    squares[ch] += part_squares[ch];
                }
            }
        } else {
            for_plane_pieces(n * c, c, l, threads, t, [&](index_t ch, index_t first, index_t len) {
                const T* xp = x + first;
                const T s = shift[ch];
                for (index_t run = 0; run < len; run += kRun) {
                    T part_sum = 0, part_squares = 0;
                    const index_t stop = std::min(len, run + kRun);
#pragma omp simd reduction(+ : part_sum, part_squares)
                    for (index_t p = run; p < stop; ++p) {
                        const T d = xp[p] - s;
                        part_sum += d;
                        part_squares += d * d;
                    }
                    sum[ch] += part_sum;
                    squares[ch] += part_squares;
                }
            });
        }
    }
    combine_threads(sums, threads, 2 * c);
}

// out = affine(x, scale, shift), then the ReLU (NaN kept: NaN < 0 is false) where relu.
template <typename T>
void normalise(const T* x, index_t n, index_t c, index_t l, bool channels_last, const T* scale, const T* shift,
               bool relu, T* out, int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        if (channels_last) {
            index_t begin, end;
            split_range(n * l, threads, t, begin, end);
            for (index_t row = begin; row < end; ++row) {
                const T* xr = x + row * c;
                T* yr = out + row * c;
                if (relu) {
#pragma omp simd
                    for (index_t ch = 0; ch < c; ++ch) {
                        const T y = affine(xr[ch], scale[ch], shift[ch]);
                        yr[ch] = y < T(0) ? T(0) : y;
                    }
                } else {
#pragma omp simd
                    for (index_t ch = 0; ch < c; ++ch) yr[ch] = affine(xr[ch], scale[ch], shift[ch]);
                }
            }
        } else {
            for_plane_pieces(n * c, c, l, threads, t, [&, relu](index_t ch, index_t first, index_t len) {
                const T *xp = x + first, a = scale[ch], b = shift[ch];
                T* yp = out + first;
                if (relu) {
#pragma omp simd
                    for (index_t p = 0; p < len; ++p) {
                        const T y = affine(xp[p], a, b);
                        yp[p] = y < T(0) ? T(0) : y;
                    }
                } else {
#pragma omp simd
                    for (index_t p = 0; p < len; ++p) yp[p] = affine(xp[p], a, b);
                }
            });
        }
    }
}

// Per-channel Σg and Σg·(x − mean), g = grad masked by the ReLU where relu (torch's ReLU
// backward: 0 where its output ≤ 0, so a NaN output passes the gradient), into
// sums[t·2c + ch] and sums[t·2c + c + ch].
template <typename T>
void gradient_sums(const T* grad, const T* x, index_t n, index_t c, index_t l, bool channels_last, const T* mean,
                   const T* scale, const T* shift, bool relu, int threads, std::vector<double>& sums) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        double* sum = sums.data() + t * 2 * c;
        double* products = sum + c;
        std::fill(sum, sum + 2 * c, 0.0);
        if (channels_last) {
            Uninitialized<T> part(2 * c);
            T *part_sum = part.data(), *part_products = part.data() + c;
            index_t begin, end;
            split_range(n * l, threads, t, begin, end);
            for (index_t run = begin; run < end; run += kRun) {
                std::fill(part_sum, part_sum + 2 * c, T(0));
                for (index_t row = run; row < std::min(end, run + kRun); ++row) {
                    const T *gr = grad + row * c, *xr = x + row * c;
#pragma omp simd
                    for (index_t ch = 0; ch < c; ++ch) {
                        const T g = relu && affine(xr[ch], scale[ch], shift[ch]) <= T(0) ? T(0) : gr[ch];
                        part_sum[ch] += g;
                        part_products[ch] += g * (xr[ch] - mean[ch]);
                    }
                }
                for (index_t ch = 0; ch < c; ++ch) {
                    sum[ch] += part_sum[ch];
                    products[ch] += part_products[ch];
                }
            }
        } else {
            for_plane_pieces(n * c, c, l, threads, t, [&, relu](index_t ch, index_t first, index_t len) {
                const T *gp = grad + first, *xp = x + first;
                const T m = mean[ch], a = scale[ch], b = shift[ch];
                for (index_t run = 0; run < len; run += kRun) {
                    T part_sum = 0, part_products = 0;
                    const index_t stop = std::min(len, run + kRun);
#pragma omp simd reduction(+ : part_sum, part_products)
                    for (index_t p = run; p < stop; ++p) {
                        const T g = relu && affine(xp[p], a, b) <= T(0) ? T(0) : gp[p];
                        part_sum += g;
                        part_products += g * (xp[p] - m);
                    }
                    sum[ch] += part_sum;
                    products[ch] += part_products;
                }
            });
        }
    }
    combine_threads(sums, threads, 2 * c);
}

// grad_input = (g − mean(g) − (x − mean) · k) · scale per channel, k = invstd² · mean(g · (x −
// mean)) (reference.py's formula). x − mean is formed first, as there: folding the mean into a
// constant term instead would cancel when the mean is large against the spread.
template <typename T>
void input_gradient(const T* grad, const T* x, index_t n, index_t c, index_t l, bool channels_last, const T* mean,
                    const T* scale, const T* shift, bool relu, const T* k, const T* mean_g, T* grad_input,
                    int threads) {
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        if (channels_last) {
            index_t begin, end;
            split_range(n * l, threads, t, begin, end);
            for (index_t row = begin; row < end; ++row) {
                const T *gr = grad + row * c, *xr = x + row * c;
                T* out = grad_input + row * c;
#pragma omp simd
                for (index_t ch = 0; ch < c; ++ch) {
                    const T g = relu && affine(xr[ch], scale[ch], shift[ch]) <= T(0) ? T(0) : gr[ch];
                    out[ch] = (g - mean_g[ch] - (xr[ch] - mean[ch]) * k[ch]) * scale[ch];
                }
            }
        } else {
            for_plane_pieces(n * c, c, l, threads, t, [&, relu](index_t ch, index_t first, index_t len) {
                const T *gp = grad + first, *xp = x + first;
                const T m = mean[ch], a = scale[ch], b = shift[ch], kc = k[ch], mg = mean_g[ch];
                T* out = grad_input + first;
#pragma omp simd
                for (index_t p = 0; p < len; ++p) {
                    const T g = relu && affine(xp[p], a, b) <= T(0) ? T(0) : gp[p];
                    out[p] = (g - mg - (xp[p] - m) * kc) * a;
                }
            });
        }
    }
}

}  // namespace

template <typename T>
void batch_norm_forward(address_t x_, index_t n, index_t c, index_t l, bool channels_last, address_t weight_,
                        address_t bias_, double eps, bool relu, address_t out_, address_t stats_, int nthreads) {
    const T *x = as_ptr<const T>(x_), *weight = as_ptr<const T>(weight_), *bias = as_ptr<const T>(bias_);
    T *out = as_ptr<T>(out_), *stats = as_ptr<T>(stats_);
    const index_t count = n * l;  // values per channel (≥ 1: Python hands empty tensors to the reference)
    const int threads = threads_for(count * c, nthreads);
    // The shift: each channel's first value, x[0, ch, 0], where finite (an infinite one would
    // make every difference infinite or NaN, where torch's mean is ±inf).
    std::vector<T> shift(c);
    for (index_t ch = 0; ch < c; ++ch) {
        const T first = channels_last ? x[ch] : x[ch * l];
        shift[ch] = std::isfinite(first) ? first : T(0);
    }
    std::vector<double> sums(std::size_t(threads) * 2 * c);
    shifted_sums(x, n, c, l, channels_last, shift.data(), threads, sums);
    for (index_t ch = 0; ch < c; ++ch) {
        const double mean_shift = sums[ch] / double(count);
        const double spread = sums[c + ch] / double(count) - mean_shift * mean_shift;
        const double var = spread < 0.0 ? 0.0 : spread;  // (rounding can take it below 0; NaN stays NaN)
        stats[ch] = T(double(shift[ch]) + mean_shift);
        stats[c + ch] = T(var);
        stats[2 * c + ch] = T(1.0 / std::sqrt(var + eps));
    }
    std::vector<T> scale(c), offset(c);
    channel_affine(stats, weight, bias, c, scale.data(), offset.data());
    normalise(x, n, c, l, channels_last, scale.data(), offset.data(), relu, out, threads);
}

template <typename T>
void batch_norm_backward(address_t grad_, address_t x_, index_t n, index_t c, index_t l, bool channels_last,
                         address_t weight_, address_t bias_, address_t stats_, bool relu, address_t grad_input_,
                         address_t grad_weight_, address_t grad_bias_, int nthreads) {
    const T *grad = as_ptr<const T>(grad_), *x = as_ptr<const T>(x_), *stats = as_ptr<const T>(stats_);
    const T *weight = as_ptr<const T>(weight_), *bias = as_ptr<const T>(bias_);
    T *grad_input = as_ptr<T>(grad_input_), *grad_weight = as_ptr<T>(grad_weight_), *grad_bias = as_ptr<T>(grad_bias_);
    const index_t count = n * l;
    const int threads = threads_for(count * c, nthreads);
    std::vector<T> scale(c), shift(c);
    channel_affine(stats, weight, bias, c, scale.data(), shift.data());
    std::vector<double> sums(std::size_t(threads) * 2 * c);
    const T *mean = stats, *invstd = stats + 2 * c;
    gradient_sums(grad, x, n, c, l, channels_last, mean, scale.data(), shift.data(), relu, threads, sums);
    std::vector<T> k(c), mean_g(c);
    for (index_t ch = 0; ch < c; ++ch) {
        const double sum_g = sums[ch], sum_gc = sums[c + ch], inv = double(invstd[ch]);
        if (grad_bias) grad_bias[ch] = T(sum_g);
        if (grad_weight) grad_weight[ch] = T(sum_gc * inv);
        k[ch] = T(inv * inv * sum_gc / double(count));
        mean_g[ch] = T(sum_g / double(count));
    }
    if (grad_input)
        input_gradient(grad, x, n, c, l, channels_last, mean, scale.data(), shift.data(), relu, k.data(),
                       mean_g.data(), grad_input, threads);
}

template void batch_norm_forward<float>(address_t, index_t, index_t, index_t, bool, address_t, address_t, double,
                                        bool, address_t, address_t, int);
template void batch_norm_forward<double>(address_t, index_t, index_t, index_t, bool, address_t, address_t, double,
                                         bool, address_t, address_t, int);
template void batch_norm_backward<float>(address_t, address_t, index_t, index_t, index_t, bool, address_t, address_t,
                                         address_t, bool, address_t, address_t, address_t, int);
template void batch_norm_backward<double>(address_t, address_t, index_t, index_t, index_t, bool, address_t,
                                          address_t, address_t, bool, address_t, address_t, address_t, int);

}  // namespace fastml
