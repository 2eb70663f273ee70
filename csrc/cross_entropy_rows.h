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

// ratio · e - scale · a, the gradient of a row's vector before its target's step, rounded the same
// way wherever a row goes: both products are formed and rounded first (keep_in_register), so
// that -ffp-contract=fast fuses neither into the subtraction. Left to the compiler, the paths fused
// one product or the other, or none (where a product had two uses), and a row's gradient moved by
// an ulp with the path: one row at a time, or with its group of four.
template <typename V>
inline V dense_gradient(V ratio, V e, V scale, V a) {
    V exp_part = ratio * e, coef_part = scale * a;
    keep_in_register(exp_part);
    keep_in_register(coef_part);
    return exp_part - coef_part;
}

// 0, 1, ..., kWidth - 1: each lane's index, to compare with a count or a class.
template <typename T>
inline typename Simd<T>::vec lane_indices() {
    typename Simd<T>::vec lane;
    for (index_t k = 0; k < Simd<T>::kWidth; ++k) lane[k] = T(k);
    return lane;
}

// v with x subtracted from its lane l alone.
template <typename T>
inline typename Simd<T>::vec minus_in_lane(typename Simd<T>::vec v, index_t l, T x) {
    return lane_indices<T>() == T(l) ? v - Simd<T>::broadcast(x) : v;
}

// A row's loss from its sums (see the terms above): log_sum = log S, z_target_shifted =
// z_t - m for an index target t, dot = Σ a_c (z_c - m) and coef = Σ a_c over the dense
// coefficients (0 where there are none); total_coef is set to A.
template <typename T>
inline double row_loss_from_sums(const RowTargets<T>& tg, std::int64_t t, double log_sum, double z_target_shifted,
                                 double dot, double coef, double& total_coef) {
    total_coef = coef;
    if (!tg.index) return coef * log_sum - dot;
    const double keep_w = double(T(1) - tg.smoothing) * (tg.weight ? double(tg.weight[t]) : 1.0);
    double loss = keep_w * (log_sum - z_target_shifted);
    if (tg.smoothing != T(0)) loss += coef * log_sum - dot;
    total_coef += keep_w;
    return loss;
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

    // Pass 2: e = exp(z - m) (kept in grad for pass 3, the last partial vector's in a register),
    // S = Σ e, and Σ a_c (z_c - m) without the target's term (added below). Coefficients:
    // probabilities (a = w ⊙ (keep·p + ε/C)), or the smoothing part of an index target
    // ((ε/C) w), or none.
    const bool dense = p != nullptr || eps != T(0);
    V vsum{}, vdot{}, vcoef{}, e_tail{};
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
        const auto valid = lane_indices<T>() < S::broadcast(T(tail));
        const V shifted = S::load_first(z + full, tail, kNegInf) - vm;
        const V e = exp_nonpositive<T>(shifted);
        vsum += e;
        if (dense) {
            const V a = coefficients(w ? S::load_first(w + full, tail, T(0)) : (valid ? ones : zero),
                                     p ? S::load_first(p + full, tail, T(0)) : zero);
            vdot += a * (valid ? shifted : zero);
            vcoef += a;
        }
        e_tail = e;  // kept in a register for pass 3
    }
    const double sum = S::sum_lanes_in_double(vsum);
    const double dot = dense ? S::sum_lanes_in_double(vdot) : 0.0, coef = dense ? S::sum_lanes_in_double(vcoef) : 0.0;
    double total_coef;
    const double loss = row_loss_from_sums(tg, t, std::log(sum), double(z_target) - double(m), dot, coef, total_coef);
    if (!grad) return loss;

    // Pass 3: grad = scale · (A e / S - a).
    const V ratio = S::broadcast(T(double(scale) * total_coef / sum));
    const V vs = S::broadcast(scale);
    for (index_t k = 0; k < full; k += W) {
        const V e = S::load(grad + k);
        S::store(grad + k, dense ? dense_gradient(ratio, e, vs, coefficients(w ? S::load(w + k) : ones,
                                                                              p ? S::load(p + k) : zero))
                                 : ratio * e);
    }
    // The target's -scale · (1 - ε) w_t: in the stored vectors, or in its lane of the last partial
    // one before that is stored (a scalar read of a masked store's lane waits for the store to
    // reach the cache: store forwarding does not serve it).
    const T target_step = tg.index ? T(scale * keep * (w ? w[t] : T(1))) : T(0);
    if (tg.index && t < full) grad[t] -= target_step;
    if (tail) {
        V g = dense ? dense_gradient(ratio, e_tail, vs,
                                     coefficients(w ? S::load_first(w + full, tail, T(0)) : ones,
                                                  p ? S::load_first(p + full, tail, T(0)) : zero))
                    : ratio * e_tail;
        if (tg.index && t >= full) g = minus_in_lane<T>(g, t - full, target_step);
        S::store_first(grad + full, tail, g);
    }
    return loss;
}

