// edgequant CPU kernels: the int4 layout's GEMV and bf16 dequantization, the int8 VNNI GEMV,
// and the small vector helpers the decode engine (engine.cpp) shares. Header-only, for the
// single translation unit torch's cpp_extension builds.
#pragma once
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

}  // namespace
