// Winograd F(2x2, 3x3) transforms for a 3x3, stride-1 convolution on channels-last (N, H, W, C)
// tensors (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//
// Each 2x2 block of outputs ("tile") comes from a 4x4 window d of the padded input. With
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  A^T = [1 1 1 0; 0 1 -1 -1]
// and the weight's transform U = G g G^T (done once per weight, in Python), the tile is
//   Y = A^T [ sum_c U[k, c] ⊙ (B^T d_c B) ] A,
// 16 multiplies per 4 outputs where the direct form takes 36: the sum over c is 16 independent
// matrix products (tiles x C) · (C x K), which Python hands to oneDNN as one grouped 1x1
// convolution. These kernels are the two transforms around it:
//   input:  x (N, H, W, C) → v (tiles, 16, C), the 16 transformed values of each tile's window
//           (zero outside the image), tiles in (image, tile row, tile column) order;
//   output: m (tiles, 16, K) → y (N, OH, OW, K), A^T m A + bias, then ReLU if asked; returns
//           whether every output was finite before the ReLU. A non-finite input or weight
//           spreads differently here than in a direct convolution (0 · inf is NaN, and each
//           tile's transform mixes its whole 4x4 window), so the caller recomputes such a
//           convolution directly, as torch would.
// Both vectorise over channels (contiguous in this layout) and split tiles over threads. Every
// transform entry is ±1 or 0, so the transforms add no rounding beyond the sums themselves.
#include <vector>

#include "kernels.h"

namespace fastml {

template <typename T>
void winograd_f2_input(address_t x_address, index_t n, index_t h, index_t w, index_t c, index_t ph, index_t pw,
                       index_t tiles_h, index_t tiles_w, index_t first_tile, index_t tiles, address_t v_address,
                       int nthreads) {
    const T* x = as_ptr<const T>(x_address);
    T* v = as_ptr<T>(v_address);
    const std::vector<T> zeros(static_cast<size_t>(c), T(0));  // the padding's "pixel"
    const index_t per_image = tiles_h * tiles_w;
    (void)n;
#pragma omp parallel for num_threads(threads_for(tiles * 16 * c, nthreads)) schedule(static)
    for (index_t t = 0; t < tiles; ++t) {
        const index_t tile = first_tile + t;
        const index_t image = tile / per_image, ty = (tile % per_image) / tiles_w, tx = tile % tiles_w;
        const T* window[4][4];
        for (int i = 0; i < 4; ++i) {
            const index_t ih = 2 * ty - ph + i;
            for (int j = 0; j < 4; ++j) {
                const index_t iw = 2 * tx - pw + j;
                const bool inside = ih >= 0 && ih < h && iw >= 0 && iw < w;
                window[i][j] = inside ? x + ((image * h + ih) * w + iw) * c : zeros.data();
            }
        }
        T* out = v + t * 16 * c;
#pragma omp simd
        for (index_t ch = 0; ch < c; ++ch) {
            T d[4][4], r[4][4];
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) d[i][j] = window[i][j][ch];
            for (int j = 0; j < 4; ++j) {  // B^T d
                r[0][j] = d[0][j] - d[2][j];
                r[1][j] = d[1][j] + d[2][j];
                r[2][j] = d[2][j] - d[1][j];
                r[3][j] = d[1][j] - d[3][j];
            }
            for (int i = 0; i < 4; ++i) {  // (B^T d) B
                out[(i * 4 + 0) * c + ch] = r[i][0] - r[i][2];
                out[(i * 4 + 1) * c + ch] = r[i][1] + r[i][2];
                out[(i * 4 + 2) * c + ch] = r[i][2] - r[i][1];
                out[(i * 4 + 3) * c + ch] = r[i][1] - r[i][3];
            }
        }
    }
}

