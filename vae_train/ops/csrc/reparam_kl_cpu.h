// CPU kernels of the fused reparameterization + KL op (torch types only at the
// edges: raw pointers in, so the loops stay simple enough to vectorize).
#pragma once

#include <cstdint>

namespace vae_train_ops {

// Tensors are contiguous [P = B * C planes, S elements]. `eps` may be null: the
// noise is then regenerated from `seed` (see reparam_kl_math.h). `kl_plane` has P
// entries and `kl` B entries, both of the accumulation type `acc_t`.
template <typename scalar_t, typename acc_t>
void forward_cpu(const scalar_t* mu, const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* z,
                 acc_t* kl_plane, acc_t* kl, int64_t batch, int64_t channels, int64_t plane_size);

template <typename scalar_t, typename acc_t>
void backward_cpu(const scalar_t* grad_z, const acc_t* grad_kl, const acc_t* grad_kl_plane, const scalar_t* mu,
                  const scalar_t* logvar, const scalar_t* eps, uint64_t seed, scalar_t* grad_mu,
                  scalar_t* grad_logvar, int64_t batch, int64_t channels, int64_t plane_size);

// out[i] = normal_at(seed, i) for i < n: the per-element noise path the CUDA
// kernel uses, exposed so CPU tests can compare it with the vectorized blocks.
void normal_at_cpu(uint64_t seed, float* out, int64_t n);

}  // namespace vae_train_ops
