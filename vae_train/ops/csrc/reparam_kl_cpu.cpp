// CPU kernels: one pass forward, one pass backward, OpenMP (at::parallel_for)
// over planes (batch x channel), each plane's KL reduced by one thread so the
// result does not depend on the thread count. The inner loops run over blocks
// of 64 elements whose noise comes from 16 Philox counters; `#pragma omp simd`
// plus the branch-free math of reparam_kl_math.h lets g++ vectorize them.
#include "reparam_kl_cpu.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "reparam_kl_math.h"

namespace vae_train_ops {
namespace {

// Loads and stores through the accumulation type; bf16 is done with bit
// arithmetic (round to nearest even) so the loops vectorize.
template <typename T>
struct Io {
  static T load(T x) { return x; }
  static T store(T x) { return x; }
};

template <>
struct Io<c10::BFloat16> {
  static float load(c10::BFloat16 x) { return bits_float(static_cast<uint32_t>(x.x) << 16); }
  static c10::BFloat16 store(float f) {
    const uint32_t u = float_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = f != f ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  }
};

template <>
struct Io<c10::Half> {
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float f) { return c10::Half(f); }
};

// Minimum elements per parallel task: below this, threads cost more than they save.
constexpr int64_t kGrainElements = 32768;

// Philox words of the 16 counters of one noise block: words[k * 16 + j] is word
// k of counter first + j. The AVX-512 / AVX2 versions do 16 / 8 counters per
// register with even/odd 32x32->64 multiplies (g++'s own vectorization of the
// 64-bit product is shuffle-bound and ~3x slower); they must equal philox_group
// bit for bit, which tests check through the scalar normal_at path.
#if defined(__AVX512F__)
inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

void philox_words(uint64_t seed, uint64_t first, uint32_t* words) {
  static_assert(kNoiseLanes == 16, "one 512-bit register holds the 16 counters of a block");
  alignas(64) uint32_t lo_words[kNoiseLanes], hi_words[kNoiseLanes];
  for (int64_t j = 0; j < kNoiseLanes; ++j) {
    const uint64_t counter = first + static_cast<uint64_t>(j);
    lo_words[j] = static_cast<uint32_t>(counter);
    hi_words[j] = static_cast<uint32_t>(counter >> 32);
  }
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(0xCD9E8D57u));
  __m512i c0 = _mm512_load_si512(lo_words), c1 = _mm512_load_si512(hi_words);
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, hi0, lo0);
    mulhilo16(c2, m1, hi1, lo1);
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
    c1 = lo1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  _mm512_storeu_si512(words, c0);
  _mm512_storeu_si512(words + kNoiseLanes, c1);
  _mm512_storeu_si512(words + 2 * kNoiseLanes, c2);
  _mm512_storeu_si512(words + 3 * kNoiseLanes, c3);
}
#elif defined(__AVX2__)
inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

void philox_words(uint64_t seed, uint64_t first, uint32_t* words) {
  // Both halves of the block go through the rounds together: one chain of
  // dependent multiplies is latency-bound, two interleaved ones are not.
  constexpr int kVectors = kNoiseLanes / 8;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(0xD2511F53u));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0xCD9E8D57u));
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(0x9E3779B9u));
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(0xBB67AE85u));
  alignas(32) uint32_t lo_words[kNoiseLanes], hi_words[kNoiseLanes];
  for (int64_t j = 0; j < kNoiseLanes; ++j) {
    const uint64_t counter = first + static_cast<uint64_t>(j);
    lo_words[j] = static_cast<uint32_t>(counter);
    hi_words[j] = static_cast<uint32_t>(counter >> 32);
  }
  __m256i c0[kVectors], c1[kVectors], c2[kVectors], c3[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    c0[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo_words + 8 * v));
    c1[v] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi_words + 8 * v));
    c2[v] = _mm256_setzero_si256();
    c3[v] = _mm256_setzero_si256();
  }
  __m256i k0 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed)));
  __m256i k1 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(seed >> 32)));
  for (int round = 0; round < 10; ++round) {
    for (int v = 0; v < kVectors; ++v) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0[v], m0, hi0, lo0);
      mulhilo8(c2[v], m1, hi1, lo1);
      c0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[v]), k0);
      c2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[v]), k1);
      c1[v] = lo1;
      c3[v] = lo0;
    }
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  for (int v = 0; v < kVectors; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 8 * v), c0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + kNoiseLanes + 8 * v), c1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 2 * kNoiseLanes + 8 * v), c2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(words + 3 * kNoiseLanes + 8 * v), c3[v]);
  }
}
#else
void philox_words(uint64_t seed, uint64_t first, uint32_t* words) {
  for (int64_t j = 0; j < kNoiseLanes; ++j) {
    uint32_t out[4];
    philox_group(first + static_cast<uint64_t>(j), seed, out);
    for (int k = 0; k < 4; ++k) words[k * kNoiseLanes + j] = out[k];
  }
}
#endif

