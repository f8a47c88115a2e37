// One row of float32 activations times a float32 weight, for the float32 decoder step at one row (see
// peft_t5/kernels.py). A one-row product reads its whole weight once and does little else, so it runs at the speed
// memory delivers the weight: written by hand because MKL's (F.linear at one row) reached ~15 GB/s on a 2-core Xeon
// where this loop, four weight rows at a time and each stream prefetched 8 KB ahead, reached 17-23 (t5-small's
// 154 MB a step); on a 2-core AMD EPYC MKL's 10.6, this loop's 20-22 (prefetching into L2 there: prefetch.h).
// AVX-512 where it is used, else AVX2 (isa.h).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include "isa.h"
#include "prefetch.h"

namespace {

constexpr int64_t kAhead = 2048;  // floats prefetched ahead of each load (8 KB)

// out[n + j] = w[n + j, :] . x for j < R, the weight prefetched with Hint (prefetch.h)
template <int R, int Hint>
__attribute__((target("avx512f"))) inline void weight_rows(const float* x, const float* w, float* out,
                                                            int64_t k_size, int64_t n) {
  __m512 acc[R];
  for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
  const float* r = w + n * k_size;
  const int64_t whole = k_size / 16 * 16;
  for (int64_t k = 0; k < whole; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int j = 0; j < R; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(r + j * k_size + k + kAhead), static_cast<_mm_hint>(Hint));
      acc[j] = _mm512_fmadd_ps(_mm512_loadu_ps(r + j * k_size + k), xv, acc[j]);
    }
  }
  if (whole < k_size) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k_size - whole)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(tail, x + whole);
    for (int j = 0; j < R; ++j)
      acc[j] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, r + j * k_size + whole), xv, acc[j]);
  }
  for (int j = 0; j < R; ++j) out[n + j] = _mm512_reduce_add_ps(acc[j]);
}

// the same with AVX2: 16 floats a turn (two accumulators a row), so each row's stream is prefetched once a line
template <int R, int Hint>
__attribute__((target("avx2,fma"))) inline void weight_rows_avx2(const float* x, const float* w, float* out,
                                                                  int64_t k_size, int64_t n) {
  __m256 acc[R], acc2[R];
  for (int j = 0; j < R; ++j) acc[j] = acc2[j] = _mm256_setzero_ps();
  const float* r = w + n * k_size;
  const int64_t whole = k_size / 16 * 16;
  for (int64_t k = 0; k < whole; k += 16) {
    const __m256 xv = _mm256_loadu_ps(x + k), xv2 = _mm256_loadu_ps(x + k + 8);
    for (int j = 0; j < R; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(r + j * k_size + k + kAhead), static_cast<_mm_hint>(Hint));
      acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(r + j * k_size + k), xv, acc[j]);
      acc2[j] = _mm256_fmadd_ps(_mm256_loadu_ps(r + j * k_size + k + 8), xv2, acc2[j]);
    }
  }
  for (int j = 0; j < R; ++j) {
    const __m256 both = _mm256_add_ps(acc[j], acc2[j]);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(both), _mm256_extractf128_ps(both, 1));
    s = _mm_hadd_ps(s, s);
    float sum = _mm_cvtss_f32(_mm_hadd_ps(s, s));
    for (int64_t k = whole; k < k_size; ++k) sum += r[j * k_size + k] * x[k];
    out[n + j] = sum;
  }
}

template <bool Avx512, int R, int Hint>
inline void rows_of(const float* x, const float* w, float* out, int64_t k_size, int64_t n) {
  if constexpr (Avx512) weight_rows<R, Hint>(x, w, out, k_size, n);
  else weight_rows_avx2<R, Hint>(x, w, out, k_size, n);
}

template <bool Avx512, int Hint>
void products(const float* xd, const float* w, float* o, int64_t k_size, int64_t n_size) {
  const int64_t blocks = n_size / 4;
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) rows_of<Avx512, 4, Hint>(xd, w, o, k_size, 4 * b);
  });
  for (int64_t n = 4 * blocks; n < n_size; ++n) rows_of<Avx512, 1, Hint>(xd, w, o, k_size, n);
}

at::Tensor f32_matvec(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kFloat, "f32_matvec: x must be [1, K] float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1) &&
                  weight.is_contiguous(),
              "f32_matvec: weight must be a contiguous [N, K] float32");  // never a silent copy of a weight
  const at::Tensor xc = x.contiguous();
  const int64_t k_size = weight.size(1), n_size = weight.size(0);
  at::Tensor out = at::empty({1, n_size}, x.options());
  const float* xd = xc.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const bool l2 = peft_t5_kernels::prefetch_to_l2();
  if (peft_t5_kernels::avx512_used()) {
    if (l2) products<true, _MM_HINT_T1>(xd, w, o, k_size, n_size);
    else products<true, _MM_HINT_T0>(xd, w, o, k_size, n_size);
  } else {
    TORCH_CHECK(peft_t5_kernels::avx2_usable(), "f32_matvec: the CPU has neither AVX-512 nor AVX2 with FMA");
    if (l2) products<false, _MM_HINT_T1>(xd, w, o, k_size, n_size);
    else products<false, _MM_HINT_T0>(xd, w, o, k_size, n_size);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) { m.def("f32_matvec(Tensor x, Tensor weight) -> Tensor"); }

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) { m.impl("f32_matvec", &f32_matvec); }
