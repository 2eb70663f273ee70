// Fused linear forward + squared loss (and its gradients) for linear regression.
//
// One pass over X: each row block's prediction P = X W^T + b, residual R = P - Y, the loss and
// the weight / bias gradients (sums of R-weighted rows) come from the same block of X while it
// is in cache. The N × O prediction never exists whole: a block of at most kBlockRows rows at a time.
// A lone output (linear regression's) may instead stream X four rows at a time (stream_rows).
#include <cmath>
#include <vector>

#include "kernels.h"
#include "linear_tiles.h"

namespace fastml {
namespace {

constexpr index_t kBlockRows = 64;
// Per-thread gradient copies up to this many bytes in all; beyond, threads split the outputs.
constexpr index_t kMaxPartialBytes = index_t(32) << 20;

struct Problem {
    index_t n, d, o;
    int reduction;  // 0 none, 1 mean, 2 sum
};

// One residual e, at flat index g of the (n, o) prediction: kept where asked, its square kept for
// reduction "none", and added to the loss in double.
template <typename T>
inline void record_residual(T e, index_t g, T* residual, T* loss_elems, double& loss) {
    if (residual) residual[g] = e;
    if (loss_elems) loss_elems[g] = e * e;
    loss += double(e) * double(e);
}

// Processes rows [row_begin, row_end) for outputs [col_begin, col_end) of the full problem.
// W, bias, Y, residual and loss are indexed by global column; grad_acc is (cols × d) local.
// prefetch: ask for each next row block while this one is computed (see linear_mse_forward).
template <typename T>
double process_rows(const Problem& p, const T* x, const T* w, const T* bias, const T* y,
                    index_t row_begin, index_t row_end, index_t col_begin, index_t col_end,
                    T* residual, T* loss_elems, T* grad_acc, T* grad_b_acc, bool prefetch) {
    const index_t d = p.d, o = p.o, cols = col_end - col_begin;
    // A row block is read twice (prediction, then gradient), and each block also loads and stores
    // the gradient tile (cols × d) once: the more rows, the less the tile costs each row. An
    // eighth of the L2 keeps the block there between its two reads, beside the weights and the
    // tile. (Half the L1 made 4-row blocks at MNIST's d = 784, where the tile's pass cost more than
    // x's: 1.33x slower on a Zen 4; bench/results/cpu-amd-epyc-2c-linear-mse-blocks.txt.)
    const index_t block_bytes = cache_sizes().l2 / 8;
    const index_t block_rows =
        std::clamp<index_t>(block_bytes / std::max<index_t>(1, d * index_t(sizeof(T))) / kRows * kRows, kRows,
                            kBlockRows);
    std::vector<T> pred(block_rows * cols);
    double loss = 0.0;
    for (index_t r0 = row_begin; r0 < row_end; r0 += block_rows) {
        const index_t rows = std::min(block_rows, row_end - r0);
        const T* xb = x + r0 * d;
        if (prefetch) prefetch_rows(xb + rows * d, std::min(block_rows, row_end - r0 - rows) * d);
        dot_block(xb, rows, d, w + col_begin * d, bias ? bias + col_begin : nullptr, cols, pred.data());
        for (index_t r = 0; r < rows; ++r) {
            for (index_t j = 0; j < cols; ++j) {
                const index_t g = (r0 + r) * o + col_begin + j;
                const T diff = pred[r * cols + j] - y[g];
                pred[r * cols + j] = diff;  // the block's residual, reused below
                record_residual(diff, g, residual, loss_elems, loss);
                if (grad_b_acc) grad_b_acc[j] += diff;
            }
        }
        // The block's gradient is summed in registers and added once (see accumulate_outer).
        if (grad_acc) accumulate_outer(pred.data(), xb, rows, d, cols, grad_acc);
    }
    return loss;
}

// How far ahead of the rows being read stream_rows asks for x, in bytes: 16 cache lines, as many
// misses as an L1 keeps in flight (16 fill buffers on an Ice Lake core). On an Ice Lake Xeon at
// 65536 x 256 -> 1 (2 threads) the kernel then read x as fast as a plain sum did (3.19 against
// 3.18 ms; 4.04 ms with no software prefetch); 4 KiB ahead took 3.41 ms, and asking for the next
// rows all at once rather than a few lines at a time slowed rows of 768 and 1024 by 10 to 15%.
constexpr index_t kStreamAheadBytes = 1024;

// Rows [r0, r0 + R) of a lone output (o = 1): their dots with w, residuals, loss terms, and their
// share of the weight gradient, added to grad_block while the rows are still in L1.
template <typename T, int R, bool Prefetch>
inline void stream_row_group(const T* x, index_t d, const T* w, T b, const T* y, index_t r0, T* residual,
                             T* loss_elems, T* grad_block, double& loss, T& grad_b) {
    using S = Simd<T>;
    using V = typename S::vec;
    constexpr index_t W = S::kWidth;
    const T* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + (r0 + r) * d;
    // Two accumulators a row: four rows make eight independent chains of FMAs, enough to cover
    // their latency (one a row left the dot latency-bound).
    V acc[R][2];
    zero_tile(acc);
    index_t k = 0;
    for (; k + 2 * W <= d; k += 2 * W) {
        if constexpr (Prefetch) {
            // The group's rows are consecutive in memory: each step asks for as many bytes as it
            // reads, in one sweep through them, from kStreamAheadBytes past the group's start (a
            // sweep in address order, not the four rows' own positions; the last d % 2W columns
            // of each group's share take no prefetch). The next group's first lines are asked
            // for during this one.
            constexpr index_t kStepBytes = R * 2 * W * index_t(sizeof(T));
            const char* line = reinterpret_cast<const char*>(xr[0]) + kStreamAheadBytes + R * k * index_t(sizeof(T));
            for (index_t byte = 0; byte < kStepBytes; byte += 64) __builtin_prefetch(line + byte, 0, 3);
        }
        V w0 = S::load(w + k), w1 = S::load(w + k + W);
        keep_in_register(w0);
        keep_in_register(w1);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            acc[r][0] += S::load(xr[r] + k) * w0;
            acc[r][1] += S::load(xr[r] + k + W) * w1;
        }
    }
    for (; k + W <= d; k += W) {
        V w0 = S::load(w + k);
        keep_in_register(w0);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][0] += S::load(xr[r] + k) * w0;
    }
    const index_t rest = d - k;  // the last d % W columns: masked loads, not a scalar loop
    if (rest > 0) {                // (a row of 13 features took 3x longer one column at a time)
        const V wk = S::load_first(w + k, rest, T(0));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r][1] += S::load_first(xr[r] + k, rest, T(0)) * wk;
    }
    T diff[R];
    for (int r = 0; r < R; ++r) {
        const T e = S::sum_by_halves(acc[r][0] + acc[r][1]) + b - y[r0 + r];
        diff[r] = e;
        record_residual(e, r0 + r, residual, loss_elems, loss);
        grad_b += e;
    }
    if (!grad_block) return;
    V coef[R];
    for (int r = 0; r < R; ++r) coef[r] = S::broadcast(diff[r]);
    for (k = 0; k + W <= d; k += W) {
        V g = S::load(grad_block + k);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) g += coef[r] * S::load(xr[r] + k);
        S::store(grad_block + k, g);
    }
    if (rest > 0) {
        V g = S::load_first(grad_block + k, rest, T(0));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) g += coef[r] * S::load_first(xr[r] + k, rest, T(0));
        S::store_first(grad_block + k, rest, g);
    }
}

