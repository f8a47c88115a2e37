// One query a row over a decoder's cached keys and values: the serving step's self- and cross-attention, in its
// compiled graphs (see peft_t5/kernels.py). Each (row, head) reads its block of keys and values once, and only the
// positions the row attends to, so the step's attention runs at the speed memory delivers the caches: written by
// hand because inductor's fused loops (and SDPA's) reached 5-8 GB/s on a 2-core AMD EPYC, 32 rows x 8 heads of ~40
// cached positions being ~100 blocks of 10 KB, each a fresh stream for the hardware's prefetcher. Here each block's
// values are prefetched while its keys are read, and the next block's keys while its values are summed (short
// blocks: the next one whole, kShortBlock; prefetch.h picks the cache level), and 16 positions' dot products are
// reduced together (8 with AVX2, where AVX-512 is not used: isa.h). The caches may be bfloat16 (an int8 base's,
// t5_runner.cache_dtype): half the bytes to stream, each widened to float32 as it is loaded (a shift: no
// AVX512-BF16 needed) and every sum kept in float32.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "isa.h"
#include "prefetch.h"

namespace {

#define AVX512 __attribute__((target("avx512f")))
#define AVX2 __attribute__((target("avx2,fma")))

using bf16 = c10::BFloat16;

// 16 (AVX-512) or 8 (AVX2) keys' or values' elements as float32: a bfloat16 is a float32's upper half
AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 inline __m512 load16(const bf16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// e^x for x <= 0 (scores less their row's maximum) as Cephes' expf: 2^n e^r, r = x - n ln 2 in [-ln2/2, ln2/2];
// 0 below -87 (the masks' -3.4e38 included)
AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

// lane j of the result = the sum of a[j]'s 16 lanes
AVX512 inline __m512 sum16(const __m512* a) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: a[2i] and a[2i+1], halved
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: a[4i..4i+3], each summed within the lane
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 f0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 f1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                  _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(f0, f1, _MM_SHUFFLE(3, 1, 3, 1)));
}

template <int Hint, typename T>
inline void prefetch_position(const T* p, int64_t head_dim) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t b = 0; b < head_dim * static_cast<int64_t>(sizeof(T)); b += 64)
    _mm_prefetch(bytes + b, static_cast<_mm_hint>(Hint));
}

// out[0:16D] = softmax(k . q + bias) . v over `positions` keys and values (each 16D floats, `step` apart)
template <int D, int Hint, typename T>
AVX512 void one_block(const float* q, const T* k, const T* v, const float* bias, int64_t bias_step,
                      int64_t positions, int64_t k_step, int64_t v_step, const T* next_k, bool fetch_values,
                      float* scores, float* out) {
  constexpr int64_t head_dim = 16 * D;
  __m512 qv[D];
  for (int d = 0; d < D; ++d) qv[d] = _mm512_loadu_ps(q + 16 * d);
  const __m512i bias_at = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                              _mm512_set1_epi32(static_cast<int>(bias_step)));
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < positions; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, positions - j0);
    __m512 a[16];
    for (int j = 0; j < 16; ++j) {
      a[j] = _mm512_setzero_ps();
      if (j < n) {
        const T* kj = k + (j0 + j) * k_step;
        if (fetch_values) prefetch_position<Hint>(v + (j0 + j) * v_step, head_dim);  // for the sums below
        for (int d = 0; d < D; ++d) a[j] = _mm512_fmadd_ps(qv[d], load16(kj + 16 * d), a[j]);
      }
    }
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1);
    const __m512 b = bias_step == 1 ? _mm512_maskz_loadu_ps(m, bias + j0)
                                    : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, bias_at, bias + j0 * bias_step, 4);
    const __m512 s = _mm512_add_ps(sum16(a), b);
    _mm512_mask_storeu_ps(scores + j0, m, s);
    top = _mm512_mask_max_ps(top, m, top, s);
  }
  const __m512 most = _mm512_set1_ps(_mm512_reduce_max_ps(top));
  __m512 total = _mm512_setzero_ps();
  for (int64_t j0 = 0; j0 < positions; j0 += 16) {
    const __mmask16 m = static_cast<__mmask16>((1u << std::min<int64_t>(16, positions - j0)) - 1);
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + j0), most));
    _mm512_mask_storeu_ps(scores + j0, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  __m512 even[D], odd[D];  // two chains of sums, positions in turn
  for (int d = 0; d < D; ++d) even[d] = odd[d] = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 1 < positions; j += 2) {
    if (next_k != nullptr) {
      prefetch_position<Hint>(next_k + j * k_step, head_dim);
      prefetch_position<Hint>(next_k + (j + 1) * k_step, head_dim);
    }
    const __m512 p0 = _mm512_set1_ps(scores[j]), p1 = _mm512_set1_ps(scores[j + 1]);
    const T *v0 = v + j * v_step, *v1 = v0 + v_step;
    for (int d = 0; d < D; ++d) {
      even[d] = _mm512_fmadd_ps(p0, load16(v0 + 16 * d), even[d]);
      odd[d] = _mm512_fmadd_ps(p1, load16(v1 + 16 * d), odd[d]);
    }
  }
  if (j < positions) {
    const __m512 p0 = _mm512_set1_ps(scores[j]);
    for (int d = 0; d < D; ++d) even[d] = _mm512_fmadd_ps(p0, load16(v + j * v_step + 16 * d), even[d]);
  }
  const __m512 scale = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
  for (int d = 0; d < D; ++d) _mm512_storeu_ps(out + 16 * d, _mm512_mul_ps(_mm512_add_ps(even[d], odd[d]), scale));
}

