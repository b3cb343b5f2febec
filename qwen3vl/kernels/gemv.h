// Helpers shared by the matrix-vector kernels (gemv.cpp, amx.cpp, via vnni.h): activation rows
// to float / int / bf16, prefetching, the parallel split over output rows, the fp32 -> output
// epilogue and the argument checks of the *_multi entry points. Everything is inline or a
// template: each kernel source compiles its own copy, so the hot loops inline as before the split.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include "simd.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace qwen3vl_gemv {

using namespace qwen3vl_simd;

constexpr int kMaxRows = 8;       // activation rows handled per pass over the weights
constexpr int64_t kGrain = 32;    // output rows per parallel task, at least
// A block of R output rows is one contiguous range of R * row_bytes, read as R short streams
// that the hardware prefetchers keep re-detecting, which leaves the core stalled on DRAM. So each
// step that consumes one 64-byte line from each of the R rows also prefetches the R lines this
// far ahead of the block's linear progress, a single sequential stream. 16 KiB measured best of
// 0-24 KiB (one 12288x2048 matrix, 2 cores: int8 18 -> 29 GB/s, int4 16 -> 34 GB/s, partly L3);
// with the VNNI int8 kernel and bf16, a 151936x2048 (lm_head) matrix from DRAM preferred 32 and 8 KiB.
constexpr int64_t kPrefetch = 16384;

// block: start of the R rows; done: bytes consumed so far in each row.
template <int R, int64_t Distance = kPrefetch>
ALWAYS_INLINE void prefetch_block(const void* block, int64_t done) {
  const char* p = (const char*)block + R * done + Distance;
  for (int r = 0; r < R; ++r) _mm_prefetch(p + 64 * r, _MM_HINT_T1);
}


// The first `distance` bytes of a thread's range of rows: the in-loop prefetch only runs that far
// ahead of the rows being read, so without this each call starts on cold demand misses (a 2048-row
// int4 matrix: 142 -> 120-128 us).
ALWAYS_INLINE void prefetch_head(const void* start, int64_t bytes, int64_t distance) {
  const char* p = (const char*)start;
  for (int64_t off = 0; off < std::min(bytes, distance); off += 64) _mm_prefetch(p + off, _MM_HINT_T1);
}

// Activation row m of x (float32 or bfloat16) as float32 in dst[0, K).
inline void row_to_float(const at::Tensor& x, int64_t m, float* dst) {
  const int64_t K = x.size(1);
  if (x.scalar_type() == at::kFloat) {
    std::copy(x.data_ptr<float>() + m * K, x.data_ptr<float>() + (m + 1) * K, dst);
    return;
  }
  const bf16* src = x.data_ptr<bf16>() + m * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    _mm512_storeu_ps(dst + k, _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)(src + k))));
  for (; k < K; ++k) dst[k] = static_cast<float>(src[k]);
}

// max |v| over v[0, n).
inline float abs_max(const float* v, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, v + k)));
  }
  return _mm512_reduce_max_ps(m);
}

// q[k] = clamp(round_half_even(v[k] * inv), -limit, limit) for k < n, as int32 (vcvtps2dq rounds
// to nearest even, like std::nearbyint in the default rounding mode).
inline void quantize_span(const float* v, int64_t n, float inv, int32_t limit, int32_t* q) {
  const __m512 vi = _mm512_set1_ps(inv);
  const __m512i hi = _mm512_set1_epi32(limit), lo = _mm512_set1_epi32(-limit);
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
    const __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, v + k), vi));
    _mm512_mask_storeu_epi32(q + k, mask, _mm512_max_epi32(lo, _mm512_min_epi32(hi, r)));
  }
}

// Activation rows as bf16 for the vdpbf16ps kernels: bf16 input is used as is (exact products);
// float32 input is split into hi + lo bf16 rows (x ~= hi + lo to ~2^-17), summed in the epilogue.
struct BF16Rows {
  int64_t rows;   // M or 2M
  bool pairs;     // rows 2m, 2m+1 are hi, lo of input row m
};

inline BF16Rows bf16_rows(const at::Tensor& x) {
  const bool pairs = x.scalar_type() == at::kFloat;
  return {x.size(0) * (pairs ? 2 : 1), pairs};
}

