// Exact distance tiles shared by cdist.cpp and knn.cpp.
//
// A tile is QB queries × W references (W = one SIMD vector: 16 floats or 8 doubles). A chunk of
// references is first packed transposed and padded (pack_chunk: m × ldc, ldc a multiple of W,
// small enough for L2), so each step over a coordinate loads one vector of W references' values
// and updates QB vector accumulators with the difference to each query's coordinate
// (broadcast): no horizontal sums, and every loaded vector serves QB queries. Differences are
// taken coordinate by coordinate, never through |x|² - 2x·y + |y|², so a distance is exact to
// rounding even between points far from the origin (the expanded form cancels there: torch.cdist
// finds 0 between 512695 and 512804).
#pragma once

#include <cmath>

#include "common.h"
#include "simd.h"

namespace fastml {

// Which distance: Σ d² (the square of the euclidean distance, rooted on output), Σ |d|, max |d|.
enum class Norm { kL2, kL1, kLinf };

constexpr int kTileQueries = 8;  // QB: 8 accumulators + the loaded vector fit the 32 registers

template <typename V>
inline V abs_vec(V v) {
    return v > 0 ? v : -v;  // NaN stays NaN
}

// acc[i][lane] = the Norm's accumulated distance between query qs[i] and reference column
// (column0 + lane) of rT, over the m coordinates.
template <typename T, Norm N>
inline void distance_tile(const T* const (&qs)[kTileQueries], const T* rT, index_t ldr, index_t m,
                          typename Simd<T>::vec (&acc)[kTileQueries]) {
    using V = typename Simd<T>::vec;
#pragma GCC unroll 8
    for (int i = 0; i < kTileQueries; ++i) acc[i] = V{};
    for (index_t k = 0; k < m; ++k) {
        const V r = Simd<T>::load(rT + k * ldr);
#pragma GCC unroll 8
        for (int i = 0; i < kTileQueries; ++i) {
            const V diff = r - qs[i][k];
            if constexpr (N == Norm::kL2) {
                acc[i] += diff * diff;
            } else if constexpr (N == Norm::kL1) {
                acc[i] += abs_vec(diff);
            } else {
                const V a = abs_vec(diff);
                acc[i] = a > acc[i] ? a : acc[i];  // a NaN coordinate is passed over, as in torch.cdist
            }
        }
    }
}

// The distance a tile's accumulated value stands for.
template <typename T, Norm N>
inline T finish_distance(T accumulated) {
    return N == Norm::kL2 ? std::sqrt(accumulated) : accumulated;
}

// Query pointers of a tile starting at query q0 of n: rows past the end repeat the last one
// (their results are ignored), so the micro-kernel always runs full.
template <typename T>
inline void tile_queries(const T* x, index_t m, index_t q0, index_t n, const T* (&qs)[kTileQueries]) {
    for (int i = 0; i < kTileQueries; ++i) qs[i] = x + std::min<index_t>(q0 + i, n - 1) * m;
}

// References per packed chunk of the float tiles: as many as fill half the L2 with their m
// values (1024 at m = 64 in float on a 512 KiB L2), a multiple of the SIMD width. Every query
// tile streams the whole chunk, so a chunk past L2 would come from L3 for each 8 queries: with a
// fixed 1024, MNIST's m = 784 made it 3 MiB.
template <typename T>
inline index_t reference_chunk(index_t m) {
    constexpr index_t W = Simd<T>::kWidth;
    const index_t fit = cache_sizes().l2 / 2 / (std::max<index_t>(m, 1) * index_t(sizeof(T)));
    return std::clamp<index_t>(fit / W * W, 4 * W, 16384);
}

// Packs references [c0, c1) of x2 (rows of m) transposed into buf (m × ldc), zero-padding the
// columns past c1 up to ldc (the next multiple of the SIMD width). Returns ldc.
template <typename T>
inline index_t pack_chunk(const T* x2, index_t m, index_t c0, index_t c1, T* buf) {
    const index_t width = Simd<T>::kWidth;
    const index_t ldc = (c1 - c0 + width - 1) / width * width;
    // One SIMD-width block of references at a time: W rows' k-th values become one contiguous
    // vector of the packed column block (the rows are read from L1 after the first k).
    for (index_t j0 = c0; j0 < c0 + ldc; j0 += width) {
        const index_t valid = std::min(width, c1 - j0);
        T* block = buf + (j0 - c0);
        for (index_t k = 0; k < m; ++k) {
            T* out = block + k * ldc;
            for (index_t l = 0; l < valid; ++l) out[l] = x2[(j0 + l) * m + k];
            for (index_t l = valid; l < width; ++l) out[l] = T(0);
        }
    }
    return ldc;
}

// Elements of the scratch a thread packs reference chunks into (pack_chunk, for_each_tile).
template <typename T>
inline index_t packed_chunk_size(index_t m) {
    return std::max<index_t>(m, 1) * (reference_chunk<T>(m) + Simd<T>::kWidth);
}

// The query range [begin, end) of part `part` of `parts`, split on query-tile boundaries.
inline void query_part(index_t n1, int parts, int part, index_t& begin, index_t& end) {
    split_range((n1 + kTileQueries - 1) / kTileQueries, parts, part, begin, end);
    begin *= kTileQueries;
    end = std::min(n1, end * kTileQueries);
}

// The reference range [begin, end) of part `part` of `parts`, split on SIMD-width boundaries.
template <typename T>
inline void reference_part(index_t n2, int parts, int part, index_t& begin, index_t& end) {
    const index_t width = Simd<T>::kWidth;
    split_range((n2 + width - 1) / width, parts, part, begin, end);
    begin *= width;
    end = std::min(n2, end * width);
}

// Every tile of queries [q0, q1) of x (n1 rows of m) against references [r_begin, r_end) of x2:
// each chunk of references is packed once (into `packed`, room for m × (reference_chunk + W)),
// then every query tile of the range runs against it. body(t0, rows, j0, cols, acc) receives
// the tile's first query and first reference, how many of each are real, and the accumulated
// values (acc[i][l]: query t0 + i, reference j0 + l).
template <typename T, Norm N, typename Body>
inline void for_each_tile(const T* x, const T* x2, index_t n1, index_t m, index_t q0, index_t q1, index_t r_begin,
                          index_t r_end, T* packed, Body&& body) {
    using S = Simd<T>;
    const index_t chunk = reference_chunk<T>(m);
    for (index_t c0 = r_begin; c0 < r_end; c0 += chunk) {
        const index_t c1 = std::min(r_end, c0 + chunk);
        const index_t ldc = pack_chunk(x2, m, c0, c1, packed);
        for (index_t t0 = q0; t0 < q1; t0 += kTileQueries) {
            const T* qs[kTileQueries];
            tile_queries(x, m, t0, n1, qs);
            const index_t rows = std::min<index_t>(kTileQueries, q1 - t0);
            for (index_t j0 = c0; j0 < c1; j0 += S::kWidth) {
                typename S::vec acc[kTileQueries];
                distance_tile<T, N>(qs, packed + (j0 - c0), ldc, m, acc);
                body(t0, rows, j0, std::min<index_t>(S::kWidth, c1 - j0), acc);
            }
        }
    }
}

}  // namespace fastml
