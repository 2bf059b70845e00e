// int4, int8 and half-precision matrix-vector kernels for decoding on AVX2 CPUs (and any x86-64 CPU of the last ten
// years with FMA): the CPUs without AVX512-BF16, where models compute in float32. Also the kernels for group sizes
// the AVX-512 ones do not take (llama.cpp's Q4_0 and Q8_0 blocks of 32), and for float16 weights, on every CPU.
//
// Decoding quantizes the activations to int8 per block of 32 inputs (unless asked for the exact float32 products,
// int4_rows8_exact and int8_row_exact), as llama.cpp's q8_0 (scale max|x| / 127, x
// times its inverse rounded half to even), and meet the weights in vpmaddubsw (u8 x s8 -> pairs of products
// summed into int16) and vpmaddwd (pairs of int16 summed into int32): 32 products per two instructions. Each
// block's int32 sums are scaled once by the weight's and the block's scales. The weights' offsets (q * scale +
// offset) meet the exact float32 sums of each group. Inputs are float32 [M, K]; outputs float32 [M, N].
//
// int4 layout: 8 output rows interleaved. For rows 8j..8j+7 and the block of 32 inputs from k0, four 32-byte
// steps; in step s, byte 4r + i holds row 8j + r's input k0 + 8s + i in its low nibble and k0 + 8s + 4 + i in its
// high one. The nibbles (0..15) are the unsigned side of vpmaddubsw, 4 activations broadcast the signed one.
// Scales float16 and zeros uint8 [N / 8, G, 8] (a group's 8 rows side by side), groups of 32 inputs or a multiple.
// int8 layout: q8[n, k] = q - 128 signed, weight = q8 * scale[n, g] + (128 - zero[n, g]) * scale[n, g], scales
// float16 and zeros uint8 [N, G]; vpmaddubsw needs one unsigned side,
// so it gets |q8| and the activations take q8's signs (vpsignb), as in llama.cpp.

#include "kernels_common.h"

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

inline float horizontal_max(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// Sum of a[i] * b[i], i < n.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = horizontal_sum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// The activations as the kernels take them: int8 per block of 32 with a scale each, and each group's float sum;
// and the weight group of each block, looked up rather than divided for in the inner loops (an integer division
// per block cost more than the block's arithmetic).
struct Int8Acts {
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> scale;     // [M, K / 32]
  std::vector<float> sums;      // [M, K / group]
  std::vector<int32_t> group_of;  // [K / 32]
};

// 8 inputs as float32, from float32 or bfloat16 (the top half of a float32: one shift).
inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
inline __m256 load8(const uint16_t* x) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

template <typename In>  // float (float32 models) or uint16_t (bfloat16 ones, on AVX512-BF16 CPUs)
Int8Acts quantize_activations(const In* x, int64_t M, int64_t K, int64_t group) {
  const int64_t B = K / 32, G = K / group;
  Int8Acts a{std::vector<int8_t>(M * K), std::vector<float>(M * B), std::vector<float>(M * G, 0.f),
             std::vector<int32_t>(B)};
  for (int64_t b = 0; b < B; ++b) a.group_of[b] = static_cast<int32_t>(b * 32 / group);
  const __m256 sign = _mm256_set1_ps(-0.f);
  // vpackssdw / vpacksswb work within 128-bit lanes: this puts the packed dwords back in input order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  // (rows in parallel for a prompt's many; one decode row costs less than waking the threads)
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (int64_t b = 0; b < B; ++b) {
        const In* xb = x + m * K + b * 32;
        __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
          v[i] = load8(xb + 8 * i);
          amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
          sum = _mm256_add_ps(sum, v[i]);
        }
        const float scale = horizontal_max(amax) / 127.f;
        const __m256 inverse = _mm256_set1_ps(scale > 0.f ? 1.f / scale : 0.f);
        a.scale[m * B + b] = scale;
        a.sums[m * G + b * 32 / group] += horizontal_sum(sum);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));  // half to even
        const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q.data() + m * K + b * 32),
                            _mm256_permutevar8x32_epi32(packed, order));
      }
  });
  return a;
}

// Rows m0.. of the quantized activations, as the row kernels read them (a decode step's, or a block of a prompt's).
struct Int8Rows {
  const int8_t* q;
  const float *scale, *sums;
  const int32_t* group_of;
};

Int8Rows rows_from(const Int8Acts& a, int64_t m0, int64_t K, int64_t group) {
  return {a.q.data() + m0 * K, a.scale.data() + m0 * (K / 32), a.sums.data() + m0 * (K / group), a.group_of.data()};
}

// 32 unsigned bytes times 32 signed ones, summed in fours into 8 int32 lanes, as floats.
inline __m256 dot_u8_s8(__m256i u, __m256i s) {
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
}

