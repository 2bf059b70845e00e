// Decode kernels for bfloat16 models on AVX-512 CPUs with AVX512-BF16 (the AVX2 kernels, kernels_avx2.cpp, serve
// the CPUs without it, and int4 weights on int8 activations on every CPU): per-channel int8 weights, a plain
// bfloat16 head, int4 weights for bfloat16 activations (the exact path), and the int4 AVX2 layout dequantized to
// bfloat16 for long inputs.
//
// int8 layout: q8[n, k] signed, weight = q8 * scale[n] + offset[n]. int8_matvec keeps the activations bfloat16
// (the exact path). int8_matvec_i8 is for CPUs with AVX512-VNNI: the activations are quantized to int8 per block
// of 64 inputs (scale max|x| / 127, as llama.cpp's q8 activations, whose blocks are 32) and meet the weights in
// vpdpbusd (u8 x s8, four products summed into each int32 lane), 64 multiply-adds per instruction. It is close to
// the exact path, not equal (under 0.1% of perplexity, see BENCHMARKS.md).

#include "kernels_common.h"

namespace {

// Per-group sums of each activation row, float32 [M, K / group].
std::vector<float> group_sums(const uint16_t* x, int64_t M, int64_t K, int64_t group) {
  const int64_t G = K / group;
  std::vector<float> sums(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sums[m * G + g] += bf16_to_float(x[m * K + k]);
  return sums;
}

// Activations for the integer kernel: each block of 64 inputs as int8 with its own scale.
struct Int8Acts {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> scale;   // [M, K / 64]
  std::vector<float> shift;   // [M]: 128 * sum of q * scale, what reading s8 weights as u8 (q + 128) adds
};

Int8Acts quantize_activations(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t B = K / 64;
  Int8Acts a{std::vector<int8_t>(M * K), std::vector<float>(M * B), std::vector<float>(M, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps();
      for (int i = 0; i < 4; ++i) {  // bfloat16 -> float32 is a shift into the high half
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + b * 64 + 16 * i));
        v[i] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
      }
      const float scale = _mm512_reduce_max_ps(amax) / 127.f;
      const __m512 inverse = _mm512_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
      a.scale[m * B + b] = scale;
      int32_t sum = 0;
      for (int i = 0; i < 4; ++i) {
        const __m512i q32 = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inverse));  // round to nearest even
        sum += _mm512_reduce_add_epi32(q32);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + m * K + b * 64 + 16 * i), _mm512_cvtsepi32_epi8(q32));
      }
      a.shift[m] += 128.f * scale * static_cast<float>(sum);
    }
  return a;
}

// int4 weights for bfloat16 activations, the exact path (STARCODER_INT8_ACTIVATIONS=0; int8 activations take the
// AVX2 kernels' interleaved layout): packed[n, k/2], 64 inputs per 32 bytes, byte j of a block starting at k0
// holding q[n, k0 + j] in its low nibble and q[n, k0 + 32 + j] in its high one; weight = q * scale + offset, both
// float32 [N, G]. One output row at a time, each thread reading its rows as one stream (prefetch_stream). Each
// block of 64 nibbles becomes two vectors of 32 bfloat16 for vdpbf16ps: bf16 0x4300 is 128.0 and its 7 mantissa
// bits count units there, so (0x4300 | q) is exactly 128 + q, one OR instead of a conversion; the 128 * sum(x)
// this adds is taken back through the offsets. Two accumulators per input row hide vdpbf16ps's latency.
template <int M>
void int4_row(const uint16_t* x, const uint8_t* packed, const float* scales, const float* offsets,
              const float* xsum, const float* bias, int64_t activation, at::BFloat16* y, int64_t K, int64_t N,
              int64_t group, int64_t n) {
  const int64_t G = K / group;
  const uint8_t* row = packed + n * (K / 2);
  const __m512i exponent128 = _mm512_set1_epi16(0x4300), low = _mm512_set1_epi16(0x0F);
  __m512 total[M];
  float constant[M];
  for (int m = 0; m < M; ++m) {
    total[m] = _mm512_setzero_ps();
    constant[m] = 0.f;
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc_a[M], acc_b[M];
    for (int m = 0; m < M; ++m) acc_a[m] = acc_b[m] = _mm512_setzero_ps();
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 64) {
      if (k0 % 128 == 0) prefetch_stream(row + k0 / 2);
      const __m512i words = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0 / 2)));
      const __m512bh w_lo = (__m512bh)_mm512_or_si512(_mm512_and_si512(words, low), exponent128);
      const __m512bh w_hi = (__m512bh)_mm512_or_si512(_mm512_srli_epi16(words, 4), exponent128);
      for (int m = 0; m < M; ++m) {
        const uint16_t* xm = x + m * K + k0;
        acc_a[m] = _mm512_dpbf16_ps(acc_a[m], w_lo, (__m512bh)_mm512_loadu_si512(xm));
        acc_b[m] = _mm512_dpbf16_ps(acc_b[m], w_hi, (__m512bh)_mm512_loadu_si512(xm + 32));
      }
    }
    const float s = scales[n * G + g], o = offsets[n * G + g];
    for (int m = 0; m < M; ++m) {
      total[m] = _mm512_fmadd_ps(_mm512_add_ps(acc_a[m], acc_b[m]), _mm512_set1_ps(s), total[m]);
      constant[m] += (o - 128.f * s) * xsum[m * G + g];
    }
  }
  for (int m = 0; m < M; ++m)
    y[m * N + n] = at::BFloat16(epilogue(_mm512_reduce_add_ps(total[m]) + constant[m], bias, n, activation));
}

