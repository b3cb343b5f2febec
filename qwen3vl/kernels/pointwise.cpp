// Pointwise kernels (bf16, fp32 inside) for the decoder and the vision encoder, registered into
// torch.ops.qwen3vl_kernels next to gemv.cpp's: RMS norm, q/k norm + rotary embedding, SwiGLU,
// tanh-GELU and the vision encoder's rotary embedding. Each is one pass over its input; the stock
// versions are several ops with a full-size temporary each. Rows are split across threads in
// chunks of >= kGrainElems elements, so decode-sized calls stay on the calling thread.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "simd.h"

namespace {

using namespace qwen3vl_simd;

constexpr int64_t kGrainElems = 16384;

// Rows per parallel task for rows of `width` elements.
int64_t grain(int64_t width) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(width, 1)); }

// RMS normalisation of bf16 rows, as the model defines it: in fp32, rounded to bf16,
// then times the bf16 weight and rounded again. weight is (W, D); row r of x uses weight row r % W
// (W = 1: one weight for all rows; W = heads: per-head q/k norms). One pass and one allocation,
// where the stock path is ~10 small ops (~20 us per call at decode, 13+ calls per step) and, in
// prefill, three passes over fp32 copies.

// One row: orow = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))).
void norm_row(const bf16* xr, const bf16* wr, int64_t D, double eps, bf16* orow) {
  __m512 acc = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= D; k += 16) {
    const __m512 v = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i*)(xr + k)));
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  float ss = _mm512_reduce_add_ps(acc);
  for (; k < D; ++k) ss += static_cast<float>(xr[k]) * static_cast<float>(xr[k]);
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + static_cast<float>(eps));
  const __m512 vinv = _mm512_set1_ps(inv);
  for (k = 0; k + 16 <= D; k += 16) {
    const __m512 n = round_bf16(_mm512_mul_ps(load_bf16_ps(0xFFFF, xr + k), vinv));
    _mm256_storeu_si256((__m256i*)(orow + k), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16_ps(0xFFFF, wr + k), n)));
  }
  for (; k < D; ++k) orow[k] = bf16(static_cast<float>(wr[k]) * static_cast<float>(bf16(static_cast<float>(xr[k]) * inv)));
}

at::Tensor rms_norm_bf16(const at::Tensor& x_, const at::Tensor& weight_, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && weight_.scalar_type() == at::kBFloat16,
              "rms_norm_bf16: x and weight must be bfloat16");
  const int64_t D = x_.size(-1);
  const at::Tensor x = x_.contiguous(), weight = weight_.contiguous();
  TORCH_CHECK(D > 0 && weight.numel() % D == 0 && weight.numel() > 0, "rms_norm_bf16: weight must be (W, D)");
  const int64_t R = x.numel() / D, W = weight.numel() / D;
  at::Tensor out = at::empty(x.sizes(), x.options());
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* wp = weight.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  at::parallel_for(0, R, grain(D), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) norm_row(xp + r * D, wp + (r % W) * D, D, eps, op + r * D);
  });
  return out;
}

