// k nearest neighbours, fused: exact distance tiles (distance_tiles.h) reduced on the fly to each
// query's k best in a bounded max-heap, so the query × reference matrix never exists. The heaps
// live in the outputs themselves (k distances and indices per query); extra memory is a packed
// chunk of references per thread, plus O(threads · queries · k) when the references are split
// between threads (few queries).
//
// Order: ascending distance, ties broken by the lower reference index, NaN after every number
// (as torch.sort puts it). References are scanned in increasing index order within a heap, so a
// later reference at an equal distance never displaces an earlier one.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "distance_tiles.h"
#include "kernels.h"
#include "quantized_tiles.h"

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

// Offers the distances of references [r_begin, r_end) of x2 (n2 rows of m) to queries
// [q0, q1) of x (n1 rows) to the queries' heaps (heaps[q - q0]). packed: scratch for one chunk.
template <typename T, Norm N>
void scan(const T* x, const T* x2, index_t n1, index_t m, index_t q0, index_t q1, index_t r_begin,
          index_t r_end, BoundedHeap<T>* heaps, T* packed) {
    for_each_tile<T, N>(x, x2, n1, m, q0, q1, r_begin, r_end, packed,
                        [&](index_t t0, index_t rows, index_t j0, index_t cols, const auto& acc) {
        for (index_t i = 0; i < rows; ++i) {
            BoundedHeap<T>& heap = heaps[t0 - q0 + i];
            // Most tiles hold no candidate once the heap is full: one vector test (a lane equal
            // to the worst comes later in index order, so offering it changes nothing).
            if (heap.full() && Simd<T>::all_greater(acc[i], heap.worst())) continue;
            for (index_t l = 0; l < cols; ++l) heap.offer(acc[i][l], j0 + l);
        }
    });
}

// Squared euclidean distance between rows a and b of m values, accumulated in double over four
// partial sums: for float rows the true value rounded once, or nearly.
template <typename T>
inline T exact_squared_distance(const T* a, const T* b, index_t m) {
    double part[4] = {0, 0, 0, 0};
    index_t k = 0;
    for (; k + 4 <= m; k += 4) {
        for (int u = 0; u < 4; ++u) {
            const double d = double(a[k + u]) - double(b[k + u]);
            part[u] += d * d;
        }
    }
    for (; k < m; ++k) {
        const double d = double(a[k]) - double(b[k]);
        part[0] += d * d;
    }
    return T((part[0] + part[1]) + (part[2] + part[3]));
}

#if defined(FASTML_QUANTIZED_TILES)
// int8 references per packed chunk: 1024 × m bytes, a quarter of the float tiles' chunk at the
// same m. Kept fixed: this path needs AVX-512 VNNI, whose CPUs have 1 MiB of L2 or more, and no
// such CPU was at hand to measure a cache-sized chunk on.
constexpr index_t kQuantizedChunk = 1024;

