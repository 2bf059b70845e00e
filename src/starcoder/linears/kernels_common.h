// What the decode kernels of every instruction set share (kernels_avx512.cpp, kernels_avx2.cpp): the epilogue,
// prefetching, the dispatch over input rows, and the int8 copy of a model's head.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// e^x for 8 floats (Cephes' expf: range reduction by ln 2 in two parts, a degree-5 polynomial, then 2^n in the
// exponent bits); relative error about 1e-7. Below -87.3 (and -inf, a masked key) it gives 0; NaN stays NaN.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.3762626647949f), x);  // NaN is the second operand: it passes through
  x = _mm256_max_ps(_mm256_set1_ps(-88.3762626647949f), x);
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

// GELU's tanh form, 0.5 v (1 + tanh u) with u = sqrt(2 / pi) (v + 0.044715 v^3), computed as v / (1 + e^(-2u)):
// the same function, one exponential where tanh took expm1 and more (4% of a 1B int4 decode step went to tanhf),
// and no cancellation in 1 + tanh u where u is very negative.
inline float gelu_tanh(float v) {
  return v / (1.f + std::exp(-1.5957691216057308f * (v + 0.044715f * v * v * v)));
}

inline __m256 gelu_tanh8(__m256 v) {
  const __m256 inner = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), v), _mm256_mul_ps(v, v), v);
  const __m256 e = exp8(_mm256_mul_ps(_mm256_set1_ps(-1.5957691216057308f), inner));
  return _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.f), e));
}

// What the layer does to its float32 sums before they are stored: bias, then the activation
// (0 none, 1 GELU with the tanh approximation, 2 exact GELU), so no extra passes run over the output.
inline float epilogue(float v, const float* bias, int64_t n, int64_t activation) {
  if (bias != nullptr) v += bias[n];
  if (activation == 1) return gelu_tanh(v);
  if (activation == 2) return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
  return v;
}

// The epilogue of outputs n .. n + 7, 8 at a time (but for the exact GELU).
inline __m256 epilogue8(__m256 v, const float* bias, int64_t n, int64_t activation) {
  if (bias != nullptr) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
  if (activation == 1) return gelu_tanh8(v);
  if (activation != 2) return v;
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  for (float& lane : lanes) lane = epilogue(lane, nullptr, 0, activation);
  return _mm256_load_ps(lanes);
}

// Decoding streams every weight from DRAM once. Each thread reads its weights as one stream, one output row after
// another, and asks for the line kStreamAhead bytes further on into L2 while it uses one. Into L1 1 KB ahead, this
// gave 93-95% of the read bandwidth on two cores of an AVX2 EPYC (65-70% when the next rows were prefetched whole or
// two rows were read side by side); on a Zen 4 EPYC, with weights on 2 MB pages, into L2 6 KB ahead streamed the
// int4 layers of 1B and 3B models 1.05-1.08x faster (1.17x for the 256-bit int4 kernel), the int8 ones 1.04x and a
// bfloat16 head as fast (alternating; 2 or 4 KB ahead gained less or lost, the hardware's prefetcher being about
// that far ahead already).
constexpr int64_t kStreamAhead = 6144;

inline void prefetch_stream(const void* p) {
  _mm_prefetch(static_cast<const char*>(p) + kStreamAhead, _MM_HINT_T1);
}

// Runs body(i0, i1) over runs of [0, units) on the intra-op threads, as at::parallel_for does, but balanced while it
// runs. Each thread starts with an equal contiguous share and walks it from the front, `grain` units at a time (one
// stream of weights per thread); a thread done with its share takes `grain` units at a time from the back of the
// share with the most left. On a 2-core VM, timestamps inside the int4 kernel had one thread finishing 10-40% after
// the other for minutes at a time (its core slower, the cause outside the process), and with fixed shares every
// call waited for it.
template <typename Body>
void balanced_for(int64_t units, int64_t grain, const Body& body) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (units + grain - 1) / grain);
  if (threads <= 1 || at::in_parallel_region()) {
    if (units > 0) body(0, units);
    return;
  }
  struct alignas(64) Share {
    std::atomic<uint64_t> range;  // front in the low 32 bits, back in the high ones: one word, so one CAS claims
  };
  const auto pack = [](uint64_t front, uint64_t back) { return front | back << 32; };
  std::unique_ptr<Share[]> shares(new Share[threads]);
  for (int64_t t = 0; t < threads; ++t) shares[t].range = pack(units * t / threads, units * (t + 1) / threads);
  // Claims up to `grain` units of a share, from its front or its back; false once it is empty.
  const auto claim = [&](Share& share, bool from_front, int64_t& i0, int64_t& i1) {
    uint64_t range = share.range.load();
    int64_t front, back;
    do {
      front = static_cast<int64_t>(range & 0xFFFFFFFFu), back = static_cast<int64_t>(range >> 32);
      if (front >= back) return false;
      i0 = from_front ? front : std::max(front, back - grain);
      i1 = from_front ? std::min(back, front + grain) : back;
    } while (!share.range.compare_exchange_weak(range, from_front ? pack(i1, back) : pack(front, i0)));
    return true;
  };
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    int64_t i0, i1;
    for (int64_t t = t0; t < t1; ++t)
      while (claim(shares[t], true, i0, i1)) body(i0, i1);
    for (;;) {
      int64_t fullest = 0, most = 0;
      for (int64_t t = 0; t < threads; ++t) {
        const uint64_t range = shares[t].range.load();
        const int64_t left = static_cast<int64_t>(range >> 32) - static_cast<int64_t>(range & 0xFFFFFFFFu);
        if (left > most) fullest = t, most = left;
      }
      if (most == 0) return;
      if (claim(shares[fullest], false, i0, i1)) body(i0, i1);
    }
  });
}

