// Minibatch SGD (torch.optim.SGD's rule) over every tensor of a parameter group in one call.
//
// Per element, in the order torch's for-loop implementation rounds:
//   g   = maximize ? -grad : grad
//   g   = fma(weight_decay, p, g)                       (when weight_decay != 0; rounded once, as
//                                                        torch's grad.add(param, alpha=...): adam.cpp)
//   buf = fresh ? g : momentum * buf + (1 - dampening) * g   (when momentum != 0)
//   g   = nesterov ? g + momentum * buf : buf           (when momentum != 0)
//   p   = p - lr * g
//   grad = 0                                            (when zero_grad)
// One pass reads p, grad (and buf) and writes p (and buf): 5 array passes with momentum, against
// torch's for-loop's 11 (it materialises grad + wd * p and updates buf in two passes).
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "multi_tensor.h"

namespace fastml {

namespace {

template <typename T>
struct SgdScalars {
    T lr, momentum, one_minus_dampening, weight_decay, sign;  // sign: -1 when maximizing
    bool decay, nesterov;
};

// One piece [begin, end) of one tensor. The per-tensor and per-group choices that only select
// between two computed values (decay, nesterov, fresh, sign) stay as selects, which vectorise;
// the ones that change which arrays are touched are template parameters.
template <typename T, bool Momentum, bool ZeroGrad>
void sgd_span(T* __restrict p, T* __restrict grad, T* __restrict buf, index_t begin, index_t end,
              const SgdScalars<T>& s, bool fresh) {
#pragma omp simd
    for (index_t i = begin; i < end; ++i) {
        T g = s.sign * grad[i];
        const T pi = p[i];
        g = s.decay ? multiply_add(s.weight_decay, pi, g) : g;
        if constexpr (Momentum) {
            const T scaled = buf[i] * s.momentum;  // torch: buf.mul_(momentum), rounded
            const T b = fresh ? g : scaled + s.one_minus_dampening * g;
            buf[i] = b;
            g = s.nesterov ? g + s.momentum * b : b;
        }
        p[i] = pi - s.lr * g;
        if constexpr (ZeroGrad) grad[i] = T(0);
    }
}

template <typename T, bool Momentum, bool ZeroGrad>
void sgd_all(const std::vector<address_t>& params, const std::vector<address_t>& grads,
             const std::vector<address_t>& buffers, const std::vector<index_t>& sizes,
             const std::vector<int>& fresh, const SgdScalars<T>& s, int nthreads) {
    for_each_span(sizes, nthreads, [&](index_t t, index_t begin, index_t end) {
        T* buf = Momentum ? as_ptr<T>(buffers[t]) : nullptr;
        sgd_span<T, Momentum, ZeroGrad>(as_ptr<T>(params[t]), as_ptr<T>(grads[t]), buf, begin, end,
                                        s, Momentum && fresh[t] != 0);
    });
}

}  // namespace

// params, grads, buffers: data pointers of equally long lists of contiguous tensors, tensor t
// holding sizes[t] elements (buffers ignored unless momentum != 0). fresh[t] != 0: buffer t has
// no value yet and is set to the gradient, as torch does on a parameter's first step.
template <typename T>
void sgd_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
              const std::vector<address_t>& buffers, const std::vector<index_t>& sizes,
              const std::vector<int>& fresh, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool zero_grad, int nthreads) {
    const SgdScalars<T> s{T(lr),           T(momentum),       T(1.0 - dampening), T(weight_decay),
                          T(maximize ? -1 : 1), weight_decay != 0, nesterov};
    auto run = [&](auto with_momentum, auto zero) {
        sgd_all<T, decltype(with_momentum)::value, decltype(zero)::value>(params, grads, buffers, sizes,
                                                                         fresh, s, nthreads);
    };
    using yes = std::true_type;
    using no = std::false_type;
    if (momentum != 0) {
        zero_grad ? run(yes{}, yes{}) : run(yes{}, no{});
    } else {
        zero_grad ? run(no{}, yes{}) : run(no{}, no{});
    }
}

// The course's hand-written step, fused: for every tensor, p = p - lr * grad / batch_size (in
// that order of rounding, as `param -= lr * param.grad / batch_size` computes it), then grad = 0.
template <typename T>
void sgd_course_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
                     const std::vector<index_t>& sizes, double lr, double batch_size, int nthreads) {
    const T rate = T(lr), divisor = T(batch_size);
    for_each_span(sizes, nthreads, [&](index_t t, index_t begin, index_t end) {
        T* __restrict p = as_ptr<T>(params[t]);
        T* __restrict g = as_ptr<T>(grads[t]);
#pragma omp simd
        for (index_t i = begin; i < end; ++i) {
            p[i] = p[i] - rate * g[i] / divisor;
            g[i] = T(0);
        }
    });
}

#define FASTML_INSTANTIATE(T)                                                                      \
    template void sgd_step<T>(const std::vector<address_t>&, const std::vector<address_t>&,        \
                              const std::vector<address_t>&, const std::vector<index_t>&,          \
                              const std::vector<int>&, double, double, double, double, bool, bool, \
                              bool, int);                                                          \
    template void sgd_course_step<T>(const std::vector<address_t>&, const std::vector<address_t>&, \
                                     const std::vector<index_t>&, double, double, int);
FASTML_INSTANTIATE(float)
FASTML_INSTANTIATE(double)
#undef FASTML_INSTANTIATE

}  // namespace fastml
