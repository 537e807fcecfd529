// edgequant decode engine: one call per generated token, the whole forward in C++.
//
// 2- to 4-bit weights are in edgequant's int4 layout (see Q4), which the prefill path also
// reads (q4_dequant_t). The GEMV turns each dword into bf16(128 + q) pairs of columns k, k+1
// with one shift and one mask-or (no table lookups, no cross-lane shuffles) and runs
// vdpbf16ps (AVX512-BF16) against the activations split into two bf16 parts, accumulating in
// float32; scales and offsets are exact float32.
// The tied lm_head is per-row int8 (VNNI) or in the int4 layout. The residual stream, norms, RoPE,
// attention and softmax are float32; the KV cache is bf16, keys in blocks of 16 positions
// [1, KV, S/16, hd, 16] and values [1, KV, S, hd], shared with the Python prefill path.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

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

inline __m512 load_f16(const at::Half* p) {  // 16 fp16 -> 16 float32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512 load_u8(const uint8_t* p) {  // 16 uint8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

inline __m512 exp512(__m512 x) {  // e^x for x <= 0 (Cephes expf: 2^n * p(r)), ~2e-7 relative
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load_bf16(const bf16_t* p) {  // 16 bf16 -> 16 float32
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// A linear in edgequant's int4 layout (edgequant.kernels.cpu.pack_q4):
// packed [N/64, K/8, 64] int32, one dword per (row, 8 columns k..k+7) holding column k+2j in
// bits 4j..4j+3 and column k+2j+1 in bits 16+4j..16+4j+3 (j = 0..3). One shift and one
// mask-or turn a dword into bf16(128 + q) for two columns of the same row, the operand pair
// vdpbf16ps wants. scale [N/64, K/g, 64] fp16 and zero [N/64, K/g, 64] uint8 (3 bytes per
// row and group): w = (q - z) * s = (128 + q) * s - (128 + z) * s.
struct Q4 {
  torch::Tensor packed, scale, zero, bias;  // bias float32 [N] or undefined
  int64_t n = 0, k = 0, g = 0;
};

Q4 make_q4(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero, int64_t g,
           c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(packed.dtype() == torch::kInt32 && packed.is_contiguous() && packed.dim() == 3);
  TORCH_CHECK(scale.dtype() == torch::kFloat16 && scale.is_contiguous());
  TORCH_CHECK(zero.dtype() == torch::kUInt8 && zero.is_contiguous());
  Q4 w;
  w.packed = packed;
  w.scale = scale;
  w.zero = zero;
  w.n = packed.size(0) * 64;
  w.k = packed.size(1) * 8;
  w.g = g;
  TORCH_CHECK(g % 8 == 0 && w.k % g == 0 && scale.numel() == w.n * (w.k / g));
  TORCH_CHECK(zero.numel() == scale.numel());
  if (bias && bias->defined()) w.bias = bias->to(torch::kFloat32).contiguous();
  return w;
}

// The activations as bf16 column pairs, split into hi + lo parts (x - hi rounded again), so two
// vdpbf16ps per weight pair keep about 16 bits of x: the GEMV matches float32 math to ~3e-6.
// xsum[group] sums exactly the values the kernel multiplies, so c * xsum cancels the 128 offset.
struct XPairs {
  std::vector<uint32_t> hi, lo;
  std::vector<float> sum;
  XPairs(const float* x, int64_t K, int64_t G) : hi(K / 2), lo(K / 2), sum(K / G, 0.f) {
    for (int64_t k = 0; k < K; k += 2) {
      bf16_t a = to_bf16(x[k]), b = to_bf16(x[k + 1]);
      bf16_t al = to_bf16(x[k] - from_bf16(a)), bl = to_bf16(x[k + 1] - from_bf16(b));
      hi[k / 2] = static_cast<uint32_t>(a) | (static_cast<uint32_t>(b) << 16);
      lo[k / 2] = static_cast<uint32_t>(al) | (static_cast<uint32_t>(bl) << 16);
      sum[k / G] += (from_bf16(a) + from_bf16(al)) + (from_bf16(b) + from_bf16(bl));
    }
  }
};

inline __m512bh q4_pair(__m512i d, int j) {  // columns k+2j, k+2j+1 as bf16(128 + q)
  const __m512i s = j ? _mm512_srli_epi32(d, 4 * j) : d;
  return (__m512bh)_mm512_ternarylogic_epi32(s, _mm512_set1_epi32(0x000F000F),
                                             _mm512_set1_epi32(0x43004300), 0xEA);  // (s&m)|b
}

void gemv_q4(const Q4& w, const float* x, float* y) {
  const int64_t K = w.k, G = w.g, ng = K / G, K8 = K / 8;
  const XPairs xp(x, K, G);
  const int32_t* P = w.packed.data_ptr<int32_t>();
  const at::Half* S = w.scale.data_ptr<at::Half>();
  const uint8_t* Z = w.zero.data_ptr<uint8_t>();
  const float* B = w.bias.defined() ? w.bias.data_ptr<float>() : nullptr;
  at::parallel_for(0, w.n / 64, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {  // 64 rows: four 16-row accumulators, hi and lo
      const int32_t* pb = P + blk * K8 * 64;
      __m512 tot[4];
      for (int a = 0; a < 4; ++a) tot[a] = B ? _mm512_loadu_ps(B + 64 * blk + 16 * a) : _mm512_setzero_ps();
      for (int64_t gi = 0; gi < ng; ++gi) {
        __m512 acc[8];
        for (auto& a : acc) a = _mm512_setzero_ps();
        for (int64_t k8 = gi * G / 8; k8 < (gi + 1) * G / 8; ++k8) {
          __m512i d[4];
          for (int a = 0; a < 4; ++a) {
            _mm_prefetch(reinterpret_cast<const char*>(pb + (k8 + 8) * 64 + 16 * a), _MM_HINT_T0);
            d[a] = _mm512_loadu_si512(pb + k8 * 64 + 16 * a);
          }
          for (int j = 0; j < 4; ++j) {
            const __m512bh xh = (__m512bh)_mm512_set1_epi32(xp.hi[4 * k8 + j]);
            const __m512bh xl = (__m512bh)_mm512_set1_epi32(xp.lo[4 * k8 + j]);
            for (int a = 0; a < 4; ++a) {
              const __m512bh wv = q4_pair(d[a], j);
              acc[a] = _mm512_dpbf16_ps(acc[a], wv, xh);
              acc[4 + a] = _mm512_dpbf16_ps(acc[4 + a], wv, xl);
            }
          }
        }
        const int64_t at = (blk * ng + gi) * 64;
        const __m512 xs = _mm512_set1_ps(xp.sum[gi]);
        for (int a = 0; a < 4; ++a) {
          const __m512 s = load_f16(S + at + 16 * a), z = load_u8(Z + at + 16 * a);
          const __m512 c = _mm512_mul_ps(_mm512_add_ps(z, _mm512_set1_ps(128.f)), s);
          tot[a] = _mm512_fmadd_ps(s, _mm512_add_ps(acc[a], acc[4 + a]), tot[a]);
          tot[a] = _mm512_fnmadd_ps(c, xs, tot[a]);  // - (128 + z) s * sum(x)
        }
      }
      for (int a = 0; a < 4; ++a) _mm512_storeu_ps(y + 64 * blk + 16 * a, tot[a]);
    }
  });
}

// The weight, transposed, in bf16: wt [K, N] (w = (128 + q) * s + c rounded once), for the
// prefill matmul. Each dword column pair becomes two 16-row runs of one wt row.
torch::Tensor q4_dequant_t(torch::Tensor packed, torch::Tensor scale, torch::Tensor zero,
                           int64_t g) {
  const Q4 w = make_q4(packed, scale, zero, g, c10::nullopt);
  const int64_t K = w.k, N = w.n, ng = K / g, K8 = K / 8;
  auto out = torch::empty({K, N}, torch::kBFloat16);
  bf16_t* O = reinterpret_cast<bf16_t*>(out.data_ptr<at::BFloat16>());
  const int32_t* P = w.packed.data_ptr<int32_t>();
  const at::Half* S = w.scale.data_ptr<at::Half>();
  const uint8_t* Z = w.zero.data_ptr<uint8_t>();
  at::parallel_for(0, N / 16, 1, [&](int64_t u0, int64_t u1) {
    const __m512i m = _mm512_set1_epi32(0xF);
    for (int64_t u = u0; u < u1; ++u)  // 16-row unit: lanes 16(u%4).. of block u/4
      for (int64_t gi = 0; gi < ng; ++gi) {
        const int64_t blk = u / 4, a = u % 4;
        const int64_t at = (blk * ng + gi) * 64 + 16 * a;
        const __m512 s = load_f16(S + at), z = load_u8(Z + at);
        for (int64_t k8 = gi * g / 8; k8 < (gi + 1) * g / 8; ++k8) {
          const __m512i d = _mm512_loadu_si512(P + (blk * K8 + k8) * 64 + 16 * a);
          for (int j = 0; j < 4; ++j)
            for (int h = 0; h < 2; ++h) {
              __m512i q = _mm512_and_si512(_mm512_srli_epi32(d, 4 * j + 16 * h), m);
              __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), z), s);
              __m256bh b = _mm512_cvtneps_pbh(v);
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(O + (8 * k8 + 2 * j + h) * N + 16 * u),
                                  (__m256i)b);
            }
        }
      }
  });
  return out;
}