// process_rows for a lone output, in one pass: kRows rows at a time are read from memory once,
// and their dots and gradient terms are formed while they are in L1. process_rows reads each
// 64-row block twice, the second time from the L2, and the memory stream waits meanwhile: on an
// Ice Lake Xeon at 65536 x 256 its kernel took 1.18x to 1.31x a plain sum's read of x. As there
// (its blocks of up to kBlockRows rows), the weight gradient is summed per kBlockRows rows, then
// added to grad_acc.
template <typename T, bool Prefetch>
double stream_rows(const T* x, index_t d, const T* w, const T* bias, const T* y, index_t row_begin,
                   index_t row_end, T* residual, T* loss_elems, T* grad_acc, T* grad_b_acc) {
    const T b = bias ? bias[0] : T(0);
    std::vector<T> grad_block(grad_acc ? d : 0);
    T* block = grad_acc ? grad_block.data() : nullptr;
    double loss = 0.0;
    T grad_b = 0;
    for (index_t r0 = row_begin; r0 < row_end; r0 += kBlockRows) {
        const index_t r1 = std::min(row_end, r0 + kBlockRows);
        index_t r = r0;
        for (; r + kRows <= r1; r += kRows)
            stream_row_group<T, kRows, Prefetch>(x, d, w, b, y, r, residual, loss_elems, block, loss, grad_b);
        for (; r < r1; ++r)
            stream_row_group<T, 1, false>(x, d, w, b, y, r, residual, loss_elems, block, loss, grad_b);
        if (block) {
            for (index_t k = 0; k < d; ++k) grad_acc[k] += block[k];
            std::fill(grad_block.begin(), grad_block.end(), T(0));
        }
    }
    if (grad_b_acc) *grad_b_acc += grad_b;
    return loss;
}

}  // namespace

