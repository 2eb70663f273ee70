// k nearest neighbours, fused: exact distance tiles (distance_tiles.h) reduced on the fly to each
// query's k best in a bounded max-heap, so the query × reference matrix never exists. The heaps
// live in the outputs themselves (k distances and indices per query); extra memory is O(k) per
// thread, or O(threads · queries · k) when the references are split between threads.
//
// Order: ascending distance, ties broken by the lower reference index, NaN after every number
// (as torch.sort puts it). References are scanned in increasing index order within a heap, so a
// later reference at an equal distance never displaces an earlier one.
#include <algorithm>
#include <utility>
#include <vector>

#include "distance_tiles.h"
#include "kernels.h"

namespace fastml {

namespace {

// Whether (d1, j1) comes before (d2, j2) in the neighbour order.
template <typename T>
inline bool precedes(T d1, index_t j1, T d2, index_t j2) {
    if (d1 != d1) return d2 != d2 && j1 < j2;
    if (d2 != d2) return true;
    return d1 < d2 || (d1 == d2 && j1 < j2);
}

// A max-heap of at most `cap` neighbours (the root is the worst kept) over two parallel arrays.
template <typename T>
struct BoundedHeap {
    T* d;
    index_t* j;
    index_t cap, count;

    bool full() const { return count == cap; }
    T worst() const { return d[0]; }

