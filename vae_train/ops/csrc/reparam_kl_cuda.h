// Raw-pointer launchers of the CUDA kernels. No torch and no CUDA types here, so
// reparam_kl_cuda.cu compiles with nvcc alone (the compile test does exactly
// that) and the torch binding includes this without the CUDA toolkit headers.
#pragma once

#include <cstdint>

namespace vae_train_ops {

// Element types of the launchers; the accumulation type is double for kFloat64
// and float otherwise.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Returns nullptr on success, else the CUDA error string. `eps` may be null (the
// noise is regenerated from `seed`); `stream` is a cudaStream_t.
const char* forward_cuda(int dtype, const void* mu, const void* logvar, const void* eps, uint64_t seed, void* z,
                         void* kl_plane, void* kl, int64_t batch, int64_t channels, int64_t plane_size,
                         void* stream);

const char* backward_cuda(int dtype, const void* grad_z, const void* grad_kl, const void* grad_kl_plane,
                          const void* mu, const void* logvar, const void* eps, uint64_t seed, void* grad_mu,
                          void* grad_logvar, int64_t batch, int64_t channels, int64_t plane_size, void* stream);

}  // namespace vae_train_ops