// Writes bf16 activation row r (of bf16_rows) for input row m into dst[k] for k < K.
template <typename F>
void for_each_bf16_row(const at::Tensor& x, F&& f) {
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<bf16> tmp(K);
  for (int64_t m = 0; m < M; ++m) {
    if (x.scalar_type() == at::kBFloat16) {
      const bf16* src = x.data_ptr<bf16>() + m * K;
      f(m, src);
    } else {
      const float* src = x.data_ptr<float>() + m * K;
      std::vector<bf16> lo(K);
      for (int64_t k = 0; k < K; ++k) {
        tmp[k] = bf16(src[k]);
        lo[k] = bf16(src[k] - static_cast<float>(tmp[k]));
      }
      f(2 * m, tmp.data());
      f(2 * m + 1, lo.data());
    }
  }
}

// y (rows, N) fp32 partial results -> out (M, N) in dtype (rows = M, or 2M with hi/lo pairs).
inline at::Tensor epilogue(const std::vector<float>& y, int64_t M, int64_t N, bool pairs, const at::TensorOptions& opts) {
  at::Tensor out = at::empty({M, N}, opts);
  for (int64_t m = 0; m < M; ++m) {
    const float* a = y.data() + (pairs ? 2 * m : m) * N;
    const float* b = a + N;
    if (out.scalar_type() == at::kFloat) {
      float* o = out.data_ptr<float>() + m * N;
      for (int64_t n = 0; n < N; ++n) o[n] = pairs ? a[n] + b[n] : a[n];
    } else {  // vcvtneps2bf16 rounds to nearest even, as bf16(float) does (a scalar loop was ~3 ns per value)
      bf16* o = out.data_ptr<bf16>() + m * N;
      for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 k = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, a + n);
        if (pairs) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + n));
        _mm256_mask_storeu_epi16(o + n, k, (__m256i)_mm512_cvtneps_pbh(v));
      }
    }
  }
  return out;
}

inline at::Tensor epilogue(const std::vector<float>& y, const at::Tensor& x, int64_t N, bool pairs) {
  return epilogue(y, x.size(0), N, pairs, x.options());
}

// Runs rows(lo, hi, row_offset, row_count) over chunks of <= kMaxRows activation rows and,
// within each, over output rows in parallel.
template <typename F>
void parallel_rows(int64_t rows, int64_t N, F&& f) {
  for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
    const int64_t mb = std::min<int64_t>(kMaxRows, rows - r0);
    at::parallel_for(0, N, kGrain, [&](int64_t lo, int64_t hi) { f(lo, hi, r0, mb); });
  }
}

#define DISPATCH_ROWS(MB, FN, ...)        \
  switch (MB) {                           \
    case 1: FN<1>(__VA_ARGS__); break;    \
    case 2: FN<2>(__VA_ARGS__); break;    \
    case 3: FN<3>(__VA_ARGS__); break;    \
    case 4: FN<4>(__VA_ARGS__); break;    \
    case 5: FN<5>(__VA_ARGS__); break;    \
    case 6: FN<6>(__VA_ARGS__); break;    \
    case 7: FN<7>(__VA_ARGS__); break;    \
    default: FN<8>(__VA_ARGS__); break;   \
  }

// The *_multi entry points multiply activation row j (or row 0 for all j when x has one row) by
// matrix idx[j] of a stack (E, N, K) of same-shaped matrices, e.g. the k experts a MoE token is
// routed to: y (J, N). One call and one parallel region for all J products, instead of J.
struct Multi {
  int64_t J;
  std::vector<int64_t> e;  // matrix of each product
  bool broadcast;          // x has one row, shared by all J
  int64_t xrow(int64_t j) const { return broadcast ? 0 : j; }
};

inline Multi multi_args(const at::Tensor& x, const at::Tensor& idx, int64_t E, const char* name) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, name, ": idx must be a 1-D int64 tensor");
  const at::Tensor ic = idx.contiguous();
  Multi mu{ic.size(0), std::vector<int64_t>(ic.data_ptr<int64_t>(), ic.data_ptr<int64_t>() + ic.size(0)),
           x.size(0) == 1};
  TORCH_CHECK(mu.broadcast || x.size(0) == mu.J, name, ": x must have 1 or len(idx) rows");
  for (int64_t e : mu.e) TORCH_CHECK(e >= 0 && e < E, name, ": matrix index ", e, " out of range [0, ", E, ")");
  return mu;
}

// f(j, lo, hi) for output rows [lo, hi) of product j, all J * N rows split across threads.
template <typename F>
void parallel_multi(int64_t J, int64_t N, F&& f) {
  at::parallel_for(0, J * N, kGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo / N; j < J && j * N < hi; ++j) f(j, std::max(lo, j * N) - j * N, std::min(hi, (j + 1) * N) - j * N);
  });
}

inline void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), name,
              ": x must be (M, K) float32 or bfloat16");
}

}  // namespace qwen3vl_gemv
