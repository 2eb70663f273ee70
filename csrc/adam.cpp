// Adam / AdamW (torch.optim.Adam's rule, decoupled weight decay included) over every tensor of a
// parameter group in one call.
//
// Per element, in the order torch's for-loop implementation rounds:
//   g   = maximize ? -grad : grad
//   p   = p * (1 - lr * weight_decay)                  (decoupled weight decay: AdamW)
//   g   = fma(weight_decay, p, g)                      (L2 weight decay: Adam; rounded once, see below)
//   m   = lerp(m, g, 1 - beta1)                        (torch.lerp's two-sided formula)
//   v   = v * beta2 + (1 - beta2) * g * g
//   vm  = max(vm, v)                                   (amsgrad; NaN propagates as torch.maximum)
//   p   = p + (-step_size * m) / (sqrt(amsgrad ? vm : v) / bias2_sqrt + eps)
//   grad = 0                                           (when zero_grad)
// torch adds the L2 decay as grad.add(param, alpha=weight_decay), which ATen forms as one fused
// multiply-add (on the CPU its vectorised add; on CUDA nvcc contracts it). Where g and
// weight_decay · p nearly cancel, rounding the product first moves the sum by up to half an ulp of
// the product, and Adam's first step divides that sum by its own magnitude: at 2.7e-7 left of
// terms of 0.089 the step moved by 1.8e-5 (lr 0.05). So the sum is rounded as torch's (multiply_add).
// step_size = lr / (1 - beta1^step) and bias2_sqrt = sqrt(1 - beta2^step) are per tensor:
// a parameter whose gradient first appeared later has taken fewer steps.
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "multi_tensor.h"

namespace fastml {

namespace {

template <typename T>
struct AdamScalars {
    T decay;          // p's factor: 1 - lr * weight_decay for AdamW, else 1 (exact)
    T l2;             // weight decay added to the gradient (Adam)
    T lerp_weight;    // 1 - beta1
    T beta2, one_minus_beta2, eps, sign;
    bool l2_decay;
};

template <typename T, bool AmsGrad, bool ZeroGrad>
void adam_span(T* __restrict p, T* __restrict grad, T* __restrict m, T* __restrict v,
               T* __restrict vmax, index_t begin, index_t end, const AdamScalars<T>& s,
               T neg_step_size, T bias2_sqrt) {
    const T w = s.lerp_weight, one_minus_w = T(1) - s.lerp_weight;
    const bool low_weight = std::abs(s.lerp_weight) < T(0.5);
#pragma omp simd
    for (index_t i = begin; i < end; ++i) {
        const T pi = p[i] * s.decay;
        T g = s.sign * grad[i];
        g = s.l2_decay ? multiply_add(s.l2, pi, g) : g;
        const T mi = m[i];
        const T mn = low_weight ? mi + w * (g - mi) : g - (g - mi) * one_minus_w;
        m[i] = mn;
        const T vs = v[i] * s.beta2;  // torch: exp_avg_sq.mul_(beta2), rounded
        const T vn = vs + s.one_minus_beta2 * g * g;
        v[i] = vn;
        T second = vn;
        if constexpr (AmsGrad) {
            const T old = vmax[i];
            second = (old > vn || old != old) ? old : vn;
            vmax[i] = second;
        }
        const T denom = std::sqrt(second) / bias2_sqrt + s.eps;
        p[i] = pi + neg_step_size * mn / denom;
        if constexpr (ZeroGrad) grad[i] = T(0);
    }
}

template <typename T, bool AmsGrad, bool ZeroGrad>
void adam_all(const std::vector<address_t>& params, const std::vector<address_t>& grads,
              const std::vector<address_t>& exp_avgs, const std::vector<address_t>& exp_avg_sqs,
              const std::vector<address_t>& max_exp_avg_sqs, const std::vector<index_t>& sizes,
              const std::vector<double>& step_sizes, const std::vector<double>& bias2_sqrts,
              const AdamScalars<T>& s, int nthreads) {
    for_each_span(sizes, nthreads, [&](index_t t, index_t begin, index_t end) {
        T* vmax = AmsGrad ? as_ptr<T>(max_exp_avg_sqs[t]) : nullptr;
        adam_span<T, AmsGrad, ZeroGrad>(as_ptr<T>(params[t]), as_ptr<T>(grads[t]),
                                        as_ptr<T>(exp_avgs[t]), as_ptr<T>(exp_avg_sqs[t]), vmax,
                                        begin, end, s, T(-step_sizes[t]), T(bias2_sqrts[t]));
    });
}

}  // namespace

// params, grads, exp_avgs, exp_avg_sqs (and max_exp_avg_sqs when amsgrad): data pointers of
// equally long lists of contiguous tensors, tensor t holding sizes[t] elements; step_sizes[t],
// bias2_sqrts[t]: tensor t's scalars for this step (see the top of this file).
template <typename T>
void adam_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
               const std::vector<address_t>& exp_avgs, const std::vector<address_t>& exp_avg_sqs,
               const std::vector<address_t>& max_exp_avg_sqs, const std::vector<index_t>& sizes,
               const std::vector<double>& step_sizes, const std::vector<double>& bias2_sqrts,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, bool amsgrad, bool maximize, bool zero_grad, int nthreads) {
    const bool decays = weight_decay != 0;
    const AdamScalars<T> s{decays && decoupled ? T(1.0 - lr * weight_decay) : T(1),
                           T(weight_decay),
                           T(1.0 - beta1),
                           T(beta2),
                           T(1.0 - beta2),
                           T(eps),
                           T(maximize ? -1 : 1),
                           decays && !decoupled};
    auto run = [&](auto ams, auto zero) {
        adam_all<T, decltype(ams)::value, decltype(zero)::value>(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, sizes, step_sizes, bias2_sqrts,
            s, nthreads);
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (amsgrad) {
        zero_grad ? run(yes{}, yes{}) : run(yes{}, no{});
    } else {
        zero_grad ? run(no{}, yes{}) : run(no{}, no{});
    }
}

template void adam_step<float>(const std::vector<address_t>&, const std::vector<address_t>&,
                               const std::vector<address_t>&, const std::vector<address_t>&,
                               const std::vector<address_t>&, const std::vector<index_t>&,
                               const std::vector<double>&, const std::vector<double>&, double,
                               double, double, double, double, bool, bool, bool, bool, int);
template void adam_step<double>(const std::vector<address_t>&, const std::vector<address_t>&,
                                const std::vector<address_t>&, const std::vector<address_t>&,
                                const std::vector<address_t>&, const std::vector<index_t>&,
                                const std::vector<double>&, const std::vector<double>&, double,
                                double, double, double, double, bool, bool, bool, bool, int);

}  // namespace fastml
