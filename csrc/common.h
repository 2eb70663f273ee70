// Shared helpers for fastml's C++ kernels.
//
// Tensors cross the Python boundary as integer data pointers plus sizes: no libtorch headers, so
// the extension builds in seconds and works with any torch. Python validates arguments, makes
// inputs contiguous, allocates every output and passes the thread count; kernels never allocate
// tensors (small per-thread scratch vectors only) and run with the GIL released.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <omp.h>
#include <unistd.h>

namespace fastml {

using index_t = std::int64_t;
using address_t = std::uintptr_t;  // a tensor's data_ptr(), 0 meaning "absent"

template <typename T>
inline T* as_ptr(address_t address) {
    return reinterpret_cast<T*>(address);
}

// a · b + c as torch's CPU kernels form it: rounded once where the build has FMA (ATen's
// vectorised fmadd, e.g. add with alpha, addcmul), twice where it has none (ATen's default
// kernels then compute a * b + c), and never a libm call emulating one in a hot loop.
template <typename T>
inline T multiply_add(T a, T b, T c) {
#if defined(__FMA__)
    return std::fma(a, b, c);
#else
    return a * b + c;
#endif
}

// n elements on the heap, left uninitialised, for a buffer whose every element a parallel pass
// writes before anything reads it (batch planes, spread gradient planes). std::vector<T>(n)
// zeroes them first, on one thread: LeNet's fused backward spent 5% of its time on a 5 MB
// memset of planes its threads then zeroed again.
template <typename T>
class Uninitialized {
public:
    explicit Uninitialized(index_t n) : data_(new T[n > 0 ? n : 1]) {}  // new T[n]: no value-initialisation
    T* data() { return data_.get(); }
    const T* data() const { return data_.get(); }

private:
    std::unique_ptr<T[]> data_;
};

// The per-core data caches this CPU reports, in bytes: block sizes derive from them, not from
// constants tuned on one machine (L2 is 512 KiB on Zen 3, 1 MiB on Zen 4 and Zen 5, 2 MiB on
// Sapphire Rapids; every block follows the L2 today, the L1d, 32 or 48 KiB, is reported too).
// glibc reads them from cpuid; where it cannot (another libc, a hypervisor hiding the leaf), the
// common sizes stand in. Out-of-range reports are clamped.
struct CacheSizes {
    index_t l1d, l2;
};

inline CacheSizes& cache_sizes_in_use() {
    static CacheSizes sizes = [] {
        CacheSizes found{32 * 1024, 512 * 1024};
#if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
        const long l1d = sysconf(_SC_LEVEL1_DCACHE_SIZE), l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        if (l1d > 0) found.l1d = std::clamp<index_t>(l1d, 16 * 1024, 256 * 1024);
        if (l2 > 0) found.l2 = std::clamp<index_t>(l2, 128 * 1024, 64 * 1024 * 1024);
#endif
        return found;
    }();
    return sizes;
}

inline const CacheSizes& cache_sizes() { return cache_sizes_in_use(); }

// Sizes given in place of the report (FASTML_CACHE_SIZES, which fastml/_cpp.py reads and checks,
// and sets before any kernel runs): another CPU's caches, to run its blocking here, or sizes
// below any CPU's, which make a test's small shapes cross the blocks' boundaries. Taken as given:
// every size derived from them has a floor of its own.
inline void set_cache_sizes(index_t l1d, index_t l2) {
    cache_sizes_in_use() = CacheSizes{l1d, l2};
}

// Splits [0, n) into `parts` contiguous ranges that differ in length by at most one;
// returns the range of part `p`. Static partitioning keeps each thread on its own rows,
// so per-thread partial sums are combined in a fixed order: results are deterministic.
inline void split_range(index_t n, int parts, int p, index_t& begin, index_t& end) {
    const index_t base = n / parts, extra = n % parts;
    begin = p * base + std::min<index_t>(p, extra);
    end = begin + base + (p < extra ? 1 : 0);
}

// A sum of doubles compensated for rounding (Neumaier's variant of Kahan's): a loss summed over
// 10^5 rows one at a time drifts by ~1e-14 relative in double, where torch's pairwise sum keeps
// ~2e-16; this keeps ~1e-16 at one add and a compare more per term. Infinite and NaN terms give
// the plain sum's inf or NaN (the compensation only follows finite partial sums).
class CompensatedSum {
public:
    void add(double term) {
        const double total = sum_ + term;
        if (std::isfinite(total))
            compensation_ += std::fabs(sum_) >= std::fabs(term) ? (sum_ - total) + term : (term - total) + sum_;
        sum_ = total;
    }
    double value() const { return std::isfinite(sum_) ? sum_ + compensation_ : sum_; }

private:
    double sum_ = 0.0, compensation_ = 0.0;
};

// Threads worth using for `work` multiply-adds: spawning a team costs a few microseconds,
// which dominates tiny problems (the course's batch of 10 rows).
inline int threads_for(index_t work, int requested) {
    constexpr index_t kWorkPerThread = 32 * 1024;
    const index_t useful = std::max<index_t>(1, work / kWorkPerThread);
    return static_cast<int>(std::max<index_t>(1, std::min<index_t>(requested, useful)));
}

}  // namespace fastml