// way: how the rows are read (kernels.h's LinearMseWay). kBlocksPrefetch adds a software
// prefetch of each next row block (prefetch_rows): out of cache it took a Zen 4's read of x at
// 65536 × 256 from 37 to 22 ns a row; an Ice Lake Xeon's own prefetchers follow the four row
// streams already, and there the same instructions cost 7 to 28%. kStream and kStreamPrefetch
// read x in one pass, with a steady prefetch in the second (stream_rows), for a lone output whose
// per-thread gradient copies fit kMaxPartialBytes (rows of up to millions of features); asked of
// any other problem, they read it in blocks without a prefetch. The caller's measured choice says which
// (fastml/ops/linear_mse/cpp_impl.py). The ways sum in different orders: which one a process runs
// may move the last bits of the loss and gradients, not more than float rounding does.
template <typename T>
void linear_mse_forward(address_t x_, address_t w_, address_t b_, address_t y_, index_t n,
                        index_t d, index_t o, int reduction, address_t loss_, address_t residual_,
                        address_t grad_w_, address_t grad_b_, int way, int nthreads) {
    const Problem p{n, d, o, reduction};
    const bool prefetch = way == kBlocksPrefetch;
    const bool stream = o == 1 && (way == kStream || way == kStreamPrefetch);
    const T *x = as_ptr<const T>(x_), *w = as_ptr<const T>(w_), *bias = as_ptr<const T>(b_),
            *y = as_ptr<const T>(y_);
    T *loss_out = as_ptr<T>(loss_), *residual = as_ptr<T>(residual_), *grad_w = as_ptr<T>(grad_w_),
      *grad_b = as_ptr<T>(grad_b_);
    T* loss_elems = reduction == 0 ? loss_out : nullptr;

    // mean over no elements is NaN (0 / 0), as in torch; the gradient of an empty sum is 0.
    const double count = double(n) * double(o);
    const double scale = reduction == 1 ? 1.0 / count : 1.0;
    const T grad_scale = T(n > 0 ? 2.0 * scale : 0.0);

    const int threads = threads_for(n * d * std::max<index_t>(o, 1), nthreads);
    const bool split_outputs =
        grad_w && threads > 1 && index_t(threads) * o * d * index_t(sizeof(T)) > kMaxPartialBytes;
    const int parts = split_outputs ? 1 : threads;
    std::vector<T> grad_parts(grad_w && !split_outputs ? parts * o * d : 0);
    std::vector<T> grad_b_parts(grad_b ? threads * o : 0);
    std::vector<double> loss_parts(threads, 0.0);

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t begin, end;
        if (split_outputs) {  // each thread owns columns [begin, end) over all rows
            split_range(o, threads, t, begin, end);
            if (begin < end) {
                T* acc = grad_w + begin * d;
                std::fill(acc, acc + (end - begin) * d, T(0));
                loss_parts[t] = process_rows(p, x, w, bias, y, 0, n, begin, end, residual,
                                             loss_elems, acc,
                                             grad_b ? grad_b_parts.data() + t * o + begin : nullptr, prefetch);
            }
        } else {  // each thread owns rows [begin, end) over all columns
            split_range(n, threads, t, begin, end);
            T* acc = grad_w ? grad_parts.data() + t * o * d : nullptr;
            T* acc_b = grad_b ? grad_b_parts.data() + t * o : nullptr;
            if (stream && way == kStreamPrefetch)
                loss_parts[t] = stream_rows<T, true>(x, d, w, bias, y, begin, end, residual, loss_elems, acc, acc_b);
            else if (stream)
                loss_parts[t] = stream_rows<T, false>(x, d, w, bias, y, begin, end, residual, loss_elems, acc, acc_b);
            else
                loss_parts[t] = process_rows(p, x, w, bias, y, begin, end, 0, o, residual, loss_elems,
                                             acc, acc_b, prefetch);
        }
    }

    if (grad_w) {
        if (split_outputs) {
            for (index_t i = 0; i < o * d; ++i) grad_w[i] *= grad_scale;
        } else {
            reduce_partials(grad_parts.data(), parts, o * d, grad_scale, grad_w, nthreads);
        }
    }
    if (grad_b) reduce_partials(grad_b_parts.data(), threads, o, grad_scale, grad_b, 1);
    if (reduction != 0) {
        double total = 0.0;
        for (double part : loss_parts) total += part;
        *loss_out = T(total * scale);
    }
}

