// Pairwise distances, exact (coordinate differences, never the expanded form): torch.cdist's
// forward for p = 2, 1 and inf.
#include <algorithm>
#include <vector>

#include "distance_tiles.h"
#include "kernels.h"

namespace fastml {

namespace {

// Threads take queries in contiguous ranges; with fewer query tiles than threads, they take
// reference ranges instead. Each thread packs a chunk of references once and runs every one
// of its query tiles against it.
template <typename T, Norm N>
void cdist_all(const T* x1, const T* x2, index_t batch, index_t n1, index_t n2, index_t m, T* out,
               int nthreads) {
    const int threads = threads_for(batch * n1 * n2 * std::max<index_t>(m, 1) / 8, nthreads);
    const index_t tiles = (n1 + kTileQueries - 1) / kTileQueries;
    const bool split_queries = tiles >= threads;
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        std::vector<T> packed(packed_chunk_size<T>(m));
        index_t q_begin = 0, q_end = n1, r_begin = 0, r_end = n2;
        if (split_queries) {
            query_part(n1, threads, t, q_begin, q_end);
        } else {
            reference_part<T>(n2, threads, t, r_begin, r_end);
        }
        for (index_t b = 0; b < batch; ++b) {
            T* o = out + b * n1 * n2;
            for_each_tile<T, N>(x1 + b * n1 * m, x2 + b * n2 * m, n1, m, q_begin, q_end, r_begin, r_end,
                                packed.data(), [&](index_t t0, index_t rows, index_t j0, index_t cols, const auto& acc) {
                                    for (index_t i = 0; i < rows; ++i)
                                        for (index_t l = 0; l < cols; ++l)
                                            o[(t0 + i) * n2 + j0 + l] = finish_distance<T, N>(acc[i][l]);
                                });
        }
    }
}

}  // namespace

// out (batch, n1, n2) = distances between the rows of x1 (batch, n1, m) and the rows of
// x2 (batch, n2, m). norm: 2 (euclidean), 1 (manhattan) or 0 (chebyshev, p = inf).
template <typename T>
void cdist_forward(address_t x1, address_t x2, index_t batch, index_t n1, index_t n2, index_t m, int norm,
                   address_t out, int nthreads) {
    const T *a = as_ptr<const T>(x1), *b = as_ptr<const T>(x2);
    T* o = as_ptr<T>(out);
    if (norm == 2) cdist_all<T, Norm::kL2>(a, b, batch, n1, n2, m, o, nthreads);
    if (norm == 1) cdist_all<T, Norm::kL1>(a, b, batch, n1, n2, m, o, nthreads);
    if (norm == 0) cdist_all<T, Norm::kLinf>(a, b, batch, n1, n2, m, o, nthreads);
}

template void cdist_forward<float>(address_t, address_t, index_t, index_t, index_t, index_t, int, address_t, int);
template void cdist_forward<double>(address_t, address_t, index_t, index_t, index_t, index_t, int, address_t, int);

}  // namespace fastml
