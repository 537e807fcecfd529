// edgequant decode engine: one call per generated token, the whole forward in C++.
//
// Weights stay in torch's int4 CPU layout (the bytes the prefill path also reads):
// packed [N/64, K, 32] bytes; byte j of row-block b at column k holds row 64b+j in its low
// nibble and row 64b+32+j in its high nibble; w = (q - 8) * s + zf per (row, group).
// The GEMV widens nibbles to bf16 through a 16-entry table (vpermw), pairs columns k, k+1
// and runs vdpbf16ps (AVX512-BF16) against the activations split into two bf16 parts,
// accumulating in float32; scales and zero terms are exact float32.
// The tied lm_head is per-row int8 (float32 FMAs). The residual stream, norms, RoPE,
// attention and softmax are float32; the KV cache is bf16 [1, KV, S, hd], shared with the
// Python prefill path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

namespace {

using bf16_t = uint16_t;

inline bf16_t to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<bf16_t>(u >> 16);
}

inline float from_bf16(bf16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline __m512 load_bf16(const bf16_t* p) {  // 16 bf16 -> 16 float32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// A linear in torch's int4 layout, with its scales re-laid for the kernel:
// sc/zf [N/64, K/g, 64] float32, rows within a block in accumulator order (see perm_row).
struct Q4 {
  torch::Tensor packed, sc, zf, bias;
  int64_t n = 0, k = 0, g = 0;
};

// Row (0..63 within a block) held by lane i of accumulator a (0..3), from the
// unpacklo/hi_epi16 interleave that works inside 128-bit lanes.
inline int perm_row(int a, int i) {
  int half = a / 2, hi = a % 2;
  return 32 * half + 8 * (i / 4) + 4 * hi + (i % 4);
}

void gemv_q4(const Q4& w, const float* x, float* y) {
  // x is split into bf16 hi + lo parts (x - hi rounded again): two vdpbf16ps per weight pair
  // keep the activations to about 16 bits of mantissa, so the GEMV matches float32 math.
  const int64_t K = w.k, N = w.n, G = w.g, ng = K / G;
  std::vector<uint32_t> xhi(K / 2), xlo(K / 2);  // bf16 column pairs (k, k+1)
  std::vector<float> xsum(ng, 0.f);
  for (int64_t k = 0; k < K; k += 2) {
    bf16_t a = to_bf16(x[k]), b = to_bf16(x[k + 1]);
    bf16_t al = to_bf16(x[k] - from_bf16(a)), bl = to_bf16(x[k + 1] - from_bf16(b));
    xhi[k / 2] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
    xlo[k / 2] = static_cast<uint32_t>(al) | (static_cast<uint32_t>(bl) << 16);
    xsum[k / G] += x[k] + x[k + 1];
  }
  alignas(64) int16_t table_v[32];
  for (int i = 0; i < 32; ++i) table_v[i] = static_cast<int16_t>(to_bf16(static_cast<float>((i & 15) - 8)));
  const __m512i table = _mm512_load_si512(table_v);
  const __m256i lo4 = _mm256_set1_epi8(0x0f);
  const uint8_t* P = w.packed.data_ptr<uint8_t>();
  const float* SC = w.sc.data_ptr<float>();
  const float* ZF = w.zf.data_ptr<float>();
  const float* B = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const uint8_t* pb = P + blk * K * 32;
      __m512 tot[4];
      for (auto& t : tot) t = _mm512_setzero_ps();
      for (int64_t gi = 0; gi < ng; ++gi) {
        __m512 acc[8];  // 0..3: hi parts, 4..7: lo parts
        for (auto& a : acc) a = _mm512_setzero_ps();
        for (int64_t k = gi * G; k < (gi + 1) * G; k += 2) {
          __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + k * 32));
          __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb + (k + 1) * 32));
          __m512bh xh = (__m512bh)_mm512_set1_epi32(static_cast<int>(xhi[k / 2]));
          __m512bh xl = (__m512bh)_mm512_set1_epi32(static_cast<int>(xlo[k / 2]));
          __m256i halves[4] = {_mm256_and_si256(va, lo4), _mm256_and_si256(vb, lo4),
                               _mm256_and_si256(_mm256_srli_epi16(va, 4), lo4),
                               _mm256_and_si256(_mm256_srli_epi16(vb, 4), lo4)};
          for (int h = 0; h < 2; ++h) {  // h 0: rows 0..31 (low nibbles), 1: rows 32..63
            __m512i ta = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(halves[2 * h]), table);
            __m512i tb = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(halves[2 * h + 1]), table);
            __m512bh p0 = (__m512bh)_mm512_unpacklo_epi16(ta, tb);
            __m512bh p1 = (__m512bh)_mm512_unpackhi_epi16(ta, tb);
            acc[2 * h] = _mm512_dpbf16_ps(acc[2 * h], p0, xh);
            acc[2 * h + 1] = _mm512_dpbf16_ps(acc[2 * h + 1], p1, xh);
            acc[4 + 2 * h] = _mm512_dpbf16_ps(acc[4 + 2 * h], p0, xl);
            acc[5 + 2 * h] = _mm512_dpbf16_ps(acc[5 + 2 * h], p1, xl);
          }
        }
        const float* sc = SC + (blk * ng + gi) * 64;
        const float* zf = ZF + (blk * ng + gi) * 64;
        __m512 xs = _mm512_set1_ps(xsum[gi]);
        for (int a = 0; a < 4; ++a) {
          __m512 dot = _mm512_add_ps(acc[a], acc[4 + a]);
          tot[a] = _mm512_fmadd_ps(_mm512_loadu_ps(sc + 16 * a), dot, tot[a]);
          tot[a] = _mm512_fmadd_ps(_mm512_loadu_ps(zf + 16 * a), xs, tot[a]);
        }
      }
      alignas(64) float out[64];
      for (int a = 0; a < 4; ++a) _mm512_store_ps(out + 16 * a, tot[a]);
      for (int a = 0; a < 4; ++a)
        for (int i = 0; i < 16; ++i) {
          int64_t row = blk * 64 + perm_row(a, i);
          y[row] = out[16 * a + i] + (B ? B[row] : 0.f);
        }
    }
  });
}

