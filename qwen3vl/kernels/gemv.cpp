// Matrix-vector kernels for decode (a few activation rows) with AVX-512 (F/BW/VL/BF16/VNNI).
//
// Decode is memory-bound, so every kernel reads each weight byte once per call for all activation
// rows and keeps the per-row partial sums in registers. Registered as torch.ops.qwen3vl_kernels.*:
//   int8_gemv(x, qweight (N,K) int8, scales (N,1) f32)                         per-channel int8
//   int4_gemv(x, qweight (N,K/2) u8, scales, zeros (N,K/G) bf16, group_size)  nibble pairs
//   bf16_gemv(x, weight (N,K) bf16)
// x is (M, K) float32 or bfloat16; the result is (M, N) in x's dtype, accumulated in fp32.
// The *_multi variants take a stack of matrices (E, N, ...) and idx (J,): y[j] = x[j] @ W[idx[j]].T
// (MoE decode: a token's k experts in one call).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
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


namespace {

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

ALWAYS_INLINE __m512bh as_bh(__m512i v) { return (__m512bh)v; }


// Activation row m of x (float32 or bfloat16) as float32 in dst[0, K).
void row_to_float(const at::Tensor& x, int64_t m, float* dst) {
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
float abs_max(const float* v, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 mask = n - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - k)) - 1);
    m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_maskz_loadu_ps(mask, v + k)));
  }
  return _mm512_reduce_max_ps(m);
}

// q[k] = clamp(round_half_even(v[k] * inv), -limit, limit) for k < n, as int32 (vcvtps2dq rounds
// to nearest even, like std::nearbyint in the default rounding mode).
void quantize_span(const float* v, int64_t n, float inv, int32_t limit, int32_t* q) {
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

BF16Rows bf16_rows(const at::Tensor& x) {
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
at::Tensor epilogue(const std::vector<float>& y, int64_t M, int64_t N, bool pairs, const at::TensorOptions& opts) {
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

at::Tensor epilogue(const std::vector<float>& y, const at::Tensor& x, int64_t N, bool pairs) {
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

Multi multi_args(const at::Tensor& x, const at::Tensor& idx, int64_t E, const char* name) {
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

Int16Rows quantize_int16(const at::Tensor& x, int64_t Kp) {
  const int64_t M = x.size(0), K = x.size(1);
  Int16Rows out{std::vector<int16_t>(M * Kp, 0), std::vector<float>(M)};
  std::vector<float> xf(K);
  std::vector<int32_t> q(K);
  for (int64_t m = 0; m < M; ++m) {
    row_to_float(x, m, xf.data());
    const float amax = abs_max(xf.data(), K);
    out.scale[m] = amax > 0.f ? amax / 32767.f : 1.f;
    quantize_span(xf.data(), K, 1.f / out.scale[m], 32767, q.data());
    for (int64_t k = 0; k < K; ++k) out.q[m * Kp + k] = static_cast<int16_t>(q[k]);
  }
  return out;
}

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), name,
              ": x must be (M, K) float32 or bfloat16");
}

// int8 x (5-8 activation rows) with AMX tiles, defined below; false when it does not apply.
bool int8_gemv_amx(const Int8Args& a, int64_t M);

at::Tensor int8_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales) {
  const at::Tensor x = x_.contiguous();
  check_x(x, "int8_gemv");
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
              qweight.size(1) == x.size(1), "int8_gemv: qweight must be contiguous (N, K) int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "int8_gemv: scales must be N contiguous float32");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0), Kp = (K + 31) / 32 * 32;
  const Int16Rows xq = quantize_int16(x, Kp);
  std::vector<float> y(M * N);
  auto args = [&](int64_t r0) {
    return Int8Args{qweight.data_ptr<int8_t>(), scales.data_ptr<float>(), xq.q.data() + r0 * Kp,
                    xq.scale.data() + r0, y.data() + r0 * N, N, K, Kp};
  };
  bool tiles = true;
  for (int64_t r0 = 0; r0 < M && tiles; r0 += kMaxRows) tiles = int8_gemv_amx(args(r0), std::min<int64_t>(kMaxRows, M - r0));
  if (tiles) return epilogue(y, x, N, false);
  parallel_rows(M, N, [&](int64_t lo, int64_t hi, int64_t r0, int64_t mb) {
    const Int8Args a = args(r0);
    DISPATCH_ROWS(mb, int8_rows, a, lo, hi);
  });
  return epilogue(y, x, N, false);
}

at::Tensor int8_gemv_multi(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& idx) {
  const at::Tensor x = x_.contiguous();
  check_x(x, "int8_gemv_multi");
  TORCH_CHECK(qweight.dim() == 3 && qweight.scalar_type() == at::kChar && qweight.is_contiguous() &&
              qweight.size(2) == x.size(1), "int8_gemv_multi: qweight must be contiguous (E, N, K) int8");
  const int64_t E = qweight.size(0), N = qweight.size(1), K = x.size(1), Kp = (K + 31) / 32 * 32;
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == E * N,
              "int8_gemv_multi: scales must be (E, N, 1) contiguous float32");
  const Multi mu = multi_args(x, idx, E, "int8_gemv_multi");
  const Int16Rows xq = quantize_int16(x, Kp);
  std::vector<float> y(mu.J * N);
  parallel_multi(mu.J, N, [&](int64_t j, int64_t lo, int64_t hi) {
    const Int8Args a{qweight.data_ptr<int8_t>() + mu.e[j] * N * K, scales.data_ptr<float>() + mu.e[j] * N,
                     xq.q.data() + mu.xrow(j) * Kp, xq.scale.data() + mu.xrow(j), y.data() + j * N, N, K, Kp};
    int8_rows<1>(a, lo, hi);
  });
  return epilogue(y, mu.J, N, false, x.options());
}

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

