// Attention for decoding (a few new tokens over a cached sequence), on AVX2 with FMA: included by kernels_avx2.cpp.
//
// A decode step's attention is small (16 query rows over ~1,000 keys per layer for a 1B model), and PyTorch's
// scaled_dot_product_attention spent 200-350 us per layer on it, alone on one core: 5-8 ms of a 45 ms int4 step.
// Here the keys are split into chunks that the threads share (flash-decoding): each chunk's scores, their
// softmax and its share of the output, then one merge of the chunks by their maxima and sums.
//
// q [B, T, H, hd] float32 or bfloat16 (as the q/k/v layer leaves it: rows contiguous, any other strides); k, v
// [B, KV, S, hd] float32 or bfloat16, rows contiguous; mask [B or 1, T, S] bool or none (true: visible). Output
// [B, T, H * hd] in q's dtype. hd % 8 == 0. The G = H / KV query heads that share a KV head, for all T tokens, are the
// R = G * T rows that meet that head's keys together (each key read once for all of them).

namespace {

// The larger of a and b, or NaN if either is: a NaN score must reach the output, as in PyTorch's attention.
inline float max_or_nan(float a, float b) { return b > a || std::isnan(b) ? b : a; }

// The largest of s[0, n), or NaN if any is: 8 at a time (a scalar loop took a sixth of the kernel's time).
inline float max_or_nan(const float* s, int64_t n) {
  __m256 top8 = _mm256_set1_ps(-INFINITY), nan8 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    top8 = _mm256_max_ps(top8, x);
    nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan8)) return NAN;
  float lanes[8], top = -INFINITY;
  _mm256_storeu_ps(lanes, top8);
  for (const float lane : lanes) top = std::max(top, lane);
  for (; j < n; ++j) top = max_or_nan(top, s[j]);
  return top;
}

// The 8 lane sums of a0..a7, in order.
inline __m256 horizontal_sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                               __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Keys or values [S, hd] of one head as float32 rows: the cache's own memory, or a chunk widened from bfloat16.
struct HeadRows {
  const void* data;
  int64_t stride;  // elements between rows
  bool bf16;

  const float* chunk(int64_t j0, int64_t n, int64_t hd, std::vector<float>& widened) const {
    if (!bf16) return static_cast<const float*>(data) + j0 * stride;
    widened.resize(n * hd);
    for (int64_t j = 0; j < n; ++j) {
      const uint16_t* row = static_cast<const uint16_t*>(data) + (j0 + j) * stride;
      for (int64_t c = 0; c < hd; c += 8) {
        const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c)));
        _mm256_storeu_ps(widened.data() + j * hd + c, _mm256_castsi256_ps(_mm256_slli_epi32(h, 16)));
      }
    }
    return widened.data();
  }
};

// scores [R, n] = q [R, hd] k^T * scale for n keys (rows `stride` apart), 8 keys at a time.
void chunk_scores(const float* q, int64_t R, const float* k, int64_t stride, int64_t n, int64_t hd, float scale,
                  float* scores) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const float* kj = k + j * stride;
    for (int64_t r = 0; r < R; ++r) {
      const float* qr = q + r * hd;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t c = 0; c < hd; c += 8) {
        const __m256 x = _mm256_loadu_ps(qr + c);
        a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + c), a0);
        a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + stride + c), a1);
        a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 2 * stride + c), a2);
        a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 3 * stride + c), a3);
        a4 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 4 * stride + c), a4);
        a5 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 5 * stride + c), a5);
        a6 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 6 * stride + c), a6);
        a7 = _mm256_fmadd_ps(x, _mm256_loadu_ps(kj + 7 * stride + c), a7);
      }
      _mm256_storeu_ps(scores + r * n + j,
                       _mm256_mul_ps(horizontal_sums8(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_set1_ps(scale)));
    }
  }
  for (; j < n; ++j)
    for (int64_t r = 0; r < R; ++r) scores[r * n + j] = dot(q + r * hd, k + j * stride, hd) * scale;
}