    void offer(T dist, index_t index) {
        if (count < cap) {
            index_t c = count++;
            while (c > 0) {  // sift up
                const index_t parent = (c - 1) / 2;
                if (!precedes(d[parent], j[parent], dist, index)) break;
                d[c] = d[parent];
                j[c] = j[parent];
                c = parent;
            }
            d[c] = dist;
            j[c] = index;
        } else if (precedes(dist, index, d[0], j[0])) {
            index_t c = 0;
            for (;;) {  // sift down from the root
                index_t child = 2 * c + 1;
                if (child >= count) break;
                if (child + 1 < count && precedes(d[child], j[child], d[child + 1], j[child + 1])) ++child;
                if (!precedes(dist, index, d[child], j[child])) break;
                d[c] = d[child];
                j[c] = j[child];
                c = child;
            }
            d[c] = dist;
            j[c] = index;
        }
    }
};

// Scans references [r_begin, r_end) for queries [q0, q1) of one batch entry, offering every
// distance to the queries' heaps (heaps[q - q0]).
template <typename T, Norm N>
void scan(const T* x, const T* rt, index_t n1, index_t m, index_t ldr, index_t q0, index_t q1,
          index_t r_begin, index_t r_end, BoundedHeap<T>* heaps) {
    using S = Simd<T>;
    constexpr index_t kChunk = 1024;  // references per chunk: 1024 × m values stay in L2
    for (index_t c0 = r_begin; c0 < r_end; c0 += kChunk) {
        const index_t c1 = std::min(r_end, c0 + kChunk);
        for (index_t t0 = q0; t0 < q1; t0 += kTileQueries) {
            const T* qs[kTileQueries];
            tile_queries(x, m, t0, n1, qs);
            const index_t rows = std::min<index_t>(kTileQueries, q1 - t0);
            for (index_t j0 = c0; j0 < c1; j0 += S::kWidth) {
                typename S::vec acc[kTileQueries];
                distance_tile<T, N>(qs, rt + j0, ldr, m, acc);
                const index_t cols = std::min<index_t>(S::kWidth, c1 - j0);
                for (index_t i = 0; i < rows; ++i) {
                    BoundedHeap<T>& heap = heaps[t0 - q0 + i];
                    if (heap.full()) {
                        // Most tiles hold no candidate once the heap is full: one vector test.
                        const T worst = heap.worst();
                        bool any = false;
                        for (index_t l = 0; l < S::kWidth; ++l) any |= !(acc[i][l] >= worst);
                        if (!any) continue;
                    }
                    for (index_t l = 0; l < cols; ++l) heap.offer(acc[i][l], j0 + l);
                }
            }
        }
    }
}

// Sorts a heap's entries into neighbour order and finishes the distances (square roots).
template <typename T, Norm N>
void sort_neighbours(T* d, index_t* j, index_t k, std::vector<std::pair<T, index_t>>& scratch) {
    scratch.resize(k);
    for (index_t i = 0; i < k; ++i) scratch[i] = {d[i], j[i]};
    std::sort(scratch.begin(), scratch.end(),
              [](const auto& a, const auto& b) { return precedes(a.first, a.second, b.first, b.second); });
    for (index_t i = 0; i < k; ++i) {
        d[i] = finish_distance<T, N>(scratch[i].first);
        j[i] = scratch[i].second;
    }
}

template <typename T, Norm N>
void knn_all(const T* x1, const T* x2t, index_t batch, index_t n1, index_t n2, index_t m, index_t ldr,
             index_t k, T* out_d, index_t* out_j, int nthreads) {
    using S = Simd<T>;
    const int threads = threads_for(batch * n1 * n2 * std::max<index_t>(m, 1) / 8, nthreads);
    // Queries per task: a superblock shares each pass over a reference chunk; fewer when k is
    // large, so that the superblock's heaps stay in cache.
    const index_t superblock = std::clamp<index_t>((index_t(1) << 20) / (k * index_t(sizeof(T) + 8)) /
                                                       kTileQueries * kTileQueries,
                                                   kTileQueries, 256);
    const index_t superblocks = (n1 + superblock - 1) / superblock;
    if (batch * superblocks >= threads || threads == 1) {
        // Enough query work: each task owns its queries' heaps, which are the outputs.
#pragma omp parallel num_threads(threads)
        {
            std::vector<BoundedHeap<T>> heaps(superblock);
            std::vector<std::pair<T, index_t>> scratch;
#pragma omp for schedule(dynamic, 1)
            for (index_t task = 0; task < batch * superblocks; ++task) {
                const index_t b = task / superblocks, q0 = task % superblocks * superblock;
                const index_t q1 = std::min(n1, q0 + superblock);
                for (index_t q = q0; q < q1; ++q)
                    heaps[q - q0] = {out_d + (b * n1 + q) * k, out_j + (b * n1 + q) * k, k, 0};
                scan<T, N>(x1 + b * n1 * m, x2t + b * m * ldr, n1, m, ldr, q0, q1, 0, n2, heaps.data());
                for (index_t q = q0; q < q1; ++q)
                    sort_neighbours<T, N>(heaps[q - q0].d, heaps[q - q0].j, k, scratch);
            }
        }
        return;
    }
    // Few queries: the references are split between threads, each keeping partial heaps for
    // every query; the partial results are then merged per query.
    const index_t total = batch * n1;
    std::vector<T> part_d(index_t(threads) * total * k);
    std::vector<index_t> part_j(index_t(threads) * total * k);
    std::vector<index_t> part_count(index_t(threads) * total);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t r_begin, r_end;
        split_range((n2 + S::kWidth - 1) / S::kWidth, threads, t, r_begin, r_end);
        r_begin *= S::kWidth;
        r_end = std::min(n2, r_end * S::kWidth);
        std::vector<BoundedHeap<T>> heaps(n1);
        for (index_t b = 0; b < batch; ++b) {
            const index_t base = index_t(t) * total + b * n1;
            for (index_t q = 0; q < n1; ++q) heaps[q] = {&part_d[(base + q) * k], &part_j[(base + q) * k], k, 0};
            scan<T, N>(x1 + b * n1 * m, x2t + b * m * ldr, n1, m, ldr, 0, n1, r_begin, r_end, heaps.data());
            for (index_t q = 0; q < n1; ++q) part_count[base + q] = heaps[q].count;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<std::pair<T, index_t>> scratch;
#pragma omp for schedule(static)
        for (index_t q = 0; q < total; ++q) {
            BoundedHeap<T> heap{out_d + q * k, out_j + q * k, k, 0};
            for (int t = 0; t < threads; ++t) {  // parts in index order: ties stay resolved
                const index_t at = index_t(t) * total + q;
                for (index_t e = 0; e < part_count[at]; ++e) heap.offer(part_d[at * k + e], part_j[at * k + e]);
            }
            sort_neighbours<T, N>(heap.d, heap.j, k, scratch);
        }
    }
}

}  // namespace

// out_d, out_j (batch, n1, k): the k nearest rows of x2 to each row of x1 (batch, n1, m), x2
// given transposed and zero-padded as x2t (batch, m, ldr) with ldr >= n2 a multiple of the SIMD
// width; 1 <= k <= n2. norm: 2 (euclidean), 1 (manhattan) or 0 (chebyshev).
template <typename T>
void knn_forward(address_t x1, address_t x2t, index_t batch, index_t n1, index_t n2, index_t m, index_t ldr,
                 index_t k, int norm, address_t out_d, address_t out_j, int nthreads) {
    const T *a = as_ptr<const T>(x1), *bt = as_ptr<const T>(x2t);
    T* d = as_ptr<T>(out_d);
    index_t* j = as_ptr<index_t>(out_j);
    if (norm == 2) knn_all<T, Norm::kL2>(a, bt, batch, n1, n2, m, ldr, k, d, j, nthreads);
    if (norm == 1) knn_all<T, Norm::kL1>(a, bt, batch, n1, n2, m, ldr, k, d, j, nthreads);
    if (norm == 0) knn_all<T, Norm::kLinf>(a, bt, batch, n1, n2, m, ldr, k, d, j, nthreads);
}

template void knn_forward<float>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                 int, address_t, address_t, int);
template void knn_forward<double>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, index_t,
                                  int, address_t, address_t, int);

}  // namespace fastml
