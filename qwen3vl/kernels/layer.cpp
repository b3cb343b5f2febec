// Dense decoder layers for one new token per sequence in one call (decode on CPU), built from the
// other kernels of torch.ops.qwen3vl_kernels (looked up in the dispatcher) plus the cache writes
// and the residual adds. The module path issues ~40 small ops per layer from Python; after each
// weight matrix has streamed through the caches their interpreter and dispatcher state is cold,
// and re-fetching it costs ~0.3 ms per layer, ~7 % of a 2B bf16 step. Same kernels, same
// arithmetic, same rounding as that path, so the results are bit-identical to it.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using Tensor = at::Tensor;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// x (B, K) times a weight in one of the formats: [weight] bf16, [qweight, scales] int8 or
// [qweight, scales, zeros] int4 (group_size), as the layer's Linear / QuantLinear would; or a
// split bf16 projection's parts [w0, w1, ...] (SplitLinear): each part's product, concatenated.
Tensor linear(const Tensor& x, at::TensorList w, int64_t group_size) {
  static auto bf16 = find<Tensor(const Tensor&, const Tensor&)>("qwen3vl_kernels::bf16_gemv");
  static auto int8 = find<Tensor(const Tensor&, const Tensor&, const Tensor&)>("qwen3vl_kernels::int8_gemv");
  static auto int4 = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t)>(
      "qwen3vl_kernels::int4_gemv");
  if (w.size() > 1 && w[0].scalar_type() == at::kBFloat16) {
    std::vector<Tensor> parts;
    for (const Tensor& part : w) parts.push_back(bf16.call(x, part));
    return at::cat(parts, 1);
  }
  switch (w.size()) {
    case 1: return bf16.call(x, w[0]);
    case 2: return int8.call(x, w[0], w[1]);
    case 3: return int4.call(x, w[0], w[1], w[2], group_size);
  }
  TORCH_CHECK(false, "decode_layers: a weight is [weight], [qweight, scales] or [qweight, scales, zeros]");
}

Tensor rms_norm(const Tensor& x, const Tensor& w, double eps) {
  static auto op = find<Tensor(const Tensor&, const Tensor&, double)>("qwen3vl_kernels::rms_norm_bf16");
  return op.call(x, w, eps);
}

// One layer's tensors: in_norm, q_norm, k_norm, post_norm, then the q/k/v, o, gate/up and down
// projections' tensors (counts given separately).
struct Layer {
  const Tensor *in_norm, *q_norm, *k_norm, *post_norm;
  at::TensorList qkv, o, gate_up, down;
};

// One layer on x (B, H) bf16 -> (B, H), one new token per row. Row b's key and value are written
// at cache index pos[b] of k_cache / v_cache ((B, Hkv, S, D): the rows' slots) and it attends to
// the first `end` indices, where mask (B, 1, 1, end) allows (all of them without one).
Tensor layer_step(const Tensor& x, const Tensor& cos, const Tensor& rot_sin, const Tensor& k_cache,
                  const Tensor& v_cache, at::IntArrayRef pos, int64_t end, const c10::optional<Tensor>& mask,
                  const Layer& w, double eps, int64_t group_size) {
  static auto norm_rope = find<Tensor(const Tensor&, const Tensor&, double, const Tensor&, const Tensor&)>(
      "qwen3vl_kernels::rms_norm_rope_bf16");
  static auto attention = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const c10::optional<Tensor>&,
                                      double)>("qwen3vl_kernels::decode_attention");
  static auto silu_mul = find<Tensor(const Tensor&)>("qwen3vl_kernels::silu_mul_bf16");
  const int64_t B = x.size(0), Hkv = k_cache.size(1), D = k_cache.size(3);
  const Tensor qkv = linear(rms_norm(x, *w.in_norm, eps), w.qkv, group_size);  // (B, (Hq + 2 Hkv) D)
  const int64_t Hq = qkv.size(1) / D - 2 * Hkv;
  TORCH_CHECK(qkv.size(1) == (Hq + 2 * Hkv) * D && Hq > 0 && w.q_norm->numel() == D && w.k_norm->numel() == D,
              "decode_layers: q/k/v projection and norms do not match the cache's heads");
  // q and k normalised and rotated in one pass, with per-head weights (Hq + Hkv, D).
  const Tensor qk_norm = at::cat({w.q_norm->view({1, D}).expand({Hq, D}), w.k_norm->view({1, D}).expand({Hkv, D})});
  const Tensor qkv4 = qkv.view({B, 1, Hq + 2 * Hkv, D});
  const Tensor qk = norm_rope.call(qkv4.narrow(2, 0, Hq + Hkv), qk_norm, eps, cos, rot_sin);  // (B, 1, Hq + Hkv, D)
  for (int64_t b = 0; b < B; ++b) {
    const at::BFloat16* kn = qk.data_ptr<at::BFloat16>() + (b * (Hq + Hkv) + Hq) * D;
    const at::BFloat16* vn = qkv.data_ptr<at::BFloat16>() + (b * (Hq + 2 * Hkv) + Hq + Hkv) * D;
    at::BFloat16* kc = k_cache.data_ptr<at::BFloat16>() + b * k_cache.stride(0) + pos[b] * k_cache.stride(2);
    at::BFloat16* vc = v_cache.data_ptr<at::BFloat16>() + b * v_cache.stride(0) + pos[b] * v_cache.stride(2);
    for (int64_t h = 0; h < Hkv; ++h) {
      std::memcpy(kc + h * k_cache.stride(1), kn + h * D, D * 2);
      std::memcpy(vc + h * v_cache.stride(1), vn + h * D, D * 2);
    }
  }
  const Tensor o = attention.call(qk.narrow(2, 0, Hq).transpose(1, 2), k_cache.narrow(2, 0, end),
                                  v_cache.narrow(2, 0, end), mask,
                                  std::pow(static_cast<double>(D), -0.5));  // (B, Hq, 1, D) view of (B, 1, Hq, D)
  const Tensor h1 = at::add(x, linear(o.transpose(1, 2).reshape({B, Hq * D}), w.o, group_size));  // (B, H)
  const Tensor mlp = linear(silu_mul.call(linear(rms_norm(h1, *w.post_norm, eps), w.gate_up, group_size)), w.down,
                            group_size);
  return at::add(h1, mlp);
}

