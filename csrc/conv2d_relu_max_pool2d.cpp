// Convolution + bias + ReLU + max-pool in one pass (LeNet's and VGG's block), and its backward.
//
// Forward: a task is (image, group, block of 8 output channels, pooled row). It computes the
// pool_kernel[0] convolution rows that pooled row reads with conv_tiles.h's register tiles into a
// small scratch (8 channels × those rows × the row's columns, in L1), then pools them: the
// pre-pool activation never reaches memory. Each maximum is kept as its int8 offset i·pool_kw + j
// in the window. Windows are scanned row by row, and a value replaces the maximum when greater
// or NaN (torch's max_pool2d rule); ReLU keeps NaN, as torch.relu.
// Small images in a large batch run the same in the batch-innermost layout (conv_batch_tiles.h),
// a vector holding one position of 16 images, its windows pooled lane-wise.
// Backward, one call: the weight and bias gradients from the activation gradient's nonzero
// entries alone where that applies (sparse_weight_gradient), then the activation gradient (grad
// at each window's maximum where the output is positive) and the convolution's remaining
// gradients (see conv2d_relu_max_pool2d_backward).
#include <cstring>
#include <type_traits>
#include <vector>

#include "conv_batch_tiles.h"
#include "conv_tiles.h"
#include "kernels.h"