// Each group's scale (float16) and zero (uint8), as checkpoints hold them (GPTQ's tensors, GGUF's Q4_0 / Q8_0
// blocks): 3 bytes per group and row, where float32 scales and offsets took 8 (12% of an int4 layer's bytes at
// groups of 128). The kernels form the offset (base - zero) * scale in float32, the rounding the layer's
// dequantize() has: base is 0 for int4's levels q, 128 for int8's q - 128.
struct Groups {
  const uint16_t* scales;
  const uint8_t* zeros;
  float base;

  float scale(int64_t i) const { return _cvtsh_ss(scales[i]); }
  float offset(int64_t i) const { return (base - zeros[i]) * scale(i); }
  __m256 scales8(int64_t i) const {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + i)));
  }
  __m256 offsets8(int64_t i, __m256 s) const {
    const __m128i z = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + i));
    return _mm256_mul_ps(_mm256_sub_ps(_mm256_set1_ps(base), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z))), s);
  }
  // Sum of offset(i0 + g) * x[g], g < G.
  float offsets_dot(int64_t i0, const float* x, int64_t G) const {
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8)
      acc = _mm256_fmadd_ps(offsets8(i0 + g, scales8(i0 + g)), _mm256_loadu_ps(x + g), acc);
    float sum = horizontal_sum(acc);
    for (; g < G; ++g) sum += offset(i0 + g) * x[g];
    return sum;
  }
};

// y[8j .. 8j + 7] = the epilogue of the 8 rows' sums.
inline void store_rows8(__m256 acc, const float* bias, int64_t activation, float* y, int64_t j) {
  _mm256_storeu_ps(y + j * 8, epilogue8(acc, bias, j * 8, activation));
}

// int4: 8 output rows at a time, interleaved in the layout so that one vector holds the 8 rows' sums: no row needs
// a horizontal sum or a scale broadcast of its own, and the products of a block of 32 inputs add up in int16 (8
// vpmaddubsw results of at most 2 x 15 x 127 each stay below 2^15) before one vpmaddwd widens them.
template <int M>
void int4_rows8(const Int8Rows& a, const uint8_t* packed, const Groups& groups, const float* bias,
                int64_t activation, float* y, int64_t K, int64_t N, int64_t group, int64_t j) {
  const int64_t G = K / group, B = K / 32, blocks_per_group = group / 32;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const uint8_t* p = packed + j * 4 * K;  // 8 rows of K / 2 bytes
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s = groups.scales8((j * G + g) * 8);
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m256i sum[M];
      for (int m = 0; m < M; ++m) sum[m] = _mm256_setzero_si256();
      for (int step = 0; step < 4; ++step) {
        if (step % 2 == 0) prefetch_stream(p + (b * 4 + step) * 32);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + (b * 4 + step) * 32));
        const __m256i lo = _mm256_and_si256(w, low), hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), low);
        for (int m = 0; m < M; ++m) {
          const int8_t* xq = a.q + m * K + b * 32 + step * 8;
          int32_t x_lo, x_hi;  // 4 activations each, the same for every row
          std::memcpy(&x_lo, xq, 4);
          std::memcpy(&x_hi, xq + 4, 4);
          sum[m] = _mm256_add_epi16(sum[m], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(x_lo)));
          sum[m] = _mm256_add_epi16(sum[m], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x_hi)));
        }
      }
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(sum[m], ones)),
                                 _mm256_mul_ps(s, _mm256_set1_ps(a.scale[m * B + b])), acc[m]);
    }
    const __m256 o = groups.offsets8((j * G + g) * 8, s);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(o, _mm256_set1_ps(a.sums[m * G + g]), acc[m]);
  }
  for (int m = 0; m < M; ++m) store_rows8(acc[m], bias, activation, y + m * N, j);
}