// One epoch of the course's minibatch SGD on squared loss (y_hat - y)^2 / 2, in visiting order
// `order`: for each batch, w -= lr * (summed gradient) / batch_size. The last batch may be
// shorter and is still divided by batch_size, as the course's `sgd` does. Sequential by nature
// (each step needs the last), and tiny per step: one thread, no allocation in the loop.
template <typename T>
void linear_regression_sgd_epoch(address_t x_, address_t y_, address_t order_, index_t n,
                                 index_t d, index_t o, address_t w_, address_t b_, double lr,
                                 index_t batch_size) {
    const T *x = as_ptr<const T>(x_), *y = as_ptr<const T>(y_);
    const std::int64_t* order = as_ptr<const std::int64_t>(order_);
    T *w = as_ptr<T>(w_), *bias = as_ptr<T>(b_);
    std::vector<T> grad_w(o * d), grad_b(o), residual(o);
    const T step = T(lr / double(batch_size));
    for (index_t start = 0; start < n; start += batch_size) {
        const index_t stop = std::min(n, start + batch_size);
        std::fill(grad_w.begin(), grad_w.end(), T(0));
        std::fill(grad_b.begin(), grad_b.end(), T(0));
        for (index_t s = start; s < stop; ++s) {
            const index_t i = order[s];
            const T* xi = x + i * d;
            dot_rows<T, 1>(xi, d, w, bias, o, residual.data(), o);
            for (index_t j = 0; j < o; ++j) {
                const T diff = residual[j] - y[i * o + j];
                if (bias) grad_b[j] += diff;
                T* gj = grad_w.data() + j * d;
#pragma omp simd
                for (index_t k = 0; k < d; ++k) gj[k] += diff * xi[k];
            }
        }
        for (index_t i = 0; i < o * d; ++i) w[i] -= step * grad_w[i];
        if (bias)
            for (index_t j = 0; j < o; ++j) bias[j] -= step * grad_b[j];
    }
}

template void linear_mse_forward<float>(address_t, address_t, address_t, address_t, index_t, index_t,
                                        index_t, int, address_t, address_t, address_t, address_t, int, int);
template void linear_mse_forward<double>(address_t, address_t, address_t, address_t, index_t, index_t,
                                         index_t, int, address_t, address_t, address_t, address_t, int, int);
template void linear_regression_sgd_epoch<float>(address_t, address_t, address_t, index_t, index_t,
                                                 index_t, address_t, address_t, double, index_t);
template void linear_regression_sgd_epoch<double>(address_t, address_t, address_t, index_t, index_t,
                                                  index_t, address_t, address_t, double, index_t);

}  // namespace fastml