namespace fastml {

namespace {

// The ReLU'd maximum of a pool window, pkh rows of pkw values `stride` apart from `row`, into best,
// and its offset i·pkw + j into argmax: a value replaces the maximum when greater or NaN (torch's
// max_pool2d: ties to the first); -1 where the maximum is <= 0, the ReLU passing no gradient. The
// ReLU keeps a NaN (it is not below 0), as torch.relu, and passes its gradient (nor is it <= 0).
template <typename T>
inline void relu_window_max(const T* row, index_t stride, index_t pkh, index_t pkw, T& best, std::int8_t& argmax) {
    T top = 0;
    int offset = -1;
    for (index_t i = 0; i < pkh; ++i) {
        for (index_t j = 0; j < pkw; ++j) {
            const T z = row[i * stride + j];
            const T v = z < 0 ? T(0) : z;
            if (offset < 0 || v > top || v != v) {
                top = v;
                offset = static_cast<int>(i * pkw + j);
            }
        }
    }
    best = top;
    argmax = static_cast<std::int8_t>(top <= 0 ? -1 : offset);
}

// relu_window_max over `count` 2 x 2 windows at stride 2 from `row` (the next row `stride`
// values on), a vector of pooled columns at a time: the two rows' values split into even and odd
// columns, the four candidates taken in the scalar scan's order by the same rule; the last
// columns by a vector overlapping the one before. Returns the first pooled column left for
// relu_window_max: 0 where the row has fewer than a vector's worth, else count. The scalar scan
// took 67 ms for VGG's 64 x 128 x 56 x 56 conv output on an Ice Lake Xeon, where torch's
// max_pool2d took 117 ms and a read of the 102 MB takes a few.
template <typename T>
inline index_t relu_max_pool_2x2_vectors(const T* row, index_t stride, index_t count, T* out, std::int8_t* argmax) {
    using S = Simd<T>;
    using V = typename S::vec;
    constexpr index_t W = S::kWidth;
    using I = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;
    typedef I IV __attribute__((vector_size(sizeof(V))));
    typedef std::int8_t BV __attribute__((vector_size(W)));
    if (count < W) return 0;
    IV even, odd;
    for (index_t lane = 0; lane < W; ++lane) even[lane] = I(2 * lane), odd[lane] = I(2 * lane + 1);
    index_t c = 0;
    for (;; c += W) {  // columns [2c, 2c + 2W) of both rows lie within the windows
        if (c + W > count) {
            if (c == count) break;
            c = count - W;  // the last columns: a vector that overlaps the one before (same values)
        }
        IV offset{};
        V best{};
        for (index_t i = 0; i < 2; ++i) {
            const V first = S::load(row + i * stride + 2 * c), second = S::load(row + i * stride + 2 * c + W);
            const V pair[2] = {__builtin_shuffle(first, second, even), __builtin_shuffle(first, second, odd)};
            for (index_t j = 0; j < 2; ++j) {
                const V v = pair[j] < T(0) ? V{} : pair[j];  // ReLU keeping NaN and -0, as relu_window_max
                if (i == 0 && j == 0) {
                    best = v;
                    continue;
                }
                const IV take = (v > best) | (v != v);
                best = take ? v : best;
                offset = take ? IV{} + I(i * 2 + j) : offset;
            }
        }
        S::store(out + c, best);
        const BV offsets = __builtin_convertvector(best <= T(0) ? IV{} - I(1) : offset, BV);
        std::memcpy(argmax + c, &offsets, sizeof(offsets));
    }
    return count;
}

// relu_window_max for `count` consecutive pooled columns (windows psw apart) of one pooled row.
template <typename T>
inline void relu_max_pool_row(const T* row, index_t stride, index_t pkh, index_t pkw, index_t psw, index_t count,
                              T* out, std::int8_t* argmax) {
    index_t c = pkh == 2 && pkw == 2 && psw == 2 ? relu_max_pool_2x2_vectors(row, stride, count, out, argmax) : 0;
    for (; c < count; ++c) relu_window_max(row + c * psw, stride, pkh, pkw, out[c], argmax[c]);
}

template <typename T, int NV>
void fused_forward(const T* padded, index_t hp, index_t wp, const T* packed, const T* bias, const ConvShape& cs,
                   index_t pkh, index_t pkw, index_t psh, index_t psw, index_t ph_out, index_t pw_out, T* out,
                   std::int8_t* argmax, int threads) {
    using S = Simd<T>;
    const index_t kg = cs.kg(), blocks = cs.kblocks(), weights_per_block = cs.cg() * cs.r * cs.s * kKB;
    const index_t row_stride = (cs.ow + NV * S::kWidth - 1) / (NV * S::kWidth) * (NV * S::kWidth);
    const index_t tasks = cs.n * cs.groups * blocks * ph_out;
#pragma omp parallel num_threads(threads)
    {
        std::vector<T> scratch(kKB * pkh * row_stride);  // [channel][window row][column]
#pragma omp for schedule(static)
        for (index_t task = 0; task < tasks; ++task) {
            const index_t prow = task % ph_out, block = task / ph_out % blocks, g = task / ph_out / blocks % cs.groups,
                          img = task / ph_out / blocks / cs.groups;
            const T* xg = padded + (img * cs.c + g * cs.cg()) * hp * wp;
            const T* wb = packed + (g * blocks + block) * weights_per_block;
            const index_t first = g * kg + block * kKB, count = std::min(kKB, kg - block * kKB);
            for (index_t i = 0; i < pkh; ++i) {
                conv_row<T, NV>(xg, cs, hp, wp, wb, prow * psh + i, [&](index_t col0, index_t cols, const auto& acc) {
                    for (index_t o = 0; o < count; ++o) {
                        // ReLU keeping NaN (a NaN is not below 0), as torch.relu
                        store_tile_row(acc[o], bias ? bias[first + o] : T(0), cols,
                                       scratch.data() + (o * pkh + i) * row_stride + col0,
                                       [](auto z) { return z < 0 ? decltype(z){} : z; });
                    }
                });
            }
            for (index_t o = 0; o < count; ++o) {
                const index_t at = ((img * cs.k + first + o) * ph_out + prow) * pw_out;
                relu_max_pool_row(scratch.data() + o * pkh * row_stride, row_stride, pkh, pkw, psw, pw_out, out + at,
                                  argmax + at);
            }
        }
    }
}

// fused_forward in the batch layout: a task is (block of images, group, block of 8 output
// channels, pooled row), the pooled rows outermost where batch_rows_outermost says; scratch holds
// [channel][window row][column] vectors of images.
template <typename T>
void batch_fused_forward(const T* planes, index_t hp, index_t wp, const T* packed, const T* bias, const ConvShape& cs,
                         index_t pkh, index_t pkw, index_t psh, index_t psw, index_t ph_out, index_t pw_out, T* out,
                         std::int8_t* argmax, int threads) {
    using S = Simd<T>;
    using V = typename S::vec;
    using Lanes = decltype(V{} < V{});  // integer vector: comparison masks, and the offsets kept
    using Offset = std::remove_reference_t<decltype(Lanes{}[0])>;
    constexpr index_t L = S::kWidth;
    const index_t kg = cs.kg(), blocks = cs.kblocks(), weights_per_block = cs.cg() * cs.r * cs.s * kKB;
    const index_t image_blocks = (cs.n + L - 1) / L, pooled = ph_out * pw_out;
    const PlaneWindow window = placed_window(cs.ph, cs.pw, cs.h, cs.w, 1, 1, hp, wp);  // the input, padded
    const index_t tasks = image_blocks * cs.groups * blocks * ph_out;
    const bool rows_outer = batch_rows_outermost<T>(cs, hp, wp);
#pragma omp parallel num_threads(threads)
    {
        std::vector<V> scratch(kKB * pkh * cs.ow), partial;
#pragma omp for schedule(static)
        for (index_t task = 0; task < tasks; ++task) {
            const auto [ib, g, block, prow] = batch_task(task, ph_out, blocks, cs.groups, rows_outer);
            const T* xg = planes + (ib * cs.c + g * cs.cg()) * hp * wp * L;
            const T* wb = packed + (g * blocks + block) * weights_per_block;
            const index_t first = g * kg + block * kKB, count = std::min(kKB, kg - block * kKB);
            for (index_t i = 0; i < pkh; ++i) {
                batch_conv_row<T>(xg, cs, hp, wp, window, wb, count, prow * psh + i, partial,
                                  [&](index_t col, index_t cols, const auto& acc) {
                    for (index_t o = 0; o < count; ++o) {
                        const V shift = S::broadcast(bias ? bias[first + o] : T(0));
                        for (index_t p = 0; p < cols; ++p) {
                            const V z = acc[o][p] + shift;
                            scratch[(o * pkh + i) * cs.ow + col + p] = z < 0 ? V{} : z;  // ReLU keeping NaN
                        }
                    }
                });
            }
            const index_t images = std::min(L, cs.n - ib * L);
            for (index_t o = 0; o < count; ++o) {
                const index_t at = ((ib * L * cs.k + first + o) * ph_out + prow) * pw_out;
                for (index_t pc = 0; pc < pw_out; ++pc) {
                    const V* window = scratch.data() + o * pkh * cs.ow + pc * psw;
                    V best = window[0];
                    Lanes offset{};
                    for (index_t i = 0; i < pkh; ++i) {
                        for (index_t j = (i == 0 ? 1 : 0); j < pkw; ++j) {
                            const V v = window[i * cs.ow + j];
                            const Lanes take = (v > best) | (v != v);  // torch's rule: greater, or NaN
                            best = take ? v : best;
                            offset = take ? Lanes{} + Offset(i * pkw + j) : offset;
                        }
                    }
                    for (index_t l = 0; l < images; ++l) {
                        out[at + l * cs.k * pooled + pc] = best[l];
                        argmax[at + l * cs.k * pooled + pc] =
                            static_cast<std::int8_t>(best[l] <= 0 ? -1 : offset[l]);  // (as fused_forward's)
                    }
                }
            }
        }
    }
}

}  // namespace

// grad_z (planes, oh, ow) = grad (planes, ph_out, pw_out) at each window's maximum where argmax is
// not -1 (the ReLU passes the gradient), zero elsewhere (overlapping windows add up, in output order):
// the fused backward's first step where it does not fuse it, and the whole C++ part of a backward
// that leaves the convolution's gradients to torch's (fastml/ops/conv2d_relu_max_pool2d/cpp_impl.py).
template <typename T>
void relu_max_pool2d_backward(address_t grad_, address_t argmax_, index_t planes, index_t oh, index_t ow,
                              const std::vector<index_t>& pool, address_t grad_z_, int nthreads) {
    const index_t pkw = pool[1], psh = pool[2], psw = pool[3], ph_out = pool[4], pw_out = pool[5];
    const T* grad = as_ptr<const T>(grad_);
    const auto* argmax = as_ptr<const std::int8_t>(argmax_);
    T* grad_z = as_ptr<T>(grad_z_);
#pragma omp parallel for schedule(static) num_threads(threads_for(planes * oh * ow, nthreads))
    for (index_t p = 0; p < planes; ++p) {
        T* plane = grad_z + p * oh * ow;
        std::fill(plane, plane + oh * ow, T(0));
        for (index_t r = 0; r < ph_out; ++r) {
            for (index_t c = 0; c < pw_out; ++c) {
                const index_t at = (p * ph_out + r) * pw_out + c;
                const index_t offset = argmax[at];
                if (offset < 0) continue;  // the ReLU passes nothing
                plane[(r * psh + offset / pkw) * ow + c * psw + offset % pkw] += grad[at];
            }
        }
    }
}

namespace {

// ------------------------------------------------- the weight gradient, from the nonzero entries
//
// After ReLU and a max-pool, the activation gradient is nonzero only at each window's maximum
// where the output is positive: one conv position per pooled output at most, a quarter of them or
// fewer for 2 x 2 pools. A dense weight gradient (fastml's tiles or oneDNN's) multiplies every
// zero too. Here each image's nonzero entries of channel k are listed (g, and the position of
// the input patch it saw), then every kernel row (k, c, a) of the weight gradient is summed over
// them in registers: Σ g · x[c, oy·sh + a·dh, ox·sw .. + s], one SIMD vector per kernel row
// (two for rows wider than a vector), up to kSparseRows rows of a few channels at once (see
// sparse_channels), on zero-padded input planes
// with room past every row for a whole vector: the lanes past the kernel row add into padding
// that is dropped. LeNet's second
// layer (256 x 6 x 14 x 14 -> 16 5x5, 2 x 2 pool): a quarter of the multiply-adds, none of
// them on zeros.
//
// Exact to rounding where the dense sum is: with every x finite, the skipped products are
// 0 · finite = 0 (an infinite or NaN input makes 0 · x NaN in the dense sums: the dense path).

constexpr index_t kSparseRows = 8;  // kernel rows of one channel summed at once (a 5 x 5 kernel: all 5)

// Channels whose kernel rows one pass over the entries sums, where each channel's rows take
// `vectors` accumulators: enough for kFmaChains independent sums, within the registers (two
// spare for the broadcast gradient and a loaded operand). Each entry adds one product to each
// accumulator, so a chain is as long as the entries (up to 25 for LeNet's second layer, its
// 5 x 5 pooled outputs): with one channel's 4 rows at once, as before, the 4 chains' latency bound
// the sum; LeNet's 5 rows of 2 channels make 10 (with the entry tables below, 440 -> 304 us on a
// Zen 5, AVX2 build).
constexpr int sparse_channels(int vectors) {
    const int want = (kFmaChains + vectors - 1) / vectors, most = (kVectorRegisters - 3) / vectors;
    return std::max(1, std::min(want, most));
}

// Whether the sparse weight gradient applies: one group, contiguous taps along a row (dw = 1),
// kernel rows of at most two vectors, at most two thirds of the dense sum's work counted in the
// sparse sum's lanes; and either what it sweeps for each output channel well inside the L2, or
// no more than the dense sum's work counted in the dense tiles' lanes and enough entries to pay
// for each sweep.
//
// The work: each nonzero entry (one per pooled output at most) costs a kernel row's whole
// vectors, of which only s lanes are taps; the dense sum costs every conv position's s taps,
// lanes full: pooled · vectors · W against positions · s. The sparse vectors are NarrowSimd's 8
// float lanes, AVX-512 builds included. Under 2 x 2 pools, 5-wide kernels (LeNet) come to 2/5 of
// the dense work (measured 0.32 of the dense time on a Zen 3, AVX2) and 3-wide ones to 2/3
// (measured 0.53 on the Zen 3; 0.6 for VGG's 3x3 blocks at batch 16 on a Zen 5, AVX2 build).
//
// The sweep: for each image, every output channel reads all of the image's padded planes and
// its slice of the thread's weight-gradient sums. Where the planes and sums take at most half
// the L2, the sparse sum won on a Zen 5 whatever the lanes: LeNet's blocks (22 KB; 307 against
// 806 us at 256 x 6 x 14 x 14 -> 16, 5x5, against the AVX-512 dense tiles) and VGG's first
// (3 -> 64 at 112 x 112, 185 KB: 4.4 against 22 ms). Beyond, each sweep comes from farther away:
// the dense tiles of an AVX-512 build, with 16 lanes, then won VGG's other 3x3 blocks (64 -> 128
// at 56 x 56: 21.3 against 27.9 ms), where the sparse sum does 4/3 of their work; and a sweep
// must make at least one product (an entry's kernel row vector) for every 4 elements it reads
// of the channel's plane and sums (VGG's last block, 512 channels at 7 x 7 and a 3 x 3 pooled
// plane: one for every 6.6; 2x slower sparse with either build).
template <typename T>
bool sparse_weight_gradient_applies(const ConvShape& cs, index_t ph_out, index_t pw_out) {
    constexpr index_t W = NarrowSimd<T>::kWidth, dense_lanes = Simd<T>::kWidth;
    const index_t vectors = (cs.s + W - 1) / W, pooled = ph_out * pw_out, positions = cs.oh * cs.ow;
    if (cs.groups != 1 || cs.dw != 1 || vectors > 2 || cs.n == 0 || cs.k == 0 ||
        3 * pooled * vectors * W > 2 * positions * cs.s)
        return false;
    const index_t plane = (cs.h + 2 * cs.ph) * (cs.w + 2 * cs.pw + W), kernel = cs.r * vectors * W;
    if (2 * cs.c * (plane + cs.k * kernel) * index_t(sizeof(T)) <= cache_sizes().l2) return true;
    return pooled * vectors * dense_lanes <= positions * cs.s && plane + kernel <= 4 * pooled * cs.r * vectors;
}

template <typename T>
bool all_finite(const T* p, index_t n, int threads) {
    index_t bad = 0;
#pragma omp parallel for simd reduction(+ : bad) num_threads(threads) schedule(static)
    for (index_t i = 0; i < n; ++i) bad += (p[i] - p[i] != p[i] - p[i]);  // x - x is NaN for inf and NaN
    return bad == 0;
}

// acc[c][a][v] = Σ_e g[e] · x[at[e] + c·plane + a·row_step + v·W] for CH channels of ROWS
// kernel rows and V vectors each, added into out (channels `channel` values apart, rows `row`).
template <typename T, int CH, int ROWS, int V>
inline void sparse_rows(const T* x, index_t plane, index_t row_step, const index_t* at, const T* g, index_t entries,
                        T* out, index_t channel, index_t row) {
    using S = NarrowSimd<T>;
    typename S::vec acc[CH][ROWS][V];
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c) zero_tile(acc[c]);
    for (index_t e = 0; e < entries; ++e) {
        const typename S::vec gv = S::broadcast(g[e]);
        const T* p = x + at[e];
#pragma GCC unroll 8
        for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
            for (int a = 0; a < ROWS; ++a)
#pragma GCC unroll 2
                for (int v = 0; v < V; ++v) acc[c][a][v] += gv * S::load(p + c * plane + a * row_step + v * S::kWidth);
    }
#pragma GCC unroll 8
    for (int c = 0; c < CH; ++c)
#pragma GCC unroll 8
        for (int a = 0; a < ROWS; ++a)
#pragma GCC unroll 2
            for (int v = 0; v < V; ++v) {
                T* o = out + c * channel + a * row + v * S::kWidth;
                S::store(o, S::load(o) + acc[c][a][v]);
            }
}

// sparse_rows over every one of `channels` channels for ROWS kernel rows of V vectors each:
// sparse_channels(ROWS · V) channels at a time, the rest one by one.
template <typename T, int ROWS, int V>
inline void sparse_channel_rows(index_t channels, const T* x, index_t plane, index_t row_step, const index_t* at,
                                const T* g, index_t entries, T* out, index_t channel, index_t row) {
    constexpr int CH = sparse_channels(ROWS * V);
    index_t c = 0;
    for (; c + CH <= channels; c += CH)
        sparse_rows<T, CH, ROWS, V>(x + c * plane, plane, row_step, at, g, entries, out + c * channel, channel, row);
    if constexpr (CH > 1)
        for (; c < channels; ++c)
            sparse_rows<T, 1, ROWS, V>(x + c * plane, plane, row_step, at, g, entries, out + c * channel, channel,
                                       row);
}

// sparse_channel_rows for `rows` kernel rows (1 .. kSparseRows) of V vectors each.
template <typename T, int V>
inline void sparse_row_block(index_t rows, index_t channels, const T* x, index_t plane, index_t row_step,
                             const index_t* at, const T* g, index_t entries, T* out, index_t channel, index_t row) {
    static_assert(kSparseRows == 8, "a block's row counts are with_count_up_to_8's");
    with_count_up_to_8(rows, [&](auto block_rows) {
        sparse_channel_rows<T, decltype(block_rows)::value, V>(channels, x, plane, row_step, at, g, entries, out,
                                                               channel, row);
    });
}

// grad_w (and grad_b where not null) from the nonzero entries of the activation gradient (where
// sparse_weight_gradient_applies and x is finite). Threads take images and keep partial sums,
// added in a fixed order.
template <typename T>
void sparse_weight_gradient(const T* grad, const std::int8_t* argmax, const T* x, const ConvShape& cs,
                            const std::vector<index_t>& pool, T* grad_w, T* grad_b, int threads) {
    constexpr index_t W = NarrowSimd<T>::kWidth;
    const index_t pkw = pool[1], psh = pool[2], psw = pool[3], ph_out = pool[4], pw_out = pool[5];
    const index_t pooled = ph_out * pw_out, vectors = (cs.s + W - 1) / W, row = vectors * W;
    // planes: the padding, and a vector's room past the last column
    const index_t wp = cs.w + 2 * cs.pw + W, hp = cs.h + 2 * cs.ph, plane = hp * wp;
    const index_t kernel_rows = cs.k * cs.c * cs.r;
    const int parts = static_cast<int>(std::max<index_t>(1, std::min<index_t>(threads, cs.n)));
    std::vector<T> w_parts(index_t(parts) * kernel_rows * row, T(0)), b_parts(grad_b ? parts * cs.k : 0, T(0));
#pragma omp parallel num_threads(parts)
    {
        const int t = omp_get_thread_num();
        index_t first, last;
        split_range(cs.n, parts, t, first, last);
        std::vector<T> planes(cs.c * plane, T(0));
        std::vector<index_t> at(pooled);
        std::vector<T> g(pooled);
        // In the planes, each pooled output's window's first tap, and each window offset's shift
        // from it: tables, not two integer divisions per entry (a third of this loop's time).
        std::vector<index_t> window_at(pooled), offset_at(pool[0] * pkw);
        for (index_t q = 0; q < pooled; ++q) window_at[q] = q / pw_out * psh * cs.sh * wp + q % pw_out * psw * cs.sw;
        for (index_t o = 0; o < index_t(offset_at.size()); ++o) offset_at[o] = o / pkw * cs.sh * wp + o % pkw * cs.sw;
        T* gw = w_parts.data() + index_t(t) * kernel_rows * row;
        for (index_t n = first; n < last; ++n) {
            pad_planes(x + n * cs.c * cs.h * cs.w, cs.c, cs.h, cs.w, cs.ph, cs.pw, 1, 1, hp, wp, planes.data());
            for (index_t k = 0; k < cs.k; ++k) {
                const index_t base = (n * cs.k + k) * pooled;
                index_t entries = 0;
                T total = 0;
                for (index_t q = 0; q < pooled; ++q) {
                    if (argmax[base + q] < 0) continue;  // the ReLU passes nothing
                    at[entries] = window_at[q] + offset_at[argmax[base + q]];  // the patch's first tap
                    g[entries++] = grad[base + q];
                    total += grad[base + q];
                }
                if (grad_b) b_parts[t * cs.k + k] += total;
                for (index_t a = 0; a < cs.r; a += kSparseRows) {  // the last block: the rows left
                    const index_t count = std::min(kSparseRows, cs.r - a);
                    const T* xa = planes.data() + a * cs.dh * wp;
                    T* o = gw + (k * cs.c * cs.r + a) * row;
                    if (vectors == 1)
                        sparse_row_block<T, 1>(count, cs.c, xa, plane, cs.dh * wp, at.data(), g.data(), entries, o,
                                               cs.r * row, row);
                    else
                        sparse_row_block<T, 2>(count, cs.c, xa, plane, cs.dh * wp, at.data(), g.data(), entries, o,
                                               cs.r * row, row);
                }
            }
        }
    }
    // the threads' sums in a fixed order; each kernel row's padding lanes dropped
    for (index_t t = 0; t < kernel_rows; ++t)
        for (index_t b = 0; b < cs.s; ++b) {
            T total = 0;
            for (int p = 0; p < parts; ++p) total += w_parts[(index_t(p) * kernel_rows + t) * row + b];
            grad_w[t * cs.s + b] = total;
        }
    if (grad_b) reduce_partials(b_parts.data(), parts, cs.k, T(1), grad_b, 1);
}

}  // namespace