// x (B, 1, H) bf16 through the layers in `layout` -> (B, 1, H), one new token per row. Per layer,
// layout holds (cache layer index, tensors of q/k/v, of o, of gate/up, of down) and `weights` its
// norms then projections (see Layer). Row b is cache slot slot + b of k_cache / v_cache (layers,
// slots, Hkv, S, D); its token goes to index pos[b] and attends to [0, end) where mask
// (B, 1, 1, end) allows (everywhere without one).
Tensor decode_layers(const Tensor& x, const Tensor& cos, const Tensor& rot_sin, const Tensor& k_cache,
                     const Tensor& v_cache, int64_t slot, at::IntArrayRef pos, int64_t end,
                     const c10::optional<Tensor>& mask, at::TensorList weights, at::IntArrayRef layout, double eps,
                     int64_t group_size) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.scalar_type() == at::kBFloat16,
              "decode_layers: x must be (B, 1, H) bfloat16");
  const int64_t B = x.size(0);
  TORCH_CHECK(k_cache.dim() == 5 && v_cache.sizes() == k_cache.sizes() && k_cache.scalar_type() == at::kBFloat16 &&
              v_cache.scalar_type() == at::kBFloat16 && k_cache.stride(4) == 1 && v_cache.stride(4) == 1 &&
              0 <= slot && slot + B <= k_cache.size(1) && static_cast<int64_t>(pos.size()) == B && 0 < end &&
              end <= k_cache.size(3),
              "decode_layers: caches must be (layers, slots, Hkv, S, D) bfloat16, slots, pos and end inside them");
  for (const int64_t p : pos) TORCH_CHECK(0 <= p && p < end, "decode_layers: slot and pos inside the cache (pos < end)");
  TORCH_CHECK(layout.size() % 5 == 0, "decode_layers: layout holds 5 numbers per layer");
  Tensor h = x.view({B, x.size(2)});
  size_t t = 0;
  for (size_t i = 0; i < layout.size(); i += 5) {
    const int64_t layer = layout[i];
    TORCH_CHECK(0 <= layer && layer < k_cache.size(0), "decode_layers: layer index outside the cache");
    size_t need = 4;
    for (int j = 1; j < 5; ++j) {
      TORCH_CHECK(1 <= layout[i + j] && layout[i + j] <= 3, "decode_layers: a projection has 1, 2 or 3 tensors");
      need += layout[i + j];
    }
    TORCH_CHECK(t + need <= weights.size(), "decode_layers: fewer weights than the layout lists");
    const Layer w{&weights[t], &weights[t + 1], &weights[t + 2], &weights[t + 3],
                  weights.slice(t + 4, layout[i + 1]), weights.slice(t + 4 + layout[i + 1], layout[i + 2]),
                  weights.slice(t + 4 + layout[i + 1] + layout[i + 2], layout[i + 3]),
                  weights.slice(t + 4 + layout[i + 1] + layout[i + 2] + layout[i + 3], layout[i + 4])};
    t += need;
    h = layer_step(h, cos, rot_sin, k_cache[layer].narrow(0, slot, B), v_cache[layer].narrow(0, slot, B), pos, end,
                   mask, w, eps, group_size);
  }
  TORCH_CHECK(t == weights.size(), "decode_layers: more weights than the layout lists");
  return h.view({B, 1, h.size(1)});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qwen3vl_kernels, m) {
  m.def("decode_layers(Tensor x, Tensor cos, Tensor rot_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, int slot, "
        "int[] pos, int end, Tensor? mask, Tensor[] weights, int[] layout, float eps, int group_size) -> Tensor",
        &decode_layers);
}