// int4_rows8 with 512-bit integer dot products, on CPUs with AVX512-VNNI (this build targets AVX2; this function
// alone is compiled for more, and runs only where the CPU has it): a vector holds two of the layout's 32-byte steps,
// vpdpbusd sums their u8 x s8 products in fours straight into int32 lanes (8 rows x 2 steps), and one fold per
// block adds the two steps. Fewer instructions per weight: on a 2-core Zen 4 EPYC 1.37x int4_rows8 for 4 input rows
// and 1.24x for one from L3; one row from memory is memory-bound either way. The same integer sums, so the same
// floats as int4_rows8.
template <int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"))) void int4_rows8_vnni(
    const Int8Rows& a, const uint8_t* packed, const Groups& groups, const float* bias, int64_t activation, float* y,
    int64_t K, int64_t N, int64_t group, int64_t j) {
  const int64_t G = K / group, B = K / 32, blocks_per_group = group / 32;
  const __m512i low = _mm512_set1_epi8(0x0F);
  // Which 4 of a block's 32 activations (as 8 int32) each half of a vector meets: step s's low nibbles take int32
  // 2s, its high ones 2s + 1; the low half of a vector is step 0 (or 2), the high half step 1 (or 3).
  const __m512i lo01 = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
  const __m512i hi01 = _mm512_add_epi32(lo01, _mm512_set1_epi32(1));
  const __m512i lo23 = _mm512_add_epi32(lo01, _mm512_set1_epi32(4));
  const __m512i hi23 = _mm512_add_epi32(lo01, _mm512_set1_epi32(5));
  const uint8_t* p = packed + j * 4 * K;  // 8 rows of K / 2 bytes
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s = groups.scales8((j * G + g) * 8);
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      prefetch_stream(p + b * 128);
      prefetch_stream(p + b * 128 + 64);
      const __m512i w01 = _mm512_loadu_si512(p + b * 128), w23 = _mm512_loadu_si512(p + b * 128 + 64);
      const __m512i l01 = _mm512_and_si512(w01, low), h01 = _mm512_and_si512(_mm512_srli_epi16(w01, 4), low);
      const __m512i l23 = _mm512_and_si512(w23, low), h23 = _mm512_and_si512(_mm512_srli_epi16(w23, 4), low);
      for (int m = 0; m < M; ++m) {
        const __m512i x = _mm512_castsi256_si512(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + m * K + b * 32)));
        __m512i sum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), l01, _mm512_permutexvar_epi32(lo01, x));
        sum = _mm512_dpbusd_epi32(sum, h01, _mm512_permutexvar_epi32(hi01, x));
        sum = _mm512_dpbusd_epi32(sum, l23, _mm512_permutexvar_epi32(lo23, x));
        sum = _mm512_dpbusd_epi32(sum, h23, _mm512_permutexvar_epi32(hi23, x));
        const __m256i rows = _mm256_add_epi32(_mm512_castsi512_si256(sum), _mm512_extracti64x4_epi64(sum, 1));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(rows), _mm256_mul_ps(s, _mm256_set1_ps(a.scale[m * B + b])),
                                 acc[m]);
      }
    }
    const __m256 o = groups.offsets8((j * G + g) * 8, s);
    for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(o, _mm256_set1_ps(a.sums[m * G + g]), acc[m]);
  }
  for (int m = 0; m < M; ++m) store_rows8(acc[m], bias, activation, y + m * N, j);
}

template <int M>
void int8_row(const Int8Rows& a, const int8_t* q8, const Groups& groups, const float* bias, int64_t activation,
              float* y, int64_t K, int64_t N, int64_t group, int64_t n) {
  const int64_t G = K / group, B = K / 32;
  const int8_t* row = q8 + n * K;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 32) {
    prefetch_stream(row + k0);
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + k0));
    const __m256i magnitude = _mm256_sign_epi8(w, w);
    const float s = groups.scale(n * G + a.group_of[k0 / 32]);
    for (int m = 0; m < M; ++m) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + m * K + k0));
      acc[m] = _mm256_fmadd_ps(dot_u8_s8(magnitude, _mm256_sign_epi8(x, w)),
                               _mm256_set1_ps(s * a.scale[m * B + k0 / 32]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m)
    y[m * N + n] = epilogue(horizontal_sum(acc[m]) + groups.offsets_dot(n * G, &a.sums[m * G], G), bias, n,
                            activation);
}

// Half-precision weights for float32 activations: 16 weights per 32-byte load, widened to two vectors of 8 floats.
// bfloat16 is the top half of a float32, so the widening is one shift (even weights: the low halves of the 32-bit
// lanes) and one mask (odd weights: the high halves), no shuffle; the activations are deinterleaved the same way
// once per call. float16 takes F16C's conversion, in order.
struct Bf16Weights {
  static constexpr bool deinterleaved = true;
  static void widen(const uint16_t* p, __m256& first, __m256& second) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    first = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    second = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};

struct F16Weights {
  static constexpr bool deinterleaved = false;
  static void widen(const uint16_t* p, __m256& first, __m256& second) {
    first = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    second = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  }
};

// One output row at a time, so that each thread reads one stream of weights (see prefetch_stream). Two accumulators
// per input row where few input rows run (the FMA latency, not the loads, would bound one), one where many do
// (registers run out).
template <typename Weights, int M>
void half_row(const float* x, const uint16_t* w, const float* bias, int64_t activation, float* y, int64_t K,
              int64_t N, int64_t n) {
  constexpr int A = M <= 2 ? 2 : 1;
  const uint16_t* row = w + n * K;
  __m256 acc[M][A];
  for (int m = 0; m < M; ++m)
    for (int a = 0; a < A; ++a) acc[m][a] = _mm256_setzero_ps();
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    prefetch_stream(row + k0);
    __m256 first, second;
    Weights::widen(row + k0, first, second);
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm256_fmadd_ps(first, _mm256_loadu_ps(x + m * K + k0), acc[m][0]);
      acc[m][A - 1] = _mm256_fmadd_ps(second, _mm256_loadu_ps(x + m * K + k0 + 8), acc[m][A - 1]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[m][0];
    if constexpr (A == 2) sum = _mm256_add_ps(sum, acc[m][1]);
    y[m * N + n] = epilogue(horizontal_sum(sum), bias, n, activation);
  }
}

