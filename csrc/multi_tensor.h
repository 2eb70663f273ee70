// Walking many tensors in one parallel region: the optimizer kernels' launch shape.
//
// An optimizer step updates every parameter tensor of a group with the same elementwise rule.
// Instead of one parallel region per tensor (torch's for-loop and fused paths: a team wake-up
// and a barrier per tensor, which dominate a LeNet's ten small tensors), the tensors' elements
// are treated as one concatenated index space [0, Σ sizes) and split evenly between threads.
// Thread boundaries fall inside tensors, so one huge tensor beside many small ones splits as
// evenly as equal tensors do.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace fastml {

// Elements worth waking a thread for: an update moves ~20 bytes per element, so 16Ki elements
// are ~320 KB, ~10 us of one core's work from L2 beside ~2 us for the team wake-up (measured on
// the LeNet step: 2 threads at 61,706 elements are 13% faster than 1).
constexpr index_t kElementsPerThread = 16 * 1024;
// A boundary between two threads' ranges is moved down to a multiple of this many elements
// from its tensor's start (one 64-byte line of floats; tensors start line-aligned), so two
// threads never write the same cache line.
constexpr index_t kSpanAlign = 16;

// Calls body(tensor, begin, end) for every nonempty piece [begin, end) of a tensor's elements,
// each piece once, spread over at most `requested` threads inside one OpenMP region.
template <typename Body>
void for_each_span(const std::vector<index_t>& sizes, int requested, Body&& body) {
    const index_t count = static_cast<index_t>(sizes.size());
    std::vector<index_t> starts(count + 1, 0);  // starts[t]: tensor t's first element overall
    for (index_t t = 0; t < count; ++t) starts[t + 1] = starts[t] + sizes[t];
    const index_t total = starts[count];
    if (total == 0) return;
    const int threads = static_cast<int>(std::max<index_t>(
        1, std::min<index_t>(requested, total / kElementsPerThread)));

    auto run_range = [&](index_t lo, index_t hi) {
        // First tensor holding element lo: the last start <= lo (skipping empty tensors).
        index_t t = std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin() - 1;
        for (; t < count && starts[t] < hi; ++t) {
            const index_t begin = std::max(lo, starts[t]) - starts[t];
            const index_t end = std::min(hi, starts[t + 1]) - starts[t];
            if (begin < end) body(t, begin, end);
        }
    };
    if (threads == 1) {
        run_range(0, total);
        return;
    }
    // Boundary between thread p - 1 and thread p; both threads compute it the same way.
    auto boundary = [&](int p) -> index_t {
        if (p == threads) return total;
        const index_t b = total / threads * p + std::min<index_t>(p, total % threads);
        const index_t t = std::upper_bound(starts.begin(), starts.end(), b) - starts.begin() - 1;
        return starts[t] + (b - starts[t]) / kSpanAlign * kSpanAlign;
    };
#pragma omp parallel num_threads(threads)
    {
        const int p = omp_get_thread_num();
        run_range(boundary(p), boundary(p + 1));
    }
}

}  // namespace fastml
