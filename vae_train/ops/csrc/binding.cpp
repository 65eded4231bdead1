// Torch binding: defines the operators vae_train_ops::reparam_kl_fwd and
// vae_train_ops::reparam_kl_bwd (TORCH_LIBRARY, so torch.compile and DeepSpeed
// see one opaque op) and registers the CPU kernels, plus the CUDA kernels when
// built with -DVAE_TRAIN_WITH_CUDA. Autograd and the fake (meta) kernels are
// registered from Python in vae_train/ops/fused.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>

#include "reparam_kl_cpu.h"

#ifdef VAE_TRAIN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "reparam_kl_cuda.h"
#endif

namespace vae_train_ops {
namespace {

// (B, C, S) of an input [B, ...]: C is dim 1 (1 for 1-D inputs), S the rest.
struct Planes {
  int64_t batch, channels, plane_size;
};

Planes planes_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "reparam_kl: inputs need a batch dimension, got a 0-d tensor");
  const int64_t batch = t.size(0);
  const int64_t channels = t.dim() > 1 ? t.size(1) : 1;
  int64_t plane_size = 1;
  for (int64_t d = 2; d < t.dim(); ++d) plane_size *= t.size(d);
  return {batch, channels, plane_size};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_inputs(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps) {
  TORCH_CHECK(mu.sizes() == logvar.sizes(), "reparam_kl: mu ", mu.sizes(), " and logvar ", logvar.sizes(),
              " differ in shape");
  TORCH_CHECK(mu.scalar_type() == logvar.scalar_type(), "reparam_kl: mu and logvar differ in dtype");
  if (eps.has_value()) {
    TORCH_CHECK(eps->sizes() == mu.sizes() && eps->scalar_type() == mu.scalar_type(),
                "reparam_kl: eps must match mu in shape and dtype");
  }
}

uint64_t seed_of(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

// Checked, contiguous inputs and their (B, C, S) layout: where every forward and backward starts.
struct Inputs {
  at::Tensor mu, logvar;
  c10::optional<at::Tensor> eps;  // absent: the kernels draw the noise from the seed
  Planes pl;

  template <typename T>
  const T* eps_data() const {
    return eps.has_value() ? static_cast<const T*>(eps->const_data_ptr()) : nullptr;
  }
};

Inputs prepare_inputs(const at::Tensor& mu, const at::Tensor& logvar, const c10::optional<at::Tensor>& eps) {
  check_inputs(mu, logvar, eps);
  const at::Tensor mu_c = mu.contiguous();
  return {mu_c, logvar.contiguous(), eps.has_value() ? c10::optional<at::Tensor>(eps->contiguous()) : eps,
          planes_of(mu_c)};
}

// z in the inputs' dtype; the KL sums per plane and per image in the accumulation type.
struct ForwardOutputs {
  at::Tensor z, kl, kl_plane;
};

ForwardOutputs allocate_forward_outputs(const Inputs& in) {
  const auto acc = in.mu.options().dtype(acc_type(in.mu.scalar_type()));
  return {at::empty_like(in.mu), at::empty({in.pl.batch}, acc), at::empty({in.pl.batch, in.pl.channels}, acc)};
}

// Upstream gradients in the dtypes the backward kernels read, contiguous.
struct Grads {
  at::Tensor dz, dkl, dkl_plane;
};

Grads prepare_grads(const at::Tensor& grad_z, const at::Tensor& grad_kl, const at::Tensor& grad_kl_plane,
                    const Inputs& in) {
  const auto acc = acc_type(in.mu.scalar_type());
  return {grad_z.to(in.mu.scalar_type()).contiguous(), grad_kl.to(acc).contiguous(),
          grad_kl_plane.to(acc).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu_op(const at::Tensor& mu_in, const at::Tensor& logvar_in,
                                                              const c10::optional<at::Tensor>& eps_in,
                                                              const at::Tensor& seed) {
  const Inputs in = prepare_inputs(mu_in, logvar_in, eps_in);
  const at::Tensor &mu = in.mu, &logvar = in.logvar;
  const Planes pl = in.pl;
  const ForwardOutputs out = allocate_forward_outputs(in);
  const at::Tensor &z = out.z, &kl = out.kl, &kl_plane = out.kl_plane;
  const uint64_t s = seed_of(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_fwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_cpu<scalar_t, acc_t>(mu.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(),
                                 in.eps_data<scalar_t>(), s,
                                 z.mutable_data_ptr<scalar_t>(), kl_plane.mutable_data_ptr<acc_t>(),
                                 kl.mutable_data_ptr<acc_t>(), pl.batch, pl.channels, pl.plane_size);
  });
  return {z, kl, kl_plane};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu_op(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                   const at::Tensor& grad_kl_plane, const at::Tensor& mu_in,
                                                   const at::Tensor& logvar_in,
                                                   const c10::optional<at::Tensor>& eps_in, const at::Tensor& seed) {
  const Inputs in = prepare_inputs(mu_in, logvar_in, eps_in);
  const at::Tensor &mu = in.mu, &logvar = in.logvar;
  const Planes pl = in.pl;
  const Grads g = prepare_grads(grad_z, grad_kl, grad_kl_plane, in);
  const at::Tensor &dz = g.dz, &dkl = g.dkl, &dkl_plane = g.dkl_plane;
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(mu);
  const uint64_t s = seed_of(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "reparam_kl_bwd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_cpu<scalar_t, acc_t>(dz.const_data_ptr<scalar_t>(), dkl.const_data_ptr<acc_t>(),
                                  dkl_plane.const_data_ptr<acc_t>(), mu.const_data_ptr<scalar_t>(),
                                  logvar.const_data_ptr<scalar_t>(),
                                  in.eps_data<scalar_t>(), s,
                                  grad_mu.mutable_data_ptr<scalar_t>(), grad_logvar.mutable_data_ptr<scalar_t>(),
                                  pl.batch, pl.channels, pl.plane_size);
  });
  return {grad_mu, grad_logvar};
}

at::Tensor normal_at_op(const at::Tensor& seed, int64_t n) {
  at::Tensor out = at::empty({n}, at::kFloat);
  normal_at_cpu(seed_of(seed), out.mutable_data_ptr<float>(), n);
  return out;
}

#ifdef VAE_TRAIN_WITH_CUDA
int cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return kFloat32;
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    case at::kDouble:
      return kFloat64;
    default:
      break;
  }
  TORCH_CHECK(false, "reparam_kl: unsupported dtype ", t);
  return -1;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cuda_op(const at::Tensor& mu_in,
                                                               const at::Tensor& logvar_in,
                                                               const c10::optional<at::Tensor>& eps_in,
                                                               const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const Inputs in = prepare_inputs(mu_in, logvar_in, eps_in);
  const at::Tensor &mu = in.mu, &logvar = in.logvar;
  const Planes pl = in.pl;
  const ForwardOutputs out = allocate_forward_outputs(in);
  const at::Tensor &z = out.z, &kl = out.kl, &kl_plane = out.kl_plane;
  const char* err = vae_train_ops::forward_cuda(
      cuda_dtype(mu.scalar_type()), mu.const_data_ptr(), logvar.const_data_ptr(),
      in.eps_data<void>(), seed_of(seed), z.mutable_data_ptr(),
      kl_plane.mutable_data_ptr(), kl.mutable_data_ptr(), pl.batch, pl.channels, pl.plane_size,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "reparam_kl forward CUDA kernel failed: ", err);
  return {z, kl, kl_plane};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda_op(const at::Tensor& grad_z, const at::Tensor& grad_kl,
                                                    const at::Tensor& grad_kl_plane, const at::Tensor& mu_in,
                                                    const at::Tensor& logvar_in,
                                                    const c10::optional<at::Tensor>& eps_in, const at::Tensor& seed) {
  const c10::cuda::CUDAGuard guard(mu_in.device());
  const Inputs in = prepare_inputs(mu_in, logvar_in, eps_in);
  const at::Tensor &mu = in.mu, &logvar = in.logvar;
  const Planes pl = in.pl;
  const Grads g = prepare_grads(grad_z, grad_kl, grad_kl_plane, in);
  const at::Tensor &dz = g.dz, &dkl = g.dkl, &dkl_plane = g.dkl_plane;
  at::Tensor grad_mu = at::empty_like(mu), grad_logvar = at::empty_like(mu);
  const char* err = vae_train_ops::backward_cuda(
      cuda_dtype(mu.scalar_type()), dz.const_data_ptr(), dkl.const_data_ptr(), dkl_plane.const_data_ptr(),
      mu.const_data_ptr(), logvar.const_data_ptr(), in.eps_data<void>(),
      seed_of(seed), grad_mu.mutable_data_ptr(), grad_logvar.mutable_data_ptr(), pl.batch, pl.channels,
      pl.plane_size, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "reparam_kl backward CUDA kernel failed: ", err);
  return {grad_mu, grad_logvar};
}
#endif

}  // namespace

TORCH_LIBRARY(vae_train_ops, m) {
  m.def("reparam_kl_fwd(Tensor mu, Tensor logvar, Tensor? eps, Tensor seed) -> (Tensor, Tensor, Tensor)");
  m.def(
      "reparam_kl_bwd(Tensor grad_z, Tensor grad_kl, Tensor grad_kl_per_channel, Tensor mu, Tensor logvar, "
      "Tensor? eps, Tensor seed) -> (Tensor, Tensor)");
  // For tests: the noise of elements 0..n-1 computed one by one, as on the GPU.
  m.def("normal_at(Tensor seed, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(vae_train_ops, CPU, m) {
  m.impl("reparam_kl_fwd", &forward_cpu_op);
  m.impl("reparam_kl_bwd", &backward_cpu_op);
  m.impl("normal_at", &normal_at_op);
}

#ifdef VAE_TRAIN_WITH_CUDA
TORCH_LIBRARY_IMPL(vae_train_ops, CUDA, m) {
  m.impl("reparam_kl_fwd", &forward_cuda_op);
  m.impl("reparam_kl_bwd", &backward_cuda_op);
}
#endif

}  // namespace vae_train_ops