template <typename Weights>
torch::Tensor widened_matvec(const torch::Tensor& x, const torch::Tensor& w, const float* bias, int64_t activation) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  std::vector<float> order(M * K);  // x as the widened weights come: within each 16, even inputs then odd ones
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * K; ++i)
    order[i] = Weights::deinterleaved ? xp[i - i % 16 + (i % 16 < 8 ? 2 * (i % 16) : 2 * (i % 16 - 8) + 1)] : xp[i];
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  balanced_for(N, 16, [&](int64_t n0, int64_t n1) {
    with_rows(M, [&](auto m) {
      for (int64_t n = n0; n < n1; ++n)
        half_row<Weights, decltype(m)::value>(order.data(), wp, bias, activation, yp, K, N, n);
    });
  });
  return y;
}

// Long inputs (prompts, prompt chunks): a float32 matrix product that widens the weights panel by panel, so each
// weight is read from memory once per call and widened once, in the cache, instead of the whole layer being
// widened into a float32 copy first (a pass over 6 bytes per weight, whatever the input's length). A panel is 16
// output rows by up to kDepth inputs, widened and transposed to [k][16] floats (16 KB: it stays in L1) by the
// weight's Panel type; a 6 x 16 tile of the output then takes 12 accumulators, and per input 2 panel loads and 6
// broadcasts feed 12 FMAs. Every output row's sums run over k in order, block by block, as float32.
constexpr int64_t kPanelRows = 16, kDepth = 256, kTileRows = 6;

inline void transpose8(__m256 r[8]) {
  __m256 t[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  __m256 u[8];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      u[4 * i + 2 * j] = _mm256_shuffle_ps(t[4 * i + j], t[4 * i + j + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[4 * i + 2 * j + 1] = _mm256_shuffle_ps(t[4 * i + j], t[4 * i + j + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// A panel of a row-major [N, K] weight: 8 rows x 8 inputs at a time, each row's 8 inputs as floats by
// widen(n, k), then transposed so that each vector holds one input's 8 rows (rows past N are 0).
template <typename Widen>
void transposed_panel(int64_t N, int64_t n0, int64_t k0, int64_t depth, float* panel, Widen widen) {
  for (int64_t half = 0; half < kPanelRows; half += 8)
    for (int64_t k = 0; k < depth; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = n0 + half + i < N ? widen(n0 + half + i, k0 + k) : _mm256_setzero_ps();
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k + i) * kPanelRows + half, r[i]);
    }
}

// Half-precision weights: bfloat16 zero-extended and shifted, float16 through F16C.
template <bool Bf16>
struct HalfPanel {
  const uint16_t* w;
  int64_t N, K;
  void operator()(int64_t n0, int64_t k0, int64_t depth, float* panel) const {
    transposed_panel(N, n0, k0, depth, panel, [&](int64_t n, int64_t k) {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + n * K + k));
      return Bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
    });
  }
};

// int8 weights with a scale and offset per (row, group).
struct Int8Panel {
  const int8_t* q8;
  Groups groups;
  int64_t N, K, group;
  void operator()(int64_t n0, int64_t k0, int64_t depth, float* panel) const {
    transposed_panel(N, n0, k0, depth, panel, [&](int64_t n, int64_t k) {
      const int64_t i = n * (K / group) + k / group;
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q8 + n * K + k));
      return _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(groups.scale(i)),
                             _mm256_set1_ps(groups.offset(i)));
    });
  }
};

// The 32 inputs of one block of int4 weights, 8 rows interleaved (the layout of int4_rows8), as floats: calls
// column(i, v) for i = 0..31 with v the 8 rows' weights of input i (level * s + o). A 32-byte step holds 8 inputs
// of 8 rows; gathering the bytes of one input's rows (vpshufb within each 128-bit lane, then the lanes' dwords
// interleaved) leaves each input's 8 rows in one 64-bit lane, already in row order: no transpose.
template <typename Column>
inline void int4_block_columns(const uint8_t* block, __m256 s, __m256 o, Column column) {
  const __m256i low = _mm256_set1_epi8(0x0F), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i by_input = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                            0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int step = 0; step < 4; ++step) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + step * 32));
    const __m256i nibbles[2] = {_mm256_and_si256(w, low), _mm256_and_si256(_mm256_srli_epi16(w, 4), low)};
    for (int h = 0; h < 2; ++h) {  // low nibbles: inputs 8 step + 0..3; high ones: 8 step + 4..7
      const __m256i grouped = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(nibbles[h], by_input), order);
      const __m128i pair[2] = {_mm256_castsi256_si128(grouped), _mm256_extracti128_si256(grouped, 1)};
      for (int i = 0; i < 4; ++i) {
        const __m128i levels = i % 2 ? _mm_srli_si128(pair[i / 2], 8) : pair[i / 2];
        column(8 * step + 4 * h + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(levels)), s, o));
      }
    }
  }
}