// exp_nonpositive with AVX2: 2^n built in the exponent's bits (n >= -126 above -87: a normal float)
AVX2 inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(two_n)));
}

// lane j of the result = the sum of a[j]'s 8 lanes
AVX2 inline __m256 sum8(const __m256* a) {
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // per 128-bit lane
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  const __m256 lo = _mm256_permute2f128_ps(h0, h1, 0x20), hi = _mm256_permute2f128_ps(h0, h1, 0x31);
  return _mm256_add_ps(lo, hi);
}

AVX2 inline __m256i first_lanes(int64_t n) {  // the mask of lanes [0, n), n <= 8
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// one_block with AVX2 over head_dim = 8 * D floats: 8 positions' dot products reduced together, q read from L1
// (D registers of it would leave too few for the sums), the values summed in chunks of 64 floats
template <int D, int Hint, typename T>
AVX2 void one_block8(const float* q, const T* k, const T* v, const float* bias, int64_t bias_step,
                     int64_t positions, int64_t k_step, int64_t v_step, const T* next_k, bool fetch_values,
                     float* scores, float* out) {
  constexpr int64_t head_dim = 8 * D;
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t j0 = 0; j0 < positions; j0 += 8) {
    const int64_t n = std::min<int64_t>(8, positions - j0);
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    if (fetch_values)
      for (int j = 0; j < n; ++j) prefetch_position<Hint>(v + (j0 + j) * v_step, head_dim);  // read next, below
    for (int d = 0; d < D; ++d) {
      const __m256 qd = _mm256_loadu_ps(q + 8 * d);
      for (int j = 0; j < n; ++j) a[j] = _mm256_fmadd_ps(qd, load8(k + (j0 + j) * k_step + 8 * d), a[j]);
    }
    alignas(32) float b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int j = 0; j < n; ++j) b[j] = bias[(j0 + j) * bias_step];
    const __m256i m = first_lanes(n);
    const __m256 s = _mm256_add_ps(sum8(a), _mm256_load_ps(b));
    _mm256_maskstore_ps(scores + j0, m, s);
    top = _mm256_blendv_ps(top, _mm256_max_ps(top, s), _mm256_castsi256_ps(m));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, top);
  const __m256 most = _mm256_set1_ps(*std::max_element(lanes, lanes + 8));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j0 = 0; j0 < positions; j0 += 8) {
    const __m256i m = first_lanes(std::min<int64_t>(8, positions - j0));
    const __m256 e = _mm256_and_ps(exp_nonpositive8(_mm256_sub_ps(_mm256_maskload_ps(scores + j0, m), most)),
                                   _mm256_castsi256_ps(m));
    _mm256_maskstore_ps(scores + j0, m, e);
    total = _mm256_add_ps(total, e);
  }
  _mm256_store_ps(lanes, total);
  float sum = 0;
  for (float lane : lanes) sum += lane;
  const __m256 scale = _mm256_set1_ps(1.0f / sum);
  for (int c = 0; c < D; c += 8) {  // 64 floats of the output at a time: 8 sums, a chain each
    __m256 acc[8];
    for (int d = 0; d < 8; ++d) acc[d] = _mm256_setzero_ps();
    for (int64_t j = 0; j < positions; ++j) {
      if (next_k != nullptr && c == 0) prefetch_position<Hint>(next_k + j * k_step, head_dim);
      const __m256 p = _mm256_set1_ps(scores[j]);
      const T* vj = v + j * v_step + 8 * c;
      for (int d = 0; d < 8; ++d) acc[d] = _mm256_fmadd_ps(p, load8(vj + 8 * d), acc[d]);
    }
    for (int d = 0; d < 8; ++d) _mm256_storeu_ps(out + 8 * (c + d), _mm256_mul_ps(acc[d], scale));
  }
}