// Calls body(std::integral_constant<int, m>) with m = min(M, Max) for M >= 1: the kernels' row counts are template
// arguments so that their accumulators live in registers (input rows of the decode kernels, up to 8 by default).
template <int Max = 8, typename Body>
void with_rows(int64_t M, Body body) {
  if constexpr (Max > 1)
    if (M < Max) return with_rows<Max - 1>(M, body);
  body(std::integral_constant<int, Max>());
}

}  // namespace

inline const float* optional_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous(), "bias: f32 [N]");
  return bias->data_ptr<float>();
}

// Checks the shapes of attention's q [B, T, H, hd] and k, v [B, KV, S, hd] (rows contiguous, k's dtype; hd a multiple
// of hd_multiple, H of KV) and of a mask [B or 1, T, S] bool (contiguous, true: visible); the mask's data or nullptr.
inline const bool* attention_inputs(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                    const c10::optional<torch::Tensor>& mask, int64_t hd_multiple) {
  TORCH_CHECK(q.dim() == 4 && q.stride(3) == 1 && k.dim() == 4, "q: [B, T, H, hd], k: [B, KV, S, hd]");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(hd % hd_multiple == 0 && KV > 0 && H % KV == 0, "head size: a multiple of ", hd_multiple,
              "; query heads: a multiple of KV's");
  for (const auto* t : {&k, &v})
    TORCH_CHECK(t->dtype() == k.dtype() && t->dim() == 4 && t->size(0) == B && t->size(1) == KV && t->size(2) == S &&
                t->size(3) == hd && t->stride(3) == 1, "k, v: [B, KV, S, hd] of one dtype, rows contiguous");
  if (!mask.has_value()) return nullptr;
  TORCH_CHECK(mask->dtype() == torch::kBool && mask->is_contiguous() && mask->dim() == 3 &&
              (mask->size(0) == 1 || mask->size(0) == B) && mask->size(1) == T && mask->size(2) == S,
              "mask: contiguous bool [B or 1, T, S]");
  return mask->data_ptr<bool>();
}

// Symmetric per-row int8 of a bfloat16 or float32 matrix (a model's head, for the int8 decode kernels):
// q = round(w / s) with s = max|w| / 127 per row; (q8 [N, K], s [N]). No temporaries: a large vocabulary is big.
inline std::vector<torch::Tensor> int8_rows(torch::Tensor w) {
  TORCH_CHECK((w.dtype() == torch::kBFloat16 || w.dtype() == torch::kFloat32) && w.is_contiguous() && w.dim() == 2,
              "w: contiguous bf16 or f32 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  auto q8 = torch::empty({N, K}, torch::kInt8);
  auto scale = torch::empty({N}, torch::kFloat32);
  const bool bf16 = w.dtype() == torch::kBFloat16;
  const void* wp = w.data_ptr();
  auto value = [&](int64_t i) {
    return bf16 ? bf16_to_float(static_cast<const uint16_t*>(wp)[i]) : static_cast<const float*>(wp)[i];
  };
  int8_t* qp = q8.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(value(n * K + k)));
      sp[n] = amax > 0.f ? amax / 127.f : 1.f;
      const float inverse = 1.f / sp[n];
      for (int64_t k = 0; k < K; ++k) qp[n * K + k] = static_cast<int8_t>(std::nearbyint(value(n * K + k) * inverse));
    }
  });
  return {q8, scale};
}