struct Int4Panel {
  const uint8_t* packed;
  Groups groups;
  int64_t N, K, group;
  void operator()(int64_t n0, int64_t k0, int64_t depth, float* panel) const {
    const int64_t G = K / group;
    for (int64_t half = 0; half < kPanelRows && n0 + half < N; half += 8) {
      const int64_t j = (n0 + half) / 8;
      for (int64_t k = 0; k < depth; k += 32) {
        const int64_t b = (k0 + k) / 32, g = (k0 + k) / group;
        const __m256 s = groups.scales8((j * G + g) * 8), o = groups.offsets8((j * G + g) * 8, s);
        int4_block_columns(packed + j * 4 * K + b * 128, s, o, [&](int i, __m256 v) {
          _mm256_storeu_ps(panel + (k + i) * kPanelRows + half, v);
        });
      }
    }
    if (n0 + 8 >= N)  // a last panel of 8 rows: the other half is zero
      for (int64_t k = 0; k < depth; ++k) _mm256_storeu_ps(panel + k * kPanelRows + 8, _mm256_setzero_ps());
  }
};

// Exact decoding (STARCODER_INT8_ACTIVATIONS=0): float32 activations times the weights dequantized in registers,
// the arithmetic of the long-input path. More instructions per weight than the integer dot products, but still
// near memory speed, where PyTorch's int4/int8 kernels take float32 activations at about 1 token/s (1B shape).
template <int M>
void int4_rows8_exact(const float* x, const uint8_t* packed, const Groups& groups, const float* bias,
                      int64_t activation, float* y, int64_t K, int64_t N, int64_t group, int64_t j) {
  const int64_t G = K / group;
  const uint8_t* p = packed + j * 4 * K;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s = groups.scales8((j * G + g) * 8), o = groups.offsets8((j * G + g) * 8, s);
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += 32) {
      prefetch_stream(p + k0 * 4);
      prefetch_stream(p + k0 * 4 + 64);
      int4_block_columns(p + k0 * 4, s, o, [&](int i, __m256 v) {
        for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(v, _mm256_set1_ps(x[m * K + k0 + i]), acc[m]);
      });
    }
  }
  for (int m = 0; m < M; ++m) store_rows8(acc[m], bias, activation, y + m * N, j);
}

template <int M>
void int8_row_exact(const float* x, const int8_t* q8, const Groups& groups, const float* bias, int64_t activation,
                    float* y, int64_t K, int64_t N, int64_t group, int64_t n) {
  const int64_t G = K / group;
  const int8_t* row = q8 + n * K;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256 s = _mm256_set1_ps(groups.scale(n * G + g)), o = _mm256_set1_ps(groups.offset(n * G + g));
    for (int64_t k = g * group; k < (g + 1) * group; k += 8) {
      if (k % 64 == 0) prefetch_stream(row + k);
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k));
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s, o);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * K + k), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * N + n] = epilogue(horizontal_sum(acc[m]), bias, n, activation);
}

// out[m, 0:16] (+)= x[m, 0:depth] . panel[0:depth][0:16] for MR rows of out (row stride ldo); x packed as
// [depth][kTileRows] (pack_rows), so that its loads run along memory as the panel's do.
template <int MR>
void tile(const float* x, const float* panel, int64_t depth, float* out, int64_t ldo, bool accumulate) {
  // (Named accumulators, not an array: GCC 12 keeps an array of them in memory and stores every FMA's result.)
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0,
         a10 = a0, a11 = a0;
  for (int64_t k = 0; k < depth; ++k) {
    const float* xk = x + k * kTileRows;
    const __m256 b0 = _mm256_loadu_ps(panel + k * kPanelRows), b1 = _mm256_loadu_ps(panel + k * kPanelRows + 8);
    __m256 a = _mm256_broadcast_ss(xk);
    a0 = _mm256_fmadd_ps(a, b0, a0), a1 = _mm256_fmadd_ps(a, b1, a1);
    if constexpr (MR > 1) a = _mm256_broadcast_ss(xk + 1), a2 = _mm256_fmadd_ps(a, b0, a2), a3 = _mm256_fmadd_ps(a, b1, a3);
    if constexpr (MR > 2) a = _mm256_broadcast_ss(xk + 2), a4 = _mm256_fmadd_ps(a, b0, a4), a5 = _mm256_fmadd_ps(a, b1, a5);
    if constexpr (MR > 3) a = _mm256_broadcast_ss(xk + 3), a6 = _mm256_fmadd_ps(a, b0, a6), a7 = _mm256_fmadd_ps(a, b1, a7);
    if constexpr (MR > 4) a = _mm256_broadcast_ss(xk + 4), a8 = _mm256_fmadd_ps(a, b0, a8), a9 = _mm256_fmadd_ps(a, b1, a9);
    if constexpr (MR > 5) {
      a = _mm256_broadcast_ss(xk + 5), a10 = _mm256_fmadd_ps(a, b0, a10), a11 = _mm256_fmadd_ps(a, b1, a11);
    }
  }
  const __m256 sums[2 * kTileRows] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11};
  for (int m = 0; m < MR; ++m)
    for (int h = 0; h < 2; ++h) {
      float* o = out + m * ldo + 8 * h;
      _mm256_storeu_ps(o, accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), sums[2 * m + h]) : sums[2 * m + h]);
    }
}

