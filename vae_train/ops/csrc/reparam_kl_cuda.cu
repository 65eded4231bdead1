// CUDA kernels of the fused reparameterization + KL op. The element math and the
// noise come from reparam_kl_math.h, the same code the CPU kernel runs, so for a
// given seed both devices draw the same eps. Forward: one warp per (batch,
// channel) plane, reducing that plane's KL with shuffles (deterministic, no
// atomics), then one thread per sample sums its channels. Backward: one thread
// per element, grid-stride.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "reparam_kl_cuda.h"
#include "reparam_kl_math.h"

namespace vae_train_ops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 65535;

template <typename T>
struct Io {
  using acc = T;
  __device__ static T load(T x) { return x; }
  __device__ static T store(T x) { return x; }
};

template <>
struct Io<__half> {
  using acc = float;
  __device__ static float load(__half x) { return __half2float(x); }
  __device__ static __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Io<__nv_bfloat16> {
  using acc = float;
  __device__ static float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename scalar_t, typename acc_t>
__device__ acc_t noise_at(const scalar_t* eps, uint64_t seed, int64_t i) {
  return eps != nullptr ? Io<scalar_t>::load(eps[i]) : acc_t(normal_at(seed, static_cast<uint64_t>(i)));
}

template <typename scalar_t>
__global__ void forward_planes(const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                               const scalar_t* __restrict__ eps, uint64_t seed, scalar_t* __restrict__ z,
                               typename Io<scalar_t>::acc* __restrict__ kl_plane, int64_t planes,
                               int64_t plane_size) {
  using acc_t = typename Io<scalar_t>::acc;
  const int lane = threadIdx.x % 32;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; p < planes;
       p += static_cast<int64_t>(gridDim.x) * kWarpsPerBlock) {
    acc_t sum = 0;
    for (int64_t s = lane; s < plane_size; s += 32) {
      const int64_t i = p * plane_size + s;
      const acc_t noise = noise_at<scalar_t, acc_t>(eps, seed, i);
      z[i] = Io<scalar_t>::store(
          forward_element<acc_t>(Io<scalar_t>::load(mu[i]), Io<scalar_t>::load(logvar[i]), noise, sum));
    }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0) kl_plane[p] = sum;
  }
}

template <typename acc_t>
__global__ void sum_channels(const acc_t* __restrict__ kl_plane, acc_t* __restrict__ kl, int64_t batch,
                             int64_t channels) {
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < batch;
       b += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t sum = 0;
    for (int64_t c = 0; c < channels; ++c) sum += kl_plane[b * channels + c];
    kl[b] = sum;
  }
}

template <typename scalar_t>
__global__ void backward_elements(const scalar_t* __restrict__ grad_z,
                                  const typename Io<scalar_t>::acc* __restrict__ grad_kl,
                                  const typename Io<scalar_t>::acc* __restrict__ grad_kl_plane,
                                  const scalar_t* __restrict__ mu, const scalar_t* __restrict__ logvar,
                                  const scalar_t* __restrict__ eps, uint64_t seed, scalar_t* __restrict__ grad_mu,
                                  scalar_t* __restrict__ grad_logvar, int64_t channels, int64_t plane_size,
                                  int64_t total) {
  using acc_t = typename Io<scalar_t>::acc;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = i / plane_size;
    const acc_t w = grad_kl[p / channels] + grad_kl_plane[p];
    acc_t dmu, dlogvar;
    backward_element<acc_t>(Io<scalar_t>::load(mu[i]), Io<scalar_t>::load(logvar[i]),
                            noise_at<scalar_t, acc_t>(eps, seed, i), Io<scalar_t>::load(grad_z[i]), w, dmu,
                            dlogvar);
    grad_mu[i] = Io<scalar_t>::store(dmu);
    grad_logvar[i] = Io<scalar_t>::store(dlogvar);
  }
}