// n floats (a multiple of 16) to bfloat16, rounded to nearest even, NaN 0x7FC0, as c10::BFloat16 converts one at a
// time (its scalar loop: 11-13 us of a 73 us self-attention call at 32 rows, 4 here)
AVX512 inline void write_row512(const float* from, bf16* to, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 v = _mm512_loadu_ps(from + i);
    const __m512i x = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(x, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(x, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to + i), _mm512_cvtepi32_epi16(r));
  }
}
AVX2 inline void write_row256(const float* from, bf16* to, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(from + i);
    const __m256i x = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);  // 8 words in the low half
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i), _mm256_castsi256_si128(packed));
  }
}
// n floats written as the caches hold them
template <bool Avx512, typename T>
inline void write_row(const float* from, T* to, int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy_n(from, n, to);
  else if constexpr (Avx512) write_row512(from, to, n);
  else write_row256(from, to, n);
}

// Blocks of up to this many positions (jokes' self- and cross-attention) are prefetched whole, keys and values, while
// the block before them is summed: interleaved with the sums, as longer blocks are (SQuAD's sources), the fetching of
// 2-4 KB blocks began too late. The step of 32 int8 jokes rows 2.5-3.4% faster (11.96 -> 11.62 ms, 12.11 -> 11.82),
// SQuAD's 1.6%, float32's 0.3%; longer blocks fetched whole were 0.84-0.88x, their memory requests all at once.
constexpr int64_t kShortBlock = 64;

// New keys and values to write first (self-attention), each row's at its position: [rows, heads * head_dim]
struct Written {
  const float *k = nullptr, *v = nullptr;
  int64_t k_row = 0, v_row = 0;
  const int64_t* at = nullptr;
};

