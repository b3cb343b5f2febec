// AMX tile paths of the int8 and int4 matrix-vector kernels (gemv.cpp) for 5-8 activation rows,
// and the amx op that reports or switches them. Compiled in when -march=native has AMX-TILE and
// AMX-INT8 (Linux), used when the kernel grants this process the tile state (arch_prctl);
// elsewhere the entry points return false and gemv.cpp keeps the VNNI kernels (vnni.h).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>
#include <torch/library.h>

#include "vnni.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

// AMX tiles (int8 and int4 kernels, several activation rows): compiled in when -march=native has them, used
// when the kernel grants this process the tile state (Linux arch_prctl).
#if defined(__linux__) && defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define QWEN3VL_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace qwen3vl_gemv {
namespace {

// ---------------------------------------------------------------------------------------------
// int4 with AMX tiles, for several activation rows. The vpdpbusd kernel (vnni.h) spends, per row,
// two dot products plus a convert, multiply and add per 128 k of each output row, which bounds it
// at 8 rows (compute, not memory). Here one tile product (TDPBUSD: A 16 output rows x Kt codes,
// u8; B the M activation rows' Kt int8 values; C 16 x M int32) does that for 16 output rows at
// once, so what remains per output row is unpacking its codes into the A tile and a per-group
// epilogue shared by 16 rows. Kt = min(G, 64): one group, or half of a 128-group, per tile.
// A tile row (one output row) holds a tile's even-k codes then its odd-k codes, the order the
// nibble pairs unpack in; the B tiles put the activations in that order.

std::atomic<bool> g_amx_enabled{true};

bool amx_supported() {
#ifdef QWEN3VL_AMX
  // ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA: without it the first tile instruction faults.
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

#ifdef QWEN3VL_AMX
constexpr int64_t kAmxMinRows = 5;  // up to 4 rows the vpdpbusd kernel keeps up with memory (measured)

// A pass's activation rows in tile order (see above).
struct Int4Tiles {
  int64_t Kt;
  std::vector<int8_t> xb;  // (K / Kt, Kt / 4, 4 M): tile T's B operand, rows of 4 k per activation row
  std::vector<float> xs;   // (K / 128, 16 M): block scale of activation row f % M, lane f of C's M vectors
  std::vector<float> sx;   // (groups, 16 M): group sum of activation row f % M, likewise
};

Int4Tiles int4_tiles(const Int4Rows& xp, int64_t r0, int64_t M, int64_t K, int64_t G) {
  const int64_t Kt = std::min<int64_t>(G, 64), half = Kt / 2, tpb = 128 / Kt, nb = K / 128;
  Int4Tiles t{Kt, std::vector<int8_t>(K * M), std::vector<float>(nb * 16 * M), std::vector<float>(xp.groups * 16 * M)};
  // Positions 4r..4r+3 of a tile are 4 adjacent bytes of the prepared row (half is a multiple of 4).
  int32_t* xb = reinterpret_cast<int32_t*>(t.xb.data());
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* row = xp.x.data() + (r0 + m) * xp.Kp;
    for (int64_t T = 0; T < K / Kt; ++T) {
      const int8_t* blk = row + (T / tpb) * 128 + (T % tpb) * half;  // the tile's first even-k position
      for (int64_t r = 0; r < Kt / 4; ++r) {
        int32_t v;
        std::memcpy(&v, blk + (4 * r < half ? 4 * r : 64 + 4 * r - half), 4);
        xb[(T * Kt / 4 + r) * M + m] = v;
      }
    }
  }
  for (int64_t f = 0; f < 16 * M; ++f) {
    const int64_t m = r0 + f % M;
    for (int64_t b = 0; b < nb; ++b) t.xs[b * 16 * M + f] = xp.scales[m * (xp.Kp / 128) + b];
    for (int64_t g = 0; g < xp.groups; ++g) t.sx[g * 16 * M + f] = xp.sums[m * xp.groups + g];
  }
  return t;
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// r[i] lane j <-> r[j] lane i (16 x 16 32-bit words).
ALWAYS_INLINE void transpose16(__m512i (&r)[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Within each 128-bit lane the 4 x 4 blocks are transposed; now transpose the 4 x 4 grid of lanes.
  for (int q = 0; q < 16; q += 8)
    for (int j = 0; j < 4; ++j) {
      t[q + j] = _mm512_shuffle_i32x4(r[q + j], r[q + 4 + j], 0x88);
      t[q + 4 + j] = _mm512_shuffle_i32x4(r[q + j], r[q + 4 + j], 0xDD);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xDD);
  }
}

// C tiles by slot (tile numbers are immediates): 0, 3, 4, 5.
ALWAYS_INLINE void tile_product(int slot, bool first) {
  switch (slot) {
    case 0: if (first) _tile_zero(0); _tile_dpbusd(0, 1, 2); break;
    case 1: if (first) _tile_zero(3); _tile_dpbusd(3, 1, 2); break;
    case 2: if (first) _tile_zero(4); _tile_dpbusd(4, 1, 2); break;
    default: if (first) _tile_zero(5); _tile_dpbusd(5, 1, 2); break;
  }
}

ALWAYS_INLINE void tile_store(int slot, int32_t* dst, int stride) {
  switch (slot) {
    case 0: _tile_stored(0, dst, stride); break;
    case 1: _tile_stored(3, dst, stride); break;
    case 2: _tile_stored(4, dst, stride); break;
    default: _tile_stored(5, dst, stride); break;
  }
}

// Output rows [lo, hi) (a multiple of 16 apart) for M activation rows. Tiles: 1 = A, 2 = B, C in
// four slots (tile_product). Software-pipelined per block of 128 k: block b's tile products read
// codes unpacked while block b - 1 was processed; its groups' C tiles are stored and scaled one
// block later (groups of 64 or 128: two slot pairs alternate) or after the next block's unpacking
// (groups of 32 take all four slots), so the vector work does not wait on the tile unit.
template <int M>
void int4_rows_amx(const Int4Args& a, const Int4Tiles& t, int64_t lo, int64_t hi) {
  const int64_t Kt = t.Kt, tpg = a.G / Kt, tpb = 128 / Kt, nb = a.K / 128, row_bytes = a.K / 2;
  const int64_t gpb = 128 / a.G;  // groups per block
  const bool lag = gpb <= 2;
  alignas(64) TileConfig cfg{};
  cfg.palette = 1;
  for (int c : {0, 3, 4, 5}) cfg.rows[c] = 16, cfg.colsb[c] = 4 * M;
  cfg.rows[1] = 16, cfg.colsb[1] = Kt;
  cfg.rows[2] = Kt / 4, cfg.colsb[2] = 4 * M;
  _tile_loadconfig(&cfg);
  prefetch_head(a.q + lo * row_bytes, (hi - lo) * row_bytes, kPrefetch);
  alignas(64) uint8_t abuf[2][16 * 128];  // per output row: the two 64-byte vectors below
  alignas(64) int32_t cbuf[4][16 * M];
  alignas(64) float out[16 * M];
  // The 16 output rows' scales and (zero - 8 * scale) per group, as float32 lanes.
  std::vector<__m512> sc(2 * a.groups);
  // 128-bit lanes of (even-k codes E, odd-k codes O) per 64-byte vector: Kt 64 -> [E0 E1 O0 O1],
  // [E2 E3 O2 O3] (one tile each); Kt 32 -> [E0 O0 E1 O1], [E2 O2 E3 O3] (two tiles each).
  const __m512i sel0 = Kt == 64 ? _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11) : _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11);
  const __m512i sel1 = Kt == 64 ? _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15) : _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i chan[M];  // lane i of C's vector v is output row (16 v + i) / M of the 16
  for (int v = 0; v < M; ++v) {
    alignas(64) int32_t idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = (16 * v + i) / M;
    chan[v] = _mm512_load_si512(idx);
  }
  // Groups is even, so each output row's scales are words holding groups (2i, 2i + 1).
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t n0 = lo; n0 < hi; n0 += 16) {
    const uint8_t* blk = a.q + n0 * row_bytes;
    const int* sw = (const int*)(a.scales + n0 * a.groups);
    const int* zw = (const int*)(a.zeros + n0 * a.groups);
    // 16 output rows x 16 words (group pairs) at a time, transposed to a vector of 16 rows per word
    // (gathers cost ~30 cycles each here).
    const int64_t words = a.groups / 2;
    for (int64_t w0 = 0; w0 < words; w0 += 16) {
      const __mmask16 k = words - w0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (words - w0)) - 1);
      __m512i rs[16], rz[16];
      for (int c = 0; c < 16; ++c) {
        rs[c] = _mm512_maskz_loadu_epi32(k, sw + c * words + w0);
        rz[c] = _mm512_maskz_loadu_epi32(k, zw + c * words + w0);
      }
      transpose16(rs);
      transpose16(rz);
      for (int64_t i = 0; i < 16 && w0 + i < words; ++i) {
        const int64_t g = 2 * (w0 + i);
        const __m512 s0 = _mm512_castsi512_ps(_mm512_slli_epi32(rs[i], 16));
        const __m512 s1 = _mm512_castsi512_ps(_mm512_and_si512(rs[i], high));
        const __m512 z0 = _mm512_castsi512_ps(_mm512_slli_epi32(rz[i], 16));
        const __m512 z1 = _mm512_castsi512_ps(_mm512_and_si512(rz[i], high));
        sc[2 * g] = s0, sc[2 * g + 2] = s1;
        sc[2 * g + 1] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s0, z0);
        sc[2 * g + 3] = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s1, z1);
      }
    }
    auto unpack = [&](int64_t b, uint8_t* dst) {
      prefetch_block<16>(blk, b * 64);
      for (int c = 0; c < 16; ++c) {
        const __m512i v = _mm512_loadu_si512(blk + c * row_bytes + b * 64);
        const __m512i even = _mm512_and_si512(v, low4), odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        _mm512_store_si512(dst + c * 128, _mm512_permutex2var_epi64(even, sel0, odd));
        _mm512_store_si512(dst + c * 128 + 64, _mm512_permutex2var_epi64(even, sel1, odd));
      }
    };
    auto slot = [&](int64_t b, int64_t j) { return (int)(lag ? (b & 1) * 2 + j : j); };
    __m512 tot[M];
    for (int v = 0; v < M; ++v) tot[v] = _mm512_setzero_ps();
    // Stores block b's C tiles and adds their groups' terms:
    //   sum_k xq w = scale * D + sum(xq) * (zero - 8 * scale) per (output row, activation row) lane.
    auto finish = [&](int64_t b) {
      for (int64_t j = 0; j < gpb; ++j) tile_store(slot(b, j), cbuf[j], 4 * M);
      const float* xs = t.xs.data() + b * 16 * M;
      for (int64_t j = 0; j < gpb; ++j) {
        const int64_t g = b * gpb + j;
        const float* sx = t.sx.data() + g * 16 * M;
        for (int v = 0; v < M; ++v) {
          const __m512 d = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf[j] + 16 * v));
          const __m512 s = _mm512_mul_ps(_mm512_permutexvar_ps(chan[v], sc[2 * g]), _mm512_loadu_ps(xs + 16 * v));
          tot[v] = _mm512_fmadd_ps(d, s, tot[v]);
          tot[v] = _mm512_fmadd_ps(_mm512_permutexvar_ps(chan[v], sc[2 * g + 1]), _mm512_loadu_ps(sx + 16 * v), tot[v]);
        }
      }
    };
    unpack(0, abuf[0]);
    for (int64_t b = 0; b < nb; ++b) {
      for (int64_t tt = 0; tt < tpb; ++tt) {
        const int64_t T = b * tpb + tt;
        _tile_loadd(1, abuf[b & 1] + tt * Kt, 128);
        _tile_loadd(2, t.xb.data() + T * Kt * M, 4 * M);
        tile_product(slot(b, (T / tpg) % gpb), T % tpg == 0);
      }
      if (b + 1 < nb) unpack(b + 1, abuf[(b + 1) & 1]);
      if (!lag) finish(b);
      else if (b > 0) finish(b - 1);
    }
    if (lag) finish(nb - 1);
    for (int v = 0; v < M; ++v) _mm512_store_ps(out + 16 * v, tot[v]);
    for (int c = 0; c < 16; ++c)
      for (int m = 0; m < M; ++m) a.y[m * a.N + n0 + c] = out[c * M + m];
  }
  _tile_release();
}

