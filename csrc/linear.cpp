// Linear layer y = x W^T + b and its gradients, for fastml.nn.Linear on the CPU.
//
// x (n × d), W (o × d), g = dL/dy (n × o), all row-major and contiguous. The forward pass and
// grad_input are parallel over row blocks; grad_weight sums per-thread partials in a fixed order
// (or, when o × d partials per thread would be large, splits the outputs between threads).
#include <vector>

#include "kernels.h"
#include "linear_tiles.h"

namespace fastml {
namespace {
constexpr index_t kBlockRows = 64;
constexpr index_t kMaxPartialBytes = index_t(32) << 20;
}  // namespace

template <typename T>
void linear_forward(address_t x_, address_t w_, address_t b_, index_t n, index_t d, index_t o,
                    address_t out_, int nthreads) {
    const T *x = as_ptr<const T>(x_), *w = as_ptr<const T>(w_), *bias = as_ptr<const T>(b_);
    T* out = as_ptr<T>(out_);
    const index_t blocks = (n + kBlockRows - 1) / kBlockRows;
#pragma omp parallel for num_threads(threads_for(n * d * o, nthreads)) schedule(static)
    for (index_t blk = 0; blk < blocks; ++blk) {
        const index_t r0 = blk * kBlockRows, rows = std::min(kBlockRows, n - r0);
        dot_block(x + r0 * d, rows, d, w, bias, o, out + r0 * o);
    }
}

// grad_input[i] = sum_j g[i, j] * W[j]: four rows share each loaded weight row.
template <typename T>
void linear_backward_input(address_t g_, address_t w_, index_t n, index_t d, index_t o,
                           address_t grad_x_, int nthreads) {
    const T *g = as_ptr<const T>(g_), *w = as_ptr<const T>(w_);
    T* grad_x = as_ptr<T>(grad_x_);
    const index_t quads = (n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(threads_for(n * d * o, nthreads)) schedule(static)
    for (index_t q = 0; q < quads; ++q) {
        const index_t r0 = q * kRows, rows = std::min<index_t>(kRows, n - r0);
        T* out = grad_x + r0 * d;
        std::fill(out, out + rows * d, T(0));
        const T* gq = g + r0 * o;
        if (rows == kRows) {
            T *o0 = out, *o1 = out + d, *o2 = out + 2 * d, *o3 = out + 3 * d;
            index_t j = 0;
            // Four weight rows at a time: each output vector is loaded and stored once per four
            // weight rows instead of once per row (the loop is otherwise load/store bound).
            for (; j + 4 <= o; j += 4) {
                const T* c = gq + j;
                const T *w0 = w + j * d, *w1 = w0 + d, *w2 = w1 + d, *w3 = w2 + d;
#pragma omp simd
                for (index_t k = 0; k < d; ++k) {
                    const T u0 = w0[k], u1 = w1[k], u2 = w2[k], u3 = w3[k];
                    o0[k] += c[0] * u0 + c[1] * u1 + c[2] * u2 + c[3] * u3;
                    o1[k] += c[o] * u0 + c[o + 1] * u1 + c[o + 2] * u2 + c[o + 3] * u3;
                    o2[k] += c[2 * o] * u0 + c[2 * o + 1] * u1 + c[2 * o + 2] * u2 + c[2 * o + 3] * u3;
                    o3[k] += c[3 * o] * u0 + c[3 * o + 1] * u1 + c[3 * o + 2] * u2 + c[3 * o + 3] * u3;
                }
            }
            for (; j < o; ++j) {
                const T c0 = gq[j], c1 = gq[o + j], c2 = gq[2 * o + j], c3 = gq[3 * o + j];
                const T* wj = w + j * d;
#pragma omp simd
                for (index_t k = 0; k < d; ++k) {
                    const T wk = wj[k];
                    o0[k] += c0 * wk, o1[k] += c1 * wk, o2[k] += c2 * wk, o3[k] += c3 * wk;
                }
            }
        } else {
            for (index_t r = 0; r < rows; ++r)
                for (index_t j = 0; j < o; ++j) {
                    const T c = gq[r * o + j];
                    const T* wj = w + j * d;
                    T* orow = out + r * d;
#pragma omp simd
                    for (index_t k = 0; k < d; ++k) orow[k] += c * wj[k];
                }
        }
    }
}

// grad_weight = g^T x (o × d) and, when requested, grad_bias = column sums of g (o).
template <typename T>
void linear_backward_weight(address_t g_, address_t x_, index_t n, index_t d, index_t o,
                            address_t grad_w_, address_t grad_b_, int nthreads) {
    const T *g = as_ptr<const T>(g_), *x = as_ptr<const T>(x_);
    T *grad_w = as_ptr<T>(grad_w_), *grad_b = as_ptr<T>(grad_b_);
    const int threads = threads_for(n * d * std::max<index_t>(o, 1), nthreads);
    const bool split_outputs =
        threads > 1 && index_t(threads) * o * d * index_t(sizeof(T)) > kMaxPartialBytes;

    if (grad_b) {
        std::fill(grad_b, grad_b + o, T(0));
        for (index_t i = 0; i < n; ++i)
            for (index_t j = 0; j < o; ++j) grad_b[j] += g[i * o + j];
    }
    if (!grad_w) return;
    if (split_outputs) {
#pragma omp parallel num_threads(threads)
        {
            index_t begin, end;
            split_range(o, threads, omp_get_thread_num(), begin, end);
            // g's columns [begin, end) are strided by o: gather each row block's slice.
            const index_t cols = end - begin;
            std::vector<T> coef(kBlockRows * cols);
            T* acc = grad_w + begin * d;
            std::fill(acc, acc + cols * d, T(0));
            for (index_t r0 = 0; r0 < n && cols > 0; r0 += kBlockRows) {
                const index_t rows = std::min(kBlockRows, n - r0);
                for (index_t r = 0; r < rows; ++r)
                    for (index_t j = 0; j < cols; ++j) coef[r * cols + j] = g[(r0 + r) * o + begin + j];
                accumulate_outer(coef.data(), x + r0 * d, rows, d, cols, acc);
            }
        }
        return;
    }
    std::vector<T> parts(threads * o * d, T(0));
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t begin, end;
        split_range(n, threads, t, begin, end);
        T* acc = parts.data() + t * o * d;
        for (index_t r0 = begin; r0 < end; r0 += kBlockRows) {
            const index_t rows = std::min(kBlockRows, end - r0);
            accumulate_outer(g + r0 * o, x + r0 * d, rows, d, o, acc);
        }
    }
    reduce_partials(parts.data(), threads, o * d, T(1), grad_w, nthreads);
}

#define FASTML_INSTANTIATE_LINEAR(T)                                                              \
    template void linear_forward<T>(address_t, address_t, address_t, index_t, index_t, index_t,   \
                                    address_t, int);                                              \
    template void linear_backward_input<T>(address_t, address_t, index_t, index_t, index_t,       \
                                           address_t, int);                                       \
    template void linear_backward_weight<T>(address_t, address_t, index_t, index_t, index_t,      \
                                            address_t, address_t, int);
FASTML_INSTANTIATE_LINEAR(float)
FASTML_INSTANTIATE_LINEAR(double)

}  // namespace fastml