Int4Rows prepare_int4(const at::Tensor& x, int64_t G) {
  const int64_t M = x.size(0), K = x.size(1), Kp = (K + 127) / 128 * 128, groups = K / G, nb = Kp / 128;
  Int4Rows out{Kp, groups, std::vector<int8_t>(M * Kp, 0), std::vector<float>(M * nb), std::vector<float>(M * groups, 0.f)};
  std::vector<float> xf(K);
  alignas(64) int32_t q[128];
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < M; ++m) {
    row_to_float(x, m, xf.data());
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * 128, n = std::min<int64_t>(128, K - k0);
      const float amax = abs_max(xf.data() + k0, n);
      const float scale = amax > 0.f ? amax / 127.f : 1.f;
      out.scales[m * nb + b] = scale;
      std::fill(q + n, q + 128, 0);
      quantize_span(xf.data() + k0, n, 1.f / scale, 127, q);
      int8_t* dst = out.x.data() + m * Kp + k0;
      for (int i = 0; i < 4; ++i) {  // dst[(j % 2) * 64 + j / 2] = q[j]
        const __m512i lo = _mm512_load_si512(q + 32 * i), hi = _mm512_load_si512(q + 32 * i + 16);
        _mm_storeu_si128((__m128i*)(dst + 16 * i), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(lo, even, hi)));
        _mm_storeu_si128((__m128i*)(dst + 64 + 16 * i), _mm512_cvtepi32_epi8(_mm512_permutex2var_epi32(lo, odd, hi)));
      }
      for (int64_t g0 = 0; g0 < n; g0 += G) {  // K is a multiple of G, so groups never straddle blocks
        __m512i sum = _mm512_setzero_si512();
        for (int64_t j = g0; j < g0 + G; j += 16) sum = _mm512_add_epi32(sum, _mm512_load_si512(q + j));
        out.sums[m * groups + (k0 + g0) / G] = static_cast<float>(_mm512_reduce_add_epi32(sum)) * scale;
      }
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// int4 with AMX tiles, for several activation rows. The vpdpbusd kernel above spends, per row,
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

