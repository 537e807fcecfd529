// Causal attention of a fresh prompt on AVX512-BF16 (the prefill path; decode attention lives
// in engine.cpp). Scores and P @ V both run as vdpbf16ps over pairs: keys are repacked per KV
// head into [T/16, hd/2, 16, 2] (16 positions' dims 2p, 2p+1 side by side), values into
// [T/2, hd, 2] (two positions' dim d side by side), so one broadcast of a query pair (or of a
// probability pair) against one 64-byte load advances 16 lanes by two products. Four query
// positions of one head are scored together against each key load; scores, max and sums are
// float32, probabilities bf16 (as torch's flash kernel keeps them for bf16 inputs).
#pragma once
#include <omp.h>

#include <algorithm>
#include <limits>

#include "kernels.h"

namespace {

constexpr int64_t kRows = 4;  // query positions scored together

// keys [T, hd] -> out [ceil(T/16), hd/2, 16, 2], zero past T
void pack_keys(const bf16_t* k, bf16_t* out, int64_t T, int64_t hd) {
  const int64_t nb = (T + 15) / 16;
  std::fill(out, out + nb * hd * 16, bf16_t{0});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < hd; ++d)
      out[((t / 16) * (hd / 2) + d / 2) * 32 + (t % 16) * 2 + d % 2] = k[t * hd + d];
}

// values [T, hd] -> out [ceil(T/2), hd, 2], zero past T
void pack_values(const bf16_t* v, bf16_t* out, int64_t T, int64_t hd) {
  const int64_t np = (T + 1) / 2;
  std::fill(out, out + np * hd * 2, bf16_t{0});
  for (int64_t t = 0; t < T; ++t)
    for (int64_t d = 0; d < hd; ++d) out[((t / 2) * hd + d) * 2 + t % 2] = v[t * hd + d];
}

inline __m512bh bcast_pair(const bf16_t* p) {  // two bf16 at p, repeated over 16 lanes
  uint32_t u;
  std::memcpy(&u, p, 4);
  return (__m512bh)_mm512_set1_epi32(static_cast<int>(u));
}

// Rows i0..i0+n-1 (n <= kRows) of one head: q rows [n, hd], keys/values packed for its KV
// head, s: scratch [kRows, nb * 16] float, pb: scratch [kRows, nb * 16] bf16.
// Writes the attention output rows to out + i * ostride.
void attend_rows(const bf16_t* q, int64_t n, int64_t i0, const bf16_t* kp, const bf16_t* vp,
                 int64_t hd, float scale, float* s, bf16_t* pb, bf16_t* out, int64_t ostride) {
  const int64_t last = i0 + n - 1, nb = last / 16 + 1, width = nb * 16;
  for (int64_t b = 0; b < nb; ++b) {
    __m512 acc[kRows];
    for (int64_t r = 0; r < kRows; ++r) acc[r] = _mm512_setzero_ps();
    const bf16_t* kb = kp + b * (hd / 2) * 32;
    for (int64_t p = 0; p < hd / 2; ++p) {
      const __m512bh kv = (__m512bh)_mm512_loadu_si512(kb + p * 32);
      for (int64_t r = 0; r < n; ++r) acc[r] = _mm512_dpbf16_ps(acc[r], bcast_pair(q + r * hd + 2 * p), kv);
    }
    for (int64_t r = 0; r < n; ++r) _mm512_storeu_ps(s + r * width + b * 16, acc[r]);
  }
  float inv[kRows];
  for (int64_t r = 0; r < n; ++r) {  // softmax over positions 0..i0+r
    float* sr = s + r * width;
    const int64_t len = i0 + r + 1;
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < len; j += 16) {
      const int64_t valid = std::min<int64_t>(len - j, 16);
      const __mmask16 keep = valid == 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      mx = _mm512_mask_max_ps(mx, keep, mx, _mm512_loadu_ps(sr + j));
    }
    const float m = _mm512_reduce_max_ps(mx) * scale;  // scale > 0
    const __m512 mv = _mm512_set1_ps(m), sv = _mm512_set1_ps(scale);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < width; j += 16) {
      const int64_t valid = std::clamp<int64_t>(len - j, 0, 16);
      const __mmask16 keep = valid == 16 ? 0xFFFF : static_cast<__mmask16>((1u << valid) - 1);
      __m512 e = exp512(_mm512_fmsub_ps(_mm512_loadu_ps(sr + j), sv, mv));
      e = _mm512_maskz_mov_ps(keep, e);
      sum = _mm512_add_ps(sum, e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb + r * width + j), (__m256i)_mm512_cvtneps_pbh(e));
    }
    inv[r] = 1.f / _mm512_reduce_add_ps(sum);
  }
  const int64_t pairs = (last + 2) / 2;  // value pairs covering positions 0..last
  for (int64_t c0 = 0; c0 < hd / 16; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, hd / 16 - c0);
    __m512 acc[kRows][4];
    for (int64_t r = 0; r < kRows; ++r)
      for (int64_t c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
    for (int64_t m = 0; m < pairs; ++m) {
      const bf16_t* vm = vp + (m * hd + 16 * c0) * 2;
      __m512bh a[kRows];
      for (int64_t r = 0; r < n; ++r) a[r] = bcast_pair(pb + r * width + 2 * m);
      for (int64_t c = 0; c < nc; ++c) {
        const __m512bh vv = (__m512bh)_mm512_loadu_si512(vm + 32 * c);
        for (int64_t r = 0; r < n; ++r) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a[r], vv);
      }
    }
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < nc; ++c) {
        const __m512 o = _mm512_mul_ps(acc[r][c], _mm512_set1_ps(inv[r]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (i0 + r) * ostride + 16 * (c0 + c)),
                            (__m256i)_mm512_cvtneps_pbh(o));
      }
  }
}

}  // namespace