template <typename T>
void conv2d_relu_max_pool2d_forward(address_t x_, address_t w_, address_t b_, const std::vector<index_t>& dims,
                                    const std::vector<index_t>& pool, address_t out_, address_t argmax_,
                                    int nthreads) {
    const ConvShape cs = conv_shape(dims);
    const index_t pkh = pool[0], pkw = pool[1], psh = pool[2], psw = pool[3], ph_out = pool[4], pw_out = pool[5];
    const int threads = threads_for(cs.n * cs.k * cs.oh * cs.ow * cs.cg() * cs.r * cs.s, nthreads);
    const index_t hp = cs.hp(), wp = cs.wp();
    const auto packed = packed_weights(as_ptr<const T>(w_), cs, false);
    const T* bias = as_ptr<const T>(b_);
    T* out = as_ptr<T>(out_);
    auto* argmax = as_ptr<std::int8_t>(argmax_);
    if (batch_layout_pays<T>(cs.n)) {
        const auto planes = batch_input(as_ptr<const T>(x_), cs, hp, wp, threads);
        batch_fused_forward(planes.data(), hp, wp, packed.data(), bias, cs, pkh, pkw, psh, psw, ph_out, pw_out, out,
                            argmax, threads);
        return;
    }
    const auto padded = padded_input(as_ptr<const T>(x_), cs, hp, wp, threads);
    if (cs.ow <= Simd<T>::kWidth) {  // one vector covers the row
        fused_forward<T, 1>(padded.data(), hp, wp, packed.data(), bias, cs, pkh, pkw, psh, psw, ph_out, pw_out, out,
                            argmax, threads);
    } else {
        fused_forward<T, kRowVectors>(padded.data(), hp, wp, packed.data(), bias, cs, pkh, pkw, psh, psw, ph_out,
                                      pw_out, out, argmax, threads);
    }
}

