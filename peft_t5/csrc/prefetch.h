// Where the one-row kernels prefetch the weights they stream from memory (int8_matmul.cpp, f32_matvec.cpp). On AMD
// (a 2-core EPYC, Zen 4), into L2 (prefetcht1) rather than L1: t5-small's 37 one-row float32 products of a step
// took 6.9-7.9 ms instead of 10.3-11.6, its int8 ones 2.7 instead of 3.4, flan-t5-large's int8 ones 26 instead of
// 37. On Intel, into L1 (prefetcht0), as measured on the Xeon the kernels were written on (L2 was not tried there).
#pragma once
#include <immintrin.h>

namespace peft_t5_kernels {

inline bool prefetch_to_l2() {
  static const bool amd = __builtin_cpu_is("amd");
  return amd;
}

}  // namespace peft_t5_kernels