// out [Rows, 16 columns from c] = p [Rows, n] v[:, c .. c + 16]: a register tile of Rows x 2 vectors (more
// would not leave registers for the values and the broadcast weight).
template <int Rows>
void weighted_values(const float* p, int64_t n, const float* v, int64_t stride, int64_t c, float* out, int64_t hd) {
  __m256 acc[Rows][2];
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const __m256 v0 = _mm256_loadu_ps(v + j * stride + c), v1 = _mm256_loadu_ps(v + j * stride + c + 8);
    for (int r = 0; r < Rows; ++r) {
      const __m256 w = _mm256_broadcast_ss(p + r * n + j);
      acc[r][0] = _mm256_fmadd_ps(w, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(w, v1, acc[r][1]);
    }
  }
  for (int r = 0; r < Rows; ++r) {
    _mm256_storeu_ps(out + r * hd + c, acc[r][0]);
    _mm256_storeu_ps(out + r * hd + c + 8, acc[r][1]);
  }
}

// One chunk of keys for the R rows of one KV head: the rows' maxima m [R], sums of e^(s - m) l [R] and weighted
// values o [R, hd], for the merge. Row r's mask is row r / group of `mask`.
void attend_chunk(const float* q, int64_t R, const float* k, const float* v, int64_t k_stride, int64_t v_stride,
                  int64_t n, int64_t hd, float scale, const bool* mask, int64_t mask_stride, int64_t group, float* m,
                  float* l, float* o, std::vector<float>& scores) {
  scores.resize(R * n);
  float* s = scores.data();
  chunk_scores(q, R, k, k_stride, n, hd, scale, s);
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * n;
    if (mask != nullptr)
      for (int64_t j = 0; j < n; ++j)
        if (!mask[r / group * mask_stride + j]) sr[j] = -INFINITY;  // (row r is token r / group's)
    const float top = m[r] = max_or_nan(sr, n);
    const __m256 shift = _mm256_set1_ps(std::isinf(top) && top < 0 ? 0.f : top);  // all masked: every p is 0
    __m256 sum = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + j), shift));
      _mm256_storeu_ps(sr + j, e);
      sum = _mm256_add_ps(sum, e);
    }
    float total = horizontal_sum(sum);
    for (; j < n; ++j) total += (sr[j] = std::exp(sr[j] - (std::isinf(top) && top < 0 ? 0.f : top)));
    l[r] = total;
  }
  for (int64_t c = 0; c < hd; c += 16) {
    if (c + 16 > hd) {  // hd % 16 == 8: the last 8 columns one vector at a time
      for (int64_t r = 0; r < R; ++r) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; ++j)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(s[r * n + j]), _mm256_loadu_ps(v + j * v_stride + c), acc);
        _mm256_storeu_ps(o + r * hd + c, acc);
      }
      break;
    }
    int64_t r = 0;
    for (; r + 4 <= R; r += 4) weighted_values<4>(s + r * n, n, v, v_stride, c, o + r * hd, hd);
    with_rows<3>(R - r, [&](auto rows) {
      if (r < R) weighted_values<decltype(rows)::value>(s + r * n, n, v, v_stride, c, o + r * hd, hd);
    });
  }
}

}  // namespace

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask,
                               double scale) {
  TORCH_CHECK((q.dtype() == torch::kFloat32 || q.dtype() == torch::kBFloat16) &&
              (k.dtype() == torch::kFloat32 || k.dtype() == torch::kBFloat16), "q, k, v: f32 or bf16");
  const bool* mp = attention_inputs(q, k, v, mask, 8);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3), KV = k.size(1), S = k.size(2);
  const int64_t G = H / KV, R = G * T, heads = B * KV;
  // The query rows of each KV head side by side, as float32: row t * G + g is token t's query head kv * G + g.
  std::vector<float> queries(heads * R * hd);
  const bool q_bf16 = q.dtype() == torch::kBFloat16;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t offset = b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
        float* row = queries.data() + ((b * KV + h / G) * R + t * G + h % G) * hd;
        for (int64_t d = 0; d < hd; ++d)
          row[d] = q_bf16 ? bf16_to_float(reinterpret_cast<const uint16_t*>(q.data_ptr())[offset + d])
                          : q.data_ptr<float>()[offset + d];
      }
  const bool bf16 = k.dtype() == torch::kBFloat16;
  // Up to 4 chunks per thread, so that one long sequence keeps every thread busy, and no fewer than 128 keys per
  // chunk, where the merge and the per-chunk work would start to show.
  const int64_t element = bf16 ? 2 : 4, threads = at::get_num_threads();
  const int64_t chunks = std::clamp<int64_t>(S / 128, 1, (4 * threads + heads - 1) / heads);
  const int64_t keys_per_chunk = (S + chunks - 1) / chunks;
  // Each chunk's o [R, hd], m [R] and l [R], for the merge.
  std::vector<float> partial(heads * chunks * R * (hd + 2));
  float* pp = partial.data();
  at::parallel_for(0, heads * chunks, 1, [&](int64_t u0, int64_t u1) {
    std::vector<float> scores, keys, values;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t head = u / chunks, chunk = u % chunks, b = head / KV, kv = head % KV;
      const int64_t j0 = chunk * keys_per_chunk, n = std::min(keys_per_chunk, S - j0);
      auto rows = [&](const torch::Tensor& t) {
        return HeadRows{static_cast<const char*>(t.data_ptr()) + (b * t.stride(0) + kv * t.stride(1)) * element,
                        t.stride(2), bf16};
      };
      const float* kc = rows(k).chunk(j0, n, hd, keys);
      const float* vc = rows(v).chunk(j0, n, hd, values);
      const int64_t k_stride = bf16 ? hd : k.stride(2), v_stride = bf16 ? hd : v.stride(2);
      const bool* mc = mp == nullptr ? nullptr : mp + (mask->size(0) == 1 ? 0 : b) * T * S + j0;
      float* out = pp + u * R * (hd + 2);
      attend_chunk(queries.data() + head * R * hd, R, kc, vc, k_stride, v_stride, n, hd, static_cast<float>(scale),
                   mc, S, G, out + R * hd, out + R * hd + R, out, scores);
    }
  });
  // The merge, here in the calling thread (a second parallel region would cost more than it saves): each chunk's
  // share weighted by e^(its maximum - the row's), over the sum of the weighted sums. The output takes the query's
  // dtype here, where a torch conversion after the call cost about 15 us per layer.
  auto y = torch::empty({B, T, H * hd}, q.dtype());
  float* y_f32 = q_bf16 ? nullptr : y.data_ptr<float>();
  at::BFloat16* y_bf16 = q_bf16 ? y.data_ptr<at::BFloat16>() : nullptr;
  std::vector<float> sum(hd);
  for (int64_t head = 0; head < heads; ++head)
    for (int64_t r = 0; r < R; ++r) {
      auto part = [&](int64_t chunk) { return pp + (head * chunks + chunk) * R * (hd + 2); };
      float top = -INFINITY;
      for (int64_t c = 0; c < chunks; ++c) top = max_or_nan(top, part(c)[R * hd + r]);
      float total = 0.f;
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float m = part(c)[R * hd + r];
        if (std::isinf(m) && m < 0) continue;  // a chunk whose keys this row cannot see
        const float weight = chunks == 1 ? 1.f : std::exp(m - top);
        total += weight * part(c)[R * hd + R + r];
        const float* o = part(c) + r * hd;
        for (int64_t d = 0; d < hd; ++d) sum[d] += weight * o[d];
      }
      const float inverse = total > 0.f ? 1.f / total : 0.f;
      const int64_t b = head / KV, kv = head % KV, t = r / G, g = r % G;
      const int64_t offset = ((b * T + t) * H + kv * G + g) * hd;
      for (int64_t d = 0; d < hd; ++d)
        if (q_bf16)
          y_bf16[offset + d] = at::BFloat16(sum[d] * inverse);
        else
          y_f32[offset + d] = sum[d] * inverse;
    }
  return y;
}