// The 64 normals of noise block `block` in the element order of kNoiseBlock.
template <typename acc_t>
void noise_block(uint64_t seed, int64_t block, acc_t* __restrict out) {
  alignas(64) uint32_t words[kNoiseBlock];
  philox_words(seed, static_cast<uint64_t>(block) * kNoiseLanes, words);
  for (int64_t pair = 0; pair < 2; ++pair) {
    const uint32_t* __restrict a = words + 2 * pair * kNoiseLanes;
    acc_t* __restrict o = out + 2 * pair * kNoiseLanes;
#pragma omp simd
    for (int64_t j = 0; j < kNoiseLanes; ++j) {
      float n_cos, n_sin;
      box_muller(a[j], a[kNoiseLanes + j], n_cos, n_sin);
      o[j] = n_cos;
      o[kNoiseLanes + j] = n_sin;
    }
  }
}

// Calls body(lo, n, noise) for each piece [lo, lo + n) of [begin, end) inside one
// noise block, where noise[k] is element lo + k's normal (or its eps) as acc_t.
// `cached` remembers which block `buffer` holds, so planes smaller than a block
// (e.g. 7x7 latents, or [B, D] vectors with one element per plane) draw each
// block once, not once per plane.
template <typename scalar_t, typename acc_t, typename Body>
void for_each_block(int64_t begin, int64_t end, const scalar_t* eps, uint64_t seed, acc_t* buffer,
                    int64_t& cached, Body body) {
  for (int64_t start = begin - begin % kNoiseBlock; start < end; start += kNoiseBlock) {
    const int64_t lo = std::max(begin, start);
    const int64_t hi = std::min(end, start + kNoiseBlock);
    if (eps != nullptr) {
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) buffer[i - start] = Io<scalar_t>::load(eps[i]);
    } else if (cached != start / kNoiseBlock) {
      cached = start / kNoiseBlock;
      noise_block(seed, cached, buffer);
    }
    body(lo, hi - lo, buffer + (lo - start));
  }
}

// True when every one of the n logvars is in the soft clamp's linear range, so the
// element loops can skip the knee (the common case; NaN counts as inside and
// propagates either way).
template <typename scalar_t>
bool all_linear(const scalar_t* __restrict logvar, int64_t n) {
  int outside = 0;
#pragma omp simd reduction(| : outside)
  for (int64_t i = 0; i < n; ++i) {
    const auto x = Io<scalar_t>::load(logvar[i]);
    outside |= static_cast<int>(x < kLogvarLinearMin) | static_cast<int>(x > kLogvarLinearMax);
  }
  return outside == 0;
}

// Element loops over n elements as functions of restrict pointers: inside the
// lambdas below, the captured pointers could alias the outputs and g++ would not
// vectorize.
template <bool kLinear, typename scalar_t, typename acc_t>
acc_t forward_range(const scalar_t* __restrict mu, const scalar_t* __restrict logvar,
                    const acc_t* __restrict noise, scalar_t* __restrict z, int64_t n) {
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    acc_t kl_i = 0;
    const acc_t z_i = forward_element<acc_t, kLinear>(Io<scalar_t>::load(mu[i]), Io<scalar_t>::load(logvar[i]),
                                                      noise[i], kl_i);
    z[i] = Io<scalar_t>::store(z_i);
    sum += kl_i;
  }
  return sum;
}