// mode 0: off, 1: on (when supported), else unchanged; returns whether int8_gemv / int4_gemv use
// AMX for 5-8 activation rows now.
bool amx(int64_t mode) {
  if (mode == 0 || mode == 1) g_amx_enabled = mode == 1;
  return g_amx_enabled && amx_supported();
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

// Word indices for the scale shuffle in int4_step: lane i (k in [8i, 8i + 8) of a block) takes
// the block's group 8i / G into its high 16 bits.
__m512i int4_group_index(int64_t G) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) idx[2 * i] = 0, idx[2 * i + 1] = static_cast<int16_t>(8 * i / G);
  return _mm512_load_si512(idx);
}

// Checks the int4 weight (lead..., N, K/2) and its (lead..., N, K/G) bf16 scales/zeros; returns N.
int64_t check_int4(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                   const at::Tensor& zeros, int64_t G, int64_t dims, const char* name) {
  check_x(x, name);
  const int64_t K = x.size(1);
  TORCH_CHECK(G == 32 || G == 64 || G == 128, name, ": group_size must be 32, 64 or 128");
  TORCH_CHECK(K % G == 0, name, ": group_size must divide K");
  TORCH_CHECK(qweight.dim() == dims && qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
              qweight.size(dims - 1) * 2 == K, name, ": qweight must be contiguous (..., N, K/2) uint8");
  const int64_t N = qweight.size(dims - 2);
  for (const at::Tensor* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->is_contiguous() && t->dim() == dims &&
                t->size(dims - 2) == N && t->size(dims - 1) == K / G && t->numel() * G == qweight.numel() * 2,
                name, ": scales and zeros must be contiguous (..., N, K/G) bfloat16");
  return N;
}

at::Tensor int4_gemv(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales,
                     const at::Tensor& zeros, int64_t group_size) {
  const at::Tensor x = x_.contiguous();
  const int64_t N = check_int4(x, qweight, scales, zeros, group_size, 2, "int4_gemv"), K = x.size(1);
  const int64_t M = x.size(0);
  const Int4Rows xp = prepare_int4(x, group_size);
  const int64_t nb = xp.Kp / 128;
  std::vector<float> y(M * N);
  const __m512i gidx = int4_group_index(group_size);
  auto args = [&](int64_t r0) {
    return Int4Args{qweight.data_ptr<uint8_t>(), scales.data_ptr<bf16>(), zeros.data_ptr<bf16>(),
                    xp.x.data() + r0 * xp.Kp, xp.scales.data() + r0 * nb, xp.sums.data() + r0 * xp.groups,
                    y.data() + r0 * N, N, K, xp.Kp, group_size, xp.groups};
  };
#ifdef QWEN3VL_AMX
  if (M >= kAmxMinRows && K % 128 == 0 && xp.groups % 2 == 0 && N >= 16 && amx(-1)) {
    const int64_t chunks = N / 16;
    for (int64_t r0 = 0; r0 < M; r0 += kMaxRows) {
      const int64_t mb = std::min<int64_t>(kMaxRows, M - r0);
      const Int4Tiles tiles = int4_tiles(xp, r0, mb, K, group_size);
      const Int4Args a = args(r0);
      at::parallel_for(0, chunks, 2, [&](int64_t lo, int64_t hi) {
        DISPATCH_ROWS(mb, int4_rows_amx, a, tiles, lo * 16, hi * 16);
        if (hi == chunks && N % 16) DISPATCH_ROWS(mb, int4_rows, a, chunks * 16, N, gidx);
      });
    }
    return epilogue(y, x, N, false);
  }
#endif
  parallel_rows(M, N, [&](int64_t lo, int64_t hi, int64_t r0, int64_t mb) {
    const Int4Args a = args(r0);
    DISPATCH_ROWS(mb, int4_rows, a, lo, hi, gidx);
  });
  return epilogue(y, x, N, false);
}

