// Weight-only int4 and int8 matrix-vector kernels for decoding on AVX-512 CPUs (with AVX512-BF16).
//
// int4 layout (ours): packed[n, k/2], 64 inputs per 32 bytes: byte j of a block starting at k0 holds
// q[n, k0 + j] in its low nibble and q[n, k0 + 32 + j] in its high nibble. A weight is q * scale + offset, with
// scale and offset per (output channel, group), float32 [N, G]: a row's are together in memory.
// Each block of 64 nibbles becomes two vectors of 32 bfloat16 (exactly 128 + q, by one OR), which meet the
// activations in vdpbf16ps with float32 accumulation; a group's sum is scaled once, and the offsets
// multiply the group's sum of activations. Activations stay bfloat16 as given: no activation quantization.
//
// int8 layout: q8[n, k] signed, weight = q8 * scale[n] + offset[n].

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstring>

namespace {

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// What the layer does to its float32 sums before they are stored as bfloat16: bias, then the activation
// (0 none, 1 GELU with the tanh approximation, 2 exact GELU), so no extra passes run over the output.
inline float epilogue(float v, const float* bias, int64_t n, int64_t activation) {
  if (bias != nullptr) v += bias[n];
  if (activation == 1) return 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)));
  if (activation == 2) return 0.5f * v * (1.f + std::erf(v * 0.7071067811865476f));
  return v;
}

// Per-group sums of each activation row, float32 [M, G].
std::vector<float> group_sums(const uint16_t* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = K / group;
  std::vector<float> sums(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += bf16_to_float(x[m * K + k]);
      sums[m * G + g] = s;
    }
  return sums;
}

constexpr int64_t kPrefetchRows = 16;

// Rows (output channels) are taken R at a time: independent accumulators and R memory streams per thread keep
// both the vector units and the memory system busy.
template <int M, int R>
void int4_rows(const uint16_t* x, const uint8_t* packed, const float* scales, const float* offsets,
               const float* xsum, const float* bias, int64_t activation, at::BFloat16* y, int64_t K, int64_t N,
               int64_t group, int64_t n) {
  // bf16 0x4300 is 128.0 and its 7 mantissa bits count units there: (0x4300 | q) is exactly 128 + q, one OR
  // instead of a conversion. The 128 * sum(x) this adds is taken back through the offsets below.
  const __m512i exponent128 = _mm512_set1_epi16(0x4300);
  const __m512i low = _mm512_set1_epi16(0x0F);
  const int64_t G = K / group;
  const uint8_t* rows[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = packed + (n + r) * (K / 2);
    // Decoding streams every weight from DRAM once: ask for rows ahead so the loads overlap the math.
    if (n + r + kPrefetchRows < N)
      for (int64_t b = 0; b < K / 2; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(rows[r] + kPrefetchRows * (K / 2) + b), _MM_HINT_T0);
  }
  __m512 total[R][M];
  float constant[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      total[r][m] = _mm512_setzero_ps();
      constant[r][m] = 0.f;
    }
  for (int64_t g = 0; g < G; ++g) {
    // Two accumulators per row and input (low and high nibbles): independent chains hide vdpbf16ps's latency.
    __m512 acc_a[R][M], acc_b[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc_a[r][m] = acc_b[r][m] = _mm512_setzero_ps();
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
      for (int r = 0; r < R; ++r) {
        __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + k0 / 2)));
        __m512bh w_lo = (__m512bh)_mm512_or_si512(_mm512_and_si512(words, low), exponent128);
        __m512bh w_hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 4), exponent128);
        for (int m = 0; m < M; ++m) {
          const uint16_t* xm = x + m * K + k0;
          acc_a[r][m] = _mm512_dpbf16_ps(acc_a[r][m], w_lo, (__m512bh)_mm512_loadu_si512(xm));
          acc_b[r][m] = _mm512_dpbf16_ps(acc_b[r][m], w_hi, (__m512bh)_mm512_loadu_si512(xm + 32));
        }
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = scales[(n + r) * G + g], o = offsets[(n + r) * G + g];
      for (int m = 0; m < M; ++m) {
        total[r][m] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[r][m], acc_b[r][m]), _mm512_set1_ps(s), total[r][m]);
        constant[r][m] += (o - 128.f * s) * xsum[m * G + g];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      y[m * N + n + r] = at::BFloat16(epilogue(_mm512_reduce_add_ps(total[r][m]) + constant[r][m], bias, n + r,
                                               activation));
}

template <int M>
void int4_range(const uint16_t* x, const uint8_t* packed, const float* scales, const float* offsets,
                const float* xsum, const float* bias, int64_t activation, at::BFloat16* y, int64_t K, int64_t N,
                int64_t group, int64_t n0, int64_t n1) {
  constexpr int R = M <= 2 ? 2 : 1;  // larger M already has enough independent work per row
  int64_t n = n0;
  for (; n + R <= n1; n += R)
    int4_rows<M, R>(x, packed, scales, offsets, xsum, bias, activation, y, K, N, group, n);
  for (; n < n1; ++n) int4_rows<M, 1>(x, packed, scales, offsets, xsum, bias, activation, y, K, N, group, n);
}

}  // namespace

const float* optional_bias(const c10::optional<torch::Tensor>& bias, int64_t N) {
  if (!bias.has_value()) return nullptr;
  TORCH_CHECK(bias->dtype() == torch::kFloat32 && bias->numel() == N && bias->is_contiguous(), "bias: f32 [N]");
  return bias->data_ptr<float>();
}

