// edgequant decode engine: one call per generated token, the whole forward in C++.
//
// Linears use the kernels of kernels.h on edgequant's int4 layout (the bytes the prefill path
// dequantizes too): bf16(128 + q) column pairs from one shift and one mask-or, vdpbf16ps
// against activations split into two bf16 parts, float32 accumulation, fp16 scales and uint8
// zeros. The tied lm_head is per-row int8 (VNNI) or in the int4 layout. The residual stream,
// norms, RoPE, attention and softmax are float32; the KV cache is bf16, keys in blocks of 16
// positions [1, KV, S/16, hd, 16] and values [1, KV, S, hd], shared with the Python prefill.
#include "attention.h"
#include "kernels.h"

namespace {

void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  float r = 1.f / std::sqrt(static_cast<float>(ss / n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * r * w[i];
}

void rope(float* v, const float* cos, const float* sin, int64_t hd) {
  const int64_t h = hd / 2;
  for (int64_t i = 0; i < h; ++i) {
    float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

struct Layer {
  Q4 qkv, o, gate_up, down;
  torch::Tensor attn_norm, attn_post, mlp_norm, mlp_post, q_norm, k_norm;  // float32 or undefined
  torch::Tensor k_cache, v_cache, cos, sin;  // bf16 [1, KV, S, hd]; float32 [S, hd]
  int64_t heads = 0, kv_heads = 0, head_dim = 0, window = -1;
  double scale = 1.0;
};

const float* ptr(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

class Engine {
 public:
  Engine(torch::Tensor final_norm, double eps, double embed_scale, double softcap, bool gelu)
      : final_norm_(final_norm), eps_(eps), embed_scale_(embed_scale), softcap_(softcap),
        gelu_(gelu) {}

  // The tied embedding / lm_head: per-row int8 [V, D] with float32 scales [V] ...
  void set_head_i8(torch::Tensor q, torch::Tensor s) {
    TORCH_CHECK(q.size(1) % 64 == 0 && q.size(0) % 4 == 0);
    head_q_ = q;
    head_s_ = s;
    head_sum_ = i8_rowsum(q);
  }
  // ... or 2- to 4-bit rows in the int4 layout
  void set_head_q4(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t g) {
    head4_ = make_q4(packed, scale, zero, g, c10::nullopt);
  }

  void add_layer(std::vector<torch::Tensor> q4s, std::vector<int64_t> groups,
                 std::vector<c10::optional<torch::Tensor>> biases,
                 std::vector<c10::optional<torch::Tensor>> norms, torch::Tensor k_cache,
                 torch::Tensor v_cache, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, int64_t window, double scale) {
    // q4s: packed, scale, zero of qkv, o, gate_up, down; norms: attn, attn_post, mlp, mlp_post,
    // q, k
    Layer L;
    Q4* lin[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
    for (int i = 0; i < 4; ++i)
      *lin[i] = make_q4(q4s[3 * i], q4s[3 * i + 1], q4s[3 * i + 2], groups[i], biases[i]);
    torch::Tensor* nt[6] = {&L.attn_norm, &L.attn_post, &L.mlp_norm, &L.mlp_post, &L.q_norm, &L.k_norm};
    for (int i = 0; i < 6; ++i)
      if (norms[i] && norms[i]->defined()) *nt[i] = norms[i]->to(torch::kFloat32).contiguous();
    L.k_cache = k_cache;
    L.v_cache = v_cache;
    L.cos = cos.contiguous();
    L.sin = sin.contiguous();
    L.heads = heads;
    L.kv_heads = kv_heads;
    L.head_dim = head_dim;
    L.window = window;
    L.scale = scale;
    layers_.push_back(L);
  }

  torch::Tensor step(int64_t token, int64_t pos) {
    const int64_t D = final_norm_.size(0);
    std::vector<float> x(D), h(D), tmp(D);
    embed(token, x.data());
    for (auto& L : layers_) block(L, x.data(), h.data(), tmp.data(), pos);
    rms_norm(x.data(), final_norm_.data_ptr<float>(), h.data(), D, eps_);
    const int64_t V = head_q_.defined() ? head_q_.size(0) : head4_.n;
    auto logits = torch::empty({V}, torch::kFloat32);
    float* lg = logits.data_ptr<float>();
    if (head_q_.defined())
      gemv_i8(head_q_.data_ptr<int8_t>(), head_s_.data_ptr<float>(),
              head_sum_.data_ptr<int32_t>(), h.data(), lg, V, D);
    else
      gemv_q4(head4_, h.data(), lg);
    if (softcap_ > 0)
      for (int64_t v = 0; v < V; ++v) lg[v] = std::tanh(lg[v] / softcap_) * softcap_;
    return logits;
  }

 private:
  void embed(int64_t token, float* x) const {  // row `token` of the head, times embed_scale
    const int64_t D = final_norm_.size(0);
    const float es = static_cast<float>(embed_scale_);
    if (head_q_.defined()) {
      const int8_t* row = head_q_.data_ptr<int8_t>() + token * D;
      const float s = head_s_.data_ptr<float>()[token] * es;
      for (int64_t i = 0; i < D; ++i) x[i] = row[i] * s;
      return;
    }
    const int64_t blk = token / 64, lane = token % 64, G = head4_.g, ng = D / G;
    const int32_t* P = head4_.packed.data_ptr<int32_t>() + blk * (D / 8) * 64 + lane;
    const at::Half* S = head4_.scale.data_ptr<at::Half>() + blk * ng * 64 + lane;
    const uint8_t* Z = head4_.zero.data_ptr<uint8_t>() + blk * ng * 64 + lane;
    for (int64_t k = 0; k < D; ++k) {
      const uint32_t d = static_cast<uint32_t>(P[(k / 8) * 64]);
      const int j = (k % 8) / 2, h = k % 2;
      const float q = static_cast<float>((d >> (4 * j + 16 * h)) & 15);
      const int64_t at = (k / G) * 64;
      x[k] = (q - static_cast<float>(Z[at])) * static_cast<float>(S[at]) * es;
    }
  }

  void block(Layer& L, float* x, float* h, float* tmp, int64_t pos) {
    const int64_t D = final_norm_.size(0), hd = L.head_dim, H = L.heads, KV = L.kv_heads;
    rms_norm(x, ptr(L.attn_norm), h, D, eps_);
    std::vector<float> qkv(L.qkv.n), att(H * hd);
    gemv_q4(L.qkv, h, qkv.data());
    float* q = qkv.data();
    float* k = q + H * hd;
    float* v = k + KV * hd;
    for (int64_t i = 0; i < H + KV; ++i) {
      float* head = q + i * hd;  // q heads, then k heads (contiguous)
      if (L.q_norm.defined()) rms_norm(head, ptr(i < H ? L.q_norm : L.k_norm), head, hd, eps_);
      rope(head, ptr(L.cos) + pos * hd, ptr(L.sin) + pos * hd, hd);
    }
    const int64_t S = L.v_cache.size(2);
    bf16_t* kc = reinterpret_cast<bf16_t*>(L.k_cache.data_ptr<at::BFloat16>());
    bf16_t* vc = reinterpret_cast<bf16_t*>(L.v_cache.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < KV; ++j)
      for (int64_t d = 0; d < hd; ++d) {
        kc[((j * (S / 16) + pos / 16) * hd + d) * 16 + pos % 16] = to_bf16(k[j * hd + d]);
        vc[(j * S + pos) * hd + d] = to_bf16(v[j * hd + d]);
      }
    attention(L, q, kc, vc, att.data(), pos, S);
    gemv_q4(L.o, att.data(), tmp);
    if (L.attn_post.defined()) rms_norm(tmp, ptr(L.attn_post), tmp, D, eps_);
    for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
    rms_norm(x, ptr(L.mlp_norm), h, D, eps_);
    const int64_t I = L.gate_up.n / 2;
    std::vector<float> gu(2 * I);
    gemv_q4(L.gate_up, h, gu.data());
    for (int64_t i = 0; i < I; ++i) gu[i] = act(gu[i]) * gu[I + i];
    gemv_q4(L.down, gu.data(), tmp);
    if (L.mlp_post.defined()) rms_norm(tmp, ptr(L.mlp_post), tmp, D, eps_);
    for (int64_t i = 0; i < D; ++i) x[i] += tmp[i];
  }

  void attention(const Layer& L, const float* q, const bf16_t* kc, const bf16_t* vc, float* out,
                 int64_t pos, int64_t S) const {
    // One query per head over cached positions [start, pos]: keys kc [KV, S/16, hd, 16],
    // values vc [KV, S, hd]. Work units are (kv head, position split): each scores 16 positions
    // per vector for all query heads of its group, then partial softmaxes are merged
    // (flash-decoding), so a single kv head still uses every thread.
    const int64_t hd = L.head_dim, KV = L.kv_heads, G = L.heads / L.kv_heads;
    const int64_t start = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
    const int64_t n = pos - start + 1, threads = at::get_num_threads();
    const int64_t splits = std::max<int64_t>(1, std::min((2 * threads + KV - 1) / KV, n / 64));
    const int64_t chunk = ((n + splits - 1) / splits + 15) / 16 * 16;
    std::vector<float> pm(KV * splits * G), pl(KV * splits * G), po(KV * splits * G * hd);
    at::parallel_for(0, KV * splits, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t j = u / splits, b = start + (u % splits) * chunk;
        const int64_t e = std::min(pos + 1, b + chunk);
        attend(L, q + j * G * hd, kc + j * hd * S, vc + j * S * hd, S, b, e, G, &pm[u * G],
               &pl[u * G], &po[u * G * hd]);
      }
    });
    for (int64_t j = 0; j < KV; ++j)
      for (int64_t g = 0; g < G; ++g) {
        float m = -INFINITY, l = 0;
        for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, pm[(j * splits + sp) * G + g]);
        float* o = out + (j * G + g) * hd;
        std::fill(o, o + hd, 0.f);
        for (int64_t sp = 0; sp < splits; ++sp) {
          const int64_t at = (j * splits + sp) * G + g;
          if (pl[at] == 0) continue;
          const float w = std::exp(pm[at] - m);
          l += w * pl[at];
          for (int64_t d = 0; d < hd; ++d) o[d] += w * po[at * hd + d];
        }
        for (int64_t d = 0; d < hd; ++d) o[d] /= l;
      }
  }

  static void attend(const Layer& L, const float* q, const bf16_t* kt, const bf16_t* v, int64_t S,
                     int64_t b, int64_t e, int64_t G, float* m, float* l, float* o) {
    // accumulators in registers: instantiate for the usual group sizes
    const bool by4 = L.head_dim % 64 == 0;
    switch (G) {
#define EQ_ATTEND(n)                                                     \
  case n:                                                                \
    if (by4 && n <= 4)                                                   \
      attend_g<n, 4>(L, q, kt, v, S, b, e, m, l, o);                     \
    else                                                                 \
      attend_g<n, 1>(L, q, kt, v, S, b, e, m, l, o);                     \
    return;
      EQ_ATTEND(1) EQ_ATTEND(2) EQ_ATTEND(3) EQ_ATTEND(4) EQ_ATTEND(5) EQ_ATTEND(6) EQ_ATTEND(7)
      EQ_ATTEND(8)
#undef EQ_ATTEND
      default:
        for (int64_t g = 0; g < G; ++g)  // one head at a time
          attend_g<1, 1>(L, q + g * L.head_dim, kt, v, S, b, e, m + g, l + g, o + g * L.head_dim);
    }
  }

  template <int G, int CH>
  static void attend_g(const Layer& L, const float* q, const bf16_t* kt, const bf16_t* v,
                       int64_t S, int64_t b, int64_t e, float* m, float* l, float* o) {
    // positions [b, e) for the G query heads q [G, hd] of one kv head (kt [S/16, hd, 16],
    // v [S, hd]):
    // m = max score, l = sum exp(score - m), o = sum exp(score - m) v, per head
    const int64_t hd = L.head_dim, len = e - b, nc = hd / 16;
    std::fill(o, o + G * hd, 0.f);
    if (len <= 0) {
      std::fill(m, m + G, -INFINITY);
      std::fill(l, l + G, 0.f);
      return;
    }
    const int64_t b0 = b / 16 * 16, padded = (e + 15) / 16 * 16 - b0;  // whole key blocks
    std::vector<float> sc(G * padded);
    const __m512 scale = _mm512_set1_ps(static_cast<float>(L.scale));
    for (int64_t p0 = 0; p0 < padded; p0 += 16) {  // scores of one 16-position block per vector
      const bf16_t* blk = kt + (b0 + p0) * hd;  // [hd, 16]
      uint32_t valid = 0;
      for (int i = 0; i < 16; ++i) valid |= static_cast<uint32_t>(b0 + p0 + i >= b && b0 + p0 + i < e) << i;
      __m512 acc[G][2];
      for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
      for (int64_t d = 0; d < hd; ++d) {
        const __m512 k = load_bf16(blk + d * 16);
        for (int g = 0; g < G; ++g)
          acc[g][d & 1] = _mm512_fmadd_ps(_mm512_set1_ps(q[g * hd + d]), k, acc[g][d & 1]);
      }
      for (int g = 0; g < G; ++g) {
        const __m512 s = _mm512_mul_ps(_mm512_add_ps(acc[g][0], acc[g][1]), scale);
        _mm512_storeu_ps(&sc[g * padded + p0],
                         _mm512_mask_blend_ps(static_cast<__mmask16>(valid), _mm512_set1_ps(-INFINITY), s));
      }
    }
    for (int g = 0; g < G; ++g) {  // partial softmax
      float* s = &sc[g * padded];
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t p = 0; p < padded; p += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + p));
      m[g] = _mm512_reduce_max_ps(mx);
      __m512 sum = _mm512_setzero_ps();
      const __m512 mv = _mm512_set1_ps(m[g]);
      for (int64_t p = 0; p < padded; p += 16) {
        const __m512 ev = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + p), mv));
        _mm512_storeu_ps(s + p, ev);
        sum = _mm512_add_ps(sum, ev);
      }
      l[g] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t c = 0; c < nc; c += CH) {  // weighted values, CH chunks of 16 dims at a time
      __m512 acc[G][CH];
      for (int g = 0; g < G; ++g)
        for (int h = 0; h < CH; ++h) acc[g][h] = _mm512_setzero_ps();
      for (int64_t p = b; p < e; ++p) {
        const bf16_t* vp = v + p * hd + 16 * c;
        for (int h = 0; h < CH; ++h) {
          const __m512 vv = load_bf16(vp + 16 * h);
          for (int g = 0; g < G; ++g)
            acc[g][h] = _mm512_fmadd_ps(_mm512_set1_ps(sc[g * padded + p - b0]), vv, acc[g][h]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int h = 0; h < CH; ++h) _mm512_storeu_ps(o + g * hd + 16 * (c + h), acc[g][h]);
    }
  }

  float act(float g) const {
    if (!gelu_) return g / (1.f + std::exp(-g));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
  }

  std::vector<Layer> layers_;
  torch::Tensor head_q_, head_s_, head_sum_, final_norm_;  // head_q_ undefined: head4_
  Q4 head4_;
  double eps_, embed_scale_, softcap_;
  bool gelu_;
};

