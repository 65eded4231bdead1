// Element-wise math of the fused reparameterization + KL op, shared by the C++
// CPU kernel and the CUDA kernel, so the CPU tests exercise exactly the math the
// GPU runs. Plain C++17 with no torch or CUDA headers: nvcc compiles it as
// __host__ __device__ code, g++ inlines it into vectorizable loops.
//
// The definition (vae_train/ops/reference.py is the same in PyTorch):
//   lv    = soft_clamp(logvar)          identity on [-15, 5], tanh knee into (-20, 10)
//   sigma = exp(lv / 2)
//   z     = mu + sigma * eps
//   kl    = 0.5 * (mu^2 + sigma^2 - 1 - lv)            summed per (batch, channel)
// and its backward with w = dKL[b] + dKL_per_channel[b, c]:
//   dmu     = dz + w * mu
//   dlogvar = soft_clamp'(logvar) * (0.5 * dz * sigma * eps + 0.5 * w * (sigma^2 - 1))
//
// Noise: when the caller gives no eps, eps is a pure function of (seed, element
// index): Philox4x32-10 (Salmon et al., SC'11) counter -> 4 x 32 random bits ->
// two Box-Muller pairs. The backward regenerates it instead of saving it. The
// float functions below are branch-free polynomial approximations (Cephes
// coefficients, about 1-2 ulp) so that g++ vectorizes whole loops; double keeps
// the libm functions (used for float64 gradcheck).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define VT_HD __host__ __device__ __forceinline__
#define VT_UNROLL _Pragma("unroll")
#else
#define VT_HD inline __attribute__((always_inline))
#define VT_UNROLL _Pragma("GCC unroll 10")
#endif