// Euclidean selection among float rows through int8 tiles (quantized_tiles.h): each pair's lower
// bound on its squared distance is tested against its query's heap, and only the pairs that
// pass (the first k, then about k·ln(R/k) per query on random data, a few more for the bound's
// width) are recomputed exactly from their rows and offered: the heaps only ever hold exact
// values, and a row that cannot be quantized (NaN scale) passes every test.
void scan_quantized(const float* x, const float* x2, index_t n2, index_t m, index_t q0, index_t q1, index_t r_begin,
                    index_t r_end, BoundedHeap<float>* heaps) {
    // The center: the mean of the first (up to) 1024 references, in double.
    const index_t sample = std::min<index_t>(n2, 1024);
    std::vector<double> mean(m, 0.0);
    for (index_t j = 0; j < sample; ++j)
        for (index_t k = 0; k < m; ++k) mean[k] += x2[j * m + k];
    std::vector<float> center(m);
    for (index_t k = 0; k < m; ++k) center[k] = float(mean[k] / double(std::max<index_t>(sample, 1)));
    const index_t width = quantized_width(m), count = q1 - q0;
    std::vector<std::int8_t> query_bytes(count * width);
    std::vector<QuantizedRow> queries(count);
    quantize_queries(x, center.data(), m, q0, q1, query_bytes.data(), queries.data());
    std::vector<std::uint8_t> packed((kQuantizedChunk + kQuantizedBlock) * width);
    const index_t stride = kQuantizedChunk + kQuantizedBlock;
    std::vector<float> reference_rows(3 * stride);
    const QuantizedReferences references{reference_rows.data(), reference_rows.data() + stride,
                                         reference_rows.data() + 2 * stride};
    // The float rounding the bound leaves out: the norms' accumulation (m·ε each) and the few
    // products and sums around them, with room to spare; underflow adds at most a few 2^-149
    // per operation.
    const float eps = std::numeric_limits<float>::epsilon();
    const __m512 keep = _mm512_set1_ps(1 - float(2 * m + 32) * eps);
    const float widen = 2 * kHalfStep * (1 + float(2 * m + 32) * eps);
    const float underflow = float(m + 32) * std::numeric_limits<float>::min();
    const float unbounded = std::numeric_limits<float>::infinity();
    for (index_t c0 = r_begin; c0 < r_end; c0 += kQuantizedChunk) {
        const index_t c1 = std::min(r_end, c0 + kQuantizedChunk);
        quantize_references(x2, center.data(), m, c0, c1, packed.data(), references);
        for (index_t t0 = q0; t0 < q1; t0 += kQuantizedTileQueries) {
            const index_t rows = std::min<index_t>(kQuantizedTileQueries, q1 - t0);
            const std::int8_t* qs[kQuantizedTileQueries];
            for (int i = 0; i < kQuantizedTileQueries; ++i)
                qs[i] = query_bytes.data() + std::min<index_t>(t0 - q0 + i, count - 1) * width;
            for (index_t j0 = c0; j0 < c1; j0 += kQuantizedBlock) {
                __m512i dots[kQuantizedTileQueries];
                quantized_tile(qs, packed.data() + (j0 - c0) * width, m, dots);
                const __m512 r_scale = _mm512_loadu_ps(references.scale + (j0 - c0));
                const __m512 r_norm2 = _mm512_loadu_ps(references.norm2 + (j0 - c0));
                const __m512 r_spread = _mm512_loadu_ps(references.spread + (j0 - c0));
                const index_t cols = std::min<index_t>(kQuantizedBlock, c1 - j0);
                for (index_t i = 0; i < rows; ++i) {
                    const QuantizedRow& q = queries[t0 - q0 + i];
                    BoundedHeap<float>& heap = heaps[t0 - q0 + i];
                    // lower = keep·(|q|² + |r|²) − s_r·(2 s_q D + w A_q) − w s_q A_r, w = 2b (1 + slack)
                    const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(dots[i], _mm512_set1_epi32(128 * q.sum)));
                    const __m512 u = _mm512_fmadd_ps(d, _mm512_set1_ps(2 * q.scale), _mm512_set1_ps(widen * q.spread));
                    __m512 lower = _mm512_fmadd_ps(keep, _mm512_add_ps(r_norm2, _mm512_set1_ps(q.norm2)),
                                                   _mm512_set1_ps(-underflow));
                    lower = _mm512_fnmadd_ps(r_scale, u, lower);
                    lower = _mm512_fnmadd_ps(_mm512_set1_ps(widen * q.scale), r_spread, lower);
                    // Most blocks hold no candidate once the heap is full: one vector test.
                    const float worst = heap.full() ? heap.worst() : unbounded;
                    if (_mm512_cmp_ps_mask(lower, _mm512_set1_ps(worst), _CMP_GT_OQ) == 0xFFFF) continue;
                    alignas(64) float bound[kQuantizedBlock];
                    _mm512_store_ps(bound, lower);
                    const float* query = x + (t0 + i) * m;
                    for (index_t l = 0; l < cols; ++l) {
                        if (bound[l] > (heap.full() ? heap.worst() : unbounded)) continue;
                        heap.offer(exact_squared_distance(query, x2 + (j0 + l) * m, m), j0 + l);
                    }
                }
            }
        }
    }
}
#endif

