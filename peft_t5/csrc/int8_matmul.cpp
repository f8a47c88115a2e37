// A few rows of activations times an int8 weight, for the serving step at one row (eagerly, up to 8; see
// peft_t5/kernels.py): each row quantized to int8 with a scale of its own, products summed in int32 with
// AVX512-VNNI, the result scaled as quantize.int8_linear scales oneDNN's. Written by hand because oneDNN's int8
// product (torch.ops.onednn.qlinear_pointwise) spends ~25-40 us a call on allocations and descriptors whatever the
// size: most of a one-row step's products (t5-small: 37 calls, ~1 ms of a ~4 ms step). Past ~8 rows oneDNN (AMX
// here) is faster. Without AVX512-VNNI (isa.h), AVX2: each row widened to int16 once and each weight's bytes as they
// load, summed in pairs by vpmaddwd into int32, exactly (oneDNN's AVX2 sums, vpmaddubsw, saturate int16: see
// quantize.weight_levels).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "isa.h"
#include "prefetch.h"
#include "quantize_row.h"

namespace {

using peft_t5_kernels::quantize_row;

// out[m, n..n+3] = (sum_k q[m, k] w[n.., k]) * scale[n..] * x_scale[m] for the MR rows from m0. VNNI multiplies
// unsigned bytes by signed ones: w with its sign bit flipped is w + 128 as unsigned bytes, and 128 * q_sum (a row's
// sum over the 64-byte blocks) is taken back; the last K % 64 are summed one by one. Each load of four weight rows
// serves MR rows of q: 4 x MR accumulators. A weight larger than the cache streams from memory: fetching the next
// four rows while these are summed took flan-t5-large's 169 one-row products from 26.7 to 23.5 ms (8 rows: 53.0 to
// 34.7) on a 2-core Xeon; t5-small's, which the cache holds, did not change.
template <int MR, int Hint>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void tile(const int8_t* q, const int32_t* q_sum,
    const float* x_scale, const int8_t* w, const float* scale, float* out, int64_t k_size, int64_t n_size, int64_t m0,
    int64_t n) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t whole = k_size / 64 * 64;
  const int8_t* r[4] = {w + n * k_size, w + (n + 1) * k_size, w + (n + 2) * k_size, w + (n + 3) * k_size};
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < whole; k += 64) {
    __m512i wv[4];
    for (int j = 0; j < 4; ++j) {  // the next four rows' bytes at this k, fetched ahead of their turn
      _mm_prefetch(reinterpret_cast<const char*>(r[j] + 4 * k_size + k), static_cast<_mm_hint>(Hint));
      wv[j] = _mm512_xor_si512(_mm512_loadu_si512(r[j] + k), flip);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512i qv = _mm512_loadu_si512(q + (m0 + i) * k_size + k);
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], wv[j], qv);
    }
  }
  for (int i = 0; i < MR; ++i) {
    // the four sums at once: pairwise interleaved adds leave [s0 s1 s2 s3] in each 128-bit lane, then the lanes add
    const __m512i a01 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[i][0], acc[i][1]),
                                         _mm512_unpackhi_epi32(acc[i][0], acc[i][1]));
    const __m512i a23 = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[i][2], acc[i][3]),
                                         _mm512_unpackhi_epi32(acc[i][2], acc[i][3]));
    const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi64(a01, a23), _mm512_unpackhi_epi64(a01, a23));
    const __m256i c = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
    __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
    sums = _mm_sub_epi32(sums, _mm_set1_epi32(128 * q_sum[m0 + i]));
    if (whole < k_size) {
      alignas(16) int32_t s[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(s), sums);
      const int8_t* qi = q + (m0 + i) * k_size;
      for (int j = 0; j < 4; ++j)
        for (int64_t k = whole; k < k_size; ++k) s[j] += r[j][k] * qi[k];
      sums = _mm_load_si128(reinterpret_cast<const __m128i*>(s));
    }
    const __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_loadu_ps(scale + n));  // (sum * scale) * x_scale, the
    _mm_storeu_ps(out + (m0 + i) * n_size + n, _mm_mul_ps(y, _mm_set1_ps(x_scale[m0 + i])));  // order oneDNN's has
  }
}

