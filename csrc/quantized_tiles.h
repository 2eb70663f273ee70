// Int8 dot-product tiles for knn.cpp's euclidean selection (AVX-512 VNNI).
//
// Each float row x (m values) is quantized to x ≈ s·x̃, x̃ integers in [-127, 127], s =
// max|x| / 127 (a little more). One vpdpbusd multiplies 64 byte pairs and sums them by fours into
// 16 int32 lanes: four coordinates of 16 references per instruction, where an FMA takes one
// coordinate of 16 (measured on Zen 4: 5× the pairs per second of the float tiles). The integer
// dot product D = Σ q̃·r̃ is exact; the quantization error it carries is bounded per pair:
//
//   |q·r − s_q·s_r·D| <= b·s_q·s_r·(Σ|q̃| + Σ|r̃| + m·b) = b·(s_r·A_q + s_q·A_r),
//   A_x = s_x·(Σ|x̃| + m·b/2) (a row's "spread"), b >= |x/s − x̃| (a half step, plus the
//   rounding of x·(1/s))
//
// so |q|² + |r|² − 2 s_q s_r D − 2b(s_r A_q + s_q A_r) is a lower bound on the squared distance,
// up to the float rounding of the norms and of the bound itself (knn.cpp adds that slack).
// Rows are quantized less a shared center (knn.cpp: the mean of some references), which leaves
// distances as they are but keeps the norms, and with them the bound's width, small where the
// points sit far from the origin; its float rounding moves a distance by at most 2ε·(|q|² + |r|²).
//
// vpdpbusd multiplies unsigned bytes by signed ones: references are stored as r̃ + 128 (1..255,
// packed for the tile), queries as signed q̃, and D = Σ (r̃ + 128)·q̃ − 128·Σq̃. With m <= 512,
// every partial sum stays below 2^24 in magnitude, so its float conversion is exact.
#pragma once

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define FASTML_QUANTIZED_TILES 1

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"
#include "distance_tiles.h"

