// Softmax cross-entropy over rows of logits (fastml.nn.CrossEntropyLoss on the CPU, and the
// row kernel of the chunked linear + cross-entropy): each row's loss and its scaled gradient in
// one parallel pass over the rows (cross_entropy_rows.h), plus the check of index targets.
#include <limits>
#include <tuple>
#include <vector>

#include "cross_entropy_rows.h"
#include "kernels.h"

namespace fastml {

namespace {
// The rows' pass shared by cross_entropy_rows and cross_entropy_forward: each thread takes a
// contiguous range of rows, as the per-row loop's static schedule gave it, and passes it whole to
// cross_entropy_block, so that short rows go four at a time. (Blocks of a fixed number of rows
// had cut the parallelism of a few long rows: 64 rows of 32000 classes ran on one thread.)
// Returns Σ of the rows' losses, each thread's part summed in double with compensation and the
// parts added in thread order (deterministic for a thread count).
template <typename T, typename ScaleOf>
double rows_in_parallel(const T* logits, index_t m, index_t c, const RowTargets<T>& targets, ScaleOf scale_of,
                        T* row_loss, T* grad, int nthreads) {
    // A row costs about 30 flops per class (three passes, the exponential's polynomial).
    const int threads = threads_for(m * c * 30, nthreads);
    std::vector<double> parts(threads, 0.0);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t begin, end;
        split_range(m, omp_get_num_threads(), t, begin, end);
        CompensatedSum loss;
        cross_entropy_block(logits + begin * c, end - begin, c, targets, begin, scale_of,
                            grad ? grad + begin * c : nullptr, [&](index_t r, double row) {
                                if (row_loss) row_loss[begin + r] = T(row);
                                loss.add(row);
                            });
        parts[t] = loss.value();
    }
    CompensatedSum sum;
    for (double part : parts) sum.add(part);
    return sum.value();
}
}  // namespace

// logits (m, c); index (m,) int64 or probs (m, c); weight (c,) or 0; row_scale (m,) or 0: the
// gradient of row i is scaled by scale · row_scale[i] (or scale). row_loss (m,) and grad (m, c)
// are written when given; grad may be logits.
template <typename T>
void cross_entropy_rows(address_t logits_, address_t index_, address_t probs_, address_t weight_, index_t m,
                        index_t c, std::int64_t ignore_index, double smoothing, double scale, address_t row_scale_,
                        address_t row_loss_, address_t grad_, int nthreads) {
    const T* row_scale = as_ptr<const T>(row_scale_);
    const RowTargets<T> targets{as_ptr<const std::int64_t>(index_), as_ptr<const T>(probs_),
                                as_ptr<const T>(weight_), ignore_index, T(smoothing)};
    auto scale_of = [&](index_t i) { return row_scale ? T(scale * double(row_scale[i])) : T(scale); };
    rows_in_parallel(as_ptr<const T>(logits_), m, c, targets, scale_of, as_ptr<T>(row_loss_), as_ptr<T>(grad_),
                     nthreads);
}

// The whole forward of a loss in one call (fastml/ops/cross_entropy/cpp_impl.py): the targets'
// check and the reduction's scale (cross_entropy_scale), each row's loss and scaled gradient, and
// for "mean" / "sum" the reduced loss itself. Going through torch for the check and the sum cost
// more than the rows at the course's sizes (256 rows of 10 classes: ~8 us of kernel, ~10 us of
// torch's sum and multiply).
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_forward(address_t logits_, address_t index_, address_t probs_,
                                                             address_t weight_, index_t m, index_t c,
                                                             std::int64_t ignore_index, double smoothing,
                                                             int reduction, address_t row_loss_, address_t loss_total_,
                                                             address_t grad_, int nthreads) {
    const auto [scale, bad, found] = cross_entropy_scale<T>(index_, weight_, m, c, ignore_index, reduction);
    if (found) return {scale, bad, true};
    const RowTargets<T> targets{as_ptr<const std::int64_t>(index_), as_ptr<const T>(probs_),
                                as_ptr<const T>(weight_), ignore_index, T(smoothing)};
    const double sum = rows_in_parallel(as_ptr<const T>(logits_), m, c, targets, [&](index_t) { return T(scale); },
                                        as_ptr<T>(row_loss_), as_ptr<T>(grad_), nthreads);
    if (T* loss_total = as_ptr<T>(loss_total_)) *loss_total = T(sum * scale);
    return {scale, 0, false};
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

// The factor that turns Σ of the rows' losses into the reduced loss (reference.loss_scale): 1 for
// "sum" and "none"; for "mean", 1 / the index targets' total weight (NaN when it is 0, torch's
// 0 / 0) or 1 / m for probability targets. Index targets are checked on the way: returns (scale,
// the first out-of-range target, whether there is one).
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_scale(address_t index, address_t weight, index_t m, index_t c,
                                                           std::int64_t ignore_index, int reduction) {
    double total = double(m);
    if (index) {
        const auto [weighted, bad, found] = cross_entropy_target_total<T>(index, weight, m, c, ignore_index);
        if (found) return {0.0, bad, true};
        total = weighted;
    }
    if (reduction != 1) return {1.0, 0, false};
    return {total != 0.0 ? 1.0 / total : std::numeric_limits<double>::quiet_NaN(), 0, false};
}

#define FASTML_INSTANTIATE_CROSS_ENTROPY(T)                                                                          \
    template std::tuple<double, std::int64_t, bool> cross_entropy_forward<T>(                                        \
        address_t, address_t, address_t, address_t, index_t, index_t, std::int64_t, double, int, address_t,          \
        address_t, address_t, int);                                                                                  \
    template std::tuple<double, std::int64_t, bool> cross_entropy_scale<T>(address_t, address_t, index_t, index_t,  \
                                                                           std::int64_t, int);                      \
    template void cross_entropy_rows<T>(address_t, address_t, address_t, address_t, index_t, index_t, std::int64_t, \
                                        double, double, address_t, address_t, address_t, int);                     \
    template std::tuple<double, std::int64_t, bool> cross_entropy_target_total<T>(address_t, address_t, index_t,   \
                                                                                  index_t, std::int64_t);
FASTML_INSTANTIATE_CROSS_ENTROPY(float)
FASTML_INSTANTIATE_CROSS_ENTROPY(double)

}  // namespace fastml
