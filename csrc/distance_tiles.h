// Exact distance tiles shared by cdist.cpp and knn.cpp.
//
// A tile is kTileQueries queries × kTileVectors SIMD vectors of references (a vector: 8 floats or
// 4 doubles with AVX2, 16 or 8 with AVX-512). A chunk of references, small enough for L2, is
// first packed transposed into panels of one tile's width (pack_chunk), so each step over a
// coordinate loads the tile's vectors of reference values, contiguous, and updates each
// query's accumulators with the difference to its coordinate (broadcast): no horizontal sums,
// and every loaded vector serves every query of the tile. Differences are taken coordinate by
// coordinate, never through |x|² - 2x·y + |y|², so a distance is exact to rounding even between
// points far from the origin (the expanded form cancels there: torch.cdist finds 0 between
// 512695 and 512804).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common.h"
#include "simd.h"

namespace fastml {

// Which distance: Σ d² (the square of the euclidean distance, rooted on output), Σ |d|, max |d|.
enum class Norm { kL2, kL1, kLinf };

// A tile: kTileQueries queries × kTileVectors vectors of references. Each step over a coordinate
// loads kTileVectors vectors, broadcasts each query's coordinate once and updates
// kTileQueries · kTileVectors accumulators: 6 x 2 holds 12 accumulators, 2 loaded vectors, a
// broadcast and a difference, AVX2's 16 registers. Against the 8 x 1 tile before it, a step
// loads and broadcasts 8 values for 12 vectors of differences instead of 9 for 8: on a Zen 3,
// 44 against 32 G coordinate pairs a second on one core (a standalone loop over one L2-resident
// chunk), the loop's instructions, not its arithmetic, having been the limit. Capped at 2
// vectors on AVX-512 too (tile_columns would allow 4): no such CPU was at hand to measure wider.
constexpr int kTileQueries = 6;
constexpr int kTileVectors = tile_columns(kTileQueries, 2, 2);

// References per tile: kTileVectors SIMD vectors.
template <typename T>
constexpr index_t tile_width() {
    return kTileVectors * Simd<T>::kWidth;
}

// |v| lane by lane: the sign bit cleared (one AND; a NaN stays NaN).
template <typename T, typename V>
inline V abs_vec(V v) {
    using U = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
    typedef U UV __attribute__((vector_size(sizeof(V))));
    return reinterpret_cast<V>(reinterpret_cast<UV>(v) & ~(UV{} + (U(1) << (8 * sizeof(T) - 1))));
}

// acc[v][i][lane] = the Norm's accumulated distance between query qs[i] and reference
// v·W + lane of a packed panel (m × tile_width), over the m coordinates.
template <typename T, Norm N>
inline void distance_tile(const T* const (&qs)[kTileQueries], const T* panel, index_t m,
                          typename Simd<T>::vec (&acc)[kTileVectors][kTileQueries]) {
    using V = typename Simd<T>::vec;
    constexpr index_t W = Simd<T>::kWidth;
    zero_tile(acc);
    for (index_t k = 0; k < m; ++k) {
        V r[kTileVectors];
#pragma GCC unroll 4
        for (int v = 0; v < kTileVectors; ++v) r[v] = Simd<T>::load(panel + (k * kTileVectors + v) * W);
#pragma GCC unroll 8
        for (int i = 0; i < kTileQueries; ++i) {
            const T q = qs[i][k];
#pragma GCC unroll 4
            for (int v = 0; v < kTileVectors; ++v) {
                const V diff = r[v] - q;
                if constexpr (N == Norm::kL2) {
                    acc[v][i] += diff * diff;
                } else if constexpr (N == Norm::kL1) {
                    acc[v][i] += abs_vec<T>(diff);
                } else {
                    const V a = abs_vec<T>(diff);
                    acc[v][i] = a > acc[v][i] ? a : acc[v][i];  // a NaN coordinate is passed over, as in torch.cdist
                }
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
// values (1024 at m = 64 in float on a 512 KiB L2), a multiple of the tile width. Every query
// tile streams the whole chunk, so a chunk past L2 would come from L3 for each tile of queries:
// with a fixed 1024, MNIST's m = 784 made it 3 MiB.
template <typename T>
inline index_t reference_chunk(index_t m) {
    constexpr index_t TW = tile_width<T>();
    const index_t fit = cache_sizes().l2 / 2 / (std::max<index_t>(m, 1) * index_t(sizeof(T)));
    return std::clamp<index_t>(fit / TW * TW, 4 * TW, 16384);
}

// Packs references [c0, c1) of x2 (rows of m) into buf as panels of one tile's width TW of
// references each: panel p holds references c0 + p·TW ... for every coordinate, coordinate-major
// (m × TW, contiguous), the columns past c1 zero. A tile then streams one contiguous panel, not m
// rows a chunk's width apart: with rows of the chunk's width (4 KiB at 1024 float references)
// every coordinate's vector fell in the same L1 set, so each tile's m loads came from L2 (knn at
// 4096 x 65536, m = 64: 483 ms before, 293 ms after, on a Zen 3).
template <typename T>
inline void pack_chunk(const T* x2, index_t m, index_t c0, index_t c1, T* buf) {
    constexpr index_t TW = tile_width<T>();
    for (index_t j0 = c0; j0 < c1; j0 += TW) {
        const index_t valid = std::min(TW, c1 - j0);
        T* panel = buf + (j0 - c0) * m;
        // TW rows' k-th values become one row of the panel (the rows are read from L1 after the
        // first k).
        for (index_t k = 0; k < m; ++k) {
            T* out = panel + k * TW;
            for (index_t l = 0; l < valid; ++l) out[l] = x2[(j0 + l) * m + k];
            for (index_t l = valid; l < TW; ++l) out[l] = T(0);
        }
    }
}

// Elements of the scratch a thread packs reference chunks into (pack_chunk, for_each_tile).
template <typename T>
inline index_t packed_chunk_size(index_t m) {
    return std::max<index_t>(m, 1) * (reference_chunk<T>(m) + tile_width<T>());
}

// The query range [begin, end) of part `part` of `parts`, split on query-tile boundaries.
inline void query_part(index_t n1, int parts, int part, index_t& begin, index_t& end) {
    split_range((n1 + kTileQueries - 1) / kTileQueries, parts, part, begin, end);
    begin *= kTileQueries;
    end = std::min(n1, end * kTileQueries);
}

// The reference range [begin, end) of part `part` of `parts`, split on tile-width boundaries.
template <typename T>
inline void reference_part(index_t n2, int parts, int part, index_t& begin, index_t& end) {
    constexpr index_t TW = tile_width<T>();
    split_range((n2 + TW - 1) / TW, parts, part, begin, end);
    begin *= TW;
    end = std::min(n2, end * TW);
}

// Every tile of queries [q0, q1) of x (n1 rows of m) against references [r_begin, r_end) of x2:
// each chunk of references is packed once (into `packed`, room for m × (reference_chunk + TW)),
// then every query tile of the range runs against it. body(t0, rows, j0, cols, acc) receives,
// for each SIMD vector of a tile's references, the tile's first query and the vector's first
// reference, how many of each are real, and the accumulated values (acc[i][l]: query t0 + i,
// reference j0 + l).
template <typename T, Norm N, typename Body>
inline void for_each_tile(const T* x, const T* x2, index_t n1, index_t m, index_t q0, index_t q1, index_t r_begin,
                          index_t r_end, T* packed, Body&& body) {
    constexpr index_t W = Simd<T>::kWidth, TW = tile_width<T>();
    const index_t chunk = reference_chunk<T>(m);
    for (index_t c0 = r_begin; c0 < r_end; c0 += chunk) {
        const index_t c1 = std::min(r_end, c0 + chunk);
        pack_chunk(x2, m, c0, c1, packed);
        for (index_t t0 = q0; t0 < q1; t0 += kTileQueries) {
            const T* qs[kTileQueries];
            tile_queries(x, m, t0, n1, qs);
            const index_t rows = std::min<index_t>(kTileQueries, q1 - t0);
            for (index_t j0 = c0; j0 < c1; j0 += TW) {
                typename Simd<T>::vec acc[kTileVectors][kTileQueries];
                distance_tile<T, N>(qs, packed + (j0 - c0) * m, m, acc);
                for (int v = 0; v < kTileVectors && j0 + v * W < c1; ++v)
                    body(t0, rows, j0 + v * W, std::min<index_t>(W, c1 - j0 - v * W), acc[v]);
            }
        }
    }
}

}  // namespace fastml
