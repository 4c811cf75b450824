// Compiles the kernels of the header named by FUSEDRES_KERNELS twice (see isa.h): into
// namespace `baseline`, and on x86-64 into namespace `avx2` with AVX2 + FMA enabled.
// Included inside namespace fusedres::cpu::(anonymous), after every #include the kernels
// need. No include guard: each kernel file includes it once, for its own header.
#define FUSEDRES_ISA baseline
#include FUSEDRES_KERNELS
#undef FUSEDRES_ISA
#ifdef FUSEDRES_AVX2_BUILD
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define FUSEDRES_ISA avx2
#include FUSEDRES_KERNELS
#undef FUSEDRES_ISA
#pragma GCC pop_options
#endif
#undef FUSEDRES_KERNELS
