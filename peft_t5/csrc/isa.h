// Which instructions peft-t5's kernels take (see peft_t5/kernels.py): AVX-512's where the CPU has them and torch's
// own kernels are not held below them (ATEN_CPU_CAPABILITY, as kernels.cpu_lacks reads it: how a CPU without
// AVX-512 is tested on one with it), else AVX2's (with FMA: every CPU with AVX2 that x86 torch runs on has it).
#pragma once
#include <ATen/Version.h>

#include <string>

namespace peft_t5_kernels {

inline bool avx512_used() {
  static const bool used = __builtin_cpu_supports("avx512f") && at::get_cpu_capability() == "AVX512";
  return used;
}

inline bool vnni_used() {  // int8 products summed by AVX512-VNNI (else widened to int16 pairs, AVX2)
  static const bool used = avx512_used() && __builtin_cpu_supports("avx512bw") &&
                           __builtin_cpu_supports("avx512vnni");
  return used;
}

inline bool avx2_usable() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

}  // namespace peft_t5_kernels