// x [M, K] as the tiles read it: per block of kDepth inputs (from k0), per tile of kTileRows rows, [depth][row]:
// element (m, k) at k0 * Mt + (m / 6) * 6 * depth + (k - k0) * 6 + m % 6, Mt = M rounded up to 6 (rows past M 0).
std::vector<float> pack_rows(const float* x, int64_t M, int64_t K) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows, Mt = tiles * kTileRows;
  std::vector<float> packed(Mt * K, 0.f);
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K - k0);
        float* dst = packed.data() + k0 * Mt + t * kTileRows * depth;
        for (int64_t r = 0; r < kTileRows && t * kTileRows + r < M; ++r) {
          const float* src = x + (t * kTileRows + r) * K + k0;
          for (int64_t k = 0; k < depth; ++k) dst[k * kTileRows + r] = src[k];
        }
      }
  });
  return packed;
}

// y [M, N] = x [M, K] W^T + bias, W given panel by panel; the output rows' panels split among the threads.
template <typename Panel>
torch::Tensor panel_matmul(const torch::Tensor& x, int64_t N, const Panel& fill_panel, const float* bias) {
  const int64_t M = x.size(0), K = x.size(1), panels = (N + kPanelRows - 1) / kPanelRows;
  const int64_t Mt = (M + kTileRows - 1) / kTileRows * kTileRows;
  const std::vector<float> packed_x = pack_rows(x.data_ptr<float>(), M, K);
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> panel(kDepth * kPanelRows), partial;  // partial: the last panel's out, when N % 16 != 0
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * kPanelRows, rows = std::min(kPanelRows, N - n0);
      if (rows < kPanelRows) partial.assign(M * kPanelRows, 0.f);
      float* out = rows < kPanelRows ? partial.data() : yp + n0;
      const int64_t ldo = rows < kPanelRows ? kPanelRows : N;
      for (int64_t k0 = 0; k0 < K; k0 += kDepth) {
        const int64_t depth = std::min(kDepth, K - k0);
        fill_panel(n0, k0, depth, panel.data());
        for (int64_t m0 = 0; m0 < M; m0 += kTileRows)
          with_rows<kTileRows>(M - m0, [&](auto mr) {
            tile<decltype(mr)::value>(packed_x.data() + k0 * Mt + m0 * depth, panel.data(), depth, out + m0 * ldo, ldo,
                                      k0 > 0);
          });
      }
      for (int64_t m = 0; m < M; ++m)
        for (int64_t r = 0; r < rows; ++r) yp[m * N + n0 + r] = out[m * ldo + r] + (bias ? bias[n0 + r] : 0.f);
    }
  });
  return y;
}

// Checks x and the groups' tensors (scales float16, zeros uint8, N * (K / group) of each, in the kernel's order).
Groups checked_groups(const torch::Tensor& x, const torch::Tensor& scales, const torch::Tensor& zeros, int64_t N,
                   int64_t group, float base) {
  TORCH_CHECK((x.dtype() == torch::kFloat32 || x.dtype() == torch::kBFloat16) && x.is_contiguous() && x.dim() == 2,
              "x: contiguous f32 or bf16 [M, K]");
  const int64_t K = x.size(1);
  TORCH_CHECK(group % 32 == 0 && K % group == 0, "groups of a multiple of 32 inputs that divide K");
  TORCH_CHECK(scales.dtype() == torch::kFloat16 && zeros.dtype() == torch::kUInt8 && scales.is_contiguous() &&
              zeros.is_contiguous() && scales.numel() == N * (K / group) && zeros.numel() == N * (K / group),
              "scales f16 and zeros u8, N * K / group of each");
  return Groups{reinterpret_cast<const uint16_t*>(scales.data_ptr()), zeros.data_ptr<uint8_t>(), base};
}