namespace vae_train_ops {

// Keep in sync with vae_train/ops/reference.py.
constexpr float kLogvarMin = -20.0f;
constexpr float kLogvarLinearMin = -15.0f;
constexpr float kLogvarLinearMax = 5.0f;
constexpr float kLogvarMax = 10.0f;

// Elements per noise block: Philox counter g covers elements
// (g / 16) * 64 + g % 16 + 16 * k for k = 0..3, so one block of 64 consecutive
// elements is 16 independent counters whose outputs store contiguously.
constexpr int64_t kNoiseBlock = 64;
constexpr int64_t kNoiseLanes = 16;

VT_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

VT_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// exp(x), about 1 ulp on the clamped range; no overflow for any finite x.
VT_HD float vt_exp(float x) {
  // Selects, not fminf/fmaxf: those have NaN rules that block vectorization.
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  return e * bits_float(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
}

VT_HD double vt_exp(double x) { return exp(x); }

// log(x) for normal positive floats (the Box-Muller input is in [2^-24, 1]).
VT_HD float vt_log(float x) {
  const uint32_t bits = float_bits(x);
  float e = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126);
  float m = bits_float((bits & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return m + y + e * 0.693359375f;
}

// sin and cos of 2*pi*u for u in [0, 1): the quadrant comes straight from u,
// so the range reduction is exact.
VT_HD void vt_sincos_2pi(float u, float& s, float& c) {
  const float q = floorf(u * 4.0f + 0.5f);
  const float a = (u - q * 0.25f) * 6.28318530717958648f;  // in [-pi/4, pi/4]
  const float z = a * a;
  const float sp = a + a * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float cp = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  const int32_t quadrant = static_cast<int32_t>(q) & 3;
  const float s1 = (quadrant & 1) ? cp : sp;
  const float c1 = (quadrant & 1) ? sp : cp;
  s = (quadrant & 2) ? -s1 : s1;
  c = ((quadrant + 1) & 2) ? -c1 : c1;
}

VT_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 of the 128-bit counter (c0, c1, c2, c3) under the key (k0, k1).
VT_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                         uint32_t out[4]) {
  VT_UNROLL
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The noise stream's Philox call: counter (group, 0) under the 64-bit seed.
VT_HD void philox_group(uint64_t group, uint64_t seed, uint32_t out[4]) {
  philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), out);
}

// Box-Muller: (cos, sin) outputs of one pair of 32-bit words, 24 bits each.
VT_HD void box_muller(uint32_t a, uint32_t b, float& n_cos, float& n_sin) {
  const float u1 = static_cast<float>((a >> 8) + 1u) * 5.9604644775390625e-8f;  // (0, 1]
  const float u2 = static_cast<float>(b >> 8) * 5.9604644775390625e-8f;         // [0, 1)
  const float radius = sqrtf(-2.0f * vt_log(u1));
  float s, c;
  vt_sincos_2pi(u2, s, c);
  n_cos = radius * c;
  n_sin = radius * s;
}

// The four normals of Philox counter `group` (see kNoiseBlock for their elements).
VT_HD void normal4(uint64_t seed, uint64_t group, float& n0, float& n1, float& n2, float& n3) {
  uint32_t bits[4];
  philox_group(group, seed, bits);
  box_muller(bits[0], bits[1], n0, n1);
  box_muller(bits[2], bits[3], n2, n3);
}

// The normal of one element, computed alone (the CUDA kernel's path).
VT_HD float normal_at(uint64_t seed, uint64_t index) {
  const uint64_t block = index / kNoiseBlock;
  const uint32_t within = static_cast<uint32_t>(index % kNoiseBlock);
  float n[4];
  normal4(seed, block * kNoiseLanes + within % kNoiseLanes, n[0], n[1], n[2], n[3]);
  return n[within / kNoiseLanes];
}

// Soft clamp of logvar and its derivative: x - s * (u - tanh u) with u the
// scaled excess over the linear range, so value, slope and curvature are
// continuous at the knees and the slope 1 - tanh(u)^2 never reaches zero.
template <typename T>
VT_HD void soft_clamp(T x, T& value, T& slope) {
  const T upper = T(kLogvarMax - kLogvarLinearMax);
  const T lower = T(kLogvarLinearMin - kLogvarMin);
  const bool high = x > T(kLogvarLinearMax);
  const T excess = high ? (x - T(kLogvarLinearMax)) * (T(1) / upper) : (T(kLogvarLinearMin) - x) * (T(1) / lower);
  const T u = excess > T(0) ? excess : T(0);
  const T q = vt_exp(T(-2) * u);  // tanh(u) = (1 - q) / (1 + q), q in (0, 1]
  const T t = (T(1) - q) / (T(1) + q);
  const T scale = high ? upper : -lower;
  value = x - scale * (u - t);
  slope = T(1) - t * t;
}

// logvar -> (clamped logvar, slope). kLinear: the caller knows logvar is inside
// the linear range (the CPU kernel checks a block at once), so skip the knee.
template <bool kLinear, typename T>
VT_HD void clamp_logvar(T logvar, T& lv, T& slope) {
  if constexpr (kLinear) {
    lv = logvar;
    slope = T(1);
  } else {
    soft_clamp(logvar, lv, slope);
  }
}

// Forward of one element; returns z and adds its KL to `kl`.
template <typename T, bool kLinear = false>
VT_HD T forward_element(T mu, T logvar, T eps, T& kl) {
  T lv, slope;
  clamp_logvar<kLinear>(logvar, lv, slope);
  const T sigma = vt_exp(T(0.5) * lv);
  kl += T(0.5) * (mu * mu + sigma * sigma - T(1) - lv);
  return mu + sigma * eps;
}

// Backward of one element; `w` is dKL[b] + dKL_per_channel[b, c].
template <typename T, bool kLinear = false>
VT_HD void backward_element(T mu, T logvar, T eps, T dz, T w, T& dmu, T& dlogvar) {
  T lv, slope;
  clamp_logvar<kLinear>(logvar, lv, slope);
  const T sigma = vt_exp(T(0.5) * lv);
  dmu = dz + w * mu;
  dlogvar = slope * T(0.5) * (dz * sigma * eps + w * (sigma * sigma - T(1)));
}

}  // namespace vae_train_ops