// The int8 kernel on int8 activations: the s8 weights are read as u8 (top bit flipped, q + 128) for vpdpbusd,
// and the 128 * sum(activations) that adds is taken back once per input row (Int8Acts::shift). No software
// prefetch: from 2 MB pages the 1B shape's int8 layers streamed 1.06-1.2x faster without it than prefetching into L1
// 1 KB ahead, and as fast as into L2 2-8 KB ahead (Zen 4 EPYC, alternating), as the bfloat16 kernel does.
template <int M, typename Out>
void int8_row_i8(const Int8Acts& a, const int8_t* q8, const float* scale, const float* offset, const float* xsum,
                 const float* bias, int64_t activation, Out* y, int64_t K, int64_t N, int64_t n) {
  const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
  const int8_t* row = q8 + n * K;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / 64; ++b) {
    const __m512i w = _mm512_xor_si512(_mm512_loadu_si512(row + b * 64), top);
    for (int m = 0; m < M; ++m) {
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(&a.q[m * K + b * 64]));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(a.scale[m * (K / 64) + b]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    y[m * N + n] = Out(epilogue(scale[n] * (_mm512_reduce_add_ps(acc[m]) - a.shift[m]) + offset[n] * xsum[m], bias,
                                n, activation));
}

// One row of a plain bfloat16 weight against M bfloat16 input rows: two sets of accumulators hide vdpbf16ps's
// latency; the last K % 64 inputs in scalar float32 (a model's K has none). (With a second, masked vector loop for
// them, or the step written as a lambda, GCC kept the accumulators in memory: a store after every vdpbf16ps.)
template <int M>
__attribute__((noinline)) void bf16_row(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
                                        int64_t n) {
  const uint16_t* row = w + n * K;
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  const int64_t K64 = K / 64 * 64;
  for (int64_t k = 0; k < K64; k += 64)
    for (int half = 0; half < 2; ++half) {
      const uint16_t* step = row + k + 32 * half;
      prefetch_stream(step);
      const __m512bh wk = (__m512bh)_mm512_loadu_si512(step);
      for (int m = 0; m < M; ++m)
        acc[m][half] = _mm512_dpbf16_ps(acc[m][half], wk, (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * half));
    }
  for (int m = 0; m < M; ++m) {
    float tail = 0.f;
    for (int64_t k = K64; k < K; ++k) tail += bf16_to_float(row[k]) * bf16_to_float(x[m * K + k]);
    y[m * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1])) + tail;
  }
}

