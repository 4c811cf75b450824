// Loop helpers of the CPU kernels: fixed chunks of the activation run in parallel, and
// within a chunk, runs of consecutive elements whose channel is known without a division.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace fusedres {
namespace cpu {

// The activation is cut into chunks whose size depends only on its size (so per-channel sums
// are the same for any thread count) and is a multiple of 8 (so no two chunks share a byte of
// the ReLU mask).
struct Chunks {
  int64_t size;
  int64_t count;
};

inline Chunks chunks_of(int64_t numel) {
  constexpr int64_t kMinChunk = 1 << 15;  // elements: big enough to amortise a task
  constexpr int64_t kMaxChunks = 1024;    // bounds the per-chunk partial sums
  const int64_t size = std::max(kMinChunk, ((numel + kMaxChunks - 1) / kMaxChunks + 7) / 8 * 8);
  return {size, (numel + size - 1) / size};
}

// body(chunk, begin, end) for every chunk, in parallel.
template <typename Body>
inline void parallel_chunks(int64_t numel, const Body& body) {
  const Chunks ch = chunks_of(numel);
  at::parallel_for(0, ch.count, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) body(k, k * ch.size, std::min(numel, (k + 1) * ch.size));
  });
}

// run(step, i0, len, c0) over the flat elements [begin, end) in runs: elements i0 .. i0+len-1
// have channel c0 + j*step, step = 1 in channels_last (a run is a row), step = 0 in NCHW (a
// run is part of one channel plane). `step` is a std::integral_constant, so kernels get both
// loop shapes at compile time.
template <typename Run>
inline void for_each_run(const Layout& layout, int64_t begin, int64_t end, const Run& run) {
  const int64_t channels = layout.channels;
  int64_t i = begin;
  if (layout.inner == 1) {
    while (i < end) {
      const int64_t c = i % channels;
      const int64_t len = std::min(channels - c, end - i);
      run(std::integral_constant<int, 1>{}, i, len, c);
      i += len;
    }
  } else {
    while (i < end) {
      const int64_t plane = i / layout.inner;
      const int64_t len = std::min((plane + 1) * layout.inner - i, end - i);
      run(std::integral_constant<int, 0>{}, i, len, plane % channels);
      i += len;
    }
  }
}

// Per-channel sums of NSUMS quantities, in double: body(partial, begin, end) adds chunk
// [begin, end)'s contributions to partial[s * C + c] (zero on entry); the chunks' partials
// are then added in chunk order. Returns NSUMS * C doubles.
template <int NSUMS, typename Body>
inline std::vector<double> channel_sums(const Layout& layout, const Body& body) {
  const int64_t numel = layout.numel(), width = NSUMS * layout.channels;
  const Chunks ch = chunks_of(numel);
  std::vector<double> partials(static_cast<size_t>(ch.count * width), 0.0);
  parallel_chunks(numel, [&](int64_t k, int64_t begin, int64_t end) { body(partials.data() + k * width, begin, end); });
  std::vector<double> total(static_cast<size_t>(width), 0.0);
  for (int64_t k = 0; k < ch.count; ++k)
    for (int64_t j = 0; j < width; ++j) total[j] += partials[k * width + j];
  return total;
}

// relu keeping NaN, as torch.relu does.
template <typename T>
inline T relu(T v) {
  return v <= T(0) ? T(0) : v;
}

// Calls f with std::true_type or std::false_type, so a flag becomes a compile-time constant.
template <typename F>
inline void with_flag(bool flag, const F& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace cpu
}  // namespace fusedres