// Per-head q/k RMS norm followed by the rotary embedding, rounded after every step as the
// separate bf16 ops do (so bit-identical to them): x (B, T, Hh, D) (heads contiguous), weight
// (Hh, D), cos and rot_sin (B, T, 1, D) with the first half of sin negated (see AttnContext):
//   out = bf16(bf16(n * cos) + bf16(roll(n, D/2) * rot_sin)),  n = the normalised row.
at::Tensor rms_norm_rope_bf16(const at::Tensor& x, const at::Tensor& weight_, double eps, const at::Tensor& cos,
                              const at::Tensor& rot_sin) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight_.scalar_type() == at::kBFloat16 &&
              cos.scalar_type() == at::kBFloat16 && rot_sin.scalar_type() == at::kBFloat16,
              "rms_norm_rope_bf16: all inputs must be bfloat16");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.stride(2) == x.size(3) && x.size(3) % 2 == 0,
              "rms_norm_rope_bf16: x must be (B, T, heads, D) with contiguous heads");
  const int64_t B = x.size(0), T = x.size(1), Hh = x.size(2), D = x.size(3);
  const at::Tensor weight = weight_.contiguous();
  TORCH_CHECK(weight.numel() == Hh * D, "rms_norm_rope_bf16: weight must be (heads, D)");
  for (const at::Tensor* t : {&cos, &rot_sin})
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(1) == T && t->size(2) == 1 && t->size(3) == D &&
                t->stride(3) == 1, "rms_norm_rope_bf16: cos/rot_sin must be (B, T, 1, D)");
  at::Tensor out = at::empty({B, T, Hh, D}, x.options());
  const int64_t h = D / 2;
  at::parallel_for(0, B * T, grain(Hh * D), [&](int64_t lo, int64_t hi) {
    std::vector<bf16> n(D);
    for (int64_t bt = lo; bt < hi; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const bf16* c = cos.data_ptr<bf16>() + b * cos.stride(0) + t * cos.stride(1);
      const bf16* rs = rot_sin.data_ptr<bf16>() + b * rot_sin.stride(0) + t * rot_sin.stride(1);
      for (int64_t hd = 0; hd < Hh; ++hd) {
        norm_row(x.data_ptr<bf16>() + b * x.stride(0) + t * x.stride(1) + hd * D, weight.data_ptr<bf16>() + hd * D, D,
                 eps, n.data());
        bf16* o = out.data_ptr<bf16>() + ((b * T + t) * Hh + hd) * D;
        int64_t k = 0;
        if (h % 16 == 0)  // 16 lanes at a time; the rolled half is then whole vectors too
          for (; k < D; k += 16) {
            const __m512 a = round_bf16(_mm512_mul_ps(load_bf16_ps(0xFFFF, n.data() + k), load_bf16_ps(0xFFFF, c + k)));
            const __m512 r = round_bf16(_mm512_mul_ps(load_bf16_ps(0xFFFF, n.data() + (k + h) % D), load_bf16_ps(0xFFFF, rs + k)));
            _mm256_storeu_si256((__m256i*)(o + k), (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(a, r)));
          }
        for (; k < D; ++k) {
          const float a = static_cast<float>(bf16(static_cast<float>(n[k]) * static_cast<float>(c[k])));
          const float r = static_cast<float>(bf16(static_cast<float>(n[(k + h) % D]) * static_cast<float>(rs[k])));
          o[k] = bf16(a + r);
        }
      }
    }
  });
  return out;
}

// SwiGLU's activation: x (..., 2I) = [gate | up] -> bf16(bf16(silu(gate)) * up),
// rounded as the separate bf16 ops round (silu in fp32, its exp within 2e-7 of the libm one).
at::Tensor silu_mul_bf16(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16 && x_.size(-1) % 2 == 0, "silu_mul_bf16: x must be (..., 2I) bfloat16");
  const at::Tensor x = x_.contiguous();
  const int64_t I = x.size(-1) / 2, R = x.numel() / (2 * I);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, R, grain(I), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r)
      for (int64_t k = 0; k < I; k += 16) {
        const __mmask16 m = lanes(I - k);
        const __m512 g = load_bf16_ps(m, xp + r * 2 * I + k), u = load_bf16_ps(m, xp + r * 2 * I + I + k);
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        const __m512 sr = round_bf16(s);
        _mm256_mask_storeu_epi16(op + r * I + k, m, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sr, u)));
      }
  });
  return out;
}

// tanh-approximated GELU of bf16 x: bf16(x * 0.5 * (1 + tanh(u))), u = sqrt(2/pi) (x + 0.044715 x^3),
// computed as x / (1 + exp(-2u)) (the same value: 0.5 (1 + tanh(u)) = sigmoid(2u)) in fp32. The
// stock bf16 kernel evaluates tanh through a slower vectorized libm path (3.2 ms for the 784x4096
// activations of a 448x448 image's vision MLP, 2 threads; this pass ~0.4 ms); results agree
// to fp32 rounding before the final bf16 rounding.
at::Tensor gelu_tanh_bf16(const at::Tensor& x_) {
  TORCH_CHECK(x_.scalar_type() == at::kBFloat16, "gelu_tanh_bf16: x must be bfloat16");
  const at::Tensor x = x_.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const bf16* xp = x.data_ptr<bf16>();
  bf16* op = out.data_ptr<bf16>();
  const __m512 beta = _mm512_set1_ps(-2.f * 0.7978845608028654f), kappa = _mm512_set1_ps(0.044715f);
  const __m512 one = _mm512_set1_ps(1.f);
  at::parallel_for(0, x.numel(), kGrainElems, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i += 16) {
      const __mmask16 m = lanes(hi - i);
      const __m512 v = load_bf16_ps(m, xp + i);
      const __m512 u = _mm512_mul_ps(beta, _mm512_fmadd_ps(_mm512_mul_ps(kappa, v), _mm512_mul_ps(v, v), v));
      const __m512 y = _mm512_div_ps(v, _mm512_add_ps(one, exp_ps(u)));
      _mm256_mask_storeu_epi16(op + i, m, (__m256i)_mm512_cvtneps_pbh(y));
    }
  });
  return out;
}

