// One row of softmax cross-entropy: its loss and its scaled gradient, in three passes over the
// row (max; exponentials and sums; gradient), shared by the cross-entropy kernel and the fused
// linear + cross-entropy kernel.
//
// Terms (fastml/ops/cross_entropy/reference.py): logits z (C), class coefficients a with
// A = Σ a, loss ℓ = Σ_c a_c (lse - z_c) and gradient A · softmax(z) - a, where a is
//   (1 - ε) w_t e_t + (ε / C) w       for a class index t (w: class weights, ones when absent),
//   w ⊙ ((1 - ε) p + ε / C)           for class probabilities p.
// With m = max z and S = Σ exp(z - m): lse - z_c = log S - (z_c - m), which keeps every sum over
// shifted logits ≤ 0 (no cancellation at logits of 1e4).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "simd.h"

namespace fastml {

template <typename T>
struct ExpConstants;
template <>
struct ExpConstants<float> {
    using Int = std::int32_t;
    static constexpr float kMagic = 12582912.0f;   // 1.5 · 2^23: adding it rounds to an integer
    static constexpr float kLowest = -87.33654f;   // log of the smallest normal float
    static constexpr float kLn2Hi = 0.693359375f;  // ln 2 split in two (Cody and Waite) so
    static constexpr float kLn2Lo = -2.12194440e-4f;  // that n · kLn2Hi is exact
    static constexpr int kBias = 127, kMantissaBits = 23, kDegree = 7;
};
template <>
struct ExpConstants<double> {
    using Int = std::int64_t;
    static constexpr double kMagic = 6755399441055744.0;  // 1.5 · 2^52
    static constexpr double kLowest = -708.3964185322641;
    static constexpr double kLn2Hi = 6.93147180369123816490e-01;
    static constexpr double kLn2Lo = 1.90821492927058770002e-10;
    static constexpr int kBias = 1023, kMantissaBits = 52, kDegree = 13;
};

// exp(x) for a vector of x ≤ 0 (shifted logits). GCC vectorises std::exp only under
// -ffast-math, which would also break NaN and inf handling elsewhere, so: x = n ln 2 + r with
// |r| ≤ ln 2 / 2, exp(r) by its Taylor polynomial (degree 7 for float, truncation error below
// 6e-9 relative; 13 for double, 4e-18), and 2^n written into the exponent bits. Lanes below the
// log of the smallest normal give 0 (so exp(-inf) is exactly 0: the softmax of a -inf logit);
// NaN lanes stay NaN.
template <typename T>
inline typename Simd<T>::vec exp_nonpositive(typename Simd<T>::vec x) {
    using C = ExpConstants<T>;
    using V = typename Simd<T>::vec;
    typedef typename C::Int IV __attribute__((vector_size(kVectorBytes)));  // V's lanes as integers
    static_assert(sizeof(IV) == sizeof(V), "the integer view of a vector has its lanes");
    const V lowest = Simd<T>::broadcast(C::kLowest), zero = Simd<T>::broadcast(T(0));
    V xc = x < lowest ? lowest : x;
    xc = xc > zero ? zero : xc;
    const V magic = Simd<T>::broadcast(C::kMagic);
    const V shifted = xc * T(1.4426950408889634) + magic;  // n in the low mantissa bits
    const V n = shifted - magic;
    const V r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
    // Horner from the highest term: p = 1 + r (1 + r/2 (1 + r/3 (...))); the loop unrolls and
    // each 1 / k folds into a constant.
    V p = Simd<T>::broadcast(T(1));
    for (int k = C::kDegree; k >= 1; --k) p = T(1) + p * r * (T(1) / T(k));
    IV bits, magic_bits;
    std::memcpy(&bits, &shifted, sizeof bits);
    std::memcpy(&magic_bits, &magic, sizeof magic_bits);
    const IV exponent = ((bits - magic_bits) + typename C::Int(C::kBias)) << C::kMantissaBits;
    V scale;
    std::memcpy(&scale, &exponent, sizeof scale);
    V result = p * scale;
    result = x < lowest ? zero : result;
    return x != x ? x : result;
}

// What the rows' targets are: exactly one of index (m,) and probs (m, c) is set.
template <typename T>
struct RowTargets {
    const std::int64_t* index;
    const T* probs;
    const T* weight;  // (c,) class weights, or null for ones
    std::int64_t ignore_index;
    T smoothing;  // ε
};

// The gradient of an ignored row, as torch's: 0 times its softmax, so zeros where the row's
// log-sum-exp is finite and NaN everywhere where it is not (a NaN logit, a +inf one, or only
// -inf ones): torch's log_softmax is NaN there, and its backward multiplies it by the row's
// zero gradient. grad may be z itself (every logit is read before any is written).
template <typename T>
inline void ignored_row_gradient(const T* z, index_t c, T* grad) {
    T m = -std::numeric_limits<T>::infinity();
    bool nan = false;
    for (index_t k = 0; k < c; ++k) {
        nan |= z[k] != z[k];
        m = z[k] > m ? z[k] : m;
    }
    const bool finite = !nan && m < std::numeric_limits<T>::infinity() && m > -std::numeric_limits<T>::infinity();
    std::fill(grad, grad + c, finite ? T(0) : std::numeric_limits<T>::quiet_NaN());
}

// Loss of row i with logits z (c); when grad is set (it may be z itself), writes
// grad = scale · (A softmax(z) - a). Every element goes through the vector code: the last
// partial vector is padded with -inf logits (exp 0), zero coefficients and, in the sum of
// a · (z - m), zero shifted logits (0 · -inf would be NaN).
template <typename T>
inline double cross_entropy_row(const T* z, index_t c, const RowTargets<T>& tg, index_t i, T scale, T* grad) {
    using S = Simd<T>;
    using V = typename S::vec;
    constexpr index_t W = S::kWidth;
    constexpr T kNegInf = -std::numeric_limits<T>::infinity();
    const index_t full = c / W * W, tail = c - full;
    std::int64_t t = -1;
    if (tg.index) {
        t = tg.index[i];
        if (t == tg.ignore_index) {
            if (grad) ignored_row_gradient(z, c, grad);
            return 0.0;
        }
    }
    const T* w = tg.weight;
    const T* p = tg.probs ? tg.probs + i * c : nullptr;
    const T eps = tg.smoothing, keep = T(1) - eps, uniform = eps / T(c);

    V vmax = S::broadcast(kNegInf);
    for (index_t k = 0; k < full; k += W) {
        const V v = S::load(z + k);
        vmax = v > vmax ? v : vmax;
    }
    if (tail) {
        const V v = S::load_first(z + full, tail, kNegInf);
        vmax = v > vmax ? v : vmax;
    }
    const T m = S::max_lanes(vmax);  // (no NaN lane: a NaN logit never wins the compares above)
    const T z_target = t >= 0 ? z[t] : T(0);  // read before grad may overwrite z

    // Pass 2: e = exp(z - m) (kept in grad for pass 3), S = Σ e, and Σ a_c (z_c - m) without
    // the target's term (added below). Coefficients: probabilities (a = w ⊙ (keep·p + ε/C)),
    // or the smoothing part of an index target ((ε/C) w), or none.
    const bool dense = p != nullptr || eps != T(0);
    V vsum{}, vdot{}, vcoef{};
    const V vm = S::broadcast(m), zero{}, ones = S::broadcast(T(1));
    auto coefficients = [&](V wk, V pk) { return p ? wk * (keep * pk + uniform) : wk * uniform; };
    for (index_t k = 0; k < full; k += W) {
        const V shifted = S::load(z + k) - vm;
        const V e = exp_nonpositive<T>(shifted);
        vsum += e;
        if (dense) {
            const V a = coefficients(w ? S::load(w + k) : ones, p ? S::load(p + k) : zero);
            vdot += a * shifted;
            vcoef += a;
        }
        if (grad) S::store(grad + k, e);
    }
    if (tail) {
        V lane{};
        for (index_t l = 0; l < W; ++l) lane[l] = T(l);
        const auto valid = lane < S::broadcast(T(tail));
        const V shifted = S::load_first(z + full, tail, kNegInf) - vm;
        const V e = exp_nonpositive<T>(shifted);
        vsum += e;
        if (dense) {
            const V a = coefficients(w ? S::load_first(w + full, tail, T(0)) : (valid ? ones : zero),
                                     p ? S::load_first(p + full, tail, T(0)) : zero);
            vdot += a * (valid ? shifted : zero);
            vcoef += a;
        }
        if (grad) S::store_first(grad + full, tail, e);
    }
    const double sum = S::sum_lanes_in_double(vsum);
    const double dot = dense ? S::sum_lanes_in_double(vdot) : 0.0, coef = dense ? S::sum_lanes_in_double(vcoef) : 0.0;
    const double log_sum = std::log(sum);
    double loss = 0.0, total_coef = coef;
    if (tg.index) {
        const double w_t = w ? double(w[t]) : 1.0;
        loss = double(keep) * w_t * (log_sum - (double(z_target) - double(m)));
        if (eps != T(0)) loss += coef * log_sum - dot;
        total_coef += double(keep) * w_t;
    } else {
        loss = coef * log_sum - dot;
    }
    if (!grad) return loss;

    // Pass 3: grad = scale · (A e / S - a).
    const V ratio = S::broadcast(T(double(scale) * total_coef / sum));
    const V vs = S::broadcast(scale);
    for (index_t k = 0; k < full; k += W) {
        V g = ratio * S::load(grad + k);
        if (dense) g -= vs * coefficients(w ? S::load(w + k) : ones, p ? S::load(p + k) : zero);
        S::store(grad + k, g);
    }
    if (tail) {
        V g = ratio * S::load_first(grad + full, tail, T(0));
        if (dense)
            g -= vs * coefficients(w ? S::load_first(w + full, tail, T(0)) : ones,
                                   p ? S::load_first(p + full, tail, T(0)) : zero);
        S::store_first(grad + full, tail, g);
    }
    if (tg.index) grad[t] -= scale * keep * (w ? w[t] : T(1));
    return loss;
}

}  // namespace fastml
