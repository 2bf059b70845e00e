// Attention for prompts (more than a few new tokens at once) in bfloat16, on AVX512-BF16: included by
// kernels_avx512.cpp.
//
// PyTorch's CPU flash attention took a 1B model's keystroke (203 new tokens over 1,400) at about 135 GFLOP/s, 17 ms
// per layer, while the layer's matmuls ran at about 400: it meets one KV head's keys once for each of its 16 query
// heads (broadcast to them), in small blocks of queries. Here each KV head's keys and values are repacked once into
// vdpbf16ps's pairs, and its R = G * T query rows (row t * G + g: token t, query head kv * G + g) go through the keys
// kKeys at a time with a running maximum and sum (flash attention), kRows rows per task, the tasks shared by the
// threads. Blocks of keys that no row of a task can see are skipped. Scores, sums and outputs are float32; the
// softmax weights meet the values as bfloat16, as in PyTorch's kernel.
//
// q [B, T, H, hd] (rows contiguous, any other strides), k, v [B, KV, S, hd] (rows contiguous), all bfloat16;
// mask [B or 1, T, S] bool (true: visible) or none: causal, the T queries being the last T of the S positions.
// hd % 32 == 0. Output [B, T, H * hd] bfloat16.

namespace {

constexpr int64_t kRows = 16;  // query rows per task, in tiles of 4
constexpr int64_t kKeys = 64;  // keys per block: 4 vectors of 16 scores

inline __m512bh pair_in_every_lane(const uint16_t* p) {
  int32_t pair;
  std::memcpy(&pair, p, 4);
  return (__m512bh)_mm512_set1_epi32(pair);
}

// scores [4][kKeys] = 4 query rows . 64 keys, packed as [hd / 2][64][2] (the block's keys side by side, a pair of
// dimensions at a time). Kept out of line so that the 16 accumulators stay in registers.
__attribute__((noinline)) void score_tile(const uint16_t* const* rows, const uint16_t* keys, int64_t hd,
                                          float* scores) {
  __m512 acc[4][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t pair = 0; pair < hd / 2; ++pair) {
    const uint16_t* step = keys + pair * 2 * kKeys;
    __m512bh kj[4];
    for (int j = 0; j < 4; ++j) kj[j] = (__m512bh)_mm512_loadu_si512(step + 32 * j);
    for (int r = 0; r < 4; ++r) {
      const __m512bh qr = pair_in_every_lane(rows[r] + 2 * pair);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], kj[j], qr);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < 4; ++j) _mm512_storeu_ps(scores + r * kKeys + 16 * j, acc[r][j]);
}

// out [4][C * 16 columns from c] += weights [4][kKeys] (bfloat16 pairs) . values, packed as [kKeys / 2][hd][2]
// (each pair of keys side by side, column by column).
template <int C>
__attribute__((noinline)) void value_tile(const uint16_t* weights, const uint16_t* values, int64_t hd, int64_t c,
                                          float* out) {
  __m512 acc[4][C];
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < C; ++j) acc[r][j] = _mm512_loadu_ps(out + r * hd + c + 16 * j);
  for (int64_t pair = 0; pair < kKeys / 2; ++pair) {
    const uint16_t* step = values + (pair * hd + c) * 2;
    __m512bh vj[C];
    for (int j = 0; j < C; ++j) vj[j] = (__m512bh)_mm512_loadu_si512(step + 32 * j);
    for (int r = 0; r < 4; ++r) {
      const __m512bh wr = pair_in_every_lane(weights + r * kKeys + 2 * pair);
      for (int j = 0; j < C; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], vj[j], wr);
    }
  }
  for (int r = 0; r < 4; ++r)
    for (int j = 0; j < C; ++j) _mm512_storeu_ps(out + r * hd + c + 16 * j, acc[r][j]);
}

// exp8 (kernels_common.h) for 16 floats, a half at a time (AVX512F alone has no 256-bit halves of floats).
inline __m512 exp16(__m512 x) {
  const __m256 low = exp8(_mm512_castps512_ps256(x));
  const __m256 high = exp8(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(low)), _mm256_castps_pd(high), 1));
}

