// Pairwise distances, exact (coordinate differences, never the expanded form): torch.cdist's
// forward for p = 2, 1 and inf.
#include <algorithm>

#include "distance_tiles.h"
#include "kernels.h"

namespace fastml {

namespace {

constexpr index_t kQuerySuperblock = 256;  // queries that share one pass over a reference chunk
constexpr index_t kReferenceChunk = 1024;  // references per chunk: 1024 × m values stay in L2

template <typename T, Norm N>
void cdist_all(const T* x1, const T* x2t, index_t batch, index_t n1, index_t n2, index_t m, index_t ldr,
               T* out, int nthreads) {
    using S = Simd<T>;
    const index_t superblocks = (n1 + kQuerySuperblock - 1) / kQuerySuperblock;
    const int threads = threads_for(batch * n1 * n2 * std::max<index_t>(m, 1) / 8, nthreads);
    // Few query superblocks: split the references too, so that every thread has work.
    const index_t parts = batch * superblocks >= threads ? 1 : (threads + batch * superblocks - 1) / (batch * superblocks);
    const index_t tasks = batch * superblocks * parts;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (index_t task = 0; task < tasks; ++task) {
        const index_t b = task / (superblocks * parts), sb = task / parts % superblocks, part = task % parts;
        const T* x = x1 + b * n1 * m;
        const T* rt = x2t + b * m * ldr;
        T* o = out + b * n1 * n2;
        index_t r_begin, r_end;
        split_range((n2 + S::kWidth - 1) / S::kWidth, int(parts), int(part), r_begin, r_end);
        r_begin *= S::kWidth;
        r_end = std::min(n2, r_end * S::kWidth);
        const index_t q_end = std::min(n1, (sb + 1) * kQuerySuperblock);
        for (index_t c0 = r_begin; c0 < r_end; c0 += kReferenceChunk) {
            const index_t c1 = std::min(r_end, c0 + kReferenceChunk);
            for (index_t q0 = sb * kQuerySuperblock; q0 < q_end; q0 += kTileQueries) {
                const T* qs[kTileQueries];
                tile_queries(x, m, q0, n1, qs);
                const index_t rows = std::min<index_t>(kTileQueries, n1 - q0);
                for (index_t j0 = c0; j0 < c1; j0 += S::kWidth) {
                    typename S::vec acc[kTileQueries];
                    distance_tile<T, N>(qs, rt + j0, ldr, m, acc);
                    const index_t cols = std::min<index_t>(S::kWidth, c1 - j0);
                    for (index_t i = 0; i < rows; ++i)
                        for (index_t l = 0; l < cols; ++l) o[(q0 + i) * n2 + j0 + l] = finish_distance<T, N>(acc[i][l]);
                }
            }
        }
    }
}

}  // namespace

// out (batch, n1, n2) = distances between the rows of x1 (batch, n1, m) and the rows of x2,
// given transposed and zero-padded as x2t (batch, m, ldr), ldr >= n2 a multiple of the SIMD
// width. norm: 2 (euclidean), 1 (manhattan) or 0 (chebyshev, p = inf).
template <typename T>
void cdist_forward(address_t x1, address_t x2t, index_t batch, index_t n1, index_t n2, index_t m, index_t ldr,
                   int norm, address_t out, int nthreads) {
    const T *a = as_ptr<const T>(x1), *bt = as_ptr<const T>(x2t);
    T* o = as_ptr<T>(out);
    if (norm == 2) cdist_all<T, Norm::kL2>(a, bt, batch, n1, n2, m, ldr, o, nthreads);
    if (norm == 1) cdist_all<T, Norm::kL1>(a, bt, batch, n1, n2, m, ldr, o, nthreads);
    if (norm == 0) cdist_all<T, Norm::kLinf>(a, bt, batch, n1, n2, m, ldr, o, nthreads);
}

template void cdist_forward<float>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, int,
                                   address_t, int);
template void cdist_forward<double>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, int,
                                    address_t, int);

}  // namespace fastml
