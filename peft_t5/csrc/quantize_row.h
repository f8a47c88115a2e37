// One row of activations quantized to int8 as quantize.int8_linear does (its scale of its own): shared by
// int8_matmul.cpp (AVX512-VNNI) and int8_amx.cpp (AMX), whose results must both be oneDNN's bit for bit.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace peft_t5_kernels {

// x [K] -> q [k_pad] int8 = round(x * 127 / max|x|) (to nearest even, as torch.round), zeros past K; returns
// max|x| / 127. Where q_sum is given: the sum of q's first `summed` values (a multiple of 16) there.
__attribute__((target("avx512f,avx512bw"))) inline float quantize_row(const float* x, int8_t* q, int64_t k_size,
                                                                      int64_t k_pad, int64_t summed,
                                                                      int32_t* q_sum) {
  __m512 most = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= k_size; k += 16) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(most);
  for (; k < k_size; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-12f);
  const float inverse = 1.f / amax * 127.f;  // as torch computes 127 / amax: its reciprocal times 127
  const __m512 inverse_v = _mm512_set1_ps(inverse);
  __m512i sum = _mm512_setzero_si512();
  for (k = 0; k + 16 <= k_size; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inverse_v));
    if (k < summed) sum = _mm512_add_epi32(sum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
  }
  for (; k < k_size; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inverse));
  std::memset(q + k_size, 0, k_pad - k_size);
  if (q_sum != nullptr) *q_sum = _mm512_reduce_add_epi32(sum);
  return amax / 127.f;
}

}  // namespace peft_t5_kernels