at::Tensor int4_gemv_multi(const at::Tensor& x_, const at::Tensor& qweight, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group_size, const at::Tensor& idx) {
  const at::Tensor x = x_.contiguous();
  const int64_t N = check_int4(x, qweight, scales, zeros, group_size, 3, "int4_gemv_multi"), K = x.size(1);
  const Multi mu = multi_args(x, idx, qweight.size(0), "int4_gemv_multi");
  const Int4Rows xp = prepare_int4(x, group_size);
  const int64_t groups = xp.groups, nb = xp.Kp / 128;
  std::vector<float> y(mu.J * N);
  const __m512i gidx = int4_group_index(group_size);
  parallel_multi(mu.J, N, [&](int64_t j, int64_t lo, int64_t hi) {
    const int64_t e = mu.e[j], xr = mu.xrow(j);
    const Int4Args a{qweight.data_ptr<uint8_t>() + e * N * (K / 2), scales.data_ptr<bf16>() + e * N * groups,
                     zeros.data_ptr<bf16>() + e * N * groups, xp.x.data() + xr * xp.Kp, xp.scales.data() + xr * nb,
                     xp.sums.data() + xr * groups, y.data() + j * N, N, K, xp.Kp, group_size, groups};
    int4_rows<1>(a, lo, hi, gidx);
  });
  return epilogue(y, mu.J, N, false, x.options());
}

// ---------------------------------------------------------------------------------------------
// bf16: 32 weights per load, one vdpbf16ps per activation row.

struct BF16Args {
  const bf16* w;
  const bf16* x;  // (rows, Kp) zero padded
  float* y;       // (rows, N)
  int64_t N, K, Kp;
};