// weight rows [first, last) for every row of q: four at a time (in tiles of up to four rows of q), then one by one;
// the weight prefetched with Hint (prefetch.h)
template <int Hint>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void weight_rows(const int8_t* q, const int32_t* q_sum,
    const float* x_scale, const int8_t* w, const float* scale, float* out, int64_t m_size, int64_t k_size,
    int64_t n_size, int64_t first, int64_t last) {
  int64_t n = first;
  for (; n + 4 <= last; n += 4) {
    int64_t m = 0;
    for (; m + 4 <= m_size; m += 4) tile<4, Hint>(q, q_sum, x_scale, w, scale, out, k_size, n_size, m, n);
    switch (m_size - m) {
      case 3: tile<3, Hint>(q, q_sum, x_scale, w, scale, out, k_size, n_size, m, n); break;
      case 2: tile<2, Hint>(q, q_sum, x_scale, w, scale, out, k_size, n_size, m, n); break;
      case 1: tile<1, Hint>(q, q_sum, x_scale, w, scale, out, k_size, n_size, m, n); break;
    }
  }
  for (; n < last; ++n) {
    const int8_t* row = w + n * k_size;
    for (int64_t m = 0; m < m_size; ++m) {
      const int8_t* qm = q + m * k_size;
      int32_t s = 0;
      for (int64_t k = 0; k < k_size; ++k) s += row[k] * qm[k];
      out[m * n_size + n] = static_cast<float>(s) * scale[n] * x_scale[m];
    }
  }
}

// x [K] -> q [k_pad] int16, as quantize_row (quantize_row.h) quantizes it to int8 (plus `offset`: 128 gives oneDNN's
// unsigned levels); returns its scale
template <typename Q>
__attribute__((target("avx2,fma"))) float quantize_row_avx2(const float* x, Q* q, int64_t k_size, int64_t k_pad,
                                                            int offset) {
  __m256 most = _mm256_setzero_ps();
  const __m256 sign = _mm256_set1_ps(-0.f);
  int64_t k = 0;
  for (; k + 8 <= k_size; k += 8) most = _mm256_max_ps(most, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, most);
  float amax = *std::max_element(lanes, lanes + 8);
  for (; k < k_size; ++k) amax = std::max(amax, std::fabs(x[k]));
  amax = std::max(amax, 1e-12f);
  const float inverse = 1.f / amax * 127.f;  // quantize_row's, as torch computes it
  const __m256 inverse_v = _mm256_set1_ps(inverse);
  const __m256i shift = _mm256_set1_epi32(offset);
  for (k = 0; k + 8 <= k_size; k += 8) {
    const __m256i v = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), inverse_v)), shift);
    const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));  // int16
    if constexpr (sizeof(Q) == 2)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), halves);
    else  // uint8 levels 1-255
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packus_epi16(halves, halves));
  }
  for (; k < k_size; ++k) q[k] = static_cast<Q>(std::nearbyint(x[k] * inverse) + offset);
  std::fill(q + k_size, q + k_pad, Q{0});
  return amax / 127.f;
}

// tile's AVX2 twin over int16 rows q [M, k_pad]: 16 weight bytes a load widened to int16 (vpmovsxbw), multiplied
// with q's and summed in pairs into int32 (vpmaddwd); each weight row prefetched once a 64-byte line
template <int MR, int Hint>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const int16_t* q, int64_t k_pad, const float* x_scale,
    const int8_t* w, const float* scale, float* out, int64_t k_size, int64_t n_size, int64_t m0, int64_t n) {
  const int64_t whole = k_size / 16 * 16;
  const int8_t* r[4] = {w + n * k_size, w + (n + 1) * k_size, w + (n + 2) * k_size, w + (n + 3) * k_size};
  __m256i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < whole; k += 16) {
    __m256i wv[4];
    for (int j = 0; j < 4; ++j) {
      if ((k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(r[j] + 4 * k_size + k), static_cast<_mm_hint>(Hint));
      wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[j] + k)));
    }
    for (int i = 0; i < MR; ++i) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + (m0 + i) * k_pad + k));
      for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(wv[j], qv));
    }
  }
  for (int i = 0; i < MR; ++i) {
    // hadd twice leaves [s0 s1 s2 s3] in each 128-bit lane; then the lanes add
    const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(acc[i][0], acc[i][1]),
                                        _mm256_hadd_epi32(acc[i][2], acc[i][3]));
    __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    if (whole < k_size) {
      alignas(16) int32_t s[4];
      _mm_store_si128(reinterpret_cast<__m128i*>(s), sums);
      const int16_t* qi = q + (m0 + i) * k_pad;
      for (int j = 0; j < 4; ++j)
        for (int64_t k = whole; k < k_size; ++k) s[j] += r[j][k] * qi[k];
      sums = _mm_load_si128(reinterpret_cast<const __m128i*>(s));
    }
    const __m128 y = _mm_mul_ps(_mm_cvtepi32_ps(sums), _mm_loadu_ps(scale + n));  // tile's order, oneDNN's
    _mm_storeu_ps(out + (m0 + i) * n_size + n, _mm_mul_ps(y, _mm_set1_ps(x_scale[m0 + i])));
  }
}