// oneDNN's packed bfloat16 weight for one input row (dense.pack_weight) holds each block of 64 outputs as one run
// of [K/2][64][2]: for every pair of inputs, the 64 outputs' two weights side by side. Read that way, a block is one
// stream of 256-byte steps, and a step is four vdpbf16ps per input row against the row's input pair broadcast:
// the sums stay vertical, one lane per output, with no reduction across lanes at the end. M <= 6 rows: 24
// accumulators. No software prefetch: the hardware's alone streamed 5-15% faster here than prefetching into L1 1, 2
// or 4 KB ahead, and as fast as into L2 2-8 KB ahead (Zen 4 EPYC, alternating). (Kept out of line: inlined into the
// parallel loop, GCC kept the accumulators in memory, 3x slower.)
template <int M, typename Out>
__attribute__((noinline)) void bf16_block64(const uint16_t* x, const uint16_t* w, const float* bias,
                                            int64_t activation, Out* y, int64_t K, int64_t N, int64_t n0) {
  __m512 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < K / 2; ++pair) {
    const uint16_t* step = w + pair * 128;
    __m512bh wj[4];
    for (int j = 0; j < 4; ++j) wj[j] = (__m512bh)_mm512_loadu_si512(step + 32 * j);
    for (int m = 0; m < M; ++m) {
      int32_t inputs;
      std::memcpy(&inputs, x + m * K + 2 * pair, 4);
      const __m512bh xm = (__m512bh)_mm512_set1_epi32(inputs);
      for (int j = 0; j < 4; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], wj[j], xm);
    }
  }
  alignas(64) float sums[64];
  for (int m = 0; m < M; ++m) {
    for (int j = 0; j < 4; ++j) _mm512_store_ps(sums + 16 * j, acc[m][j]);
    for (int i = 0; i < 64; i += 8)
      _mm256_store_ps(sums + i, epilogue8(_mm256_load_ps(sums + i), bias, n0 + i, activation));
    for (int i = 0; i < 64; ++i) y[m * N + n0 + i] = Out(sums[i]);
  }
}

}  // namespace

// x [M, K] bfloat16 (M <= 8), packed [N, K/2] uint8, scales/offsets [N, G] float32, bias [N] float32 or None
// -> activation(x W^T + bias) as bfloat16 [M, N] (int4_row's layout and arithmetic).
torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor offsets,
                          int64_t group, c10::optional<torch::Tensor> bias, int64_t activation) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(M >= 1 && M <= 8, "int4_matvec takes 1 to 8 rows");
  TORCH_CHECK(K % 64 == 0 && group % 64 == 0 && K % group == 0 && packed.size(1) * 2 == K, "int4_matvec shapes");
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto xsum = group_sums(xp, M, K, group);
  auto y = torch::empty({M, N}, torch::kBFloat16);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float *sp = scales.data_ptr<float>(), *op = offsets.data_ptr<float>(), *bp = optional_bias(bias, N);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  balanced_for(N, 16, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto m) {
      for (int64_t n = n0; n < n1; ++n)
        int4_row<decltype(m)::value>(xp, pp, sp, op, xsum.data(), bp, activation, yp, K, N, group, n);
    });
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