// The whole backward pass: grad (n, k, pooled h, pooled w) → grad_x, grad_w, grad_b (each 0 when
// not wanted). The weight and bias gradients first, from the nonzero entries alone, where
// sparse_weight_gradient applies and x is finite (LeNet's blocks, interleaved in one process on a
// Zen 3: weight + bias gradients 3.1 -> 1.2 ms at 256 x 6 x 14 x 14 -> 16 5x5, 3.3 -> 1.3 ms
// at 256 x 1 x 28 x 28 -> 6). Then, for what is left: in the batch layout (stride 1, padding
// within the kernel's reach) the activation gradient goes straight from the pooled gradient into
// batch planes laid out as grad_input's spread planes, and grad_weight reads the same planes at
// their offset: no (n, k, oh, ow) activation gradient, and one transposition instead of three.
// Otherwise relu_max_pool2d_backward and conv2d.cpp's gradients, as before.
template <typename T>
void conv2d_relu_max_pool2d_backward(address_t grad_, address_t argmax_, address_t x_, address_t w_,
                                     const std::vector<index_t>& dims, const std::vector<index_t>& pool,
                                     address_t grad_x_, address_t grad_w_, address_t grad_b_, int nthreads) {
    const ConvShape cs = conv_shape(dims);
    if (grad_w_ && sparse_weight_gradient_applies<T>(cs, pool[4], pool[5])) {
        const int threads = threads_for(cs.n * cs.k * pool[4] * pool[5] * cs.c * cs.r * cs.s, nthreads);
        const T* x = as_ptr<const T>(x_);
        if (all_finite(x, cs.n * cs.c * cs.h * cs.w, threads)) {
            sparse_weight_gradient(as_ptr<const T>(grad_), as_ptr<const std::int8_t>(argmax_), x, cs, pool,
                                   as_ptr<T>(grad_w_), as_ptr<T>(grad_b_), threads);
            grad_w_ = grad_b_ = 0;  // done: what is left is the input gradient, if wanted
            if (!grad_x_) return;
        }
    }
    const index_t top = (cs.r - 1) * cs.dh - cs.ph, left = (cs.s - 1) * cs.dw - cs.pw;
    if (!batch_layout_pays<T>(cs.n) || cs.sh != 1 || cs.sw != 1 || top < 0 || left < 0) {
        std::vector<T> grad_z(cs.n * cs.k * cs.oh * cs.ow);
        const address_t z = reinterpret_cast<address_t>(grad_z.data());
        relu_max_pool2d_backward<T>(grad_, argmax_, cs.n * cs.k, cs.oh, cs.ow, pool, z, nthreads);
        if (grad_x_) conv2d_backward_input<T>(z, w_, dims, grad_x_, nthreads);
        if (grad_w_ || grad_b_) conv2d_backward_weight<T>(z, x_, dims, grad_w_, grad_b_, nthreads);
        return;
    }
    using S = Simd<T>;
    constexpr index_t L = S::kWidth;
    const int threads = threads_for(cs.n * cs.k * cs.oh * cs.ow * cs.cg() * cs.r * cs.s, nthreads);
    const index_t pkw = pool[1], psh = pool[2], psw = pool[3], ph_out = pool[4], pw_out = pool[5];
    const index_t hp = gradient_plane_rows(cs.h + (cs.r - 1) * cs.dh, cs.w + (cs.s - 1) * cs.dw);
    const index_t wp = cs.w + (cs.s - 1) * cs.dw, pitch = hp * wp * L, pooled = ph_out * pw_out;
    const index_t image_blocks = (cs.n + L - 1) / L;
    const T* grad = as_ptr<const T>(grad_);
    const auto* argmax = as_ptr<const std::int8_t>(argmax_);
    Uninitialized<T> planes(image_blocks * cs.k * pitch);  // each task zeroes its own plane
    std::vector<T> bias_parts(image_blocks * cs.k, T(0));
#pragma omp parallel for schedule(static) num_threads(threads)
    for (index_t task = 0; task < image_blocks * cs.k; ++task) {
        const index_t ib = task / cs.k, ko = task % cs.k, images = std::min(L, cs.n - ib * L);
        T* plane = planes.data() + task * pitch;
        std::fill(plane, plane + pitch, T(0));
        T total = 0;
        for (index_t l = 0; l < images; ++l) {
            const index_t at = ((ib * L + l) * cs.k + ko) * pooled;
            for (index_t q = 0; q < pooled; ++q) {
                const index_t offset = argmax[at + q], pr = q / pw_out, pc = q % pw_out;
                if (offset < 0) continue;  // the ReLU passes nothing
                const index_t row = top + pr * psh + offset / pkw, col = left + pc * psw + offset % pkw;
                plane[(row * wp + col) * L + l] += grad[at + q];
                total += grad[at + q];
            }
        }
        bias_parts[task] = total;
    }
    if (grad_b_) {
        T* grad_b = as_ptr<T>(grad_b_);
        for (index_t ko = 0; ko < cs.k; ++ko) {
            T total = 0;
            for (index_t ib = 0; ib < image_blocks; ++ib) total += bias_parts[ib * cs.k + ko];
            grad_b[ko] = total;
        }
    }
    if (grad_x_) {
        const auto packed = packed_weights(as_ptr<const T>(w_), cs, true);
        const ConvShape transposed{cs.n, cs.k, hp, wp, cs.c, cs.r, cs.s, 1, 1, 0, 0, cs.dh, cs.dw, cs.groups, cs.h,
                                   cs.w};
        const PlaneWindow window = placed_window(top, left, cs.oh, cs.ow, 1, 1, hp, wp);
        batch_correlate<T>(planes.data(), hp, wp, window, packed.data(), nullptr, transposed, as_ptr<T>(grad_x_),
                           threads);
    }
    if (grad_w_) {
        const index_t xh = cs.hp(), xw = cs.wp();
        const auto inputs = batch_input(as_ptr<const T>(x_), cs, xh, xw, threads);
        batch_weight_gradient(planes.data() + (top * wp + left) * L, wp, pitch, inputs.data(), xh, xw, cs,
                              as_ptr<T>(grad_w_), threads);
    }
}

