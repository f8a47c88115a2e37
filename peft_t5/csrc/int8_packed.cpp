// Rows of activations times an int8 weight packed once in blocks (kernels.pack_int8), for every product of the
// serving engine's int8 layers on a CPU with AVX512-VNNI (see peft_t5/kernels.py): each row quantized to int8 with a
// scale of its own as int8_matmul.cpp does, the products summed exactly in int32, the result scaled in oneDNN's
// order, so its results are oneDNN's bit for bit. Written by hand because oneDNN's int8 product spends ~25-40 us a
// call on set-up whatever the size (most of its time at the decoder step's shapes) and, at 8-32 rows, reached
// ~200-360 GOPS where these tiles reach ~400-440 (one core of an AMD EPYC, t5-small's layers).
//
// The layout: blocks of 16 outputs x 64 inputs, [N / 16, K / 64, 16, 64], where byte c of row r holds output
// 16 * nb + c / 4, input 64 * kb + 4 * r + c % 4 (N padded to 32 and K to 64 with zeros): AMX's B tiles, and row by
// row the operands of AVX512-VNNI's vpdpbusd (16 outputs' sums of 4 products each). Several rows: AMX's tiles where
// the CPU has them (tile_rows), else AVX512-VNNI's (vnni_tile); one row: AVX512-VNNI (vnni_row).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <torch/library.h>
#include <torch/types.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "quantize_row.h"

namespace {

constexpr int64_t ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

using peft_t5_kernels::quantize_row;

// one row of a block's 32 (or `width`) outputs: (sum * scale) * x_scale, the order oneDNN's has
__attribute__((target("avx512f"))) void write_row(float* out, const int32_t* left, const int32_t* right,
                                                  const float* scale, float x_scale, int64_t width) {
  const __m512 xs = _mm512_set1_ps(x_scale);
  for (int half = 0; half < 2; ++half) {
    const int64_t cols = std::min<int64_t>(16, width - 16 * half);
    if (cols <= 0) break;
    const __mmask16 mask = cols == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
    const __m512 sums = _mm512_cvtepi32_ps(_mm512_loadu_si512(half ? right : left));
    _mm512_mask_storeu_ps(out + 16 * half, mask,
                          _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_maskz_loadu_ps(mask, scale + 16 * half)), xs));
  }
}

