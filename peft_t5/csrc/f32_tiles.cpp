// Rows of activations times a float32 weight packed once in blocks of 16 outputs (kernels.pack_f32): the compiled
// float32 step's products (one row's too), on an AVX-512 CPU where T5Weights gives its step layers this copy
// (kernels.f32_tiles_problem). Written by hand because the step streams its weights from memory (t5-small's decoder
// and output layer, 166 MB, past a 32 MiB L3), and oneDNN's product over its held copy read them at ~12 GB/s at 8
// rows and ran at ~83 GFLOPS at 32, where these tiles, fetching the next blocks at an even pace, reach ~14 GB/s and
// ~95 GFLOPS (one core of an AMD EPYC, benchmarks/step_products.py: the step's products 1.11-1.19x, 1.23-1.27x and
// 1.14-1.15x as fast at 4, 8 and 32 rows, 0.96-1.04x at 2, 1.03-1.05x at 64; and 1.11-1.23x f32_matvec's at one row;
// the engine's step 1.28-1.37x at 8 jokes rows, 1.09x at 32).
//
// The layout: [N / 16, K, 16], row k of block nb holding input k of outputs 16 * nb .. 16 * nb + 15 (N padded to 16
// with zeros): one 64-byte line per input, which a tile of MR rows x NB blocks multiplies by each row's input k
// (broadcast) into MR x NB accumulators of 16 outputs: no horizontal sums. Each output's sum runs over k in order,
// in chunks of kChunk inputs added up in the output (one chain over all 512 inputs of t5-small's layers was 2.6x
// further from float64's sum than MKL's product; chunks of 128 are as close, at no cost step_products.py can see).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>

#include "isa.h"

namespace {

#define AVX512 __attribute__((target("avx512f")))

constexpr int64_t kChunk = 128;

// out[m0.., 16 * nb0..] for MR rows and NB blocks. Of the next NB blocks' lines, this tile fetches inputs phase,
// phase + period, ...: the `period` tiles over the same blocks share the fetching, so the next blocks arrive at an even
// pace while these are used (fetched by one tile alone, the same tiles were no faster than oneDNN in the step)
template <int MR, int NB>
AVX512 inline void tile(const float* x, int64_t k_size, const float* packed, float* out, int64_t n_size, int64_t m0,
                        int64_t nb0, int64_t phase, int64_t period) {
  const int64_t block = k_size * 16;
  const float* b = packed + nb0 * block;
  const float* a = x + m0 * k_size;
  int64_t fetch_in = phase;  // inputs until this tile's next fetch (a counter: no division an input)
  for (int64_t k0 = 0; k0 < k_size; k0 += kChunk) {
    __m512 acc[MR][NB];
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
    for (int64_t k = k0; k < std::min(k_size, k0 + kChunk); ++k) {
      if (fetch_in-- == 0) {
        fetch_in = period - 1;
        _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(b + (NB + j) * block + 16 * k), _MM_HINT_T0);
      }
      __m512 w[NB];
      _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) w[j] = _mm512_loadu_ps(b + j * block + 16 * k);
      _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_set1_ps(a[i * k_size + k]);
        _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_fmadd_ps(xv, w[j], acc[i][j]);
      }
    }
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
      _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) {
        const int64_t n = 16 * (nb0 + j), cols = std::clamp<int64_t>(n_size - n, 0, 16);
        const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
        float* o = out + (m0 + i) * n_size + n;
        _mm512_mask_storeu_ps(o, mask, k0 == 0 ? acc[i][j] : _mm512_add_ps(_mm512_maskz_loadu_ps(mask, o), acc[i][j]));
      }
  }
}

// 8 x 3: 24 accumulators, 3 weights and 1 input of 32 registers (int8_packed.cpp's tile, measured fastest there)
constexpr int kTileRows = 8, kTileBlocks = 3, kChunkRows = 64;

// rows [m_first, m_last) through NB blocks from nb0: tiles of kTileRows rows, then one of the rest
template <int NB>
AVX512 void tiles_of(const float* x, int64_t k_size, const float* packed, float* out, int64_t n_size,
                     int64_t m_first, int64_t m_last, int64_t nb0) {
  const int64_t tiles = (m_last - m_first + kTileRows - 1) / kTileRows;
  int64_t m = m_first;
  for (; m + kTileRows <= m_last; m += kTileRows)
    tile<kTileRows, NB>(x, k_size, packed, out, n_size, m, nb0, (m - m_first) / kTileRows, tiles);
  switch (m_last - m) {
#define PEFT_T5_TILE(R)                                                                  \
  case R:                                                                                \
    tile<R, NB>(x, k_size, packed, out, n_size, m, nb0, tiles - 1, tiles); \
    break;
    PEFT_T5_TILE(1) PEFT_T5_TILE(2) PEFT_T5_TILE(3) PEFT_T5_TILE(4) PEFT_T5_TILE(5) PEFT_T5_TILE(6) PEFT_T5_TILE(7)
#undef PEFT_T5_TILE
  }
}

// x [M, K] float32 times the packed weight of out_features outputs -> [M, out_features]; chunks of 64 rows, which
// the cache holds while every block of the weight passes them
at::Tensor f32_tiles(const at::Tensor& x, const at::Tensor& packed, int64_t out_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "f32_tiles: x must be [M, K] float32");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.size(2) == 16 &&
                  packed.size(1) == x.size(1) && packed.is_contiguous(),
              "f32_tiles: packed must be kernels.pack_f32's [N / 16, K, 16] of a weight with x's K inputs");
  TORCH_CHECK(out_features > 0 && (out_features + 15) / 16 == packed.size(0),
              "f32_tiles: out_features does not fit the packed weight's ", packed.size(0), " blocks of 16");
  TORCH_CHECK(peft_t5_kernels::avx512_used(), "f32_tiles: AVX-512 is not used here (kernels.f32_tiles_problem)");
  const at::Tensor xc = x.contiguous();
  const int64_t m_size = x.size(0), k_size = x.size(1), blocks = packed.size(0);
  at::Tensor out = at::empty({m_size, out_features}, x.options());
  if (k_size == 0) return out.zero_();
  const float *xd = xc.data_ptr<float>(), *w = packed.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  at::parallel_for(0, groups, 4, [&](int64_t first, int64_t last) {  // ~200 outputs a thread at least
    const int64_t nb_last = std::min(kTileBlocks * last, blocks);
    for (int64_t m0 = 0; m0 < m_size; m0 += kChunkRows) {
      const int64_t m1 = std::min(m_size, m0 + kChunkRows);
      int64_t nb = kTileBlocks * first;
      for (; nb + kTileBlocks <= nb_last; nb += kTileBlocks)
        tiles_of<kTileBlocks>(xd, k_size, w, o, out_features, m0, m1, nb);
      for (; nb < nb_last; ++nb) tiles_of<1>(xd, k_size, w, o, out_features, m0, m1, nb);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) { m.def("f32_tiles(Tensor x, Tensor packed, int out_features) -> Tensor"); }

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) { m.impl("f32_tiles", &f32_tiles); }