// weight_rows' AVX2 twin: tiles of up to two rows of q (16 registers: 4 x 2 sums, 4 weights, q)
template <int Hint>
__attribute__((target("avx2,fma"))) void weight_rows_avx2(const int16_t* q, int64_t k_pad, const float* x_scale,
    const int8_t* w, const float* scale, float* out, int64_t m_size, int64_t k_size, int64_t n_size, int64_t first,
    int64_t last) {
  int64_t n = first;
  for (; n + 4 <= last; n += 4) {
    int64_t m = 0;
    for (; m + 2 <= m_size; m += 2) tile_avx2<2, Hint>(q, k_pad, x_scale, w, scale, out, k_size, n_size, m, n);
    if (m < m_size) tile_avx2<1, Hint>(q, k_pad, x_scale, w, scale, out, k_size, n_size, m, n);
  }
  for (; n < last; ++n) {
    const int8_t* row = w + n * k_size;
    for (int64_t m = 0; m < m_size; ++m) {
      const int16_t* qm = q + m * k_pad;
      int32_t s = 0;
      for (int64_t k = 0; k < k_size; ++k) s += row[k] * qm[k];
      out[m * n_size + n] = static_cast<float>(s) * scale[n] * x_scale[m];
    }
  }
}

at::Tensor int8_matmul_avx2(const at::Tensor& xc, const at::Tensor& wc, const at::Tensor& sc) {
  TORCH_CHECK(peft_t5_kernels::avx2_usable(), "int8_matmul: the CPU has neither AVX512-VNNI nor AVX2 with FMA");
  const int64_t m_size = xc.size(0), k_size = wc.size(1), n_size = wc.size(0), k_pad = (k_size + 15) / 16 * 16;
  std::vector<int16_t> q(m_size * k_pad);
  std::vector<float> x_scale(m_size);
  const float* xd = xc.data_ptr<float>();
  for (int64_t m = 0; m < m_size; ++m)
    x_scale[m] = quantize_row_avx2(xd + m * k_size, q.data() + m * k_pad, k_size, k_pad, 0);
  at::Tensor out = at::empty({m_size, n_size}, xc.options());
  float* out_data = out.data_ptr<float>();
  const int8_t* w = wc.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 1024 / std::max<int64_t>(m_size, 1) / 4 * 4);
  at::parallel_for(0, n_size, grain, [&](int64_t first, int64_t last) {
    if (peft_t5_kernels::prefetch_to_l2())
      weight_rows_avx2<_MM_HINT_T1>(q.data(), k_pad, x_scale.data(), w, s, out_data, m_size, k_size, n_size, first,
                                    last);
    else
      weight_rows_avx2<_MM_HINT_T0>(q.data(), k_pad, x_scale.data(), w, s, out_data, m_size, k_size, n_size, first,
                                    last);
  });
  return out;
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_matmul: x must be [M, K] float32");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(1) == x.size(1),
              "int8_matmul: weight must be [N, K] int8");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat && scale.size(0) == weight.size(0),
              "int8_matmul: scale must be [N] float32");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous(), sc = scale.contiguous();
  if (!peft_t5_kernels::vnni_used()) return int8_matmul_avx2(xc, wc, sc);
  const int64_t m_size = xc.size(0), k_size = wc.size(1), n_size = wc.size(0);
  std::vector<int8_t> q(m_size * k_size);
  std::vector<int32_t> q_sum(m_size);
  std::vector<float> x_scale(m_size);
  const float* xd = xc.data_ptr<float>();
  for (int64_t m = 0; m < m_size; ++m)
    x_scale[m] = quantize_row(xd + m * k_size, q.data() + m * k_size, k_size, k_size, k_size / 64 * 64, &q_sum[m]);
  at::Tensor out = at::empty({m_size, n_size}, x.options());
  float* out_data = out.data_ptr<float>();
  const int8_t* w = wc.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(16, 1024 / std::max<int64_t>(m_size, 1) / 4 * 4);  // ~1024 rows' work
  at::parallel_for(0, n_size, grain, [&](int64_t first, int64_t last) {
    if (peft_t5_kernels::prefetch_to_l2())
      weight_rows<_MM_HINT_T1>(q.data(), q_sum.data(), x_scale.data(), w, s, out_data, m_size, k_size, n_size, first,
                               last);
    else
      weight_rows<_MM_HINT_T0>(q.data(), q_sum.data(), x_scale.data(), w, s, out_data, m_size, k_size, n_size, first,
                               last);
  });
  return out;
}

