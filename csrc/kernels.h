// Entry points of every C++ kernel, as bound in bindings.cpp. Arguments: data pointers
// (address_t, 0 = absent) and sizes; shapes are documented beside each definition.
#pragma once

#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"

namespace fastml {

// linear_mse.cpp: reduction 0 none, 1 mean, 2 sum; way, how x's rows are read (linear_mse.cpp).
enum LinearMseWay : int { kBlocks = 0, kBlocksPrefetch = 1, kStream = 2, kStreamPrefetch = 3 };
template <typename T>
void linear_mse_forward(address_t x, address_t w, address_t b, address_t y, index_t n, index_t d,
                        index_t o, int reduction, address_t loss, address_t residual,
                        address_t grad_w, address_t grad_b, int way, int nthreads);
template <typename T>
void linear_regression_sgd_epoch(address_t x, address_t y, address_t order, index_t n, index_t d,
                                 index_t o, address_t w, address_t b, double lr, index_t batch_size);

// linear.cpp
template <typename T>
void linear_forward(address_t x, address_t w, address_t b, index_t n, index_t d, index_t o,
                    address_t out, int nthreads);
template <typename T>
void linear_backward_input(address_t g, address_t w, index_t n, index_t d, index_t o,
                           address_t grad_x, int nthreads);
template <typename T>
void linear_backward_weight(address_t g, address_t x, index_t n, index_t d, index_t o,
                            address_t grad_w, address_t grad_b, int nthreads);

// mse_loss.cpp
template <typename T>
void mse_loss_forward(address_t input, address_t target, index_t n, int reduction, address_t loss,
                      address_t diff, int nthreads);
template <typename T>
void mse_loss_backward(address_t diff, address_t grad_out, index_t g_stride, double scale, index_t n,
                       address_t grad_input, int nthreads);

// sgd.cpp: lists hold one entry per tensor.
template <typename T>
void sgd_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
              const std::vector<address_t>& buffers, const std::vector<index_t>& sizes,
              const std::vector<int>& fresh, double lr, double momentum, double dampening,
              double weight_decay, bool nesterov, bool maximize, bool zero_grad, int nthreads);
template <typename T>
void sgd_course_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
                     const std::vector<index_t>& sizes, double lr, double batch_size, int nthreads);

// adam.cpp: lists hold one entry per tensor.
template <typename T>
void adam_step(const std::vector<address_t>& params, const std::vector<address_t>& grads,
               const std::vector<address_t>& exp_avgs, const std::vector<address_t>& exp_avg_sqs,
               const std::vector<address_t>& max_exp_avg_sqs, const std::vector<index_t>& sizes,
               const std::vector<double>& step_sizes, const std::vector<double>& bias2_sqrts,
               double lr, double beta1, double beta2, double eps, double weight_decay,
               bool decoupled, bool amsgrad, bool maximize, bool zero_grad, int nthreads);

// cdist.cpp, knn.cpp: x1 (batch, n1, m), x2 (batch, n2, m); norm 2, 1 or 0 (inf).
template <typename T>
void cdist_forward(address_t x1, address_t x2, index_t batch, index_t n1, index_t n2, index_t m, int norm,
                   address_t out, int nthreads);
template <typename T>
void knn_forward(address_t x1, address_t x2, index_t batch, index_t n1, index_t n2, index_t m, index_t k, int norm,
                 address_t out_d, address_t out_j, int nthreads);

// batch_norm.cpp: x (n, c, l) contiguous (planes) or channels-last (rows of c), n·l ≥ 1;
// weight, bias (c,) or 0; stats (3, c): mean, biased variance, invstd (forward writes, backward
// reads). Backward writes the gradients asked for (0 = not asked).
template <typename T>
void batch_norm_forward(address_t x, index_t n, index_t c, index_t l, bool channels_last, address_t weight,
                        address_t bias, double eps, bool relu, address_t out, address_t stats, int nthreads);
template <typename T>
void batch_norm_backward(address_t grad, address_t x, index_t n, index_t c, index_t l, bool channels_last,
                         address_t weight, address_t bias, address_t stats, bool relu, address_t grad_input,
                         address_t grad_weight, address_t grad_bias, int nthreads);