// The int4 weight in the AVX2 kernels' layout (8 output rows interleaved, kernels_avx2.cpp: for rows 8j..8j+7 and
// the block of 32 inputs from k0, four 32-byte steps; in step s, byte 4r + i holds row 8j + r's input k0 + 8s + i
// in its low nibble and k0 + 8s + 4 + i in its high one; scales float16 and zeros uint8 [N / 8, G, 8]) as bfloat16
// [N, K] into `w`, for long inputs: a bfloat16 model's prompt runs one oneDNN matmul on it. The caller reuses one
// buffer: fresh memory would cost a page fault every 4 KB, more than the work itself.
torch::Tensor int4x8_dequantize(torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros, int64_t group,
                                torch::Tensor w) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, G = K / group;
  TORCH_CHECK(N % 8 == 0 && K % 32 == 0 && group % 32 == 0 && K % group == 0, "int4x8_dequantize shapes");
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.numel() == N * K, "w: bf16 [N, K]");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  const uint8_t* zp = zeros.data_ptr<uint8_t>();
  uint16_t* wp = reinterpret_cast<uint16_t*>(w.data_ptr<at::BFloat16>());
  // Dword r of each step is row r's: gathered as [step 0, 1, 2, 3] per 128-bit lane, rows 0-3 and rows 4-7.
  const __m512i rows_0123 = _mm512_setr_epi32(0, 8, 16, 24, 1, 9, 17, 25, 2, 10, 18, 26, 3, 11, 19, 27);
  const __m512i rows_4567 = _mm512_add_epi32(rows_0123, _mm512_set1_epi32(4));
  const __m512i low = _mm512_set1_epi8(0x0F);
  at::parallel_for(0, N / 8, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j)
      for (int64_t b = 0; b < K / 32; ++b) {
        const uint8_t* block = pp + j * 4 * K + b * 128;
        const __m512i steps_01 = _mm512_loadu_si512(block), steps_23 = _mm512_loadu_si512(block + 64);
        const int64_t at_group = (j * G + b * 32 / group) * 8;
        for (int half = 0; half < 2; ++half) {
          const __m512i v = _mm512_permutex2var_epi32(steps_01, half ? rows_4567 : rows_0123, steps_23);
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          // per lane: [low s0, high s0, low s1, high s1] = inputs 0-15 in order; the next two steps 16-31
          const __m512i first = _mm512_unpacklo_epi32(lo, hi), second = _mm512_unpackhi_epi32(lo, hi);
          alignas(64) uint8_t bytes[2][64];
          _mm512_store_si512(bytes[0], first);
          _mm512_store_si512(bytes[1], second);
          for (int lane = 0; lane < 4; ++lane) {
            const int r = half * 4 + lane;
            const float scale = _cvtsh_ss(sp[at_group + r]);
            const __m512 s = _mm512_set1_ps(scale), o = _mm512_set1_ps(-static_cast<float>(zp[at_group + r]) * scale);
            uint16_t* out = wp + (j * 8 + r) * K + b * 32;
            for (int part = 0; part < 2; ++part) {
              const __m128i q = _mm_load_si128(reinterpret_cast<const __m128i*>(bytes[part] + 16 * lane));
              const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(q));
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * part),
                                  (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(x, s, o)));
            }
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
  balanced_for(N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
        const float* xm = xp + m * K;
        int64_t k = 0;
        for (; k + 32 <= K; k += 32) {
          if (m == 0 && k % 64 == 0) prefetch_stream(row + k);
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
  TORCH_CHECK(M >= 1 && M <= 8 && w.size(1) == K, "bf16_matvec shapes");
  auto y = torch::empty({M, N}, torch::kFloat32);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* yp = y.data_ptr<float>();
  balanced_for(N, 16, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto m) {
      for (int64_t n = n0; n < n1; ++n) bf16_row<decltype(m)::value>(xp, wp, yp, K, N, n);
    });
  });
  return y;
}

// x [M, K] bfloat16 (M <= 6) against a packed weight [N, K] (bf16_block64's layout, at address `weight`: a oneDNN
// tensor's buffer, which Python keeps alive through the call), bias [N] bfloat16, float32 or None ->
// activation(x w^T + bias) as bfloat16 [M, N]. Decodes 1.1-1.4x faster than oneDNN's own matvec on the same bytes
// (Zen 4 EPYC).
torch::Tensor bf16_packed_matvec(torch::Tensor x, int64_t weight, int64_t N, c10::optional<torch::Tensor> bias,
                                 int64_t activation) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(M >= 1 && M <= 6 && N % 64 == 0 && K % 2 == 0, "bf16_packed_matvec shapes");
  auto y = torch::empty({M, N}, torch::kBFloat16);
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight);
  const float* bp = optional_bias(bias, N);
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  balanced_for(N / 64, 1, [&](int64_t b0, int64_t b1) {
    with_rows<6>(M, [&](auto m) {
      for (int64_t b = b0; b < b1; ++b)
        bf16_block64<decltype(m)::value>(xp, wp + b * 64 * K, bp, activation, yp, K, N, b * 64);
    });
  });
  return y;
}

