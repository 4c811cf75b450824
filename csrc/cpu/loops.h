// Loop helpers of the CPU kernels: fixed chunks of the activation run in parallel, and
// within a chunk, runs of consecutive elements whose channel is known without a division.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

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

// v where keep, else +0: a bitwise select, so loops stay branch-free and vectorise (a
// data-dependent branch mispredicts on every other element of a ReLU mask). Unlike v * keep
// it gives 0, not NaN, for a NaN or infinite v that is masked out, as masked_fill does.
template <typename T>
inline T keep_if(bool keep, T v) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(Bits), "keep_if: float or double");
  Bits bits;
  std::memcpy(&bits, &v, sizeof(T));
  bits &= Bits(0) - static_cast<Bits>(keep);
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// relu keeping NaN, as torch.relu does.
template <typename T>
inline T relu(T v) {
  return keep_if(!(v <= T(0)), v);
}

// The ReLU mask of out[begin, end), begin a multiple of 8: bit (i % 8) of bits[i / 8] is set
// where out[i] is not <= 0 (NaN passes its gradient, as with the saved output).
template <typename scalar_t, typename acc_t>
inline void pack_relu_mask(const scalar_t* out, int64_t begin, int64_t end, uint8_t* bits) {
  int64_t i = begin;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    // SSE2 (every x86-64): "not less or equal" is true for NaN, as !(v <= 0) is.
    const __m128 zero = _mm_setzero_ps();
    for (; i + 8 <= end; i += 8) {
      const int lo = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(out + i), zero));
      const int hi = _mm_movemask_ps(_mm_cmpnle_ps(_mm_loadu_ps(out + i + 4), zero));
      bits[i / 8] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
#endif
  for (; i < end; i += 8) {
    uint8_t byte = 0;
    for (int64_t j = 0; j < 8 && i + j < end; ++j)
      byte |= static_cast<uint8_t>(!(static_cast<acc_t>(out[i + j]) <= acc_t(0))) << j;
    bits[i / 8] = byte;
  }
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