// The vision encoder's rotary embedding of q and k, read from the fused qkv projection's output
// qkv (N, 3, H, D) (any strides, D contiguous; bf16 or fp32) with float32 cos and sin (N, D):
// out (2, N, H, D) in qkv's dtype = [q, k] with x -> x * cos + rotate_half(x) * sin computed in
// fp32 and rounded once to the dtype, as the reference does, with each product and the sum
// rounded separately (no fused multiply-add): bit-identical to the eager ops.
at::Tensor vision_rope(const at::Tensor& qkv, const at::Tensor& cos_, const at::Tensor& sin_) {
  TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3 && qkv.stride(3) == 1 && qkv.size(3) % 2 == 0,
              "vision_rope: qkv must be (N, 3, H, D) with D even and contiguous");
  TORCH_CHECK(qkv.scalar_type() == at::kBFloat16 || qkv.scalar_type() == at::kFloat,
              "vision_rope: qkv must be bfloat16 or float32");
  const int64_t N = qkv.size(0), H = qkv.size(2), D = qkv.size(3), h = D / 2;
  const at::Tensor cos = cos_.contiguous(), sin = sin_.contiguous();
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.numel() == N * D &&
              sin.numel() == N * D, "vision_rope: cos and sin must be float32 (N, D)");
  const bool is_bf16 = qkv.scalar_type() == at::kBFloat16;
  at::Tensor out = at::empty({2, N, H, D}, qkv.options());
  const char* in = (const char*)qkv.data_ptr();
  char* dst = (char*)out.data_ptr();
  const int64_t es = qkv.element_size();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  constexpr int R = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;  // explicit rounding: never contracted to FMA
  at::parallel_for(0, N, grain(2 * H * D), [&](int64_t lo, int64_t hi) {
    std::vector<float> x(D), y(D);
    for (int64_t n = lo; n < hi; ++n) {
      const float* c = cp + n * D;
      const float* s = sp + n * D;
      for (int64_t w = 0; w < 2; ++w)
        for (int64_t hd = 0; hd < H; ++hd) {
          const char* row = in + (n * qkv.stride(0) + w * qkv.stride(1) + hd * qkv.stride(2)) * es;
          char* orow = dst + (((w * N + n) * H + hd) * D) * es;
          int64_t k = 0;
          if (is_bf16)
            for (; k + 16 <= D; k += 16) _mm512_storeu_ps(x.data() + k, load_bf16_ps(0xFFFF, (const bf16*)row + k));
          for (; k < D; ++k) x[k] = is_bf16 ? static_cast<float>(((const bf16*)row)[k]) : ((const float*)row)[k];
          k = 0;
          if (h % 16 == 0)
            for (; k < D; k += 16) {
              __m512 rot = _mm512_loadu_ps(x.data() + (k + h) % D);  // rotate_half: [-x2, x1]
              if (k < h) rot = _mm512_sub_ps(_mm512_setzero_ps(), rot);
              const __m512 a = _mm512_mul_round_ps(_mm512_loadu_ps(x.data() + k), _mm512_loadu_ps(c + k), R);
              const __m512 b = _mm512_mul_round_ps(rot, _mm512_loadu_ps(s + k), R);
              _mm512_storeu_ps(y.data() + k, _mm512_add_round_ps(a, b, R));
            }
          for (; k < D; ++k) {
            const float rot = k < h ? -x[k + h] : x[k - h];
            volatile float a = x[k] * c[k], b = rot * s[k];  // volatile: no contraction either
            y[k] = a + b;
          }
          k = 0;
          if (is_bf16)
            for (; k + 16 <= D; k += 16)
              _mm256_storeu_si256((__m256i*)((bf16*)orow + k), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(y.data() + k)));
          for (; k < D; ++k) {
            if (is_bf16)
              ((bf16*)orow)[k] = bf16(y[k]);
            else
              ((float*)orow)[k] = y[k];
          }
        }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen3vl_kernels, m) {
  m.def("rms_norm_bf16(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm_bf16);
  m.def("rms_norm_rope_bf16(Tensor x, Tensor weight, float eps, Tensor cos, Tensor rot_sin) -> Tensor", &rms_norm_rope_bf16);
  m.def("silu_mul_bf16(Tensor x) -> Tensor", &silu_mul_bf16);
  m.def("gelu_tanh_bf16(Tensor x) -> Tensor", &gelu_tanh_bf16);
  m.def("vision_rope(Tensor qkv, Tensor cos, Tensor sin) -> Tensor", &vision_rope);
}