// out[m, n] for the m_rows (<= 32) rows of q from m0 and outputs [n_first, n_last) (multiples of 32): per 32
// outputs, two B tiles per 64 inputs, each used by the A tiles of up to two blocks of 16 rows (four accumulators)
__attribute__((target("avx512f,amx-tile,amx-int8"))) void tile_rows(const int8_t* q, const float* x_scale,
    const int8_t* packed, const float* scale, float* out, int64_t m0, int64_t m_rows, int64_t k_blocks,
    int64_t n_size, int64_t n_first, int64_t n_last) {
  const int64_t rows0 = std::min<int64_t>(m_rows, 16), rows1 = m_rows - rows0;
  TileConfig config;
  for (int t : {0, 1}) config.rows[t] = rows0, config.colsb[t] = 64;  // C of rows m0..: outputs +0, +16
  for (int t : {2, 3, 5}) config.rows[t] = rows1, config.colsb[t] = rows1 ? 64 : 0;  // C, A of rows m0+16..
  config.rows[4] = rows0, config.colsb[4] = 64;                                     // A, rows m0..
  for (int t : {6, 7}) config.rows[t] = 16, config.colsb[t] = 64;                  // B, outputs +0 and +16
  _tile_loadconfig(&config);
  const int64_t q_stride = k_blocks * 64;
  const int8_t* a0 = q + m0 * q_stride;
  const int8_t* a1 = a0 + 16 * q_stride;
  alignas(64) int32_t c[32][16];
  for (int64_t n = n_first; n < n_last; n += 32) {
    const int8_t* b0 = packed + (n / 16) * k_blocks * 1024;
    const int8_t* b1 = b0 + k_blocks * 1024;
    _tile_zero(0);
    _tile_zero(1);
    if (rows1) {
      _tile_zero(2);
      _tile_zero(3);
    }
    for (int64_t kb = 0; kb < k_blocks; ++kb) {
      _tile_loadd(6, b0 + kb * 1024, 64);
      _tile_loadd(7, b1 + kb * 1024, 64);
      _tile_loadd(4, a0 + kb * 64, q_stride);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if (rows1) {
        _tile_loadd(5, a1 + kb * 64, q_stride);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
    }
    _tile_stored(0, &c[0][0], 64);
    _tile_stored(1, &c[0][0] + 16 * 16, 64);  // rows 0..15 of outputs +16 go to c[16..31] for now
    const int64_t width = std::min<int64_t>(32, n_size - n);
    for (int64_t i = 0; i < rows0; ++i)
      write_row(out + (m0 + i) * n_size + n, c[i], c[16 + i], scale + n, x_scale[m0 + i], width);
    if (rows1) {
      _tile_stored(2, &c[0][0], 64);
      _tile_stored(3, &c[0][0] + 16 * 16, 64);
      for (int64_t i = 0; i < rows1; ++i)
        write_row(out + (m0 + 16 + i) * n_size + n, c[i], c[16 + i], scale + n, x_scale[m0 + 16 + i], width);
    }
  }
  _tile_release();
}

// one row: the packed tiles read as AVX512-VNNI operands, so one row needs no row-major copy of the weight. Row r of a
// block holds inputs 4r..4r+3 of its 16 outputs: VNNI multiplies those 64 bytes (sign bit flipped: w + 128 as unsigned
// bytes, 128 * q_sum taken back as int8_matmul.cpp does) by the row's 4 inputs broadcast, the 16 outputs' sums in the
// 16 lanes. Blocks [first, last) of 16 outputs, four at a time, each stream fetched 1 KB ahead (from memory: as fast
// as int8_matmul.cpp's row-major loop, flan-t5-large's 169 one-row products ~24.5 ms in both).
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_row(const int8_t* q, int32_t q_sum, float x_scale,
    const int8_t* packed, const float* scale, float* out, int64_t k_blocks, int64_t n_size, int64_t first,
    int64_t last) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i taken = _mm512_set1_epi32(128 * q_sum);
  const __m512 xs = _mm512_set1_ps(x_scale);
  const int64_t block = k_blocks * 1024;  // bytes of 16 outputs
  int32_t inputs[4];
  for (int64_t nb = first; nb < last; nb += 4) {
    const int blocks = static_cast<int>(std::min<int64_t>(4, last - nb));
    const int8_t* b = packed + nb * block;
    __m512i acc[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t row = 0; row < k_blocks * 16; ++row) {  // row kb * 16 + r: inputs 64 kb + 4 r ..
      std::memcpy(inputs, q + 4 * row, 4);
      const __m512i xv = _mm512_set1_epi32(inputs[0]);
      for (int j = 0; j < blocks; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(b + j * block + 64 * row + 1024), _MM_HINT_T0);
        acc[j] = _mm512_dpbusd_epi32(acc[j], _mm512_xor_si512(_mm512_loadu_si512(b + j * block + 64 * row), flip), xv);
      }
    }
    for (int j = 0; j < blocks; ++j) {
      const int64_t n = 16 * (nb + j), cols = std::min<int64_t>(16, n_size - n);
      if (cols <= 0) break;
      const __mmask16 mask = cols == 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], taken));  // (sum * scale) * x_scale, the
      _mm512_mask_storeu_ps(out + n, mask,  // order oneDNN's has
                            _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_maskz_loadu_ps(mask, scale + n)), xs));
    }
  }
}

// acc + the sums of u8 x s8 products, updated in place: written with the intrinsic, GCC copied each of a large tile's
// accumulators to another register (and to the stack) around every vpdpbusd: half the speed at 8 x 3
__attribute__((target("avx512f,avx512vnni"))) inline __m512i dpbusd(__m512i acc, __m512i u8, __m512i s8) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "v"(s8));
  return acc;
}