// Whether the packed weight at `weight` holds w [N, K] in bf16_block64's layout, element for element: oneDNN picks
// its layout per CPU and version, so the kernel above runs only on a layout seen to match.
bool bf16_packed_layout_matches(torch::Tensor w, int64_t weight, int64_t nbytes) {
  TORCH_CHECK(w.dtype() == torch::kBFloat16 && w.is_contiguous() && w.dim() == 2, "w: contiguous bf16 [N, K]");
  const int64_t N = w.size(0), K = w.size(1);
  if (N % 64 != 0 || K % 2 != 0 || nbytes != N * K * 2) return false;
  const uint16_t* plain = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const uint16_t* packed = reinterpret_cast<const uint16_t*>(weight);
  std::atomic<bool> same{true};
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1 && same; ++n)
      for (int64_t k = 0; k < K; ++k)
        if (packed[((n / 64 * (K / 2) + k / 2) * 64 + n % 64) * 2 + k % 2] != plain[n * K + k]) {
          same = false;
          break;
        }
  });
  return same;
}

// As int8_matvec, with the activations quantized to int8 per block of 64 (AVX512-VNNI); K % 64 == 0. With
// float_out the result is float32 (a model's head: logits keep their precision), else bfloat16.
torch::Tensor int8_matvec_i8(torch::Tensor x, torch::Tensor q8, torch::Tensor scale, torch::Tensor offset,
                             c10::optional<torch::Tensor> bias, int64_t activation, bool float_out) {
  TORCH_CHECK(x.dtype() == torch::kBFloat16 && x.is_contiguous() && x.dim() == 2, "x: contiguous bf16 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = q8.size(0);
  TORCH_CHECK(M >= 1 && M <= 8 && K % 64 == 0 && q8.size(1) == K, "int8_matvec_i8 shapes");
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const Int8Acts acts = quantize_activations(xp, M, K);
  const auto xsum = group_sums(xp, M, K, K);
  auto y = torch::empty({M, N}, float_out ? torch::kFloat32 : torch::kBFloat16);
  const int8_t* qp = q8.data_ptr<int8_t>();
  const float *sp = scale.data_ptr<float>(), *op = offset.data_ptr<float>(), *bp = optional_bias(bias, N);
  balanced_for(N, 16, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto m) {
      constexpr int rows = decltype(m)::value;
      for (int64_t n = n0; n < n1; ++n)
        if (float_out)
          int8_row_i8<rows>(acts, qp, sp, op, xsum.data(), bp, activation, y.data_ptr<float>(), K, N, n);
        else
          int8_row_i8<rows>(acts, qp, sp, op, xsum.data(), bp, activation, y.data_ptr<at::BFloat16>(), K, N, n);
    });
  });
  return y;
}

#include "attention_avx512.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prompt_attention", &prompt_attention, "attention of many new tokens, bfloat16 (prompts)");
  m.def("int8_rows", &int8_rows, "symmetric per-row int8 of a bfloat16 matrix");
  m.def("int8_matvec_i8", &int8_matvec_i8, "int8 weights, int8 activations, integer dot products (decode)",
        py::arg("x"), py::arg("q8"), py::arg("scale"), py::arg("offset"), py::arg("bias"), py::arg("activation"),
        py::arg("float_out") = false);
  m.def("int4_matvec", &int4_matvec, "int4 weights, bfloat16 activations (decode, the exact path)");
  m.def("int4_dequantize", &int4_dequantize, "int4 weight to bfloat16");
  m.def("int4x8_dequantize", &int4x8_dequantize, "int4 weight in the AVX2 kernels' layout to bfloat16");
  m.def("int8_matvec", &int8_matvec, "int8 weight-only matrix-vector product (decode)");
  m.def("int8_dequantize", &int8_dequantize, "int8 weight to bfloat16");
  m.def("bf16_matvec", &bf16_matvec, "bfloat16 matrix-vector product on a plain weight (decode)");
  m.def("bf16_packed_matvec", &bf16_packed_matvec, "bfloat16 matrix-vector product on oneDNN's packed weight");
  m.def("bf16_packed_layout_matches", &bf16_packed_layout_matches, "whether a packed weight has the expected layout");
}