// out, argmax (planes, pooled h, pooled w) from a convolution's output z (planes, oh, ow), bias
// included: max_pool2d(relu(z)) and the window offsets, as the fused forward's epilogue, for a
// forward that leaves the convolution to torch's (fastml/ops/conv2d_relu_max_pool2d/cpp_impl.py).
template <typename T>
void relu_max_pool2d_forward(address_t z_, index_t planes, index_t oh, index_t ow, const std::vector<index_t>& pool,
                             address_t out_, address_t argmax_, int nthreads) {
    const index_t pkh = pool[0], pkw = pool[1], psh = pool[2], psw = pool[3], ph_out = pool[4], pw_out = pool[5];
    const T* z = as_ptr<const T>(z_);
    T* out = as_ptr<T>(out_);
    auto* argmax = as_ptr<std::int8_t>(argmax_);
#pragma omp parallel for schedule(static) num_threads(threads_for(planes * oh * ow, nthreads))
    for (index_t p = 0; p < planes; ++p) {
        for (index_t r = 0; r < ph_out; ++r) {
            const T* row = z + (p * oh + r * psh) * ow;
            const index_t at = (p * ph_out + r) * pw_out;
            relu_max_pool_row(row, ow, pkh, pkw, psw, pw_out, out + at, argmax + at);
        }
    }
}

#define FASTML_FUSED(T)                                                                                        \
    template void conv2d_relu_max_pool2d_forward<T>(address_t, address_t, address_t, const std::vector<index_t>&, \
                                                    const std::vector<index_t>&, address_t, address_t, int);      \
    template void conv2d_relu_max_pool2d_backward<T>(address_t, address_t, address_t, address_t,                 \
                                                     const std::vector<index_t>&, const std::vector<index_t>&,    \
                                                     address_t, address_t, address_t, int);                \
    template void relu_max_pool2d_backward<T>(address_t, address_t, index_t, index_t, index_t,                 \
                                              const std::vector<index_t>&, address_t, int);                    \
    template void relu_max_pool2d_forward<T>(address_t, index_t, index_t, index_t, const std::vector<index_t>&, \
                                             address_t, address_t, int);
FASTML_FUSED(float)
FASTML_FUSED(double)
#undef FASTML_FUSED

}  // namespace fastml