// Int8 rows: y[v] = s[v] * sum_k q[v, k] x[k] on VNNI (vpdpbusd, u8 x s8 -> int32).
// x is split into two int8 parts, x ~ sx * (x1 + x2 / 256) (about 16 bits, like the bf16
// hi/lo split), each offset by 128 to unsigned; rowsum[v] = sum_k q[v, k] removes the offset.
// K must be a multiple of 64.
void gemv_i8(const int8_t* q, const float* s, const int32_t* rowsum, const float* x, float* y,
             int64_t V, int64_t K) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float sx = amax > 0 ? amax / 127.f : 1.f;
  std::vector<uint8_t> u1(K), u2(K);
  for (int64_t k = 0; k < K; ++k) {
    const float t = x[k] / sx, x1 = std::nearbyint(t);
    const float x2 = std::min(127.f, std::max(-128.f, std::nearbyint((t - x1) * 256.f)));
    u1[k] = static_cast<uint8_t>(static_cast<int>(x1) + 128);
    u2[k] = static_cast<uint8_t>(static_cast<int>(x2) + 128);
  }
  at::parallel_for(0, V / 4, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0 * 4; r < r1 * 4; r += 4) {
      __m512i acc[8];
      for (auto& a : acc) a = _mm512_setzero_si512();
      for (int64_t k = 0; k < K; k += 64) {
        const __m512i a1 = _mm512_loadu_si512(u1.data() + k), a2 = _mm512_loadu_si512(u2.data() + k);
        for (int j = 0; j < 4; ++j) {
          _mm_prefetch(reinterpret_cast<const char*>(q + (r + 8 + j) * K + k), _MM_HINT_T0);
          const __m512i w = _mm512_loadu_si512(q + (r + j) * K + k);
          acc[j] = _mm512_dpbusd_epi32(acc[j], a1, w);
          acc[4 + j] = _mm512_dpbusd_epi32(acc[4 + j], a2, w);
        }
      }
      for (int j = 0; j < 4; ++j) {
        const int64_t off = 128LL * rowsum[r + j];
        const double d1 = static_cast<double>(_mm512_reduce_add_epi32(acc[j]) - off);
        const double d2 = static_cast<double>(_mm512_reduce_add_epi32(acc[4 + j]) - off);
        y[r + j] = static_cast<float>(s[r + j] * sx * (d1 + d2 / 256.0));
      }
    }
  });
}

torch::Tensor i8_rowsum(torch::Tensor q) { return q.sum(1, false, torch::kInt32).contiguous(); }

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
