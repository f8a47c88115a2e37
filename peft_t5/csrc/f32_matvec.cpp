// One row of float32 activations times a float32 weight, for the float32 decoder step at one row, and 2-4 rows over
// one stream of the weight for the step of a few (see peft_t5/kernels.py). A one-row product reads its whole weight
// once and does little else, so it runs at the speed memory delivers the weight: written by hand because MKL's
// (F.linear at one row) reached ~15 GB/s on a 2-core Xeon where this loop, four weight rows at a time and each stream
// prefetched 8 KB ahead, reached 17-23 (t5-small's 154 MB a step); on a 2-core AMD EPYC MKL's 10.6, this loop's
// 20-22 (prefetching into L2 there: prefetch.h). AVX-512 where it is used, else AVX2 (isa.h).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include "isa.h"
#include "prefetch.h"

#include <algorithm>
#include <type_traits>

namespace {

constexpr int64_t kAhead = 2048;  // floats prefetched ahead of each load (8 KB)

// out[n + j] = w[n + j, :] . x for j < R with AVX2 (with AVX-512: weight_rows_of_rows<1, R>, below), the weight
// prefetched with Hint (prefetch.h): 16 floats a turn (two accumulators a row), so each row's stream is prefetched
// once a line
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

// out[m, n + j] = w[n + j, :] . x[m, :] for j < R, m < MR: a few rows of x over one stream of the weight (the
// step of 2-4 rows, whose weights stream from memory as one row's do)
template <int MR, int R, int Hint>
__attribute__((target("avx512f"))) inline void weight_rows_of_rows(const float* x, const float* w, float* out,
                                                                    int64_t k_size, int64_t n_size, int64_t n) {
  __m512 acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < R; ++j) acc[i][j] = _mm512_setzero_ps();
  const float* r = w + n * k_size;
  const int64_t whole = k_size / 16 * 16;
  for (int64_t k = 0; k < whole; k += 16) {
    __m512 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_ps(x + i * k_size + k);
    for (int j = 0; j < R; ++j) {
      _mm_prefetch(reinterpret_cast<const char*>(r + j * k_size + k + kAhead), static_cast<_mm_hint>(Hint));
      const __m512 wv = _mm512_loadu_ps(r + j * k_size + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(wv, xv[i], acc[i][j]);
    }
  }
  if (whole < k_size) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (k_size - whole)) - 1);
    for (int j = 0; j < R; ++j) {
      const __m512 wv = _mm512_maskz_loadu_ps(tail, r + j * k_size + whole);
      for (int i = 0; i < MR; ++i)
        acc[i][j] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(tail, x + i * k_size + whole), acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < R; ++j) out[i * n_size + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

// the same with AVX2 (16 registers: MR x R sums, MR rows of x, a weight)
template <int MR, int R, int Hint>
__attribute__((target("avx2,fma"))) inline void weight_rows_of_rows_avx2(const float* x, const float* w, float* out,
                                                                          int64_t k_size, int64_t n_size, int64_t n) {
  __m256 acc[MR][R];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < R; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* r = w + n * k_size;
  const int64_t whole = k_size / 16 * 16;
  for (int64_t k = 0; k < whole; k += 16) {
    for (int j = 0; j < R; ++j)
      _mm_prefetch(reinterpret_cast<const char*>(r + j * k_size + k + kAhead), static_cast<_mm_hint>(Hint));
    for (int half = 0; half < 16; half += 8) {
      __m256 xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + i * k_size + k + half);
      for (int j = 0; j < R; ++j) {
        const __m256 wv = _mm256_loadu_ps(r + j * k_size + k + half);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(wv, xv[i], acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < R; ++j) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[i][j]), _mm256_extractf128_ps(acc[i][j], 1));
      s = _mm_hadd_ps(s, s);
      float sum = _mm_cvtss_f32(_mm_hadd_ps(s, s));
      for (int64_t k = whole; k < k_size; ++k) sum += r[j * k_size + k] * x[i * k_size + k];
      out[i * n_size + n + j] = sum;
    }
}

