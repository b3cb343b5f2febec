// AVX-512 helpers shared by the kernel sources (matrix-vector products, attention, pointwise).
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

#define ALWAYS_INLINE inline __attribute__((always_inline))

namespace qwen3vl_simd {

using bf16 = c10::BFloat16;

// The first min(n, 16) lanes.
ALWAYS_INLINE __mmask16 lanes(int64_t n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

// Up to 16 bfloat16 values (mask m) as float32 lanes (zeros elsewhere).
ALWAYS_INLINE __m512 load_bf16_ps(__mmask16 m, const bf16* p) {
  return _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m, p));
}

// 32 bfloat16 values as the operand type of the vdpbf16ps intrinsics.
ALWAYS_INLINE __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// v rounded to bfloat16 (nearest even) and back: what a bf16 op's result holds.
ALWAYS_INLINE __m512 round_bf16(__m512 v) { return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v)); }

// exp(x) in float32 (|rel. error| < 2e-7): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor series
// to r^7, times 2^n. Inputs below -87 give ~0 (softmax weights that small vanish anyway).
ALWAYS_INLINE __m512 exp_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln2 split: exact high part
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  for (const float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

}  // namespace qwen3vl_simd