// q [1, H, T, hd], k/v [1, KV, T, hd] bf16 (H a multiple of KV, hd a multiple of 16) ->
// causal attention [1, T, H * hd] bf16, the layout the output projection reads.
torch::Tensor prefill_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16, "prefill_attention takes bf16 q, k, v");
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous();
  const int64_t H = q.size(1), T = q.size(2), hd = q.size(3), KV = k.size(1), R = H / KV;
  TORCH_CHECK(H % KV == 0 && hd % 16 == 0 && k.size(2) == T && v.size(2) == T,
              "prefill_attention: shapes");
  const int64_t nb = (T + 15) / 16, width = nb * 16;
  auto kp = torch::empty({KV, nb * hd * 16}, torch::kBFloat16);
  auto vp = torch::empty({KV, ((T + 1) / 2) * hd * 2}, torch::kBFloat16);
  auto out = torch::empty({1, T, H * hd}, torch::kBFloat16);
  auto bf = [](const torch::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>()); };
  const bf16_t *Q = bf(q), *K = bf(k), *V = bf(v);
  bf16_t *KP = bf(kp), *VP = bf(vp), *O = bf(out);
  for (int64_t g = 0; g < KV; ++g) {
    pack_keys(K + g * T * hd, KP + g * nb * hd * 16, T, hd);
    pack_values(V + g * T * hd, VP + g * ((T + 1) / 2) * hd * 2, T, hd);
  }
  const int64_t tiles = (T + kRows - 1) / kRows, items = H * tiles;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> s(kRows * width);
    std::vector<bf16_t> pb(kRows * width);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; ++it) {  // the longest rows first
      const int64_t tile = tiles - 1 - it / H, h = it % H, g = h / R;
      const int64_t i0 = tile * kRows, n = std::min(kRows, T - i0);
      attend_rows(Q + (h * T + i0) * hd, n, i0, KP + g * nb * hd * 16,
                  VP + g * ((T + 1) / 2) * hd * 2, hd, static_cast<float>(scale), s.data(),
                  pb.data(), O + h * hd, H * hd);
    }
  }
  return out;
}