template <int MB, int R>
ALWAYS_INLINE void bf16_block(const BF16Args& a, int64_t n0) {
  __m512 acc[R][MB];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) acc[r][m] = _mm512_setzero_ps();
  const bf16* w = a.w + n0 * a.K;
  int64_t k = 0;
  for (; k + 32 <= a.K; k += 32) {
    prefetch_block<R, 8192>(w, 2 * k);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_loadu_si512(w + r * a.K + k);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(v), as_bh(_mm512_loadu_si512(a.x + m * a.Kp + k)));
    }
  }
  if (k < a.K) {
    const __mmask32 tail = (__mmask32)((1ull << (a.K - k)) - 1);
    for (int r = 0; r < R; ++r) {
      const __m512i v = _mm512_maskz_loadu_epi16(tail, w + r * a.K + k);
      for (int m = 0; m < MB; ++m)
        acc[r][m] = _mm512_dpbf16_ps(acc[r][m], as_bh(v), as_bh(_mm512_loadu_si512(a.x + m * a.Kp + k)));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MB; ++m) a.y[m * a.N + n0 + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int MB>
void bf16_rows_kernel(const BF16Args& a, int64_t lo, int64_t hi) {
  constexpr int R = MB <= 2 ? 8 : MB <= 4 ? 4 : 2;
  prefetch_head(a.w + lo * a.K, (hi - lo) * a.K * 2, 8192);
  int64_t n = lo;
  for (; n + R <= hi; n += R) bf16_block<MB, R>(a, n);
  for (; n < hi; ++n) bf16_block<MB, 1>(a, n);
}

// Activation rows as bf16 (hi/lo pairs for float32), zero padded to Kp.
std::vector<bf16> prepare_bf16(const at::Tensor& x, const BF16Rows& rows, int64_t Kp) {
  std::vector<bf16> xb(rows.rows * Kp, bf16(0.f));
  for_each_bf16_row(x, [&](int64_t r, const bf16* src) { std::copy(src, src + x.size(1), xb.data() + r * Kp); });
  return xb;
}

at::Tensor bf16_gemv(const at::Tensor& x_, const at::Tensor& weight) {
  const at::Tensor x = x_.contiguous();
  check_x(x, "bf16_gemv");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
              weight.size(1) == x.size(1), "bf16_gemv: weight must be contiguous (N, K) bfloat16");
  const int64_t K = x.size(1), N = weight.size(0), Kp = (K + 31) / 32 * 32;
  const BF16Rows rows = bf16_rows(x);
  const std::vector<bf16> xb = prepare_bf16(x, rows, Kp);
  std::vector<float> y(rows.rows * N);
  parallel_rows(rows.rows, N, [&](int64_t lo, int64_t hi, int64_t r0, int64_t mb) {
    const BF16Args a{weight.data_ptr<bf16>(), xb.data() + r0 * Kp, y.data() + r0 * N, N, K, Kp};
    DISPATCH_ROWS(mb, bf16_rows_kernel, a, lo, hi);
  });
  return epilogue(y, x, N, rows.pairs);
}

at::Tensor bf16_gemv_multi(const at::Tensor& x_, const at::Tensor& weight, const at::Tensor& idx) {
  const at::Tensor x = x_.contiguous();
  check_x(x, "bf16_gemv_multi");
  TORCH_CHECK(weight.dim() == 3 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
              weight.size(2) == x.size(1), "bf16_gemv_multi: weight must be contiguous (E, N, K) bfloat16");
  const int64_t N = weight.size(1), K = x.size(1), Kp = (K + 31) / 32 * 32;
  const Multi mu = multi_args(x, idx, weight.size(0), "bf16_gemv_multi");
  const BF16Rows rows = bf16_rows(x);
  const int64_t rp = rows.pairs ? 2 : 1;
  const std::vector<bf16> xb = prepare_bf16(x, rows, Kp);
  std::vector<float> y(mu.J * rp * N);
  parallel_multi(mu.J, N, [&](int64_t j, int64_t lo, int64_t hi) {
    const BF16Args a{weight.data_ptr<bf16>() + mu.e[j] * N * K, xb.data() + mu.xrow(j) * rp * Kp,
                     y.data() + j * rp * N, N, K, Kp};
    if (rp == 1) bf16_rows_kernel<1>(a, lo, hi);
    else bf16_rows_kernel<2>(a, lo, hi);
  });
  return epilogue(y, mu.J, N, rows.pairs, x.options());
}

// ---------------------------------------------------------------------------------------------
// Dequantization to bf16 for prefill GEMMs (many activation rows: compute-bound, so the weight
// is expanded once per call and handed to the bf16 GEMM). One fused pass, fp32 arithmetic and a
// single rounding, ~10x the speed of the equivalent chain of PyTorch elementwise ops.

// Both write into ``out`` (N, K) contiguous bf16: callers reuse one buffer, since a fresh
// allocation per call costs more in page faults than the conversion itself.
static void check_out(const at::Tensor& out, int64_t N, int64_t K) {
  TORCH_CHECK(out.scalar_type() == at::kBFloat16 && out.is_contiguous() && out.dim() == 2 && out.size(0) == N &&
              out.size(1) == K, "dequant: out must be a contiguous (N, K) bfloat16 tensor");
}

void int8_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& out) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kChar && qweight.is_contiguous(),
              "int8_dequant: qweight must be contiguous (N, K) int8");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
              "int8_dequant: scales must be (N, 1) float32");
  check_out(out, N, K);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* sc = scales.data_ptr<float>();
  bf16* o = out.data_ptr<bf16>();
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const int8_t* qr = q + n * K;
      bf16* orow = o + n * K;
      const __m512 vs = _mm512_set1_ps(sc[n]);
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m512 f = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(qr + k)))), vs);
        _mm256_storeu_si256((__m256i*)(orow + k), (__m256i)_mm512_cvtneps_pbh(f));
      }
      for (; k < K; ++k) orow[k] = bf16(static_cast<float>(qr[k]) * sc[n]);
    }
  });
}

