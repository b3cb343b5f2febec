// The int8 and int4 matrix-vector kernels on integer dot products (AVX-512 VNNI), shared by their
// entry points (gemv.cpp) and the AMX paths (amx.cpp), which hand these kernels the output rows
// left over after their 16-row tiles; and the AMX entry points amx.cpp defines.
#pragma once

#include "gemv.h"

namespace qwen3vl_gemv {

// ---------------------------------------------------------------------------------------------
// int8: w[n, k] = scale[n] * q[n, k]. Each activation row is quantized to int16 with its own scale
// (x[m, k] ~= sx[m] * xq[m, k], error <= 2^-16 of the row's largest magnitude, finer than bf16 for
// all but extreme outliers), so 32 weights take one vpmovsxbw and then one vpdpwssd (32 int16
// products, summed in pairs into 16 int32 lanes) per activation row: a third of the vector work of
// converting weights to fp32 for FMAs, which made the kernel compute-bound below the memory
// bandwidth at one row and at ~1/3 of it at eight.

// k per int32 partial sum: each lane adds kFlush / 16 products of magnitude <= 127 * 32767, which
// stays below 2^31; partials are then converted and summed in fp32.
constexpr int64_t kFlush = 4096;

struct Int8Args {
  const int8_t* q;
  const float* scales;
  const int16_t* x;  // (rows, Kp) quantized activations, zero padded
  const float* sx;   // (rows,) their scales
  float* y;          // (rows, N)
  int64_t N, K, Kp;
};

template <int MB, int R>
ALWAYS_INLINE void int8_block(const Int8Args& a, int64_t n0) {
  __m512 tot[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
  const int8_t* q = a.q + n0 * a.K;
  for (int64_t k0 = 0; k0 < a.K; k0 += kFlush) {
    const int64_t k1 = std::min(a.K, k0 + kFlush);
    __m512i acc[R][MB];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_si512();
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {
      prefetch_block<R, 32768>(q, k);
      for (int r = 0; r < R; ++r) {
        for (int c = 0; c < 64; c += 32) {
          const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(q + r * a.K + k + c)));
          for (int m = 0; m < MB; ++m)
            acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], w, _mm512_loadu_si512(a.x + m * a.Kp + k + c));
        }
      }
    }
    for (; k < k1; k += 32) {  // x is zero padded to Kp, so only the weight load is masked
      const int64_t left = k1 - k;
      const __mmask32 mask = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, q + r * a.K + k));
        for (int m = 0; m < MB; ++m)
          acc[r][m] = _mm512_dpwssd_epi32(acc[r][m], w, _mm512_loadu_si512(a.x + m * a.Kp + k));
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_add_ps(tot[r][m], _mm512_cvtepi32_ps(acc[r][m]));
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m)
      a.y[m * a.N + n0 + r] = a.scales[n0 + r] * a.sx[m] * _mm512_reduce_add_ps(tot[r][m]);
}

template <int MB>
void int8_rows(const Int8Args& a, int64_t lo, int64_t hi) {
  // Enough independent chains to cover latency, few enough accumulators for 32 registers.
  constexpr int R = MB <= 2 ? 4 : MB <= 4 ? 2 : 1;
  prefetch_head(a.q + lo * a.K, (hi - lo) * a.K, 32768);
  int64_t n = lo;
  for (; n + R <= hi; n += R) int8_block<MB, R>(a, n);
  for (; n < hi; ++n) int8_block<MB, 1>(a, n);
}

// Activation rows -> int16 with one scale per row, zero padded to Kp.
struct Int16Rows {
  std::vector<int16_t> q;
  std::vector<float> scale;
};

// ---------------------------------------------------------------------------------------------
// int4: w[n, k] = (code - 8) * scale[n, g] + zero[n, g], codes as nibble pairs (even k low).
// Activations are quantized to int8 per block of 128 k of each row (x ~= xs[b] * xq, error <=
// 1/254 of the block's largest magnitude: small next to 4-bit weight rounding), so a 64-byte
// load of 128 codes gives 64 even-k codes (low nibbles) and 64 odd-k codes (high nibbles) as
// bytes, and two vpdpbusd (u8 code x s8 activation, 4 products per int32 lane) per activation row
// replace four bf16 dot products. int32 lane i covers k in [8i, 8i + 8) of the block, i.e. group
// 8i / G, and per group
//   sum_k xq w = scale * D_g + sum_g(xq) * (zero - 8 * scale).
// Activations are stored per block as 64 even-k then 64 odd-k values to match.

struct Int4Args {
  const uint8_t* q;
  const bf16* scales;
  const bf16* zeros;
  const int8_t* x;   // (rows, Kp) quantized, permuted, zero padded
  const float* xs;   // (rows, Kp / 128) block scales
  const float* sx;   // (rows, groups) sums of the quantized activations (times their scale) per group
  float* y;          // (rows, N)
  int64_t N, K, Kp, G, groups;
};

