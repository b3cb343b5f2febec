// Dequantization to bf16 for prefill GEMMs, registered into torch.ops.qwen3vl_kernels:
//   int8_dequant(qweight (N,K) int8, scales (N,1) f32, out)
//   int4_dequant(qweight (N,K/2) u8, scales, zeros (N,K/G) bf16, group_size, out)
// (the formats of gemv.cpp). The Python fallback (qwen3vl/kernels/reference.py) is the same
// definition: fp32 arithmetic, one rounding to bf16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>
#include <torch/library.h>

#include "simd.h"

#include <cstdint>

namespace {

using namespace qwen3vl_simd;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen3vl_kernels, m) {
  m.def("int8_dequant(Tensor qweight, Tensor scales, Tensor(a!) out) -> ()", &int8_dequant);
  m.def("int4_dequant(Tensor qweight, Tensor scales, Tensor zeros, int group_size, Tensor(a!) out) -> ()",
        &int4_dequant);
}