void int4_dequant(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& zeros,
                  int64_t group_size, const at::Tensor& out) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kByte && qweight.is_contiguous(),
              "int4_dequant: qweight must be contiguous (N, K/2) uint8");
  const int64_t N = qweight.size(0), K = qweight.size(1) * 2, G = group_size;
  TORCH_CHECK(G > 0 && G % 32 == 0 && K % G == 0, "int4_dequant: group size must be a multiple of 32 dividing K");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
              scales.numel() == N * (K / G) && zeros.numel() == N * (K / G) && scales.is_contiguous() &&
              zeros.is_contiguous(), "int4_dequant: scales/zeros must be (N, K/G) bfloat16");
  check_out(out, N, K);
  const uint8_t* q = qweight.data_ptr<uint8_t>();
  const bf16* sc = scales.data_ptr<bf16>();
  const bf16* ze = zeros.data_ptr<bf16>();
  bf16* o = out.data_ptr<bf16>();
  // Per group, a table of the 16 values bf16(code * s + z) (fp32 fma, one rounding), twice over so
  // that vpermw, which reads 5 index bits, ignores bit 4. 16 bytes = 32 codes: byte j holds
  // k = 2j (low nibble) and 2j + 1 (high nibble); word j of the widened bytes indexes k = 2j as it is.
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) int16_t inter[32];
  for (int i = 0; i < 32; ++i) inter[i] = static_cast<int16_t>(i % 2 ? 32 + i / 2 : i / 2);  // W0 H0 W1 H1 ...
  const __m512i interleave = _mm512_load_si512(inter);
  at::parallel_for(0, N, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) {
      const uint8_t* qr = q + n * (K / 2);
      bf16* orow = o + n * K;
      for (int64_t g = 0; g < K / G; ++g) {
        const float s = sc[n * (K / G) + g], z = static_cast<float>(ze[n * (K / G) + g]) - 8.f * s;  // w = code * s + z
        const __m256i t16 = (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(z)));
        const __m512i table = _mm512_inserti64x4(_mm512_castsi256_si512(t16), t16, 1);
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
          const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(qr + k / 2)));
          const __m512i idx = _mm512_permutex2var_epi16(_mm512_castsi256_si512(w), interleave,
                                                        _mm512_castsi256_si512(_mm256_srli_epi16(w, 4)));
          _mm512_storeu_si512(orow + k, _mm512_permutexvar_epi16(idx, table));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// ---------------------------------------------------------------------------------------------
// Decode attention: a few new query tokens against the KV cache, bf16 in and out, fp32 inside
// (scores, softmax and the weighted sum of values), with grouped-query heads (q head h reads kv
// head h / (H / Hkv), as SDPA's enable_gqa). One decode token of a 2B layer (16 heads over 8 kv
// heads, 256 cached tokens, 2 threads): SDPA's CPU flash kernel 39-55 us with the cache in L2,
// 100-140 us inside a decode step; this pass 26 us and ~78 us.