template <int MB, int R, bool TAIL>
ALWAYS_INLINE void int4_step(const Int4Args& a, int64_t n0, int64_t b, __m512 (&tot)[R][MB], __mmask64 bmask,
                             __mmask16 gmask, __m512i gidx) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const int64_t gpb = 128 / a.G;  // groups per block
  const int64_t nb = a.Kp / 128;
  if (!TAIL) prefetch_block<R>(a.q + n0 * (a.K / 2), b * 64);
  for (int r = 0; r < R; ++r) {
    const uint8_t* p = a.q + (n0 + r) * (a.K / 2) + b * 64;
    const __m512i v = TAIL ? _mm512_maskz_loadu_epi8(bmask, p) : _mm512_loadu_si512(p);
    const __m512i even = _mm512_and_si512(v, low4);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    // Lane i's group scale, as float32: a bf16 placed in the high half of each 32-bit lane
    // (gidx: word 2i + 1 <- group of lane i, even words zeroed) with one shuffle.
    const bf16* sp = a.scales + (n0 + r) * a.groups + b * gpb;
    const __m512 sv = _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(
        0xAAAAAAAAu, gidx, _mm512_castsi128_si512(_mm_maskz_loadu_epi16((__mmask8)gmask, sp))));
    for (int m = 0; m < MB; ++m) {
      const int8_t* xp = a.x + m * a.Kp + b * 128;
      __m512i d = _mm512_dpbusd_epi32(_mm512_setzero_si512(), even, _mm512_loadu_si512(xp));
      d = _mm512_dpbusd_epi32(d, odd, _mm512_loadu_si512(xp + 64));
      const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(a.xs[m * nb + b]));
      tot[r][m] = _mm512_fmadd_ps(t, sv, tot[r][m]);
    }
  }
}

template <int MB, int R>
ALWAYS_INLINE void int4_block(const Int4Args& a, int64_t n0, __m512i gidx) {
  __m512 tot[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) tot[r][m] = _mm512_setzero_ps();
  const int64_t full = a.K / 128, tail = a.K % 128;
  const __mmask16 gmask = (__mmask16)((1u << (128 / a.G)) - 1);
  for (int64_t b = 0; b < full; ++b) int4_step<MB, R, false>(a, n0, b, tot, ~0ull, gmask, gidx);
  if (tail)
    int4_step<MB, R, true>(a, n0, full, tot, (1ull << (tail / 2)) - 1, (__mmask16)((1u << (tail / a.G)) - 1), gidx);
  // Zero-point term: sum_g sx[g] * (zero[g] - 8 * scale[g]).
  const __m512 c8 = _mm512_set1_ps(8.f);
  for (int r = 0; r < R; ++r) {
    const bf16* s = a.scales + (n0 + r) * a.groups;
    const bf16* z = a.zeros + (n0 + r) * a.groups;
    __m512 zc[MB];
    for (int m = 0; m < MB; ++m) zc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a.groups; g += 16) {
      const __mmask16 gm = a.groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (a.groups - g)) - 1);
      const __m512 c = _mm512_fnmadd_ps(c8, load_bf16_ps(gm, s + g), load_bf16_ps(gm, z + g));
      for (int m = 0; m < MB; ++m) zc[m] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(gm, a.sx + m * a.groups + g), c, zc[m]);
    }
    for (int m = 0; m < MB; ++m) a.y[m * a.N + n0 + r] = _mm512_reduce_add_ps(_mm512_add_ps(tot[r][m], zc[m]));
  }
}

template <int MB>
void int4_rows(const Int4Args& a, int64_t lo, int64_t hi, __m512i gidx) {
  constexpr int R = MB <= 2 ? 4 : MB <= 4 ? 2 : 1;
  prefetch_head(a.q + lo * (a.K / 2), (hi - lo) * (a.K / 2), kPrefetch);
  int64_t n = lo;
  for (; n + R <= hi; n += R) int4_block<MB, R>(a, n, gidx);
  for (; n < hi; ++n) int4_block<MB, 1>(a, n, gidx);
}

// Activation rows quantized and permuted into the int4 kernel's order, with block scales and
// per-group sums.
struct Int4Rows {
  int64_t Kp, groups;
  std::vector<int8_t> x;
  std::vector<float> scales, sums;
};

// AMX tile paths (amx.cpp) for passes of 5-8 activation rows; each returns false, having done
// nothing, when it does not apply (too few rows, shapes the tiles do not cover, no AMX on this CPU
// or in this build, or switched off), and the caller runs the kernels above.
// mode 0: off, 1: on (when supported), else unchanged; returns whether the tiles are used now.
bool amx(int64_t mode);
// int8: one pass, the M <= kMaxRows activation rows of a (int16, as quantize_int16 writes them).
bool int8_gemv_amx(const Int8Args& a, int64_t M);
// int4: all M rows of xp (prepare_int4) in passes of kMaxRows; a holds row 0's pointers.
bool int4_gemv_amx(const Int4Args& a, const Int4Rows& xp, int64_t M, __m512i gidx);

}  // namespace qwen3vl_gemv