// Several rows without AMX: AVX512-VNNI over the packed weight as vnni_row reads it, in tiles of MR rows x NB blocks
// of 16 outputs (MR x NB accumulators of 16 outputs' sums each: no horizontal sums). Each 64-byte row of a block
// (sign bit flipped, as vnni_row's) serves the tile's MR rows, each row's 4 inputs (broadcast) its NB blocks. The
// next NB blocks are fetched too: of their 64-byte rows, this tile fetches rows phase, phase + period, ... (the output
// layer at 8 rows, one tile fetching them all: 1.10 -> 0.75 ms). So the tiles over the same blocks (period of them)
// share the fetching, and the next blocks arrive at an even pace while these are used: fetched by the first tile
// alone, the requests came in a burst a quarter of the time at 32 rows (the 32-row int8 step 1.04-1.21x as fast in
// alternating launches of benchmarks/step_profile.py on an AMD EPYC).
template <int MR, int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) inline void vnni_tile(const int8_t* q, int64_t q_stride,
    const int32_t* q_sum, const float* x_scale, const int8_t* packed, const float* scale, float* out, int64_t k_blocks,
    int64_t n_size, int64_t m0, int64_t nb0, int64_t phase, int64_t period) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t block = k_blocks * 1024;
  const int8_t* b = packed + nb0 * block;
  const int8_t* a = q + m0 * q_stride;
  __m512i acc[MR][NB];
  _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i)
    _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
  int64_t fetch_in = phase;  // rows until this tile's next fetch (a counter: no division a row)
  for (int64_t row = 0; row < k_blocks * 16; ++row) {
    if (fetch_in-- == 0) {
      fetch_in = period - 1;
      _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(b + (NB + j) * block + 64 * row), _MM_HINT_T0);
    }
    __m512i wv[NB];
    _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j)
      wv[j] = _mm512_xor_si512(_mm512_loadu_si512(b + j * block + 64 * row), flip);
    _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
      int32_t inputs;
      std::memcpy(&inputs, a + i * q_stride + 4 * row, 4);
      const __m512i xv = _mm512_set1_epi32(inputs);
      _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) acc[i][j] = dpbusd(acc[i][j], wv[j], xv);
    }
  }
  _Pragma("GCC unroll 16") for (int i = 0; i < MR; ++i) {
    const __m512i taken = _mm512_set1_epi32(128 * q_sum[m0 + i]);
    const __m512 xs = _mm512_set1_ps(x_scale[m0 + i]);
    _Pragma("GCC unroll 16") for (int j = 0; j < NB; ++j) {  // no early exit: GCC keeps an array indexed past one in
      const int64_t n = 16 * (nb0 + j), cols = std::clamp<int64_t>(n_size - n, 0, 16);  // memory
      const __mmask16 mask = static_cast<__mmask16>((1u << cols) - 1);
      const __m512 sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], taken));  // (sum * scale) * x_scale,
      _mm512_mask_storeu_ps(out + (m0 + i) * n_size + n, mask,                      // oneDNN's order
                            _mm512_mul_ps(_mm512_mul_ps(sums, _mm512_maskz_loadu_ps(mask, scale + n)), xs));
    }
  }
}

// 8 x 3 (24 accumulators, 3 weights, 1 input of 32 registers): ~400-440 GOPS at t5-small's layers, where 4 x 4 and
// 6 x 4 were as fast but at the output layer (32 rows: 3.96 and 3.33 ms, 8 x 3 3.14); chunks of 64 rows, which the
// cache holds while every block of the weight passes them
constexpr int kTileRows = 8, kTileBlocks = 3, kChunkRows = 64;

// rows [m_first, m_last) through NB blocks from nb0: tiles of kTileRows rows, then one of the rest, which share the
// fetching of the next NB blocks
template <int NB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_blocks(const int8_t* q, int64_t q_stride,
    const int32_t* q_sum, const float* x_scale, const int8_t* packed, const float* scale, float* out, int64_t k_blocks,
    int64_t n_size, int64_t m_first, int64_t m_last, int64_t nb0) {
  const int64_t tiles = (m_last - m_first + kTileRows - 1) / kTileRows;
  int64_t m = m_first;
  for (; m + kTileRows <= m_last; m += kTileRows)
    vnni_tile<kTileRows, NB>(q, q_stride, q_sum, x_scale, packed, scale, out, k_blocks, n_size, m, nb0,
                             (m - m_first) / kTileRows, tiles);
  switch (m_last - m) {
#define PEFT_T5_TILE(R)                                                                                         \
  case R:                                                                                                       \
    vnni_tile<R, NB>(q, q_stride, q_sum, x_scale, packed, scale, out, k_blocks, n_size, m, nb0, tiles - 1, tiles); \
    break;
    PEFT_T5_TILE(1) PEFT_T5_TILE(2) PEFT_T5_TILE(3) PEFT_T5_TILE(4) PEFT_T5_TILE(5) PEFT_T5_TILE(6) PEFT_T5_TILE(7)
#undef PEFT_T5_TILE
  }
}