// Quantizes x's rows (if int8_activations), then runs row(acts, x, y, m, i) for i in [0, units) in parallel, for
// blocks of up to 8 input rows: acts, x and y start at the block's first row, and m (its rows) is an integral
// constant, for the row kernels' template argument. Long inputs go in chunks of kChunkRows rows, each unit's
// weights staying in the L1 cache for all blocks of a chunk (chunks of 64 rows measured the same on the 1B shapes:
// 64 x 8,192 int8 activations already fill the L2 cache).
constexpr int64_t kChunkRows = 256;

// A bfloat16 x (a bfloat16 model's decoding, on int8 activations only) gives a bfloat16 y: converted here, where
// two torch conversions per layer call cost a 1B int4 decode step about 1 ms.
template <typename Row>
torch::Tensor by_row_blocks(const torch::Tensor& x, int64_t N, int64_t units, int64_t grain, int64_t group,
                            bool int8_activations, Row row) {
  const int64_t M = x.size(0), K = x.size(1);
  const bool bf16 = x.dtype() == torch::kBFloat16;
  TORCH_CHECK(int8_activations || !bf16, "the exact products take float32 x");
  const Int8Acts acts = !int8_activations ? Int8Acts{}
                        : bf16 ? quantize_activations(reinterpret_cast<const uint16_t*>(x.data_ptr()), M, K, group)
                               : quantize_activations(x.data_ptr<float>(), M, K, group);
  auto y = torch::empty({M, N}, torch::kFloat32);
  float* yp = y.data_ptr<float>();
  const float* xp = bf16 ? nullptr : x.data_ptr<float>();
  for (int64_t c0 = 0; c0 < M; c0 += kChunkRows) {
    const int64_t c1 = std::min(M, c0 + kChunkRows);
    balanced_for(units, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t m0 = c0; m0 < c1; m0 += 8) {
          const Int8Rows rows = int8_activations ? rows_from(acts, m0, K, group) : Int8Rows{};
          with_rows(c1 - m0, [&](auto m) { row(rows, xp ? xp + m0 * K : nullptr, yp + m0 * N, m, i); });
        }
    });
  }
  if (!bf16) return y;
  auto out = torch::empty({M, N}, torch::kBFloat16);
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  for (int64_t i = 0; i < M * N; ++i) op[i] = at::BFloat16(yp[i]);
  return out;
}

}  // namespace

// x [M, K] float32 (any M: blocks of 8 rows; long inputs with int8 activations take this path too, see
// Avx2Int4Linear._matmul), packed uint8 [N / 8, K / 32, 4, 32] as int4_rows8 reads it, the groups' scales
// float16 and zeros uint8 [N / 8, G, 8], bias [N] float32 or None -> activation(x W^T + bias) as float32 [M, N];
// N % 8 == 0. int8_activations: x quantized per block of 32 for integer dot products (x may then be bfloat16, and
// the result is too), 512-bit ones if vnni (the caller has checked the CPU for AVX512-VNNI and AVX512-BW); else
// exact float32 products.
torch::Tensor int4_matvec(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group, c10::optional<torch::Tensor> bias, int64_t activation, bool int8_activations,
                          bool vnni) {
  const int64_t K = x.size(1), N = packed.numel() * 2 / K;
  const Groups groups = checked_groups(x, scales, zeros, N, group, 0.f);
  TORCH_CHECK(N % 8 == 0 && packed.numel() * 2 == N * K && packed.is_contiguous(), "packed: uint8, N * K / 2, N % 8 == 0");
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* bp = optional_bias(bias, N);
  return by_row_blocks(x, N, N / 8, 2, group, int8_activations,
                       [&](const Int8Rows& acts, const float* xp, float* yp, auto m, int64_t j) {
    constexpr int rows = decltype(m)::value;
    if (int8_activations && vnni) int4_rows8_vnni<rows>(acts, pp, groups, bp, activation, yp, K, N, group, j);
    else if (int8_activations) int4_rows8<rows>(acts, pp, groups, bp, activation, yp, K, N, group, j);
    else int4_rows8_exact<rows>(xp, pp, groups, bp, activation, yp, K, N, group, j);
  });
}

// x [M, K] float32 (any M, blocks of 8 rows; or bfloat16 as in int4_matvec), q8 [N, K] int8 (q - 128), the groups'
// scales float16 and zeros uint8 [N, G] -> float32 [M, N]; K % 32 == 0.
torch::Tensor int8_matvec(torch::Tensor x, torch::Tensor q8, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group, c10::optional<torch::Tensor> bias, int64_t activation, bool int8_activations) {
  const int64_t K = x.size(1), N = q8.size(0);
  const Groups groups = checked_groups(x, scales, zeros, N, group, 128.f);
  TORCH_CHECK(q8.dtype() == torch::kInt8 && q8.size(1) == K && q8.is_contiguous(), "q8: int8 [N, K]");
  const int8_t* qp = q8.data_ptr<int8_t>();
  const float* bp = optional_bias(bias, N);
  return by_row_blocks(x, N, N, 16, group, int8_activations,
                       [&](const Int8Rows& acts, const float* xp, float* yp, auto m, int64_t n) {
    constexpr int rows = decltype(m)::value;
    if (int8_activations) int8_row<rows>(acts, qp, groups, bp, activation, yp, K, N, group, n);
    else int8_row_exact<rows>(xp, qp, groups, bp, activation, yp, K, N, group, n);
  });
}

