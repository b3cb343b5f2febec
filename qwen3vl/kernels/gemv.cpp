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
// Shared helpers live in gemv.h, the int8/int4 VNNI kernels in vnni.h, their AMX tile paths for
// 5-8 activation rows in amx.cpp.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "vnni.h"

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

using namespace qwen3vl_gemv;

// Activation rows -> int16 with one scale per row, zero padded to Kp.
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

// Activation rows quantized and permuted into the int4 kernel's order, with block scales and
// per-group sums (Int4Rows).
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
  if (int4_gemv_amx(args(0), xp, M, gidx)) return epilogue(y, x, N, false);
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
}  // namespace

// The other kernel sources add theirs with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(qwen3vl_kernels, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales) -> Tensor", &int8_gemv);
  m.def("int4_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor", &int4_gemv);
  m.def("bf16_gemv(Tensor x, Tensor weight) -> Tensor", &bf16_gemv);
  m.def("int8_gemv_multi(Tensor x, Tensor qweight, Tensor scales, Tensor idx) -> Tensor", &int8_gemv_multi);
  m.def("int4_gemv_multi(Tensor x, Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor idx) -> Tensor",
        &int4_gemv_multi);
  m.def("bf16_gemv_multi(Tensor x, Tensor weight, Tensor idx) -> Tensor", &bf16_gemv_multi);
}
