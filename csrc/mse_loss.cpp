// Squared-error loss between two equally shaped, contiguous tensors of n elements.
//
// One pass: the difference (which the backward pass needs) and the reduced or elementwise loss.
// The reduced sum is accumulated in double per thread and combined in a fixed order.
#include <vector>

#include "kernels.h"

namespace fastml {

template <typename T>
void mse_loss_forward(address_t input_, address_t target_, index_t n, int reduction,
                      address_t loss_, address_t diff_, int nthreads) {
    const T *input = as_ptr<const T>(input_), *target = as_ptr<const T>(target_);
    T *loss = as_ptr<T>(loss_), *diff = as_ptr<T>(diff_);
    const int threads = threads_for(n, nthreads);
    std::vector<double> parts(threads, 0.0);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t begin, end;
        split_range(n, threads, t, begin, end);
        double acc = 0.0;
#pragma omp simd reduction(+ : acc)
        for (index_t i = begin; i < end; ++i) {
            const T e = input[i] - target[i];
            if (diff) diff[i] = e;
            if (reduction == 0) loss[i] = e * e;
            acc += double(e) * double(e);
        }
        parts[t] = acc;
    }
    if (reduction != 0) {
        double total = 0.0;
        for (double part : parts) total += part;
        *loss = T(reduction == 1 ? total / double(n) : total);
    }
}

// grad_input[i] = scale * diff[i] * g[i or 0]: `grad_out` is elementwise (reduction "none",
// g_stride 1) or a single value (g_stride 0).
template <typename T>
void mse_loss_backward(address_t diff_, address_t grad_out_, index_t g_stride, double scale,
                       index_t n, address_t grad_input_, int nthreads) {
    const T *diff = as_ptr<const T>(diff_), *g = as_ptr<const T>(grad_out_);
    T* grad = as_ptr<T>(grad_input_);
    const T s = T(scale);
#pragma omp parallel for simd num_threads(threads_for(n, nthreads)) schedule(static)
    for (index_t i = 0; i < n; ++i) grad[i] = s * diff[i] * g[i * g_stride];
}

template void mse_loss_forward<float>(address_t, address_t, index_t, int, address_t, address_t, int);
template void mse_loss_forward<double>(address_t, address_t, index_t, int, address_t, address_t, int);
template void mse_loss_backward<float>(address_t, address_t, index_t, double, index_t, address_t, int);
template void mse_loss_backward<double>(address_t, address_t, index_t, double, index_t, address_t, int);

}  // namespace fastml
