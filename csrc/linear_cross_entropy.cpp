// Fused linear + softmax cross-entropy for small heads (the course's softmax regression, an
// MLP's last layer): one pass over X computes a row block's logits X W^T + b, each row's loss
// and logit gradient (cross_entropy_rows.h), and from that gradient the block's input gradient
// and its share of the weight and bias gradients, while the block is in cache. The N × C logits
// never exist whole, and the whole step is one call instead of torch's dozen.
//
// Large heads go chunk by chunk through a vendor GEMM instead (fastml/ops/linear_cross_entropy/
// chunked.py): per-thread copies of a C × D weight gradient only pay off while it is small.
#include <tuple>
#include <vector>

#include "cross_entropy_rows.h"
#include "kernels.h"
#include "linear_tiles.h"

namespace fastml {
namespace {
constexpr index_t kBlockRows = 32;
}  // namespace

// The reduction's scale and the index targets' check come from cross_entropy_scale: one call from
// Python rather than two (a softmax-regression step is mostly such fixed costs).
template <typename T>
std::tuple<std::int64_t, bool> linear_cross_entropy_forward(address_t x_, address_t w_, address_t b_, address_t index_,
                                                           address_t probs_, address_t weight_, index_t n, index_t d,
                                                           index_t c, std::int64_t ignore_index, double smoothing,
                                                           int reduction, address_t row_loss_, address_t loss_total_,
                                                           address_t grad_x_, address_t grad_w_, address_t grad_b_,
                                                           int nthreads) {
    const auto [scale, bad, found] = cross_entropy_scale<T>(index_, weight_, n, c, ignore_index, reduction);
    if (found) return {bad, true};
    const T *x = as_ptr<const T>(x_), *w = as_ptr<const T>(w_), *bias = as_ptr<const T>(b_);
    T *row_loss = as_ptr<T>(row_loss_), *loss_total = as_ptr<T>(loss_total_);
    T *grad_x = as_ptr<T>(grad_x_), *grad_w = as_ptr<T>(grad_w_), *grad_b = as_ptr<T>(grad_b_);
    const RowTargets<T> targets{as_ptr<const std::int64_t>(index_), as_ptr<const T>(probs_),
                                as_ptr<const T>(weight_), ignore_index, T(smoothing)};
    const bool want_grad = grad_x || grad_w || grad_b;
    const int threads = threads_for(n * d * c * (want_grad ? 3 : 1), nthreads);
    std::vector<T> grad_w_parts(grad_w ? threads * c * d : 0, T(0)), grad_b_parts(grad_b ? threads * c : 0, T(0));
    std::vector<double> loss_parts(threads, 0.0);

#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t begin, end;
        split_range(n, threads, t, begin, end);
        std::vector<T> logits(kBlockRows * c);
        T* acc_w = grad_w ? grad_w_parts.data() + t * c * d : nullptr;
        T* acc_b = grad_b ? grad_b_parts.data() + t * c : nullptr;
        CompensatedSum loss;
        for (index_t r0 = begin; r0 < end; r0 += kBlockRows) {
            const index_t rows = std::min(kBlockRows, end - r0);
            const T* xb = x + r0 * d;
            dot_block(xb, rows, d, w, bias, c, logits.data());
            cross_entropy_block(logits.data(), rows, c, targets, r0, [&](index_t) { return T(scale); },
                                want_grad ? logits.data() : nullptr, [&](index_t r, double row) {
                                    if (row_loss) row_loss[r0 + r] = T(row);
                                    loss.add(row);
                                });
            if (grad_x) combine_rows(logits.data(), rows, c, w, d, grad_x + r0 * d);
            if (acc_w) accumulate_outer(logits.data(), xb, rows, d, c, acc_w);
            if (acc_b)
                for (index_t r = 0; r < rows; ++r)
                    for (index_t j = 0; j < c; ++j) acc_b[j] += logits[r * c + j];
        }
        loss_parts[t] = loss.value();
        if (grad_w) {  // the threads' weight gradients added by the same team: no second fork and join
#pragma omp barrier
            split_range(c * d, threads, t, begin, end);
            reduce_partials_range(grad_w_parts.data(), threads, c * d, T(1), grad_w, begin, end);
        }
    }
    if (grad_b) reduce_partials(grad_b_parts.data(), threads, c, T(1), grad_b, 1);
    if (loss_total) {
        CompensatedSum sum;
        for (double part : loss_parts) sum.add(part);
        *loss_total = T(sum.value() * scale);
    }
    return {0, false};
}

template std::tuple<std::int64_t, bool> linear_cross_entropy_forward<float>(
    address_t, address_t, address_t, address_t, address_t, address_t, index_t, index_t, index_t, std::int64_t, double,
    int, address_t, address_t, address_t, address_t, address_t, int);
template std::tuple<std::int64_t, bool> linear_cross_entropy_forward<double>(
    address_t, address_t, address_t, address_t, address_t, address_t, index_t, index_t, index_t, std::int64_t, double,
    int, address_t, address_t, address_t, address_t, address_t, int);

}  // namespace fastml