inline bool is_minus_inf(float x) { return std::isinf(x) && x < 0; }

// One row's step of flash attention over the block of kKeys keys from j0: its scores (scaled, -inf where the row
// may not see the key: outside [first, last] or false in its mask row, if any) become e^(score - running maximum)
// as bfloat16 weights; the running sum and the output so far are rescaled to a new maximum. NaN scores stay NaN.
void softmax_step(float* scores, int64_t j0, int64_t first, int64_t last, const bool* mask, float scale, float& top,
                  float& total, float* out, int64_t hd, uint16_t* weights) {
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 high = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t j = 0; j < kKeys; j += 16) {
    const __m512i key = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int32_t>(j0 + j)));
    __mmask16 visible = _mm512_cmpge_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(first))) &
                        _mm512_cmple_epi32_mask(key, _mm512_set1_epi32(static_cast<int32_t>(last)));
    if (mask != nullptr && visible)  // (inside [first, last] the mask row has all these bytes)
      visible &= _mm_cmpneq_epi8_mask(_mm_maskz_loadu_epi8(visible, mask + j0 + j), _mm_setzero_si128());
    const __m512 x = _mm512_mask_blend_ps(visible, _mm512_set1_ps(-INFINITY),
                                          _mm512_mul_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(scale)));
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    high = _mm512_max_ps(high, x);
    _mm512_storeu_ps(scores + j, x);
  }
  const float m = nan ? NAN : std::max(top, _mm512_reduce_max_ps(high));
  const float shift = is_minus_inf(m) ? 0.f : m;  // nothing seen yet: every weight is 0
  const float decay = is_minus_inf(top) ? 0.f : std::exp(top - shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < kKeys; j += 16) {
    const __m512 x = _mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(shift));
    const __m512 e = exp16(x);
    sum = _mm512_add_ps(sum, e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(weights + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  top = m, total = total * decay + _mm512_reduce_add_ps(sum);
  if (decay != 1.f)
    for (int64_t d = 0; d < hd; d += 16)
      _mm512_storeu_ps(out + d, _mm512_mul_ps(_mm512_loadu_ps(out + d), _mm512_set1_ps(decay)));
}

}  // namespace