// x [M, K] float32 (any M), the weights of int4_matvec -> x W^T + bias as float32 [M, N], for long inputs: the
// weights dequantize panel by panel in the cache (panel_matmul).
torch::Tensor int4_matmul(torch::Tensor x, torch::Tensor packed, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group, c10::optional<torch::Tensor> bias) {
  const int64_t K = x.size(1), N = packed.numel() * 2 / K;
  const Groups groups = checked_groups(x, scales, zeros, N, group, 0.f);
  TORCH_CHECK(N % 8 == 0 && packed.numel() * 2 == N * K && packed.is_contiguous(), "packed: uint8, N * K / 2, N % 8 == 0");
  const Int4Panel panel{packed.data_ptr<uint8_t>(), groups, N, K, group};
  return panel_matmul(x, N, panel, optional_bias(bias, N));
}

// x [M, K] float32 (any M), the weights of int8_matvec -> x W^T + bias as float32 [M, N], for long inputs.
torch::Tensor int8_matmul(torch::Tensor x, torch::Tensor q8, torch::Tensor scales, torch::Tensor zeros,
                          int64_t group, c10::optional<torch::Tensor> bias) {
  const int64_t K = x.size(1), N = q8.size(0);
  const Groups groups = checked_groups(x, scales, zeros, N, group, 128.f);
  TORCH_CHECK(q8.dtype() == torch::kInt8 && q8.size(1) == K && q8.is_contiguous(), "q8: int8 [N, K]");
  const Int8Panel panel{q8.data_ptr<int8_t>(), groups, N, K, group};
  return panel_matmul(x, N, panel, optional_bias(bias, N));
}

// x [M, K] float32 (M <= 8), w [N, K] bfloat16 or float16, bias [N] float32 or None -> activation(x W^T + bias)
// as float32 [M, N]; K % 16 == 0. The products and sums are float32, as a float32 matmul of the widened weights.
torch::Tensor half_matvec(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t activation) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous f32 [M, K]");
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= 8, "the decode kernels take 1 to 8 rows");
  TORCH_CHECK((w.dtype() == torch::kBFloat16 || w.dtype() == torch::kFloat16) && w.is_contiguous() && w.dim() == 2 &&
              w.size(1) == x.size(1) && x.size(1) % 16 == 0, "w: contiguous bf16 or f16 [N, K], K % 16 == 0");
  const float* bp = optional_bias(bias, w.size(0));
  return w.dtype() == torch::kBFloat16 ? widened_matvec<Bf16Weights>(x, w, bp, activation)
                                       : widened_matvec<F16Weights>(x, w, bp, activation);
}

// x [M, K] float32 (any M), w [N, K] bfloat16 or float16, bias [N] float32 or None -> x W^T + bias as float32
// [M, N]; K % 8 == 0. For long inputs: the weights widen panel by panel in the cache (panel_matmul).
torch::Tensor half_matmul(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "x: contiguous f32 [M, K]");
  TORCH_CHECK((w.dtype() == torch::kBFloat16 || w.dtype() == torch::kFloat16) && w.is_contiguous() && w.dim() == 2 &&
              w.size(1) == x.size(1) && x.size(1) % 8 == 0, "w: contiguous bf16 or f16 [N, K], K % 8 == 0");
  const int64_t N = w.size(0), K = w.size(1);
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  const float* bp = optional_bias(bias, N);
  return w.dtype() == torch::kBFloat16 ? panel_matmul(x, N, HalfPanel<true>{wp, N, K}, bp)
                                       : panel_matmul(x, N, HalfPanel<false>{wp, N, K}, bp);
}

#include "attention_avx2.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_matvec", &int4_matvec, "int4 weights, int8 or float32 activations (decode)");
  m.def("int8_matvec", &int8_matvec, "int8 weights in groups, int8 or float32 activations (decode)");
  m.def("half_matvec", &half_matvec, "bfloat16 or float16 weights, float32 activations (decode)");
  m.def("half_matmul", &half_matmul, "bfloat16 or float16 weights widened panel by panel (long inputs)");
  m.def("int4_matmul", &int4_matmul, "int4 weights dequantized panel by panel (long inputs)");
  m.def("int8_matmul", &int8_matmul, "int8 weights dequantized panel by panel (long inputs)");
  m.def("int8_rows", &int8_rows, "symmetric per-row int8 of a matrix");
  m.def("decode_attention", &decode_attention, "attention of a few query rows over cached keys (decode)");
}