// max_pool2d.cpp: x (planes, h, w) → out, indices (planes, oh, ow); kernel kh × kw, stride sh,
// sw, padding ph, pw, dilation dh, dw. Backward: grad, indices (planes, outputs) → grad_input
// (planes, inputs).
template <typename T>
void max_pool2d_forward(address_t x, index_t planes, index_t h, index_t w, index_t oh, index_t ow, index_t kh,
                        index_t kw, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh, index_t dw,
                        address_t out, address_t indices, int nthreads);
template <typename T>
void max_pool2d_backward(address_t grad, address_t indices, index_t planes, index_t outputs, index_t inputs,
                         address_t grad_input, int nthreads);

// conv2d.cpp: dims = (n, c, h, w, k, r, s, stride h, stride w, padding h, padding w, dilation h,
// dilation w, groups, oh, ow): input (n, c, h, w), weight (k, c / groups, r, s), bias (k,) or 0,
// output and its gradient (n, k, oh, ow).
template <typename T>
void conv2d_forward(address_t x, address_t w, address_t b, const std::vector<index_t>& dims, address_t out,
                    int nthreads);
template <typename T>
void conv2d_backward_input(address_t grad, address_t w, const std::vector<index_t>& dims, address_t grad_x,
                           int nthreads);
template <typename T>
void conv2d_backward_weight(address_t grad, address_t x, const std::vector<index_t>& dims, address_t grad_w,
                            address_t grad_b, int nthreads);

// conv2d_relu_max_pool2d.cpp: dims as conv2d's; pool = (kernel h, kernel w, stride h, stride w,
// pooled h, pooled w); out (n, k, pooled h, pooled w), argmax the same, int8 window offsets (-1
// where the ReLU passes no gradient: all the backward reads besides grad, x and w).
template <typename T>
void conv2d_relu_max_pool2d_forward(address_t x, address_t w, address_t b, const std::vector<index_t>& dims,
                                    const std::vector<index_t>& pool, address_t out, address_t argmax, int nthreads);
template <typename T>
void conv2d_relu_max_pool2d_backward(address_t grad, address_t argmax, address_t x, address_t w,
                                     const std::vector<index_t>& dims, const std::vector<index_t>& pool,
                                     address_t grad_x, address_t grad_w, address_t grad_b, int nthreads);
// out, argmax (planes, pooled h, pooled w) = max_pool2d(relu(z)) of a convolution's output z
// (planes, oh, ow) and its window offsets, as conv2d_relu_max_pool2d_forward's; pool as above.
template <typename T>
void relu_max_pool2d_forward(address_t z, index_t planes, index_t oh, index_t ow, const std::vector<index_t>& pool,
                             address_t out, address_t argmax, int nthreads);
// grad_z (planes, oh, ow): grad (planes, pooled h, pooled w) at each window's argmax offset, zero
// elsewhere and where argmax is -1; pool as above.
template <typename T>
void relu_max_pool2d_backward(address_t grad, address_t argmax, index_t planes, index_t oh, index_t ow,
                              const std::vector<index_t>& pool, address_t grad_z, int nthreads);

// cross_entropy.cpp: logits (m, c), index (m,) int64 or probs (m, c), weight (c,) or 0,
// row_scale (m,) or 0 → row_loss (m,), grad (m, c) (either may be 0; grad may be logits).
template <typename T>
void cross_entropy_rows(address_t logits, address_t index, address_t probs, address_t weight, index_t m, index_t c,
                        std::int64_t ignore_index, double smoothing, double scale, address_t row_scale,
                        address_t row_loss, address_t grad, int nthreads);
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_target_total(address_t index, address_t weight, index_t m,
                                                                  index_t c, std::int64_t ignore_index);
// The reduction's scale (reduction 0 none, 1 mean, 2 sum: 1 / the targets' total weight for
// "mean", else 1), after checking index targets: (scale, the first out-of-range target, found).
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_scale(address_t index, address_t weight, index_t m, index_t c,
                                                           std::int64_t ignore_index, int reduction);
