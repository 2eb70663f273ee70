// Softmax cross-entropy over rows of logits (fastml.nn.CrossEntropyLoss on the CPU, and the
// row kernel of the chunked linear + cross-entropy): each row's loss and its scaled gradient in
// one parallel pass over the rows (cross_entropy_rows.h), plus the check of index targets.
#include <algorithm>
#include <tuple>

#include "cross_entropy_rows.h"
#include "kernels.h"

namespace fastml {

// logits (m, c); index (m,) int64 or probs (m, c); weight (c,) or 0; row_scale (m,) or 0: the
// gradient of row i is scaled by scale · row_scale[i] (or scale). row_loss (m,) and grad (m, c)
// are written when given; grad may be logits.
template <typename T>
void cross_entropy_rows(address_t logits_, address_t index_, address_t probs_, address_t weight_, index_t m,
                        index_t c, std::int64_t ignore_index, double smoothing, double scale, address_t row_scale_,
                        address_t row_loss_, address_t grad_, int nthreads) {
    const T* logits = as_ptr<const T>(logits_);
    const T* row_scale = as_ptr<const T>(row_scale_);
    T *row_loss = as_ptr<T>(row_loss_), *grad = as_ptr<T>(grad_);
    const RowTargets<T> targets{as_ptr<const std::int64_t>(index_), as_ptr<const T>(probs_),
                                as_ptr<const T>(weight_), ignore_index, T(smoothing)};
    // A row costs about 30 flops per class (three passes, the exponential's polynomial). Blocks
    // of rows, so that short rows go several at a time (cross_entropy_block).
    constexpr index_t kBlockRows = 64;
    const index_t blocks = (m + kBlockRows - 1) / kBlockRows;
    auto scale_of = [&](index_t i) { return row_scale ? T(scale * double(row_scale[i])) : T(scale); };
#pragma omp parallel for num_threads(threads_for(m * c * 30, nthreads)) schedule(static)
    for (index_t b = 0; b < blocks; ++b) {
        const index_t i0 = b * kBlockRows, rows = std::min(kBlockRows, m - i0);
        cross_entropy_block(logits + i0 * c, rows, c, targets, i0, scale_of, grad ? grad + i0 * c : nullptr,
                            [&](index_t r, double loss) {
                                if (row_loss) row_loss[i0 + r] = T(loss);
                            });
    }
}

// Checks index targets and sums their class weights: returns (Σ w[t_i] over the rows not
// ignored (their count without weights), the first target outside [0, c) that is not
// ignore_index, whether there is one). Sequential: the first bad target is torch's error.
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_target_total(address_t index_, address_t weight_, index_t m,
                                                                  index_t c, std::int64_t ignore_index) {
    const std::int64_t* index = as_ptr<const std::int64_t>(index_);
    const T* weight = as_ptr<const T>(weight_);
    double total = 0.0;
    for (index_t i = 0; i < m; ++i) {
        const std::int64_t t = index[i];
        if (t == ignore_index) continue;
        if (t < 0 || t >= c) return {total, t, true};
        total += weight ? double(weight[t]) : 1.0;
    }
    return {total, 0, false};
}

#define FASTML_INSTANTIATE_CROSS_ENTROPY(T)                                                                          \
    template void cross_entropy_rows<T>(address_t, address_t, address_t, address_t, index_t, index_t, std::int64_t, \
                                        double, double, address_t, address_t, address_t, int);                     \
    template std::tuple<double, std::int64_t, bool> cross_entropy_target_total<T>(address_t, address_t, index_t,   \
                                                                                  index_t, std::int64_t);
FASTML_INSTANTIATE_CROSS_ENTROPY(float)
FASTML_INSTANTIATE_CROSS_ENTROPY(double)

}  // namespace fastml