// Int8 rows: y[v] = s[v] * sum_k q[v, k] x[k], four rows per pass over x.
void gemv_i8(const int8_t* q, const float* s, const float* x, float* y, int64_t V, int64_t K) {
  at::parallel_for(0, V / 4, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0 * 4; r < r1 * 4; r += 4) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t k = 0; k < K; k += 16) {
        __m512 xv = _mm512_loadu_ps(x + k);
        for (int j = 0; j < 4; ++j) {
          __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + (r + j) * K + k));
          acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), xv, acc[j]);
        }
      }
      for (int j = 0; j < 4; ++j) y[r + j] = s[r + j] * _mm512_reduce_add_ps(acc[j]);
    }
  });
}

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
  Engine(torch::Tensor head_q, torch::Tensor head_s, torch::Tensor final_norm, double eps,
         double embed_scale, double softcap, bool gelu)
      : head_q_(head_q), head_s_(head_s), final_norm_(final_norm), eps_(eps),
        embed_scale_(embed_scale), softcap_(softcap), gelu_(gelu) {}

  static Q4 make_q4(torch::Tensor packed, torch::Tensor sz, int64_t g, c10::optional<torch::Tensor> bias) {
    // sz [K/g, N, 2] bf16 (scale, zf) -> sc/zf [N/64, K/g, 64] float32 in accumulator row order
    Q4 w;
    w.packed = packed.contiguous();
    w.n = packed.size(0);
    w.k = packed.size(1) * 2;
    w.g = g;
    const int64_t ng = w.k / g, nb = w.n / 64;
    auto f = sz.to(torch::kFloat32).contiguous();
    w.sc = torch::empty({nb, ng, 64}, torch::kFloat32);
    w.zf = torch::empty({nb, ng, 64}, torch::kFloat32);
    auto fa = f.accessor<float, 3>();
    float* sc = w.sc.data_ptr<float>();
    float* zf = w.zf.data_ptr<float>();
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t gi = 0; gi < ng; ++gi)
        for (int a = 0; a < 4; ++a)
          for (int i = 0; i < 16; ++i) {
            int64_t row = b * 64 + perm_row(a, i), at = (b * ng + gi) * 64 + 16 * a + i;
            sc[at] = fa[gi][row][0];
            zf[at] = fa[gi][row][1];
          }
    if (bias && bias->defined()) w.bias = bias->to(torch::kFloat32).contiguous();
    return w;
  }

  void add_layer(std::vector<torch::Tensor> q4s, std::vector<int64_t> groups,
                 std::vector<c10::optional<torch::Tensor>> biases,
                 std::vector<c10::optional<torch::Tensor>> norms, torch::Tensor k_cache,
                 torch::Tensor v_cache, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                 int64_t kv_heads, int64_t head_dim, int64_t window, double scale) {
    // q4s: packed and sz of qkv, o, gate_up, down; norms: attn, attn_post, mlp, mlp_post, q, k
    Layer L;
    Q4* lin[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
    for (int i = 0; i < 4; ++i) *lin[i] = make_q4(q4s[2 * i], q4s[2 * i + 1], groups[i], biases[i]);
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
    const int64_t D = head_q_.size(1);
    std::vector<float> x(D), h(D), tmp(D);
    const int8_t* erow = head_q_.data_ptr<int8_t>() + token * D;
    const float es = head_s_.data_ptr<float>()[token] * static_cast<float>(embed_scale_);
    for (int64_t i = 0; i < D; ++i) x[i] = erow[i] * es;
    for (auto& L : layers_) block(L, x.data(), h.data(), tmp.data(), pos);
    rms_norm(x.data(), final_norm_.data_ptr<float>(), h.data(), D, eps_);
    const int64_t V = head_q_.size(0);
    auto logits = torch::empty({V}, torch::kFloat32);
    float* lg = logits.data_ptr<float>();
    gemv_i8(head_q_.data_ptr<int8_t>(), head_s_.data_ptr<float>(), h.data(), lg, V, D);
    if (softcap_ > 0)
      for (int64_t v = 0; v < V; ++v) lg[v] = std::tanh(lg[v] / softcap_) * softcap_;
    return logits;
  }

 private:
  void block(Layer& L, float* x, float* h, float* tmp, int64_t pos) {
    const int64_t D = head_q_.size(1), hd = L.head_dim, H = L.heads, KV = L.kv_heads;
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
    const int64_t S = L.k_cache.size(2);
    bf16_t* kc = reinterpret_cast<bf16_t*>(L.k_cache.data_ptr<at::BFloat16>());
    bf16_t* vc = reinterpret_cast<bf16_t*>(L.v_cache.data_ptr<at::BFloat16>());
    for (int64_t j = 0; j < KV; ++j)
      for (int64_t d = 0; d < hd; ++d) {
        kc[(j * S + pos) * hd + d] = to_bf16(k[j * hd + d]);
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
                 int64_t pos, int64_t S) {
    // one query per head over cached positions [start, pos]; hd is a multiple of 16
    const int64_t hd = L.head_dim, H = L.heads, group = L.heads / L.kv_heads, nc = hd / 16;
    const int64_t start = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
    const __m512 scale = _mm512_set1_ps(static_cast<float>(L.scale));
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      std::vector<float> w(pos - start + 1);
      for (int64_t hh = h0; hh < h1; ++hh) {
        const float* qh = q + hh * hd;
        const bf16_t* kh = kc + (hh / group) * S * hd;
        const bf16_t* vh = vc + (hh / group) * S * hd;
        float mx = -INFINITY;
        for (int64_t p = start; p <= pos; ++p) {
          __m512 s = _mm512_setzero_ps();
          for (int64_t c = 0; c < nc; ++c)
            s = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), load_bf16(kh + p * hd + 16 * c), s);
          float e = _mm512_reduce_add_ps(_mm512_mul_ps(s, scale));
          w[p - start] = e;
          mx = std::max(mx, e);
        }
        float sum = 0;
        for (auto& e : w) sum += (e = std::exp(e - mx));
        float* oh = out + hh * hd;
        for (int64_t c = 0; c < nc; ++c) {
          __m512 o = _mm512_setzero_ps();
          for (int64_t p = start; p <= pos; ++p)
            o = _mm512_fmadd_ps(_mm512_set1_ps(w[p - start]), load_bf16(vh + p * hd + 16 * c), o);
          _mm512_storeu_ps(oh + 16 * c, _mm512_mul_ps(o, _mm512_set1_ps(1.f / sum)));
        }
      }
    });
  }

  float act(float g) const {
    if (!gelu_) return g / (1.f + std::exp(-g));
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * g * (1.f + std::tanh(c * (g + 0.044715f * g * g * g)));
  }

  std::vector<Layer> layers_;
  torch::Tensor head_q_, head_s_, final_norm_;
  double eps_, embed_scale_, softcap_;
  bool gelu_;
};