template <typename T>
bool winograd_f2_output(address_t m_address, address_t bias_address, bool relu, index_t oh, index_t ow, index_t k,
                        index_t tiles_h, index_t tiles_w, index_t first_tile, index_t tiles, address_t y_address,
                        int nthreads) {
    const T* m = as_ptr<const T>(m_address);
    const T* bias = as_ptr<const T>(bias_address);
    T* y = as_ptr<T>(y_address);
    const std::vector<T> no_bias(static_cast<size_t>(k), T(0));
    if (bias == nullptr) bias = no_bias.data();
    const index_t per_image = tiles_h * tiles_w;
    // y - y is 0 for a finite y and NaN otherwise: the sum says whether every output (before the
    // ReLU, which would turn -inf into 0) is finite, at one add per output.
    T finite_check = T(0);
#pragma omp parallel num_threads(threads_for(tiles * 16 * k, nthreads)) reduction(+ : finite_check)
    {
        std::vector<T> discard(static_cast<size_t>(k));  // where a tile's outputs past the edge go
#pragma omp for schedule(static)
        for (index_t t = 0; t < tiles; ++t) {
            const index_t tile = first_tile + t;
            const index_t image = tile / per_image, ty = (tile % per_image) / tiles_w, tx = tile % tiles_w;
            T* target[2][2];
            for (int i = 0; i < 2; ++i)
                for (int j = 0; j < 2; ++j) {
                    const index_t oy = 2 * ty + i, ox = 2 * tx + j;
                    target[i][j] = oy < oh && ox < ow ? y + ((image * oh + oy) * ow + ox) * k : discard.data();
                }
            const T* in = m + t * 16 * k;
#pragma omp simd reduction(+ : finite_check)
            for (index_t ch = 0; ch < k; ++ch) {
                T s[2][4];
                for (int j = 0; j < 4; ++j) {  // A^T m
                    const T m0 = in[(0 * 4 + j) * k + ch], m1 = in[(1 * 4 + j) * k + ch];
                    const T m2 = in[(2 * 4 + j) * k + ch], m3 = in[(3 * 4 + j) * k + ch];
                    s[0][j] = m0 + m1 + m2;
                    s[1][j] = m1 - m2 - m3;
                }
                for (int i = 0; i < 2; ++i) {  // (A^T m) A + bias
                    T y0 = s[i][0] + s[i][1] + s[i][2] + bias[ch];
                    T y1 = s[i][1] - s[i][2] - s[i][3] + bias[ch];
                    finite_check += (y0 - y0) + (y1 - y1);
                    if (relu) {
                        y0 = y0 > T(0) ? y0 : (y0 == y0 ? T(0) : y0);  // NaN stays NaN, as torch's relu
                        y1 = y1 > T(0) ? y1 : (y1 == y1 ? T(0) : y1);
                    }
                    target[i][0][ch] = y0;
                    target[i][1][ch] = y1;
                }
            }
        }
    }
    return finite_check == T(0);
}

template <typename T>
void winograd_f2_weight(address_t g_address, index_t k, index_t c, address_t u_address, int nthreads) {
    // U = G g G^T per (K, C) filter, G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1], in double and
    // rounded once, into u (16, K, C): position p = 4 a + b of every filter together, the weight of
    // the 16-group 1x1 product. Done once per weight version: in training, every step.
    const T* g = as_ptr<const T>(g_address);
    T* u = as_ptr<T>(u_address);
    const index_t filters = k * c;
#pragma omp parallel for num_threads(threads_for(filters * 25, nthreads)) schedule(static)
    for (index_t f = 0; f < filters; ++f) {
        const T* w = g + f * 9;
        double t[3][4];  // t = g G^T: row r of the filter through G
        for (int r = 0; r < 3; ++r) {
            const double w0 = w[3 * r], w1 = w[3 * r + 1], w2 = w[3 * r + 2];
            t[r][0] = w0;
            t[r][1] = 0.5 * (w0 + w1 + w2);
            t[r][2] = 0.5 * (w0 - w1 + w2);
            t[r][3] = w2;
        }
        for (int b = 0; b < 4; ++b) {
            const double t0 = t[0][b], t1 = t[1][b], t2 = t[2][b];
            u[(0 * 4 + b) * filters + f] = static_cast<T>(t0);
            u[(1 * 4 + b) * filters + f] = static_cast<T>(0.5 * (t0 + t1 + t2));
            u[(2 * 4 + b) * filters + f] = static_cast<T>(0.5 * (t0 - t1 + t2));
            u[(3 * 4 + b) * filters + f] = static_cast<T>(t2);
        }
    }
}

template void winograd_f2_weight<float>(address_t, index_t, index_t, address_t, int);
template void winograd_f2_weight<double>(address_t, index_t, index_t, address_t, int);
template void winograd_f2_input<float>(address_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                       index_t, index_t, index_t, address_t, int);
template void winograd_f2_input<double>(address_t, index_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                        index_t, index_t, index_t, address_t, int);
template bool winograd_f2_output<float>(address_t, address_t, bool, index_t, index_t, index_t, index_t, index_t,
                                        index_t, index_t, address_t, int);
template bool winograd_f2_output<double>(address_t, address_t, bool, index_t, index_t, index_t, index_t, index_t,
                                         index_t, index_t, address_t, int);

}  // namespace fastml