// int8 weights with AMX: the A tile is 16 weight rows x 64 k straight from memory (no unpacking);
// each int16 activation x = 256 hi + lo (hi signed, lo unsigned bytes) gives two B tiles, multiplied
// with tdpbssd and tdpbsud into two C tiles of 16 output rows x M activation rows. Same integer
// products as the vpdpwssd kernel, summed in another order: from 5 rows that kernel is bound by
// its multiplies (8 rows: ~2x the time of 1), this one by memory.
constexpr int64_t kAmxFlush = 16384;  // k per int32 sum: 16384 * 127 * 255 < 2^31

struct Int8Tiles {
  std::vector<uint8_t> hi, lo;  // (K / 4, 4 M) each: row r = k-quad r, 4 bytes per activation row
};

Int8Tiles int8_tiles(const Int8Args& a, int64_t M) {
  Int8Tiles t{std::vector<uint8_t>(a.K * M), std::vector<uint8_t>(a.K * M)};
  // 32 activations at a time: their high and low bytes, then the 8 k-quads of each to their rows.
  const __m256i quads = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32((int)M));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < a.K; k += 32) {  // K % 64 == 0
      const __m512i v = _mm512_loadu_si512(a.x + m * a.Kp + k);
      const __m256i idx = _mm256_add_epi32(quads, _mm256_set1_epi32((int)(k / 4 * M + m)));
      _mm256_i32scatter_epi32(t.hi.data(), idx, _mm512_cvtepi16_epi8(_mm512_srai_epi16(v, 8)), 4);
      _mm256_i32scatter_epi32(t.lo.data(), idx, _mm512_cvtepi16_epi8(v), 4);
    }
  return t;
}