// cross_entropy_row for R rows of at most one vector each (c <= W), i0 .. i0 + R - 1: logits z
// (R × c), their gradients into grad (may be z) where set, each row's loss into loss[r], the
// row's gradient scaled by scale[r]. No row may be ignored (cross_entropy_block sends those to
// cross_entropy_row; here an ignored index would be read as a class). The same operations as
// cross_entropy_row's in the same order, with the same results to the bit, step by step
// across the rows: a row alone is a chain of dependent steps (the lanes' max, the exponential's
// polynomial, the lanes' sums, the log, a division) of about 200 cycles, which left the core
// mostly waiting (softmax regression's 10 classes, an Ice Lake Xeon); four chains overlap.
template <typename T, int R>
inline void cross_entropy_short_rows(const T* z, index_t c, const RowTargets<T>& tg, index_t i0, const T* scale,
                                     T* grad, double* loss) {
    using S = Simd<T>;
    using V = typename S::vec;
    const V neg_inf = S::broadcast(-std::numeric_limits<T>::infinity()), zero{}, ones = S::broadcast(T(1));
    const auto valid = lane_indices<T>() < S::broadcast(T(c));
    const T eps = tg.smoothing, keep = T(1) - eps, uniform = eps / T(c);
    const bool dense = tg.probs != nullptr || eps != T(0);
    const V class_weight = tg.weight ? S::load_first(tg.weight, c, T(0)) : (valid ? ones : zero);
    V shifted[R], e[R], a[R]{};  // (a: set where dense, read only there)
    T m[R], z_target[R];
    std::int64_t t[R];
    double sum[R], dot[R], coef[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        t[r] = tg.index ? tg.index[i0 + r] : -1;
        z_target[r] = t[r] >= 0 ? z[r * c + t[r]] : T(0);
        const V v = S::load_first(z + r * c, c, -std::numeric_limits<T>::infinity());
        m[r] = S::max_lanes(v > neg_inf ? v : neg_inf);  // (a NaN lane never wins, as there)
        shifted[r] = v - S::broadcast(m[r]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        e[r] = exp_nonpositive<T>(shifted[r]);
        sum[r] = S::sum_lanes_in_double(e[r]);
        dot[r] = coef[r] = 0.0;
        if (dense) {
            a[r] = tg.probs ? class_weight * (keep * S::load_first(tg.probs + (i0 + r) * c, c, T(0)) + uniform)
                            : class_weight * uniform;
            dot[r] = S::sum_lanes_in_double(a[r] * (valid ? shifted[r] : zero));
            coef[r] = S::sum_lanes_in_double(a[r]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
        double total_coef;
        loss[r] = row_loss_from_sums(tg, t[r], std::log(sum[r]), double(z_target[r]) - double(m[r]), dot[r], coef[r],
                                     total_coef);
        if (!grad) continue;
        const V ratio = S::broadcast(T(double(scale[r]) * total_coef / sum[r]));
        V g = dense ? dense_gradient(ratio, e[r], S::broadcast(scale[r]), a[r]) : ratio * e[r];
        if (t[r] >= 0)
            g = minus_in_lane<T>(g, t[r], T(scale[r] * keep * (tg.weight ? tg.weight[t[r]] : T(1))));
        S::store_first(grad + r * c, c, g);
    }
}

// cross_entropy_row for rows i0 .. i0 + rows - 1: logits z (rows × c), gradients into grad (may
// be z) where set, row i's gradient scaled by scale_of(i); emit(r, loss) for each row in order.
// Rows of at most one vector go four at a time through cross_entropy_short_rows where none of
// the four is ignored.
template <typename T, typename ScaleOf, typename Emit>
inline void cross_entropy_block(const T* z, index_t rows, index_t c, const RowTargets<T>& tg, index_t i0,
                                ScaleOf scale_of, T* grad, Emit emit) {
    constexpr int R = 4;
    auto one_row = [&](index_t r) {
        emit(r, cross_entropy_row(z + r * c, c, tg, i0 + r, scale_of(i0 + r), grad ? grad + r * c : nullptr));
    };
    index_t r = 0;
    if (c <= Simd<T>::kWidth) {
        for (; r + R <= rows; r += R) {
            bool ignored = false;
            if (tg.index)
                for (int k = 0; k < R; ++k) ignored |= tg.index[i0 + r + k] == tg.ignore_index;
            if (ignored) {
                for (int k = 0; k < R; ++k) one_row(r + k);
                continue;
            }
            T scales[R];
            double losses[R];
            for (int k = 0; k < R; ++k) scales[k] = scale_of(i0 + r + k);
            cross_entropy_short_rows<T, R>(z + r * c, c, tg, i0 + r, scales, grad ? grad + r * c : nullptr, losses);
            for (int k = 0; k < R; ++k) emit(r + k, losses[k]);
        }
    }
    for (; r < rows; ++r) one_row(r);
}

}  // namespace fastml