template <bool Avx512, int D, int Hint, typename T>
void blocks(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& bias,
            const int64_t* valid, const Written& written, at::Tensor& scores, at::Tensor& out) {
  const int64_t rows = keys.size(0), heads = keys.size(1), all = keys.size(2);
  T *kd = keys.data_ptr<T>(), *vd = values.data_ptr<T>();
  const float* qd = q.data_ptr<float>();
  const float* bd = bias.data_ptr<float>();
  float *sd = scores.data_ptr<float>(), *od = out.data_ptr<float>();
  const int64_t bias_row = bias.size(0) == 1 ? 0 : bias.stride(0), bias_head = bias.size(1) == 1 ? 0 : bias.stride(1);
  at::parallel_for(0, rows * heads, 16, [&](int64_t first, int64_t last) {
    const int64_t head_dim = (Avx512 ? 16 : 8) * D;
    auto length = [&](int64_t c) { return std::clamp<int64_t>(valid[c / heads], 1, all); };
    auto fetch_whole = [&](int64_t c) {  // a short block's keys and values, all at once, a block ahead
      const T* kc = kd + c / heads * keys.stride(0) + c % heads * keys.stride(1);
      const T* vc = vd + c / heads * values.stride(0) + c % heads * values.stride(1);
      for (int64_t j = 0, n = length(c); j < n; ++j) {
        prefetch_position<Hint>(kc + j * keys.stride(2), head_dim);
        prefetch_position<Hint>(vc + j * values.stride(2), head_dim);
      }
    };
    if (length(first) <= kShortBlock) fetch_whole(first);
    for (int64_t b = first; b < last; ++b) {
      const int64_t r = b / heads, h = b % heads;
      const T* next_k = nullptr;
      if (b + 1 < last) {
        if (length(b + 1) <= kShortBlock) fetch_whole(b + 1);
        else next_k = kd + (b + 1) / heads * keys.stride(0) + (b + 1) % heads * keys.stride(1);
      }
      const bool fetch_values = length(b) > kShortBlock;
      T *kb = kd + r * keys.stride(0) + h * keys.stride(1), *vb = vd + r * values.stride(0) + h * values.stride(1);
      if (written.k != nullptr) {  // here rather than all first: each write's line is fetched with its block's reads
        const float *k_from = written.k + r * written.k_row + h * head_dim;
        const float *v_from = written.v + r * written.v_row + h * head_dim;
        write_row<Avx512>(k_from, kb + written.at[r] * keys.stride(2), head_dim);
        write_row<Avx512>(v_from, vb + written.at[r] * values.stride(2), head_dim);
      }
      const int64_t positions = std::clamp<int64_t>(valid[r], 1, all);
      const float *qb = qd + r * q.stride(0) + h * head_dim, *bb = bd + r * bias_row + h * bias_head;
      float* ob = od + r * heads * head_dim + h * head_dim;
      if constexpr (Avx512)
        one_block<D, Hint, T>(qb, kb, vb, bb, bias.stride(3), positions, keys.stride(2), values.stride(2), next_k,
                           fetch_values, sd + b * all, ob);
      else
        one_block8<D, Hint, T>(qb, kb, vb, bb, bias.stride(3), positions, keys.stride(2), values.stride(2), next_k,
                            fetch_values, sd + b * all, ob);
    }
  });
}

// What the kernel cannot take, refused before anything is computed or written (op: the name the message gives)
void check_attention(const char* op, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                     const at::Tensor& bias) {
  TORCH_CHECK(keys.dim() == 4 && values.sizes() == keys.sizes() && values.scalar_type() == keys.scalar_type() &&
                  (keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kBFloat16) &&
                  keys.stride(3) == 1 && values.stride(3) == 1,
              op, ": keys and values must be float32 or bfloat16 [rows, heads, positions, head_dim], head_dim "
              "contiguous");
  const int64_t rows = keys.size(0), heads = keys.size(1), positions = keys.size(2), head_dim = keys.size(3);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, op, ": head_dim must be 64 or 128");
  TORCH_CHECK(positions >= 1, op, ": no positions");
  TORCH_CHECK(q.dim() == 2 && q.size(0) == rows && q.size(1) == heads * head_dim && q.scalar_type() == at::kFloat &&
                  q.stride(1) == 1,
              op, ": q must be float32 [rows, heads * head_dim]");
  TORCH_CHECK(bias.dim() == 4 && (bias.size(0) == rows || bias.size(0) == 1) &&
                  (bias.size(1) == heads || bias.size(1) == 1) && bias.size(2) == 1 && bias.size(3) == positions &&
                  bias.scalar_type() == at::kFloat,
              op, ": bias must be float32 [rows or 1, heads or 1, 1, positions]");
}

// blocks() for this ISA, head_dim (64: D 4 or 8; 128: 8 or 16) and prefetch hint
template <typename T>
void dispatch(bool l2, bool wide, const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
              const at::Tensor& bias, const int64_t* valid, const Written& written, at::Tensor& scores,
              at::Tensor& out) {
  if (peft_t5_kernels::avx512_used()) {
    if (wide) l2 ? blocks<true, 8, _MM_HINT_T1, T>(q, keys, values, bias, valid, written, scores, out)
                 : blocks<true, 8, _MM_HINT_T0, T>(q, keys, values, bias, valid, written, scores, out);
    else l2 ? blocks<true, 4, _MM_HINT_T1, T>(q, keys, values, bias, valid, written, scores, out)
            : blocks<true, 4, _MM_HINT_T0, T>(q, keys, values, bias, valid, written, scores, out);
  } else {
    TORCH_CHECK(peft_t5_kernels::avx2_usable(), "decode_attention: the CPU has neither AVX-512 nor AVX2 with FMA");
    if (wide) l2 ? blocks<false, 16, _MM_HINT_T1, T>(q, keys, values, bias, valid, written, scores, out)
                 : blocks<false, 16, _MM_HINT_T0, T>(q, keys, values, bias, valid, written, scores, out);
    else l2 ? blocks<false, 8, _MM_HINT_T1, T>(q, keys, values, bias, valid, written, scores, out)
            : blocks<false, 8, _MM_HINT_T0, T>(q, keys, values, bias, valid, written, scores, out);
  }
}