// Output rows [lo, hi) (a multiple of 16 apart). Tiles: 0, 1 = C (hi, lo), 2 = A, 3, 4 = B (hi, lo).
template <int M>
void int8_rows_amx(const Int8Args& a, const Int8Tiles& t, int64_t lo, int64_t hi) {
  alignas(64) TileConfig cfg{};
  cfg.palette = 1;
  for (int c : {0, 1, 3, 4}) cfg.rows[c] = 16, cfg.colsb[c] = 4 * M;
  cfg.rows[2] = 16, cfg.colsb[2] = 64;
  _tile_loadconfig(&cfg);
  prefetch_head(a.q + lo * a.K, (hi - lo) * a.K, 32768);
  alignas(64) int32_t ch[16 * M], cl[16 * M];
  for (int64_t n0 = lo; n0 < hi; n0 += 16) {
    const int8_t* blk = a.q + n0 * a.K;
    float tot[16 * M] = {};
    for (int64_t k0 = 0; k0 < a.K; k0 += kAmxFlush) {
      const int64_t k1 = std::min(a.K, k0 + kAmxFlush);
      _tile_zero(0);
      _tile_zero(1);
      for (int64_t k = k0; k < k1; k += 64) {
        prefetch_block<16, 32768>(blk, k);
        _tile_loadd(2, blk + k, a.K);
        _tile_loadd(3, t.hi.data() + k * M, 4 * M);
        _tile_loadd(4, t.lo.data() + k * M, 4 * M);
        _tile_dpbssd(0, 2, 3);
        _tile_dpbsud(1, 2, 4);
      }
      _tile_stored(0, ch, 4 * M);
      _tile_stored(1, cl, 4 * M);
      for (int i = 0; i < 16 * M; ++i) tot[i] += 256.f * static_cast<float>(ch[i]) + static_cast<float>(cl[i]);
    }
    for (int c = 0; c < 16; ++c)
      for (int m = 0; m < M; ++m) a.y[m * a.N + n0 + c] = a.scales[n0 + c] * a.sx[m] * tot[c * M + m];
  }
  _tile_release();
}
#endif

}  // namespace