torch::Tensor q4_gemv(torch::Tensor packed, torch::Tensor sz, int64_t g, torch::Tensor x) {
  // x [K] float32 -> [N] float32; the kernel alone, for tests
  Q4 w = Engine::make_q4(packed, sz, g, c10::nullopt);
  auto xc = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({w.n}, torch::kFloat32);
  gemv_q4(w, xc.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

double bench_i8(torch::Tensor q, torch::Tensor s, torch::Tensor x, int64_t iters) {
  auto y = torch::empty({q.size(0)}, torch::kFloat32);
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i)
    gemv_i8(q.data_ptr<int8_t>(), s.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr<float>(),
            q.size(0), q.size(1));
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / iters;
}

double bench_q4(torch::Tensor packed, torch::Tensor sz, int64_t g, torch::Tensor x, int64_t iters) {
  // microseconds per GEMV, scales re-laid once
  Q4 w = Engine::make_q4(packed, sz, g, c10::nullopt);
  auto xc = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({w.n}, torch::kFloat32);
  gemv_q4(w, xc.data_ptr<float>(), y.data_ptr<float>());
  auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) gemv_q4(w, xc.data_ptr<float>(), y.data_ptr<float>());
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::micro>(t1 - t0).count() / iters;
}

torch::Tensor i8_gemv(torch::Tensor q, torch::Tensor s, torch::Tensor x) {
  auto xc = x.to(torch::kFloat32).contiguous();
  auto sc = s.to(torch::kFloat32).contiguous();
  auto y = torch::empty({q.size(0)}, torch::kFloat32);
  gemv_i8(q.data_ptr<int8_t>(), sc.data_ptr<float>(), xc.data_ptr<float>(), y.data_ptr<float>(),
          q.size(0), q.size(1));
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("q4_gemv", &q4_gemv);
  m.def("i8_gemv", &i8_gemv);
  m.def("bench_q4", &bench_q4);
  m.def("bench_i8", &bench_i8);
  pybind11::class_<Engine>(m, "Engine")
      .def(pybind11::init<torch::Tensor, torch::Tensor, torch::Tensor, double, double, double, bool>())
      .def("add_layer", &Engine::add_layer)
      .def("step", &Engine::step);
}
