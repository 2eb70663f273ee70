// Softmax cross-entropy over rows of logits (fastml.nn.CrossEntropyLoss on the CPU, and the
// row kernel of the chunked linear + cross-entropy): each row's loss and its scaled gradient in
// one parallel pass over the rows (cross_entropy_rows.h), plus the check of index targets.
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
    // A row costs about 30 flops per class (three passes, the exponential's polynomial). Each
    // thread takes a contiguous range of rows, as the per-row loop's static schedule gave it, and
    // passes it whole to cross_entropy_block, so that short rows go four at a time. (Blocks of a
    // fixed number of rows had cut the parallelism of a few long rows: 64 rows of 32000 classes
    // ran on one thread.)
    auto scale_of = [&](index_t i) { return row_scale ? T(scale * double(row_scale[i])) : T(scale); };
#pragma omp parallel num_threads(threads_for(m * c * 30, nthreads))
    {
        index_t begin, end;
        split_range(m, omp_get_num_threads(), omp_get_thread_num(), begin, end);
        cross_entropy_block(logits + begin * c, end - begin, c, targets, begin, scale_of,
                            grad ? grad + begin * c : nullptr, [&](index_t r, double loss) {
                                if (row_loss) row_loss[begin + r] = T(loss);
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