torch::Tensor q4_gemv(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t g,
                      torch::Tensor x,
                      c10::optional<torch::Tensor> bias) {
  // x [M, K] -> y [M, N] float32, one GEMV per row (few rows: cheaper than dequantizing)
  const Q4 w = make_q4(packed, scale, zero, g, bias);
  auto xc = x.to(torch::kFloat32).contiguous();
  TORCH_CHECK(xc.dim() == 2 && xc.size(1) == w.k);
  auto y = torch::empty({xc.size(0), w.n}, torch::kFloat32);
  for (int64_t m = 0; m < xc.size(0); ++m)
    gemv_q4(w, xc.data_ptr<float>() + m * w.k, y.data_ptr<float>() + m * w.n);
  return y;
}

torch::Tensor i8_gemv(torch::Tensor q, torch::Tensor s, torch::Tensor x,
                      c10::optional<torch::Tensor> rowsum) {
  // x [K] -> [V] float32, the lm_head kernel alone (for tests and timing)
  TORCH_CHECK(q.is_contiguous() && q.size(1) % 64 == 0 && q.size(0) % 4 == 0);
  auto xc = x.to(torch::kFloat32).contiguous();
  auto sc = s.to(torch::kFloat32).contiguous();
  auto rs = rowsum ? *rowsum : i8_rowsum(q);
  auto y = torch::empty({q.size(0)}, torch::kFloat32);
  gemv_i8(q.data_ptr<int8_t>(), sc.data_ptr<float>(), rs.data_ptr<int32_t>(), xc.data_ptr<float>(),
          y.data_ptr<float>(), q.size(0), q.size(1));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_gemv", &q4_gemv);
  m.def("q4_dequant_t", &q4_dequant_t);
  m.def("prefill_attention", &prefill_attention);
  m.def("i8_gemv", &i8_gemv, "", pybind11::arg("q"), pybind11::arg("s"), pybind11::arg("x"),
        pybind11::arg("rowsum") = pybind11::none());
  m.def("i8_rowsum", &i8_rowsum);
  pybind11::class_<Engine>(m, "Engine")
      .def(pybind11::init<torch::Tensor, double, double, double, bool>())
      .def("set_head_i8", &Engine::set_head_i8)
      .def("set_head_q4", &Engine::set_head_q4)
      .def("add_layer", &Engine::add_layer)
      .def("step", &Engine::step);
}
