// One row of activations times an int8 weight, for the serving step at one row (see peft_t5/int8_matvec.py): the
// row quantized to int8 with a scale of its own, products summed in int32 with AVX512-VNNI, the result scaled as
// quantize.int8_linear scales oneDNN's. Written by hand because oneDNN's int8 product (torch.ops.onednn.
// qlinear_pointwise) spends ~25-30 us a call on allocations and descriptors whatever the size: most of a one-row
// step's products (t5-small: 37 calls, ~1 ms of a ~4 ms step).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// x [K] -> q [K] int8 = round(x * 127 / max|x|) (to nearest even, as torch.round), the sum of the first `summed`
// (a multiple of 16), and max|x| / 127
__attribute__((target("avx512f,avx512bw,avx512vnni"))) float quantize_row(const float* x, int8_t* q, int64_t k_size,
                                                                            int64_t summed, int32_t* q_sum) {
  __m512 most = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= k_size; k += 16) most = _mm512_max_ps(most, _mm512_abs_ps(_mm512_loadu_ps(x + k)));
  float amax = _mm512_reduce_max_ps(most);
  for (; k < k_size; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-12f);
  const float inverse = 127.f / amax;
  const __m512 inverse_v = _mm512_set1_ps(inverse);
  __m512i sum = _mm512_setzero_si512();
  for (k = 0; k + 16 <= k_size; k += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + k), inverse_v));
    if (k < summed) sum = _mm512_add_epi32(sum, v);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
  }
  for (; k < k_size; ++k) q[k] = static_cast<int8_t>(std::nearbyint(x[k] * inverse));
  *q_sum = _mm512_reduce_add_epi32(sum);
  return amax / 127.f;
}

// out[n] = (sum_k q[k] w[n, k]) * scale[n] * x_scale for n in [first, last). VNNI multiplies unsigned bytes by signed
// ones: w with its sign bit flipped is w + 128 as unsigned bytes, and 128 * q_sum (q's sum over the 64-byte blocks)
// is taken back; the last K % 64 are summed one by one. Four rows of w share each load of q.
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void weight_rows(const int8_t* q, int32_t q_sum,
                                                                         const int8_t* w, const float* scale,
                                                                         float x_scale, float* out, int64_t k_size,
                                                                         int64_t first, int64_t last) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t whole = k_size / 64 * 64;
  const int32_t offset = 128 * q_sum;
  int64_t n = first;
  for (; n + 4 <= last; n += 4) {
    const int8_t* r0 = w + n * k_size;
    const int8_t* r1 = r0 + k_size;
    const int8_t* r2 = r1 + k_size;
    const int8_t* r3 = r2 + k_size;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < whole; k += 64) {
      const __m512i qv = _mm512_loadu_si512(q + k);
      a0 = _mm512_dpbusd_epi32(a0, _mm512_xor_si512(_mm512_loadu_si512(r0 + k), flip), qv);
      a1 = _mm512_dpbusd_epi32(a1, _mm512_xor_si512(_mm512_loadu_si512(r1 + k), flip), qv);
      a2 = _mm512_dpbusd_epi32(a2, _mm512_xor_si512(_mm512_loadu_si512(r2 + k), flip), qv);
      a3 = _mm512_dpbusd_epi32(a3, _mm512_xor_si512(_mm512_loadu_si512(r3 + k), flip), qv);
    }
    int32_t s[4] = {_mm512_reduce_add_epi32(a0) - offset, _mm512_reduce_add_epi32(a1) - offset,
                    _mm512_reduce_add_epi32(a2) - offset, _mm512_reduce_add_epi32(a3) - offset};
    for (int64_t k = whole; k < k_size; ++k) {
      s[0] += r0[k] * q[k];
      s[1] += r1[k] * q[k];
      s[2] += r2[k] * q[k];
      s[3] += r3[k] * q[k];
    }
    for (int j = 0; j < 4; ++j) out[n + j] = static_cast<float>(s[j]) * scale[n + j] * x_scale;
  }
  for (; n < last; ++n) {
    const int8_t* row = w + n * k_size;
    int32_t s = 0;
    for (int64_t k = 0; k < k_size; ++k) s += row[k] * q[k];
    out[n] = static_cast<float>(s) * scale[n] * x_scale;
  }
}

at::Tensor int8_matvec(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat, "int8_matvec: x must be [1, K] float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
              "int8_matvec: weight must be [N, K] int8");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.size(0) == weight.size(0),
              "int8_matvec: scale must be [N] float32");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), sc = scale.contiguous();
  const int64_t k_size = wc.size(1), n_size = wc.size(0);
  std::vector<int8_t> q(k_size);
  int32_t q_sum = 0;
  const float x_scale = quantize_row(xc.data_ptr<float>(), q.data(), k_size, k_size / 64 * 64, &q_sum);
  at::Tensor out = at::empty({1, n_size}, x.options());
  float* out_data = out.data_ptr<float>();
  const int8_t* w = wc.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  at::parallel_for(0, n_size, 1024, [&](int64_t first, int64_t last) {
    weight_rows(q.data(), q_sum, w, s, x_scale, out_data, k_size, first, last);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(peft_t5, m) { m.def("int8_matvec(Tensor x, Tensor weight, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) { m.impl("int8_matvec", &int8_matvec); }