// x [M, K] bfloat16 (M <= 8), packed [N, K/2] uint8, scales/offsets [N, G] float32, bias [N] float32 or None
// -> activation(x W^T + bias) as bfloat16 [M, N].
torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor offsets,
                          int64_t group, c10::optional<torch::Tensor> bias, int64_t activation) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "int4_matvec takes 1 to 8 rows");
  TORCH_CHECK(K % 64 == 0 && group % 64 == 0 && K % group == 0 && packed.size(1) * 2 == K, "int4_matvec shapes");
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto xsum = group_sums(xp, M, K, group);
  auto y = torch::empty({M, N}, torch::kBFloat16);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  const float* bp = optional_bias(bias, N);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: int4_range<1>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 2: int4_range<2>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 3: int4_range<3>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 4: int4_range<4>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 5: int4_range<5>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 6: int4_range<6>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      case 7: int4_range<7>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
      default: int4_range<8>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n0, n1); break;
    }
  });
  return y;
}

// The int4 weight as bfloat16 [N, K] into `w`, for long inputs (a matmul reads it once per prompt). The caller
// reuses one buffer: fresh memory would cost a page fault every 4 KB, more than the work itself.
torch::Tensor int4_dequantize(torch::Tensor packed, torch::Tensor scales, torch::Tensor offsets, int64_t group,
                              torch::Tensor w) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % 64 == 0 && group % 64 == 0 && K % group == 0, "int4_dequantize shapes");
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.numel() == N * K, "w: bf16 [N, K]");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const float* op = offsets.data_ptr<float>();
  at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = pp + n * (K / 2);
      at::BFloat16* out = wp + n * K;
      for (int64_t k0 = 0; k0 < K; k0 += 64) {
        const __m512 s = _mm512_set1_ps(sp[n * (K / group) + k0 / group]);
        const __m512 o = _mm512_set1_ps(op[n * (K / group) + k0 / group]);
        // 64 nibbles -> 4 x 16 floats: zero-extend the 32 bytes to 32-bit lanes twice (low and high nibbles).
        const __m128i* src = reinterpret_cast<const __m128i*>(row + k0 / 2);
        for (int half = 0; half < 2; ++half) {
          const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(src + half));  // 16 bytes, 16 lanes
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
          const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k0 + 16 * half),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(lo, s, o)));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k0 + 32 + 16 * half),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(hi, s, o)));
        }
      }
    }
  });
  return w;
}

// x [M, K] bfloat16, q8 [N, K] int8, scale/offset [N] float32, bias [N] float32 or None -> bfloat16 [M, N].
torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor q8, torch::Tensor scale, torch::Tensor offset,
                          c10::optional<torch::Tensor> bias, int64_t activation) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = q8.size(0);
  TORCH_CHECK(K % 16 == 0 && q8.size(1) == K, "int8_matvec shapes");
  auto xf = x.to(torch::kFloat32).contiguous();
  auto y = torch::empty({M, N}, torch::kBFloat16);
  const float* bp = optional_bias(bias, N);
  const float* xp = xf.data_ptr<float>();
  const int8_t* qp = q8.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  std::vector<float> xsum(M, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m] += xp[m * K + k];
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qp + n * K;
      if (n + kPrefetchRows < n1)
        for (int64_t b = 0; b < K; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * K + b), _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const float* xm = xp + m * K;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
          __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k + 16))));
          acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm + k), acc0);
          acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xm + k + 16), acc1);
        }
        for (; k < K; k += 16) {
          __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
          acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xm + k), acc0);
        }
        yp[m * N + n] = at::BFloat16(epilogue(_mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) * sp[n] +
                                              op[n] * xsum[m], bp, n, activation));
      }
    }
  });
  return y;
}

// The int8 weight as bfloat16 [N, K] into `w`, for long inputs.
torch::Tensor int8_dequantize(torch::Tensor q8, torch::Tensor scale, torch::Tensor offset, torch::Tensor w) {
  const int64_t N = q8.size(0), K = q8.size(1);
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.numel() == N * K, "w: bf16 [N, K]");
  const int8_t* qp = q8.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* op = offset.data_ptr<float>();
  at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t k = 0; k < K; ++k) wp[n * K + k] = at::BFloat16(static_cast<float>(qp[n * K + k]) * sp[n] + op[n]);
  });
  return w;
}

// x [M, K] bfloat16 (M <= 8), w [N, K] bfloat16 (a plain, unpacked weight such as a tied lm_head) -> [M, N] f32.
torch::Tensor bf16_matvec(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && w.dtype() == torch::kBFloat16 && x.is_contiguous() &&
              w.is_contiguous(), "bf16_matvec: contiguous bf16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 8 && K % 32 == 0 && w.size(1) == K, "bf16_matvec shapes");
  auto y = torch::empty({M, N}, torch::kFloat32);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint16_t* row = wp + n * K;
      if (n + kPrefetchRows < n1)
        for (int64_t b = 0; b < K * 2; b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchRows * K) + b, _MM_HINT_T0);
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const uint16_t* xm = xp + m * K;
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(xm + k));
          acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(row + k + 32),
                                  (__m512bh)_mm512_loadu_si512(xm + k + 32));
        }
        for (; k < K; k += 32)
          acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(row + k), (__m512bh)_mm512_loadu_si512(xm + k));
        yp[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
      }
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_matvec", &int4_matvec, "int4 weight-only matrix-vector product (decode)");
  m.def("int4_dequantize", &int4_dequantize, "int4 weight to bfloat16");
  m.def("int8_matvec", &int8_matvec, "int8 weight-only matrix-vector product (decode)");
  m.def("int8_dequantize", &int8_dequantize, "int8 weight to bfloat16");
  m.def("bf16_matvec", &bf16_matvec, "bfloat16 matrix-vector product on a plain weight (decode)");
}
