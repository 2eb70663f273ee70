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

// Coordinates [k, m) of a row as a 16-lane mask (all lanes once 16 or more remain).
inline __mmask16 lanes_left(index_t k, index_t m) {
    return m - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (m - k)) - 1);
}

// Quantizes row x − center (m floats) sixteen coordinates at a time: bytes receives each x̃_k
// xor `flip` (0 for signed bytes, 0x80 for x̃ + 128), for k < quantized_width(m), x̃ = 0 past m;
// bytes has room for quantized_width(m) rounded up to 16 (kQuantizedMaxDim + 16 always do).
// Vectorized because references are quantized at every scan (1M rows of 32 floats: 41% of the
// scan's time as a scalar loop per coordinate, on an Ice Lake Xeon). Each x̃ is the scalar loop's: the same difference, product
// and rounding (to nearest even, as nearbyint under the default mode), the clamp in integers
// instead of floats (|x·(1/s)| <= 127.5 before rounding); only |x|² sums in another order, which
// the bound's slack covers (m·ε whatever the order).
inline QuantizedRow quantize_row(const float* x, const float* center, index_t m, std::uint8_t flip,
                                 std::uint8_t* bytes) {
    __m512 max_abs = _mm512_setzero_ps(), norm2 = _mm512_setzero_ps();
    for (index_t k = 0; k < m; k += 16) {
        const __mmask16 valid = lanes_left(k, m);
        const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + k), _mm512_maskz_loadu_ps(valid, center + k));
        max_abs = _mm512_max_ps(_mm512_abs_ps(v), max_abs);  // a NaN is passed over here and shows in norm2
        norm2 = _mm512_fmadd_ps(v, v, norm2);
    }
    const float largest = _mm512_reduce_max_ps(max_abs), squares = _mm512_reduce_add_ps(norm2);
    const index_t width = quantized_width(m);
    const bool representable = largest == 0 || (largest >= kQuantizableMin && largest <= kQuantizableMax);
    if (!representable || !std::isfinite(squares)) {
        std::memset(bytes, flip, width);
        return {std::numeric_limits<float>::quiet_NaN(), squares, 0, 0};
    }
    // The scale is inflated by 2^-20 so that x·(1/s) stays below 127.5 after its roundings.
    const float scale = largest / 127 * (1 + 1.0f / (1 << 20));
    const __m512 inverse = _mm512_set1_ps(scale > 0 ? 1 / scale : 0);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
    const __m128i flips = _mm_set1_epi8(static_cast<char>(flip));
    __m512i sum = _mm512_setzero_si512(), sum_abs = _mm512_setzero_si512();
    for (index_t k = 0; k < width; k += 16) {
        const __mmask16 valid = lanes_left(k, m);  // (none past m: x̃ = 0 there)
        const __m512 v = _mm512_sub_ps(_mm512_maskz_loadu_ps(valid, x + k), _mm512_maskz_loadu_ps(valid, center + k));
        const __m512i q = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, inverse)), low), high);
        sum = _mm512_add_epi32(sum, q);
        sum_abs = _mm512_add_epi32(sum_abs, _mm512_abs_epi32(q));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(bytes + k), _mm_xor_si128(_mm512_cvtepi32_epi8(q), flips));
    }
    const std::int32_t total_abs = _mm512_reduce_add_epi32(sum_abs);
    return {scale, squares, scale * (float(total_abs) + float(m) * (kHalfStep / 2)), _mm512_reduce_add_epi32(sum)};
}

// Query rows [q0, q1) of x (rows of m), less center, as signed bytes (quantized_width(m) per
// row, in `bytes`) and their QuantizedRow (in `rows`).
inline void quantize_queries(const float* x, const float* center, index_t m, index_t q0, index_t q1,
                             std::int8_t* bytes, QuantizedRow* rows) {
    const index_t width = quantized_width(m);
    alignas(64) std::uint8_t row[kQuantizedMaxDim + 16];
    for (index_t q = q0; q < q1; ++q) {
        rows[q - q0] = quantize_row(x + q * m, center, m, 0, row);
        std::memcpy(bytes + (q - q0) * width, row, width);
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
    alignas(64) std::uint8_t row_bytes[kQuantizedMaxDim + 16];
    for (index_t j = 0; j < padded; ++j) {
        QuantizedRow row{0, 0, 0, 0};
        if (c0 + j < c1) {
            row = quantize_row(x2 + (c0 + j) * m, center, m, 0x80, row_bytes);
        } else {
            std::memset(row_bytes, 0x80, width);
        }
        // Four coordinates of the reference make one int32 lane of its block's 64-byte groups.
        std::uint8_t* lane = packed + (j / kQuantizedBlock) * kQuantizedBlock * width + (j % kQuantizedBlock) * 4;
        for (index_t g = 0; g < width / 4; ++g) std::memcpy(lane + g * 64, row_bytes + g * 4, 4);
        rows.scale[j] = row.scale;
        rows.norm2[j] = row.norm2;
        rows.spread[j] = row.spread;
    }
}

// acc += the four bytes at `four` (broadcast) times r, summed by fours: one vpdpbusd with the
// query's bytes straight from memory. Written out because GCC copies the accumulator to a scratch
// register and back around the intrinsic (_mm512_dpbusd_epi32), which doubled the tile's
// instructions.
inline void dot_four(__m512i& acc, __m512i r, const std::int8_t* four) {
    asm("vpdpbusd %[four]%{1to16%}, %[r], %[acc]"
        : [acc] "+v"(acc)
        : [r] "v"(r), [four] "m"(*reinterpret_cast<const std::int32_t*>(four)));
}

// acc[i] lane l = Σ_k (r̃_lk + 128)·q̃_ik for query row qs[i] (signed bytes) and reference l of a
// packed block (quantized_width(m) / 4 groups of 64 bytes).
inline void quantized_tile(const std::int8_t* const (&qs)[kQuantizedTileQueries], const std::uint8_t* block, index_t m,
                           __m512i (&acc)[kQuantizedTileQueries]) {
    // Eight named sums, not an array: GCC kept an array of them (the caller's, indexed at run
    // time, or a local one alike) in memory around the asm, a load and a store beside every
    // vpdpbusd (a third of knn's scan at 256 x 1M x 32 on an Ice Lake Xeon).
    static_assert(kQuantizedTileQueries == 8, "the tile names its eight sums");
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
    const index_t groups = quantized_width(m) / 4;
    for (index_t g = 0; g < groups; ++g) {
        const __m512i r = _mm512_loadu_si512(block + g * 64);
        const index_t at = g * 4;
        dot_four(s0, r, qs[0] + at);
        dot_four(s1, r, qs[1] + at);
        dot_four(s2, r, qs[2] + at);
        dot_four(s3, r, qs[3] + at);
        dot_four(s4, r, qs[4] + at);
        dot_four(s5, r, qs[5] + at);
        dot_four(s6, r, qs[6] + at);
        dot_four(s7, r, qs[7] + at);
    }
    acc[0] = s0, acc[1] = s1, acc[2] = s2, acc[3] = s3, acc[4] = s4, acc[5] = s5, acc[6] = s6, acc[7] = s7;
}

}  // namespace fastml

#endif
