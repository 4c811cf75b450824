// The CPU kernels are compiled twice: for the baseline ISA (x86-64: SSE2) and, on x86-64, for
// AVX2 + FMA, chosen at run time. (PyTorch's own CPU kernels do the same through their
// CPU_CAPABILITY builds; without it the extension would run half-width vectors.)
//
// A kernel file compiles its *_kernels.h once per FUSEDRES_ISA namespace through
// compile_twice.h (the second time under `#pragma GCC target("avx2,fma")`);
// FUSEDRES_CPU_CALL(f<...>(args)) calls the best one this CPU runs.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define FUSEDRES_AVX2_BUILD 1
#endif

namespace fusedres {
namespace cpu {

// FUSEDRES_CPU_ISA=baseline (read once) forces the baseline build: how the tests reach it
// on an AVX2 machine.
inline bool use_avx2() {
#ifdef FUSEDRES_AVX2_BUILD
  static const bool chosen = [] {
    const char* isa = std::getenv("FUSEDRES_CPU_ISA");
    if (isa != nullptr && std::strcmp(isa, "baseline") == 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return chosen;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace fusedres

#ifdef FUSEDRES_AVX2_BUILD
#define FUSEDRES_CPU_CALL(...) (use_avx2() ? avx2::__VA_ARGS__ : baseline::__VA_ARGS__)
#else
#define FUSEDRES_CPU_CALL(...) (baseline::__VA_ARGS__)
#endif
