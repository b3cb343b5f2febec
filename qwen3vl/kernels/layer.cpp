// One dense decoder layer for one new token in one call (batch-1 decode on CPU), built from the
// other kernels of torch.ops.qwen3vl_kernels (looked up in the dispatcher) plus the cache write
// and the residual adds. The layer-by-layer Python path issues ~40 small ops per layer; after each
// weight matrix has streamed through the caches their interpreter and dispatcher state is cold,
// and re-fetching it costs ~0.3 ms per layer, ~7 % of a 2B bf16 step. Same kernels, same
// arithmetic, same rounding as that path, so the results are bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>

namespace {

using Tensor = at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// x (1, K) times a weight in one of the formats: [weight] bf16, [qweight, scales] int8 or
// [qweight, scales, zeros] int4 (group_size), as the layer's Linear / QuantLinear would.
Tensor linear(const Tensor& x, at::TensorList w, int64_t group_size) {
  static auto bf16 = find<Tensor(const Tensor&, const Tensor&)>("qwen3vl_kernels::bf16_gemv");
  static auto int8 = find<Tensor(const Tensor&, const Tensor&, const Tensor&)>("qwen3vl_kernels::int8_gemv");
  static auto int4 = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
      "qwen3vl_kernels::int4_gemv");
  switch (w.size()) {
    case 1: return bf16.call(x, w[0]);
    case 2: return int8.call(x, w[0], w[1]);
    case 3: return int4.call(x, w[0], w[1], w[2], group_size);
  }
  TORCH_CHECK(false, "decode_layer: a weight is [weight], [qweight, scales] or [qweight, scales, zeros]");
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  static auto op = find<Tensor(const Tensor&, const Tensor&, double)>("qwen3vl_kernels::rms_norm_bf16");
  return op.call(x, w, eps);
}

// x (1, 1, H) bf16 -> the layer's output (1, 1, H). The new token's key and value are written at
// cache index `pos` of k_cache / v_cache ((1, Hkv, S, D) views of one slot) and it attends to
// indices [0, pos]. qk_norm is (H + Hkv, D): q_norm's weight per query head, then k_norm's.
Tensor decode_layer(const Tensor& x, const Tensor& in_norm, at::TensorList qkv_w, const Tensor& qk_norm,
                    const Tensor& cos, const Tensor& rot_sin, const Tensor& k_cache, const Tensor& v_cache,
                    int64_t pos, at::TensorList o_w, const Tensor& post_norm, at::TensorList gate_up_w,
                    at::TensorList down_w, double eps, int64_t group_size) {
  static auto norm_rope = find<Tensor(const Tensor&, const Tensor&, double, const Tensor&, const Tensor&)>(
      "qwen3vl_kernels::rms_norm_rope_bf16");
  static auto attention = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                      double)>("qwen3vl_kernels::decode_attention");
  static auto silu_mul = find<Tensor(const Tensor&)>("qwen3vl_kernels::silu_mul_bf16");
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.scalar_type() == at::kBFloat16,
              "decode_layer: x must be (1, 1, H) bfloat16");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(0) == 1 &&
              k_cache.scalar_type() == at::kBFloat16 && v_cache.scalar_type() == at::kBFloat16 &&
              k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "decode_layer: k_cache / v_cache must be (1, Hkv, S, D) bfloat16 with contiguous D");
  const int64_t H = x.size(2), Hkv = k_cache.size(1), D = k_cache.size(3), Hqk = qk_norm.size(0), Hq = Hqk - Hkv;
  TORCH_CHECK(qk_norm.dim() == 2 && qk_norm.size(1) == D && Hq > 0 && 0 <= pos && pos < k_cache.size(2),
              "decode_layer: qk_norm must be (H + Hkv, D) and 0 <= pos < S");
  const Tensor x2 = x.view({1, H});
  const Tensor qkv = linear(rms_norm(x2, in_norm, eps), qkv_w, group_size).view({1, 1, Hqk + Hkv, D});
  const Tensor qk = norm_rope.call(qkv.narrow(2, 0, Hqk), qk_norm, eps, cos, rot_sin);  // (1, 1, Hq + Hkv, D)
  const at::BFloat16* kn = qk.data_ptr<at::BFloat16>() + Hq * D;
  const at::BFloat16* vn = qkv.data_ptr<at::BFloat16>() + Hqk * D;
  for (int64_t h = 0; h < Hkv; ++h) {
    std::memcpy(k_cache.data_ptr<at::BFloat16>() + h * k_cache.stride(1) + pos * k_cache.stride(2), kn + h * D, D * 2);
    std::memcpy(v_cache.data_ptr<at::BFloat16>() + h * v_cache.stride(1) + pos * v_cache.stride(2), vn + h * D, D * 2);
  }
  const Tensor q = qk.narrow(2, 0, Hq).transpose(1, 2);  // (1, Hq, 1, D)
  const Tensor o = attention.call(q, k_cache.narrow(2, 0, pos + 1), v_cache.narrow(2, 0, pos + 1), c10::nullopt,
                                  std::pow(static_cast<double>(D), -0.5));  // (1, Hq, 1, D) view of (1, 1, Hq, D)
  const Tensor h1 = at::add(x2, linear(o.transpose(1, 2).reshape({1, Hq * D}), o_w, group_size));  // (1, H)
  const Tensor mlp = linear(silu_mul.call(linear(rms_norm(h1, post_norm, eps), gate_up_w, group_size)), down_w,
                            group_size);
  return at::add(h1, mlp).view({1, 1, H});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen3vl_kernels, m) {
  m.def("decode_layer(Tensor x, Tensor in_norm, Tensor[] qkv, Tensor qk_norm, Tensor cos, Tensor rot_sin, "
        "Tensor(a!) k_cache, Tensor(b!) v_cache, int pos, Tensor[] o, Tensor post_norm, Tensor[] gate_up, "
        "Tensor[] down, float eps, int group_size) -> Tensor", &decode_layer);
}