// Lane j = the sum of v[j]'s 16 lanes, for 16 vectors at once (a transpose-and-add tree: ~3
// shuffles/adds per vector where _mm512_reduce_add_ps takes ~8).
ALWAYS_INLINE __m512 sum16(const __m512 (&v)[16]) {
  __m512 w[8], u[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [v2i, v2i+1, v2i, v2i+1] partials
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per 128-bit lane: [v4i .. v4i+3] partials
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(w[2 * i], w[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // 128-bit lanes 0, 1: v8i..v8i+3 halves; 2, 3: v8i+4..v8i+7 halves
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}

// out + g * D + [0, 32 NC) = bf16(sum_l p[g * L + l] * v[l * stride + [0, 32 NC)]) for GB heads g,
// the accumulators in registers. Each 64-byte run of a v row is widened as its even and odd
// elements (one shift or mask each: half the uops of widening in order), interleaved at the end.
template <int NC, int GB>
void value_sum(const float* p, const bf16* v, int64_t stride, int64_t L, int64_t D, bf16* out) {
  __m512 ev[GB][NC], od[GB][NC];
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NC; ++c) ev[g][c] = od[g][c] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  for (int64_t l = 0; l < L; ++l) {
    for (int c = 0; c < NC; c += 2) _mm_prefetch((const char*)(v + (l + 16) * stride + 32 * c), _MM_HINT_T0);
    __m512 pl[GB];
    for (int g = 0; g < GB; ++g) pl[g] = _mm512_set1_ps(p[g * L + l]);
    for (int c = 0; c < NC; ++c) {
      const __m512i x = _mm512_loadu_si512(v + l * stride + 32 * c);
      const __m512 e = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16)), o = _mm512_castsi512_ps(_mm512_and_si512(x, high));
      for (int g = 0; g < GB; ++g) {
        ev[g][c] = _mm512_fmadd_ps(pl[g], e, ev[g][c]);
        od[g][c] = _mm512_fmadd_ps(pl[g], o, od[g][c]);
      }
    }
  }
  const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  for (int g = 0; g < GB; ++g)
    for (int c = 0; c < NC; ++c) {
      bf16* o = out + g * D + 32 * c;
      _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(_mm512_permutex2var_ps(ev[g][c], first, od[g][c])));
      _mm256_storeu_si256((__m256i*)(o + 16), (__m256i)_mm512_cvtneps_pbh(_mm512_permutex2var_ps(ev[g][c], second, od[g][c])));
    }
}

template <int GB>
void value_sums(const float* p, const bf16* v, int64_t stride, int64_t L, int64_t D, bf16* out) {
  for (int64_t d = 0; d < D; d += 128) {  // 128 dimensions (8 registers per head) per pass
    switch ((D - d) / 32) {
      case 1: value_sum<1, GB>(p, v + d, stride, L, D, out + d); break;
      case 2: value_sum<2, GB>(p, v + d, stride, L, D, out + d); break;
      case 3: value_sum<3, GB>(p, v + d, stride, L, D, out + d); break;
      default: value_sum<4, GB>(p, v + d, stride, L, D, out + d);
    }
  }
}