// Any rows of a compiled graph's int8 product: the kernel where it is faster than oneDNN, else oneDNN's product over
// the weight held under `number` (the same results, bit for bit). Decided here, as the call runs: a graph of several
// rows takes any count of them, and deciding in the graph would make it guard on the count (and compile again for
// each other). The kernel's share (kernel_products.py): with AVX2, up to 8 rows of any weight (oneDNN's AVX2 int8
// costs ~50-120 us a call); with AVX512-VNNI, up to 8 rows of weights up to 2048 x 512 (2 rows of 512 x 512: 9 us
// against 26). Call by call, from cache, oneDNN's product of 8 rows is as fast at some of those (2048 x 512: 68 us
// against 80), but in the step, whose weights stream from memory, the kernel's 5-8 rows made the engine's 8 jokes
// rows 4-7% faster (two A/B runs on an AMD EPYC; until then it took up to 4).
constexpr int64_t kMostRows = 8, kMostWeight = 2048 * 512;  // kernels.MOST_ROWS, MOST_WEIGHT

bool kernel_is_faster(int64_t rows, int64_t weight_size) {
  return rows <= kMostRows && (!peft_t5_kernels::vnni_used() || weight_size <= kMostWeight);
}

at::Tensor int8_rows(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, int64_t number,
                     const at::Tensor& zero_point) {
  if (x.size(0) == 1 || kernel_is_faster(x.size(0), weight.numel())) return int8_matmul(x, weight, scale);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_rows: x must be [M, K] float32");
  const at::Tensor xc = x.contiguous();
  const int64_t m_size = xc.size(0), k_size = xc.size(1);
  at::Tensor q = at::empty({m_size, k_size}, xc.options().dtype(at::kByte));
  std::vector<float> x_scale(m_size);
  for (int64_t m = 0; m < m_size; ++m)
    x_scale[m] = quantize_row_avx2(xc.data_ptr<float>() + m * k_size, q.data_ptr<uint8_t>() + m * k_size, k_size,
                                   k_size, 128);
  static const auto product = c10::Dispatcher::singleton()
      .findSchemaOrThrow("peft_t5::onednn_int8_matmul", "")
      .typed<at::Tensor(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&)>();
  at::Tensor out = product.call(q, number, scale, zero_point);
  float* o = out.data_ptr<float>();
  const int64_t n_size = out.size(1);
  for (int64_t m = 0; m < m_size; ++m)  // times each row's scale, after oneDNN's, as quantize.int8_linear does
    for (int64_t n = 0; n < n_size; ++n) o[m * n_size + n] *= x_scale[m];
  return out;
}

}  // namespace

TORCH_LIBRARY(peft_t5, m) {
  m.def("int8_matmul(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("int8_rows(Tensor x, Tensor weight, Tensor scale, int number, Tensor zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) {
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_rows", &int8_rows);
}