// cross_entropy_scale, then the rows: row_loss (m,) for "none", else the reduced loss into
// loss_total (0-dim); grad (m, c) scaled by the reduction's scale where given. Returns
// (scale, the first out-of-range index target, whether there is one): then nothing is written.
template <typename T>
std::tuple<double, std::int64_t, bool> cross_entropy_forward(address_t logits, address_t index, address_t probs,
                                                             address_t weight, index_t m, index_t c,
                                                             std::int64_t ignore_index, double smoothing,
                                                             int reduction, address_t row_loss, address_t loss_total,
                                                             address_t grad, int nthreads);

// linear_cross_entropy.cpp: x (n, d), w (c, d), b (c,) or 0, targets as cross_entropy_rows';
// reduction 0 none, 1 mean, 2 sum. Every row's gradient scaled by the reduction's scale (for
// "mean", 1 / the targets' total weight, as cross_entropy_scale finds it). Writes row_loss
// (n,) or the scaled total into loss_total (0-dim), and the gradients asked for (0 = not asked).
// Returns (the first out-of-range index target, whether there is one): then nothing is written.
template <typename T>
std::tuple<std::int64_t, bool> linear_cross_entropy_forward(address_t x, address_t w, address_t b, address_t index,
                                                           address_t probs, address_t weight, index_t n, index_t d,
                                                           index_t c, std::int64_t ignore_index, double smoothing,
                                                           int reduction, address_t row_loss, address_t loss_total,
                                                           address_t grad_x, address_t grad_w, address_t grad_b,
                                                           int nthreads);

// winograd.cpp: F(2x2, 3x3) transforms around a grouped 1x1 convolution, channels-last tensors:
// x (n, h, w, c) → v (tiles, 16, c) for tiles [first_tile, first_tile + tiles) of the
// (n, tiles_h, tiles_w) grid, padding ph, pw; m (tiles, 16, k) → y (n, oh, ow, k), + bias (0:
// none), then ReLU if relu; returns whether every output was finite before the ReLU; the weight
// g (k, c, 3, 3) → u (16, k, c), G g G^T of each filter.
template <typename T>
void winograd_f2_weight(address_t g, index_t k, index_t c, address_t u, int nthreads);
template <typename T>
void winograd_f2_input(address_t x, index_t n, index_t h, index_t w, index_t c, index_t ph, index_t pw,
                       index_t tiles_h, index_t tiles_w, index_t first_tile, index_t tiles, address_t v,
                       int nthreads);
template <typename T>
bool winograd_f2_output(address_t m, address_t bias, bool relu, index_t oh, index_t ow, index_t k, index_t tiles_h,
                        index_t tiles_w, index_t first_tile, index_t tiles, address_t y, int nthreads);

// grouped_conv.cpp: a direct convolution with small groups on channels-last tensors: x (n, h, w, c)
// → y (n, oh, ow, k), + bias (0: none), then ReLU if relu. The weight packed as (r, s, c) where
// c == k == groups (depthwise), else (groups, r, s, c / groups, k / groups).
template <typename T>
void grouped_conv_forward(address_t x, index_t n, index_t h, index_t w, index_t c, address_t weight, address_t bias,
                          index_t k, index_t groups, index_t r, index_t s, index_t sh, index_t sw, index_t ph,
                          index_t pw, index_t dh, index_t dw, index_t oh, index_t ow, bool relu, address_t y,
                          int nthreads);
// Depthwise (c == k == groups) gradients, the weight packed (r, s, c): grad (n, oh, ow, c) →
// grad_x (n, h, w, c); x (n, h, w, c) and grad → grad_w (r, s, c).
template <typename T>
void depthwise_conv_backward_input(address_t grad, index_t n, index_t h, index_t w, index_t c, address_t weight,
                                   index_t r, index_t s, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                                   index_t dw, index_t oh, index_t ow, address_t grad_x, int nthreads);
template <typename T>
void depthwise_conv_backward_weight(address_t x, address_t grad, index_t n, index_t h, index_t w, index_t c,
                                    index_t r, index_t s, index_t sh, index_t sw, index_t ph, index_t pw, index_t dh,
                                    index_t dw, index_t oh, index_t ow, address_t grad_w, int nthreads);

}  // namespace fastml