// blocks [first, last) of 16 outputs for every row
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_rows(const int8_t* q, int64_t q_stride,
    const int32_t* q_sum, const float* x_scale, const int8_t* packed, const float* scale, float* out, int64_t m_size,
    int64_t k_blocks, int64_t n_size, int64_t first, int64_t last) {
  for (int64_t m0 = 0; m0 < m_size; m0 += kChunkRows) {
    const int64_t m1 = std::min(m_size, m0 + kChunkRows);
    int64_t nb = first;
    for (; nb + kTileBlocks <= last; nb += kTileBlocks)
      vnni_blocks<kTileBlocks>(q, q_stride, q_sum, x_scale, packed, scale, out, k_blocks, n_size, m0, m1, nb);
    for (; nb < last; ++nb)
      vnni_blocks<1>(q, q_stride, q_sum, x_scale, packed, scale, out, k_blocks, n_size, m0, m1, nb);
  }
}

bool tiles_allowed() {  // Linux lets a process use AMX's tile registers once it asks (oneDNN asks the same)
  static const bool allowed = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  return allowed;
}

at::Tensor int8_packed_matmul(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, bool amx) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "int8_packed_matmul: x must be [M, K] float32");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kChar && packed.size(2) == 16 &&
                  packed.size(3) == 64 && packed.size(0) % 2 == 0 && packed.is_contiguous(),
              "int8_packed_matmul: packed must be kernels.pack_int8's [N / 16, K / 64, 16, 64]");
  const int64_t m_size = x.size(0), k_size = x.size(1), k_blocks = packed.size(1), n_size = scale.size(0);
  TORCH_CHECK(k_blocks * 64 >= k_size && k_blocks * 64 < k_size + 64 && packed.size(0) * 16 >= n_size &&
                  packed.size(0) * 16 < n_size + 32,
              "int8_packed_matmul: packed is for another shape than x and scale");
  TORCH_CHECK(scale.dim() == 1 && scale.scalar_type() == at::kFloat, "int8_packed_matmul: scale must be [N] float32");
  const at::Tensor xc = x.contiguous(), sc = scale.contiguous();
  const int64_t q_stride = k_blocks * 64;
  std::vector<int8_t> q(m_size * q_stride);
  std::vector<int32_t> q_sum(m_size);  // AVX512-VNNI's tiles take 128 x each row's sum back
  std::vector<float> x_scale(m_size);
  const float* xd = xc.data_ptr<float>();
  const int64_t summed = k_size / 16 * 16;
  for (int64_t m = 0; m < m_size; ++m) {
    int8_t* qm = q.data() + m * q_stride;
    x_scale[m] = quantize_row(xd + m * k_size, qm, k_size, q_stride, summed, &q_sum[m]);
    for (int64_t k = summed; k < k_size; ++k) q_sum[m] += qm[k];
  }
  at::Tensor out = at::empty({m_size, n_size}, x.options());
  const int8_t* w = packed.data_ptr<int8_t>();
  const float* s = sc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (m_size == 1) {
    const int64_t groups = (n_size + 63) / 64;  // of four blocks; ~1024 outputs a thread at least
    at::parallel_for(0, groups, 16, [&](int64_t first, int64_t last) {
      vnni_row(q.data(), q_sum[0], x_scale[0], w, s, o, k_blocks, n_size, 4 * first,
               std::min(4 * last, (n_size + 15) / 16));
    });
  } else if (amx) {
    TORCH_CHECK(tiles_allowed(), "int8_packed_matmul: the kernel refused AMX's tile registers");
    const int64_t n_chunks = packed.size(0) / 2;
    at::parallel_for(0, n_chunks, 8, [&](int64_t first, int64_t last) {
      for (int64_t m0 = 0; m0 < m_size; m0 += 32)
        tile_rows(q.data(), x_scale.data(), w, s, o, m0, std::min<int64_t>(32, m_size - m0), k_blocks, n_size,
                  first * 32, std::min(last * 32, n_size));
    });
  } else {
    const int64_t blocks = (n_size + 15) / 16, groups = (blocks + kTileBlocks - 1) / kTileBlocks;
    at::parallel_for(0, groups, 4, [&](int64_t first, int64_t last) {  // ~200 outputs a thread at least
      vnni_rows(q.data(), q_stride, q_sum.data(), x_scale.data(), w, s, o, m_size, k_blocks, n_size,
                kTileBlocks * first, std::min(kTileBlocks * last, blocks));
    });
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(peft_t5, m) {
  m.def("int8_packed_matmul(Tensor x, Tensor packed, Tensor scale, bool amx) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_t5, CPU, m) { m.impl("int8_packed_matmul", &int8_packed_matmul); }