// The attention of checked tensors: row r reads its first valid[r] positions
at::Tensor attend_blocks(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values, const at::Tensor& bias,
                         const int64_t* valid, const Written& written = Written()) {
  const int64_t rows = keys.size(0), heads = keys.size(1), positions = keys.size(2), head_dim = keys.size(3);
  at::Tensor out = at::empty({rows, heads * head_dim}, q.options());
  at::Tensor scores = at::empty({rows * heads, positions}, q.options());
  const bool l2 = peft_t5_kernels::prefetch_to_l2(), wide = head_dim == 128;
  if (keys.scalar_type() == at::kBFloat16)
    dispatch<bf16>(l2, wide, q, keys, values, bias, valid, written, scores, out);
  else
    dispatch<float>(l2, wide, q, keys, values, bias, valid, written, scores, out);
  return out;
}

// valid: int64 [rows], the positions each row attends to (those past it, which the bias must mask, are not read:
// the cross-attention of rows whose sources are shorter than the longest)
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& bias, const at::Tensor& valid) {
  check_attention("decode_attention", q, keys, values, bias);
  TORCH_CHECK(valid.dim() == 1 && valid.size(0) == keys.size(0) && valid.scalar_type() == at::kLong,
              "decode_attention: valid must be int64 [rows]");
  const at::Tensor counts = valid.contiguous();
  return attend_blocks(q, keys, values, bias, counts.data_ptr<int64_t>());
}

// Self-attention: each row's new key and value [rows, heads * head_dim] written into the caches at its length
// first, and its positions up to it attended to. In the op, so that a compiled graph writes into the caches it is
// given, where the index_put before an opaque op made inductor copy each layer's caches whole every step.
at::Tensor decode_self_attention(const at::Tensor& q, const at::Tensor& new_k, const at::Tensor& new_v,
                                 const at::Tensor& lengths, at::Tensor& keys, at::Tensor& values,
                                 const at::Tensor& bias) {
  check_attention("decode_self_attention", q, keys, values, bias);  // before anything is written
  const int64_t rows = keys.size(0), heads = keys.size(1), positions = keys.size(2), head_dim = keys.size(3);
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == rows && lengths.scalar_type() == at::kLong,
              "decode_self_attention: lengths must be int64 [rows]");
  for (const at::Tensor* t : {&new_k, &new_v})
    TORCH_CHECK(t->dim() == 2 && t->size(0) == rows && t->size(1) == heads * head_dim &&
                    t->scalar_type() == at::kFloat && t->stride(1) == 1,
                "decode_self_attention: new keys and values must be float32 [rows, heads * head_dim]");
  const at::Tensor positions_at = lengths.contiguous();
  const int64_t* at = positions_at.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)  // every length checked before anything is written
    TORCH_CHECK(at[r] >= 0 && at[r] < positions, "decode_self_attention: a length is past the caches");
  std::vector<int64_t> valid(at, at + rows);
  for (int64_t& v : valid) ++v;
  Written written;
  written.k = new_k.data_ptr<float>(), written.v = new_v.data_ptr<float>();
  written.k_row = new_k.stride(0), written.v_row = new_v.stride(0), written.at = at;
  return attend_blocks(q, keys, values, bias, valid.data(), written);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor bias, Tensor valid) -> Tensor");
  m.def("decode_self_attention(Tensor q, Tensor new_k, Tensor new_v, Tensor lengths, Tensor(a!) keys, "
        "Tensor(b!) values, Tensor bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("decode_self_attention", &decode_self_attention);
}