int blocks_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <typename scalar_t>
const char* forward_typed(const void* mu, const void* logvar, const void* eps, uint64_t seed, void* z,
                          void* kl_plane, void* kl, int64_t batch, int64_t channels, int64_t plane_size,
                          cudaStream_t stream) {
  using acc_t = typename Io<scalar_t>::acc;
  const int64_t planes = batch * channels;
  if (planes > 0) {
    forward_planes<scalar_t><<<blocks_for(planes, kWarpsPerBlock), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(mu), static_cast<const scalar_t*>(logvar), static_cast<const scalar_t*>(eps),
        seed, static_cast<scalar_t*>(z), static_cast<acc_t*>(kl_plane), planes, plane_size);
  }
  if (batch > 0) {
    sum_channels<acc_t><<<blocks_for(batch, kThreads), kThreads, 0, stream>>>(
        static_cast<const acc_t*>(kl_plane), static_cast<acc_t*>(kl), batch, channels);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename scalar_t>
const char* backward_typed(const void* grad_z, const void* grad_kl, const void* grad_kl_plane, const void* mu,
                           const void* logvar, const void* eps, uint64_t seed, void* grad_mu, void* grad_logvar,
                           int64_t batch, int64_t channels, int64_t plane_size, cudaStream_t stream) {
  using acc_t = typename Io<scalar_t>::acc;
  const int64_t total = batch * channels * plane_size;
  if (total > 0) {
    backward_elements<scalar_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
        static_cast<const scalar_t*>(grad_z), static_cast<const acc_t*>(grad_kl),
        static_cast<const acc_t*>(grad_kl_plane), static_cast<const scalar_t*>(mu),
        static_cast<const scalar_t*>(logvar), static_cast<const scalar_t*>(eps), seed,
        static_cast<scalar_t*>(grad_mu), static_cast<scalar_t*>(grad_logvar), channels, plane_size, total);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* forward_cuda(int dtype, const void* mu, const void* logvar, const void* eps, uint64_t seed, void* z,
                         void* kl_plane, void* kl, int64_t batch, int64_t channels, int64_t plane_size,
                         void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return forward_typed<float>(mu, logvar, eps, seed, z, kl_plane, kl, batch, channels, plane_size, s);
    case kFloat16:
      return forward_typed<__half>(mu, logvar, eps, seed, z, kl_plane, kl, batch, channels, plane_size, s);
    case kBFloat16:
      return forward_typed<__nv_bfloat16>(mu, logvar, eps, seed, z, kl_plane, kl, batch, channels, plane_size, s);
    case kFloat64:
      return forward_typed<double>(mu, logvar, eps, seed, z, kl_plane, kl, batch, channels, plane_size, s);
    default:
      return "unsupported dtype";
  }
}

const char* backward_cuda(int dtype, const void* grad_z, const void* grad_kl, const void* grad_kl_plane,
                          const void* mu, const void* logvar, const void* eps, uint64_t seed, void* grad_mu,
                          void* grad_logvar, int64_t batch, int64_t channels, int64_t plane_size, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case kFloat32:
      return backward_typed<float>(grad_z, grad_kl, grad_kl_plane, mu, logvar, eps, seed, grad_mu, grad_logvar,
                                   batch, channels, plane_size, s);
    case kFloat16:
      return backward_typed<__half>(grad_z, grad_kl, grad_kl_plane, mu, logvar, eps, seed, grad_mu, grad_logvar,
                                    batch, channels, plane_size, s);
    case kBFloat16:
      return backward_typed<__nv_bfloat16>(grad_z, grad_kl, grad_kl_plane, mu, logvar, eps, seed, grad_mu,
                                           grad_logvar, batch, channels, plane_size, s);
    case kFloat64:
      return backward_typed<double>(grad_z, grad_kl, grad_kl_plane, mu, logvar, eps, seed, grad_mu, grad_logvar,
                                    batch, channels, plane_size, s);
    default:
      return "unsupported dtype";
  }
}

}  // namespace vae_train_ops