// The scan for one range. Euclidean selection among float rows goes through int8 tiles where the
// machine has them, while k is small against the references (the recomputed candidates then
// stay few); everything else through exact float tiles. scratch: packed_chunk_size(m) elements.
template <typename T, Norm N>
void scan_range(const T* x, const T* x2, index_t n1, index_t n2, index_t m, index_t k, index_t q0, index_t q1,
                index_t r_begin, index_t r_end, BoundedHeap<T>* heaps, T* scratch) {
#if defined(FASTML_QUANTIZED_TILES)
    if constexpr (std::is_same_v<T, float> && N == Norm::kL2) {
        if (m >= kQuantizedMinDim && m <= kQuantizedMaxDim && 64 * k <= n2) {
            scan_quantized(x, x2, n2, m, q0, q1, r_begin, r_end, heaps);
            return;
        }
    }
#endif
    scan<T, N>(x, x2, n1, m, q0, q1, r_begin, r_end, heaps, scratch);
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

// With many queries, threads take queries in contiguous ranges, their heaps being the outputs;
// each thread packs a chunk of references once and runs all its queries against it. With fewer
// (under 64 tiles per thread), the threads take reference ranges instead, each keeping partial
// heaps for every query, merged afterwards: every reference is then read and packed once, not
// once per thread (256 queries × 1M references: 0.28 s against 0.33 s).
template <typename T, Norm N>
void knn_all(const T* x1, const T* x2, index_t batch, index_t n1, index_t n2, index_t m, index_t k, T* out_d,
             index_t* out_j, int nthreads) {
    const int threads = threads_for(batch * n1 * n2 * std::max<index_t>(m, 1) / 8, nthreads);
    const index_t tiles = (n1 + kTileQueries - 1) / kTileQueries;
    const index_t scratch = packed_chunk_size<T>(m);
    if (tiles >= index_t(threads) * 64) {
#pragma omp parallel num_threads(threads)
        {
            const int t = omp_get_thread_num();
            index_t q_begin, q_end;
            query_part(n1, threads, t, q_begin, q_end);
            std::vector<T> packed(scratch);
            std::vector<BoundedHeap<T>> heaps(std::max<index_t>(q_end - q_begin, 0));
            std::vector<std::pair<T, index_t>> order;
            for (index_t b = 0; b < batch && q_begin < q_end; ++b) {
                for (index_t q = q_begin; q < q_end; ++q)
                    heaps[q - q_begin] = {out_d + (b * n1 + q) * k, out_j + (b * n1 + q) * k, k, 0};
                scan_range<T, N>(x1 + b * n1 * m, x2 + b * n2 * m, n1, n2, m, k, q_begin, q_end, 0, n2,
                                 heaps.data(), packed.data());
                for (auto& heap : heaps) sort_neighbours<T, N>(heap.d, heap.j, k, order);
            }
        }
        return;
    }
    const index_t total = batch * n1;
    std::vector<T> part_d(index_t(threads) * total * k);
    std::vector<index_t> part_j(index_t(threads) * total * k);
    std::vector<index_t> part_count(index_t(threads) * total);
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num();
        index_t r_begin, r_end;
        reference_part<T>(n2, threads, t, r_begin, r_end);
        std::vector<T> packed(scratch);
        std::vector<BoundedHeap<T>> heaps(n1);
        for (index_t b = 0; b < batch; ++b) {
            const index_t base = index_t(t) * total + b * n1;
            for (index_t q = 0; q < n1; ++q) heaps[q] = {&part_d[(base + q) * k], &part_j[(base + q) * k], k, 0};
            scan_range<T, N>(x1 + b * n1 * m, x2 + b * n2 * m, n1, n2, m, k, 0, n1, r_begin, r_end, heaps.data(),
                             packed.data());
            for (index_t q = 0; q < n1; ++q) part_count[base + q] = heaps[q].count;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        std::vector<std::pair<T, index_t>> order;
#pragma omp for schedule(static)
        for (index_t q = 0; q < total; ++q) {
            BoundedHeap<T> heap{out_d + q * k, out_j + q * k, k, 0};
            for (int t = 0; t < threads; ++t) {
                const index_t at = index_t(t) * total + q;
                for (index_t e = 0; e < part_count[at]; ++e) heap.offer(part_d[at * k + e], part_j[at * k + e]);
            }
            sort_neighbours<T, N>(heap.d, heap.j, k, order);
        }
    }
}

}  // namespace

// out_d, out_j (batch, n1, k): the k nearest rows of x2 (batch, n2, m) to each row of x1
// (batch, n1, m), in neighbour order; 1 <= k <= n2. norm: 2 (euclidean), 1 (manhattan) or 0
// (chebyshev).
template <typename T>
void knn_forward(address_t x1, address_t x2, index_t batch, index_t n1, index_t n2, index_t m, index_t k, int norm,
                 address_t out_d, address_t out_j, int nthreads) {
    const T *a = as_ptr<const T>(x1), *b = as_ptr<const T>(x2);
    T* d = as_ptr<T>(out_d);
    index_t* j = as_ptr<index_t>(out_j);
    if (norm == 2) knn_all<T, Norm::kL2>(a, b, batch, n1, n2, m, k, d, j, nthreads);
    if (norm == 1) knn_all<T, Norm::kL1>(a, b, batch, n1, n2, m, k, d, j, nthreads);
    if (norm == 0) knn_all<T, Norm::kLinf>(a, b, batch, n1, n2, m, k, d, j, nthreads);
}

template void knn_forward<float>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, int,
                                 address_t, address_t, int);
template void knn_forward<double>(address_t, address_t, index_t, index_t, index_t, index_t, index_t, int,
                                  address_t, address_t, int);

}  // namespace fastml