torch::Tensor prompt_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale) {
  TORCH_CHECK(q.dtype() == torch::kBFloat16 && k.dtype() == torch::kBFloat16, "q, k, v: bf16");
  const bool* mp = attention_inputs(q, k, v, mask, 32);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3), KV = k.size(1), S = k.size(2);
  TORCH_CHECK(S >= T, "fewer keys than queries");
  const int64_t G = H / KV, R = G * T, heads = B * KV, blocks = (S + kKeys - 1) / kKeys, padded = blocks * kKeys;
  // Keys as [block][hd / 2][kKeys][2] and values as [S / 2][hd][2] per head, zero past S (a zero weight meets them).
  auto packed_keys = torch::empty({heads, padded * hd}, torch::kBFloat16);
  auto packed_values = torch::empty({heads, padded * hd}, torch::kBFloat16);
  uint16_t* pk = reinterpret_cast<uint16_t*>(packed_keys.data_ptr());
  uint16_t* pv = reinterpret_cast<uint16_t*>(packed_values.data_ptr());
  at::parallel_for(0, heads * blocks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t head = u / blocks, block = u % blocks, b = head / KV, kv = head % KV;
      const auto* ks = reinterpret_cast<const uint16_t*>(k.data_ptr()) + b * k.stride(0) + kv * k.stride(1);
      const auto* vs = reinterpret_cast<const uint16_t*>(v.data_ptr()) + b * v.stride(0) + kv * v.stride(1);
      uint16_t* kb = pk + head * padded * hd + block * kKeys * hd;
      uint16_t* vb = pv + head * padded * hd + block * kKeys * hd;
      for (int64_t j = 0; j < kKeys; ++j) {
        const bool key = block * kKeys + j < S;
        const uint16_t* kr = ks + (block * kKeys + j) * k.stride(2);
        const uint16_t* vr = vs + (block * kKeys + j) * v.stride(2);
        for (int64_t d = 0; d < hd; ++d) {
          kb[(d / 2 * kKeys + j) * 2 + d % 2] = key ? kr[d] : 0;
          vb[(j / 2 * hd + d) * 2 + j % 2] = key ? vr[d] : 0;
        }
      }
    }
  });
  // The keys each token may see lie in [first, last] (a mask's true values; causal: up to the token's position).
  const int64_t masks = mask.has_value() ? mask->size(0) : 1;
  std::vector<int64_t> first(masks * T, 0), last(masks * T);
  for (int64_t i = 0; i < masks * T; ++i) {
    if (mp == nullptr) {
      last[i] = S - T + i;
      continue;
    }
    const bool* m = mp + i * S;
    first[i] = std::find(m, m + S, true) - m;
    last[i] = first[i] == S ? -1 : S - 1;
    while (last[i] > first[i] && !m[last[i]]) --last[i];
  }
  auto y = torch::empty({B, T, H * hd}, torch::kBFloat16);
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr());
  const int64_t tasks_per_head = (R + kRows - 1) / kRows;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, heads * tasks_per_head, 1, [&](int64_t u0, int64_t u1) {
    alignas(64) float scores[kRows * kKeys];
    alignas(64) uint16_t weights[kRows * kKeys];
    std::vector<float> out(kRows * hd);
    float top[kRows], total[kRows];
    int64_t token[kRows];  // row i's index into first, last and the mask's rows
    const uint16_t* rows[kRows];
    std::vector<uint16_t> zero_query(hd, 0);  // for the rows past R in the last task
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t head = u / tasks_per_head, r0 = u % tasks_per_head * kRows, b = head / KV, kv = head % KV;
      const int64_t n = std::min(kRows, R - r0);
      int64_t from = S, to = -1;  // the keys any row of the task may see
      for (int64_t i = 0; i < kRows; ++i) {
        const int64_t r = std::min(r0 + i, R - 1), t = r / G, h = kv * G + r % G;
        token[i] = (masks == 1 ? 0 : b) * T + t;
        rows[i] = i < n ? reinterpret_cast<const uint16_t*>(q.data_ptr()) + b * q.stride(0) + t * q.stride(1) +
                              h * q.stride(2)
                        : zero_query.data();
        from = std::min(from, first[token[i]]), to = std::max(to, last[token[i]]);
        top[i] = -INFINITY, total[i] = 0.f;
      }
      std::fill(out.begin(), out.end(), 0.f);
      for (int64_t block = from / kKeys; block * kKeys <= to; ++block) {
        const int64_t j0 = block * kKeys;
        const uint16_t* kb = pk + head * padded * hd + j0 * hd;
        for (int64_t i = 0; i < kRows; i += 4) score_tile(rows + i, kb, hd, scores + i * kKeys);
        for (int64_t i = 0; i < kRows; ++i)
          softmax_step(scores + i * kKeys, j0, first[token[i]], last[token[i]],
                       mp == nullptr ? nullptr : mp + token[i] * S, fscale, top[i], total[i], out.data() + i * hd, hd,
                       weights + i * kKeys);
        const uint16_t* vb = pv + head * padded * hd + j0 * hd;
        for (int64_t i = 0; i < kRows; i += 4) {
          int64_t c = 0;
          for (; c + 64 <= hd; c += 64) value_tile<4>(weights + i * kKeys, vb, hd, c, out.data() + i * hd);
          if (c < hd) value_tile<2>(weights + i * kKeys, vb, hd, c, out.data() + i * hd);
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i, t = r / G, h = kv * G + r % G;
        const float inverse = total[i] > 0.f ? 1.f / total[i] : (std::isnan(total[i]) ? NAN : 0.f);
        uint16_t* yr = yp + ((b * T + t) * H + h) * hd;
        for (int64_t d = 0; d < hd; ++d) yr[d] = at::BFloat16(out[i * hd + d] * inverse).x;
      }
    }
  });
  return y;
}