// MR rows of x (x [MR, K] contiguous) times the whole weight, four weight rows at a time
template <bool Avx512, int MR, int Hint>
void rows_products(const float* x, const float* w, float* o, int64_t k_size, int64_t n_size) {
  const int64_t blocks = n_size / 4;
  const auto rows = [&](auto r, int64_t n) {
    constexpr int R = decltype(r)::value;
    if constexpr (Avx512) weight_rows_of_rows<MR, R, Hint>(x, w, o, k_size, n_size, n);
    else weight_rows_of_rows_avx2<MR, R, Hint>(x, w, o, k_size, n_size, n);
  };
  at::parallel_for(0, blocks, 64, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) rows(std::integral_constant<int, 4>{}, 4 * b);
  });
  for (int64_t n = 4 * blocks; n < n_size; ++n) rows(std::integral_constant<int, 1>{}, n);
}

template <bool Avx512, int R, int Hint>
inline void rows_of(const float* x, const float* w, float* out, int64_t k_size, int64_t n) {
  if constexpr (Avx512) weight_rows_of_rows<1, R, Hint>(x, w, out, k_size, 0, n);
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

// x [M, K] of a few rows (the step of several rows, float32) times weight [N, K]: this file's loops for up to
// kFewRows rows, two rows of x at a time with AVX2, over one stream of the weight each; oneDNN's product over the
// weight's copy held under `number` (onednn_held.cpp) past them. Decided here, as the call runs, so that the
// compiled graph of several rows (which takes any count) needs no guard on the count. Measured in the engine's step
// (weights streaming from memory): oneDNN's read them at ~10 GB/s at 2 rows, these loops at ~18.
constexpr int64_t kFewRows = 4;

template <int Hint>
void few_rows(const float* x, const float* w, float* o, int64_t m_size, int64_t k_size, int64_t n_size) {
  const bool avx512 = peft_t5_kernels::avx512_used();
  for (int64_t m = 0; m < m_size;) {
    const int64_t take = std::min<int64_t>(m_size - m, avx512 ? 4 : 2);
    const float* xm = x + m * k_size;
    float* om = o + m * n_size;
    switch (avx512 ? take : -take) {  // AVX2's negative
      case 4: rows_products<true, 4, Hint>(xm, w, om, k_size, n_size); break;
      case 3: rows_products<true, 3, Hint>(xm, w, om, k_size, n_size); break;
      case 2: rows_products<true, 2, Hint>(xm, w, om, k_size, n_size); break;
      case 1: rows_products<true, 1, Hint>(xm, w, om, k_size, n_size); break;
      case -2: rows_products<false, 2, Hint>(xm, w, om, k_size, n_size); break;
      default: rows_products<false, 1, Hint>(xm, w, om, k_size, n_size); break;
    }
    m += take;
  }
}

at::Tensor f32_rows(const at::Tensor& x, const at::Tensor& weight, int64_t number, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "f32_rows: x must be [M, K] float32");
  if (x.size(0) > kFewRows) {
    static const auto held = c10::Dispatcher::singleton()
        .findSchemaOrThrow("peft_t5::onednn_float_linear", "")
        .typed<at::Tensor(const at::Tensor&, int64_t, int64_t)>();
    return held.call(x, number, out_features);
  }
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(1) == x.size(1) &&
                  weight.size(0) == out_features && weight.is_contiguous(),
              "f32_rows: weight must be a contiguous [N, K] float32");
  TORCH_CHECK(peft_t5_kernels::avx512_used() || peft_t5_kernels::avx2_usable(),
              "f32_rows: the CPU has neither AVX-512 nor AVX2 with FMA");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  if (peft_t5_kernels::prefetch_to_l2())
    few_rows<_MM_HINT_T1>(xc.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0),
                          x.size(1), out_features);
  else
    few_rows<_MM_HINT_T0>(xc.data_ptr<float>(), weight.data_ptr<float>(), out.data_ptr<float>(), x.size(0),
                          x.size(1), out_features);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) {
  m.def("f32_matvec(Tensor x, Tensor weight) -> Tensor");
  m.def("f32_rows(Tensor x, Tensor weight, int number, int out_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) {
  m.impl("f32_matvec", &f32_matvec);
  m.impl("f32_rows", &f32_rows);
}