namespace fastml {

constexpr index_t kQuantizedMaxDim = 512;     // keeps every integer sum exact in float (< 2^24)
// Fewer coordinates: the float tiles are as fast (measured at m = 8: 0.021 s either way for 1024
// × 65536 on one Zen 4 core), and low-dimensional neighbours lie within the bound's width.
constexpr index_t kQuantizedMinDim = 16;
constexpr float kHalfStep = 0.5f * (1.0f + 1.0f / 1024);  // b: bounds |x/s − x̃| with the rounding
constexpr float kQuantizableMax = 1e17f;      // larger rows would overflow the norms and bounds
constexpr float kQuantizableMin = 1e-30f;     // smaller (nonzero) rows would underflow the scale
constexpr index_t kQuantizedBlock = 16;       // references per packed block (one int32 lane each)
constexpr int kQuantizedTileQueries = 8;      // queries per tile: 8 accumulators of the 32 registers

// Coordinates rounded up to a multiple of four (one int32 lane holds four bytes).
inline index_t quantized_width(index_t m) { return (m + 3) / 4 * 4; }

// What the bound needs of a quantized row: the scale s (NaN where the row cannot be quantized:
// NaN or infinite values, or magnitudes outside [kQuantizableMin, kQuantizableMax], which then
// never pass the filter's test and are always recomputed), |x|², A = s·(Σ|x̃| + m·b/2), Σx̃.
struct QuantizedRow {
    float scale, norm2, spread;
    std::int32_t sum;
};

// Quantizes row x − center (m floats); out(k, value) receives each x̃_k (k <
// quantized_width(m), zero past m).
template <typename Out>
inline QuantizedRow quantize_row(const float* x, const float* center, index_t m, Out&& out) {
    float max_abs = 0, norm2 = 0;
    for (index_t k = 0; k < m; ++k) {
        const float v = x[k] - center[k];
        max_abs = std::max(max_abs, std::fabs(v));  // a NaN shows in norm2
        norm2 += v * v;
    }
    const index_t width = quantized_width(m);
    const bool representable = max_abs == 0 || (max_abs >= kQuantizableMin && max_abs <= kQuantizableMax);
    if (!representable || !std::isfinite(norm2)) {
        for (index_t k = 0; k < width; ++k) out(k, 0);
        return {std::numeric_limits<float>::quiet_NaN(), norm2, 0, 0};
    }
    // The scale is inflated by 2^-20 so that x·(1/s) stays below 127.5 after its roundings.
    const float scale = max_abs / 127 * (1 + 1.0f / (1 << 20));
    const float inverse = scale > 0 ? 1 / scale : 0;
    std::int32_t sum = 0, sum_abs = 0;
    for (index_t k = 0; k < m; ++k) {
        const float v = x[k] - center[k];
        const int q = static_cast<int>(std::min(127.0f, std::max(-127.0f, std::nearbyint(v * inverse))));
        out(k, q);
        sum += q;
        sum_abs += q < 0 ? -q : q;
    }
    for (index_t k = m; k < width; ++k) out(k, 0);
    return {scale, norm2, scale * (float(sum_abs) + float(m) * (kHalfStep / 2)), sum};
}

// Query rows [q0, q1) of x (rows of m), less center, as signed bytes (quantized_width(m) per
// row, in `bytes`) and their QuantizedRow (in `rows`).
inline void quantize_queries(const float* x, const float* center, index_t m, index_t q0, index_t q1,
                             std::int8_t* bytes, QuantizedRow* rows) {
    const index_t width = quantized_width(m);
    for (index_t q = q0; q < q1; ++q) {
        std::int8_t* row = bytes + (q - q0) * width;
        rows[q - q0] =
            quantize_row(x + q * m, center, m, [&](index_t k, int v) { row[k] = static_cast<std::int8_t>(v); });
    }
}

// The per-reference parts of QuantizedRow, as arrays a tile loads 16 at a time.
struct QuantizedReferences {
    float* scale;
    float* norm2;
    float* spread;
};

// References [c0, c1) of x2, less center, as unsigned bytes r̃ + 128 in blocks of kQuantizedBlock references:
// block-major, then groups of four coordinates, then the 16 references' four bytes, so one
// 64-byte load holds four coordinates of a block. Rows past c1 up to the next block are zero
// (byte 128, scale 0). Reference c0 + j's QuantizedRow goes to element j of `rows`.
inline void quantize_references(const float* x2, const float* center, index_t m, index_t c0, index_t c1,
                                std::uint8_t* packed, const QuantizedReferences& rows) {
    const index_t width = quantized_width(m);
    const index_t padded = (c1 - c0 + kQuantizedBlock - 1) / kQuantizedBlock * kQuantizedBlock;
    for (index_t j = 0; j < padded; ++j) {
        std::uint8_t* block = packed + (j / kQuantizedBlock) * kQuantizedBlock * width;
        const index_t lane = j % kQuantizedBlock;
        const auto out = [&](index_t k, int v) {
            block[(k / 4) * 64 + lane * 4 + k % 4] = static_cast<std::uint8_t>(v + 128);
        };
        QuantizedRow row{0, 0, 0, 0};
        if (c0 + j < c1) {
            row = quantize_row(x2 + (c0 + j) * m, center, m, out);
        } else {
            for (index_t k = 0; k < width; ++k) out(k, 0);
        }
        rows.scale[j] = row.scale;
        rows.norm2[j] = row.norm2;
        rows.spread[j] = row.spread;
    }
}

// acc[i] lane l = Σ_k (r̃_lk + 128)·q̃_ik for query row qs[i] (signed bytes) and reference l of a
// packed block (quantized_width(m) / 4 groups of 64 bytes).
inline void quantized_tile(const std::int8_t* const (&qs)[kQuantizedTileQueries], const std::uint8_t* block, index_t m,
                           __m512i (&acc)[kQuantizedTileQueries]) {
#pragma GCC unroll 8
    for (int i = 0; i < kQuantizedTileQueries; ++i) acc[i] = _mm512_setzero_si512();
    const index_t groups = quantized_width(m) / 4;
    for (index_t g = 0; g < groups; ++g) {
        const __m512i r = _mm512_loadu_si512(block + g * 64);
#pragma GCC unroll 8
        for (int i = 0; i < kQuantizedTileQueries; ++i) {
            // The query's four bytes broadcast straight from memory. Written out because GCC
            // copies each accumulator to a scratch register and back around the intrinsic
            // (_mm512_dpbusd_epi32), which doubled the tile's instructions.
            const auto* four = reinterpret_cast<const std::int32_t*>(qs[i] + g * 4);
            asm("vpdpbusd %[four]%{1to16%}, %[r], %[acc]" : [acc] "+v"(acc[i]) : [r] "v"(r), [four] "m"(*four));
        }
    }
}

}  // namespace fastml

#endif