// q (B, H, T, D), k/v (B, Hkv, L, D): bf16, any strides with the last dimension contiguous; mask
// (B, 1, T, L) bool (True = attend, broadcast strides allowed) or undefined (all L keys).
// Returns (B, H, T, D) as a view of a (B, T, H, D) tensor (what the output projection reads).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.scalar_type() == at::kBFloat16 &&
              k.scalar_type() == at::kBFloat16 && v.scalar_type() == at::kBFloat16,
              "decode_attention: q, k, v must be 4-D bfloat16");
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.size(0) == B && v.size(0) == B && v.size(1) == Hkv && v.size(2) == L && k.size(3) == D &&
              v.size(3) == D && Hkv > 0 && H % Hkv == 0 && D % 32 == 0 && L > 0,
              "decode_attention: shapes must be q (B, H, T, D), k/v (B, Hkv, L, D), H % Hkv == 0, D % 32 == 0");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: the head dimension must be contiguous");
  const uint8_t* mp = nullptr;
  int64_t msb = 0, mst = 0, msl = 0;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == B && m.size(1) == 1 && m.size(2) == T &&
                m.size(3) == L, "decode_attention: mask must be (B, 1, T, L) bool");
    mp = reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
    msb = m.stride(0), mst = m.stride(2), msl = m.stride(3);
  }
  const int64_t G = H / Hkv;
  at::Tensor out = at::empty({B, T, H, D}, q.options());
  const bf16* qp = q.data_ptr<bf16>();
  const bf16* kp = k.data_ptr<bf16>();
  const bf16* vp = v.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv * T, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> s(G * L);  // scores, then softmax weights, per (q head of the group, key)
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / (Hkv * T), h = task / T % Hkv, t = task % T;
      const bf16* kb = kp + b * k.stride(0) + h * k.stride(1);
      const bf16* vb = vp + b * v.stride(0) + h * v.stride(1);
      const uint8_t* mrow = mp ? mp + b * msb + t * mst : nullptr;
      for (int64_t l0 = 0; l0 < L; l0 += 16) {  // scores of 16 keys at a time
        const int64_t nk = std::min<int64_t>(16, L - l0);
        // The keys two blocks ahead (or the first values): the rows are short streams from DRAM.
        for (int j = 0; j < 16; ++j) {
          const int64_t l = l0 + 32 + j;
          const char* row = l < L ? (const char*)(kb + l * k.stride(2)) : (const char*)(vb + (l - L) * v.stride(2));
          for (int64_t d = 0; d < D; d += 32) _mm_prefetch(row + 2 * d, _MM_HINT_T0);
        }
        for (int64_t g = 0; g < G; ++g) {
          const bf16* qr = qp + b * q.stride(0) + (h * G + g) * q.stride(1) + t * q.stride(2);
          __m512 a[16];
          for (int j = 0; j < 16; ++j) {
            a[j] = _mm512_setzero_ps();
            if (j >= nk) continue;
            const bf16* kr = kb + (l0 + j) * k.stride(2);
            for (int64_t d = 0; d < D; d += 32) {
              a[j] = _mm512_dpbf16_ps(a[j], as_bh(_mm512_loadu_si512(qr + d)), as_bh(_mm512_loadu_si512(kr + d)));
            }
          }
          __m512 sv = _mm512_mul_ps(sum16(a), _mm512_set1_ps(sc));
          if (mrow) {
            __mmask16 keep = 0;
            for (int j = 0; j < nk; ++j) keep |= (__mmask16)((mrow[(l0 + j) * msl] ? 1u : 0u) << j);
            sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, sv);
          }
          _mm512_mask_storeu_ps(s.data() + g * L + l0, (__mmask16)((1u << nk) - 1), sv);
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax over the keys, in place
        float* sg = s.data() + g * L;
        float mx = -INFINITY;
        for (int64_t l = 0; l < L; ++l) mx = std::max(mx, sg[l]);
        __m512 tot = _mm512_setzero_ps();
        for (int64_t l = 0; l < L; l += 16) {
          const __mmask16 lm = L - l >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - l)) - 1);
          const __m512 x = _mm512_maskz_loadu_ps(lm, sg + l);
          const __mmask16 live = _mm512_mask_cmp_ps_mask(lm, x, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
          const __m512 w = _mm512_maskz_mov_ps(live, exp_ps(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
          _mm512_mask_storeu_ps(sg + l, lm, w);
          tot = _mm512_add_ps(tot, w);
        }
        const float inv = 1.f / _mm512_reduce_add_ps(tot);
        for (int64_t l = 0; l < L; ++l) sg[l] *= inv;
      }
      bf16* og = op + ((b * T + t) * H + h * G) * D;  // the group's G heads are adjacent in (B, T, H, D)
      int64_t g = 0;
      for (; g + 2 <= G; g += 2) value_sums<2>(s.data() + g * L, vb, v.stride(2), L, D, og + g * D);
      if (g < G) value_sums<1>(s.data() + g * L, vb, v.stride(2), L, D, og + g * D);
    }
  });
  return out.permute({0, 2, 1, 3});
}

}  // namespace

TORCH_LIBRARY(qwen3vl_kernels, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor", &int8_gemv);
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_gemv);
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor", &bf16_gemv);
  m.def("amx(int mode) -> bool", &amx);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor", &decode_attention);
  m.def("int8_gemv_multi(Tensor x, Tensor qweight, Tensor scales, Tensor idx) -> Tensor", &int8_gemv_multi);
  m.def("int4_gemv_multi(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor idx) -> Tensor",
        &int4_gemv_multi);
  m.def("bf16_gemv_multi(Tensor x, Tensor weight, Tensor idx) -> Tensor", &bf16_gemv_multi);
  m.def("int8_dequant(Tensor qweight, Tensor scales, Tensor(a!) out) -> ()", &int8_dequant);
  m.def("int4_dequant(Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()",
        &int4_dequant);
}