// mode 0: off, 1: on (when supported), else unchanged; returns whether int8_gemv / int4_gemv use
// AMX for 5-8 activation rows now.
bool amx(int64_t mode) {
  if (mode == 0 || mode == 1) g_amx_enabled = mode == 1;
  return g_amx_enabled && amx_supported();
}

bool int8_gemv_amx(const Int8Args& a, int64_t M) {
#ifdef QWEN3VL_AMX
  if (M < kAmxMinRows || a.K % 64 || a.N < 16 || !amx(-1)) return false;
  const Int8Tiles t = int8_tiles(a, M);
  const int64_t chunks = a.N / 16;
  at::parallel_for(0, chunks, 2, [&](int64_t lo, int64_t hi) {
    DISPATCH_ROWS(M, int8_rows_amx, a, t, lo * 16, hi * 16);
    if (hi == chunks && a.N % 16) DISPATCH_ROWS(M, int8_rows, a, chunks * 16, a.N);
  });
  return true;
#else
  return false;
#endif
}

bool int4_gemv_amx(const Int4Args& a0, const Int4Rows& xp, int64_t M, __m512i gidx) {
#ifdef QWEN3VL_AMX
  const int64_t N = a0.N, K = a0.K, group_size = a0.G, nb = xp.Kp / 128;
  if (!(M >= kAmxMinRows && K % 128 == 0 && xp.groups % 2 == 0 && N >= 16 && amx(-1))) return false;
  const int64_t chunks = N / 16;
  for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
    const int64_t mb = std::min<int64_t>(kMaxRows, M - r0);
    const Int4Tiles tiles = int4_tiles(xp, r0, mb, K, group_size);
    Int4Args a = a0;  // the pass's activation rows and outputs
    a.x += r0 * xp.Kp, a.xs += r0 * nb, a.sx += r0 * xp.groups, a.y += r0 * N;
    at::parallel_for(0, chunks, 2, [&](int64_t lo, int64_t hi) {
      DISPATCH_ROWS(mb, int4_rows_amx, a, tiles, lo * 16, hi * 16);
      if (hi == chunks && N % 16) DISPATCH_ROWS(mb, int4_rows, a, chunks * 16, N, gidx);
    });
  }
  return true;
#else
  return false;
#endif
}

}  // namespace qwen3vl_gemv

TORCH_LIBRARY_FRAGMENT(qwen3vl_kernels, m) {
  m.def("amx(int mode) -> bool", &qwen3vl_gemv::amx);
}