template <bool kLinear, typename scalar_t, typename acc_t>
void backward_range(const scalar_t* __restrict grad_z, acc_t w, const scalar_t* __restrict mu,
                    const scalar_t* __restrict logvar, const acc_t* __restrict noise,
                    scalar_t* __restrict grad_mu, scalar_t* __restrict grad_logvar, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t dmu, dlogvar;
    backward_element<acc_t, kLinear>(Io<scalar_t>::load(mu[i]), Io<scalar_t>::load(logvar[i]), noise[i],
                                     Io<scalar_t>::load(grad_z[i]), w, dmu, dlogvar);
    grad_mu[i] = Io<scalar_t>::store(dmu);
    grad_logvar[i] = Io<scalar_t>::store(dlogvar);
  }
}

}  // namespace

template <typename scalar_t, typename acc_t>
void forward_cpu(const scalar_t* mu, const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* z,
                 acc_t* kl_plane, acc_t* kl, int64_t batch, int64_t channels, int64_t plane_size) {
  const int64_t planes = batch * channels;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, plane_size));
  at::parallel_for(0, planes, grain, [&](int64_t first, int64_t last) {
    alignas(64) acc_t buffer[kNoiseBlock];
    int64_t cached = -1;
    for (int64_t p = first; p < last; ++p) {
      acc_t sum = 0;
      for_each_block(p * plane_size, (p + 1) * plane_size, eps, seed, buffer, cached,
                     [&](int64_t lo, int64_t n, const acc_t* noise) {
                       sum += all_linear(logvar + lo, n)
                                  ? forward_range<true>(mu + lo, logvar + lo, noise, z + lo, n)
                                  : forward_range<false>(mu + lo, logvar + lo, noise, z + lo, n);
                     });
      kl_plane[p] = sum;
    }
  });
  for (int64_t b = 0; b < batch; ++b) {
    acc_t sum = 0;
    for (int64_t c = 0; c < channels; ++c) sum += kl_plane[b * channels + c];
    kl[b] = sum;
  }
}

template <typename scalar_t, typename acc_t>
void backward_cpu(const scalar_t* grad_z, const acc_t* grad_kl, const acc_t* grad_kl_plane, const scalar_t* mu,
                  const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* grad_mu,
                  scalar_t* grad_logvar, int64_t batch, int64_t channels, int64_t plane_size) {
  const int64_t planes = batch * channels;
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, plane_size));
  at::parallel_for(0, planes, grain, [&](int64_t first, int64_t last) {
    alignas(64) acc_t buffer[kNoiseBlock];
    int64_t cached = -1;
    for (int64_t p = first; p < last; ++p) {
      const acc_t w = grad_kl[p / channels] + grad_kl_plane[p];
      for_each_block(p * plane_size, (p + 1) * plane_size, eps, seed, buffer, cached,
                     [&](int64_t lo, int64_t n, const acc_t* noise) {
                       if (all_linear(logvar + lo, n)) {
                         backward_range<true>(grad_z + lo, w, mu + lo, logvar + lo, noise, grad_mu + lo,
                                              grad_logvar + lo, n);
                       } else {
                         backward_range<false>(grad_z + lo, w, mu + lo, logvar + lo, noise, grad_mu + lo,
                                               grad_logvar + lo, n);
                       }
                     });
    }
  });
}

void normal_at_cpu(uint64_t seed, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = normal_at(seed, static_cast<uint64_t>(i));
}

#define VT_INSTANTIATE(scalar_t, acc_t)                                                                       \
  template void forward_cpu<scalar_t, acc_t>(const scalar_t*, const scalar_t*, const scalar_t*, uint64_t,    \
                                             scalar_t*, acc_t*, acc_t*, int64_t, int64_t, int64_t);          \
  template void backward_cpu<scalar_t, acc_t>(const scalar_t*, const acc_t*, const acc_t*, const scalar_t*,   \
                                              const scalar_t*, const scalar_t*, uint64_t, scalar_t*, scalar_t*, \
                                              int64_t, int64_t, int64_t);

VT_INSTANTIATE(float, float)
VT_INSTANTIATE(double, double)
VT_INSTANTIATE(c10::BFloat16, float)
VT_INSTANTIATE(c10::Half, float)

}  // namespace vae_train_ops
