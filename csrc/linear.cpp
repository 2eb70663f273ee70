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
// Rows a thread's outputs take at once when threads split the outputs: its slice of grad_weight
// is read and written once per block, and one tile's x slab (rows × 2 vectors, 16 KiB at 256
// float rows) stays in L1 across the block's outputs.
constexpr index_t kSplitBlockRows = 256;
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

// grad_input[i] = sum_j g[i, j] * W[j], four rows at a time (combine_rows).
template <typename T>
void linear_backward_input(address_t g_, address_t w_, index_t n, index_t d, index_t o,
                           address_t grad_x_, int nthreads) {
    const T *g = as_ptr<const T>(g_), *w = as_ptr<const T>(w_);
    T* grad_x = as_ptr<T>(grad_x_);
    const index_t quads = (n + kRows - 1) / kRows;
#pragma omp parallel for num_threads(threads_for(n * d * o, nthreads)) schedule(static)
    for (index_t q = 0; q < quads; ++q) {
        const index_t r0 = q * kRows;
        combine_rows(g + r0 * o, std::min<index_t>(kRows, n - r0), o, w, d, grad_x + r0 * d);
    }
}

// grad_weight = g^T x (o × d) and, when requested, grad_bias = column sums of g (o).
template <typename T>
void linear_backward_weight(address_t g_, address_t x_, index_t n, index_t d, index_t o,
                            address_t grad_w_, address_t grad_b_, int nthreads) {
    const T *g = as_ptr<const T>(g_), *x = as_ptr<const T>(x_);
    T *grad_w = as_ptr<T>(grad_w_), *grad_b = as_ptr<T>(grad_b_);
    const int threads = threads_for(n * d * std::max<index_t>(o, 1), nthreads);
    // Either the threads split the rows and each sums a partial o × d, zeroed, read and written
    // once per row block (from memory once it outgrows half the L2) and reduced at the end; or
    // they split the outputs (each at least one 4-output tile), and each reads all of x but
    // writes only its own rows of grad_weight. The one moving fewer elements runs: at an MLP
    // layer (256 x 784 -> 256, 2 threads) the partials, 800 KB each, ran 1.8x slower (Zen 3);
    // at 4096 x 512 -> 64 (128 KB partials, in L2) reading x twice ran 1.1x slower.
    // (One thread: no partials.)
    const index_t blocks_per_thread = (n / threads + kBlockRows - 1) / kBlockRows;
    const bool partial_in_cache = o * d * index_t(sizeof(T)) <= cache_sizes().l2 / 2;
    const index_t partial_moves = o * d * threads * (3 + (partial_in_cache ? 0 : 2 * blocks_per_thread));
    const index_t split_moves = (threads - 1) * n * d;
    const bool split_outputs =
        o >= index_t(threads) * 4 &&
        (split_moves < partial_moves || index_t(threads) * o * d * index_t(sizeof(T)) > kMaxPartialBytes);

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
            std::vector<T> coef(kSplitBlockRows * cols);
            T* acc = grad_w + begin * d;
            std::fill(acc, acc + cols * d, T(0));
            for (index_t r0 = 0; r0 < n && cols > 0; r0 += kSplitBlockRows) {
                const index_t rows = std::min(kSplitBlockRows, n - r0);
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
