// CUDA kernels of the affinity ops: check the arguments, then hand the
// tensors to the launchers in cuda/affinity_kernels.cu. Only CUDA builds
// compile this file.
#include "affinity.h"
#include "affinity_kernels.cuh"

#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace etap {
namespace {

// Tensor?[] as a list of tensors in which a missing entry is undefined.
std::vector<at::Tensor> with_missing_undefined(
    const c10::List<std::optional<at::Tensor>>& tensors) {
  std::vector<at::Tensor> result;
  result.reserve(tensors.size());
  for (const auto k : c10::irange(tensors.size())) {
    const std::optional<at::Tensor> tensor = tensors[k];
    result.push_back(tensor.has_value() ? *tensor : at::Tensor());
  }
  return result;
}

at::Tensor affinity_cuda(
    at::TensorList grads, at::TensorList updates, const at::Tensor& losses) {
  const AffinityPlan plan = check_affinity_args(grads, updates, losses);
  const c10::cuda::CUDAGuard device_guard(plan.device);
  return cuda::launch_affinity(grads, updates, losses, plan.accumulate_dtype);
}

at::Tensor affinity_sgd_cuda(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    const at::Tensor& losses) {
  const AffinityPlan plan =
      check_affinity_sgd_args(grads, scales, offsets, losses);
  const c10::cuda::CUDAGuard device_guard(plan.device);
  return cuda::launch_affinity_sgd(
      grads,
      scales,
      with_missing_undefined(offsets),
      losses,
      plan.accumulate_dtype);
}

at::Tensor affinity_adam_cuda(
    at::TensorList grads,
    at::TensorList params,
    const c10::List<std::optional<at::Tensor>>& exp_avgs,
    const c10::List<std::optional<at::Tensor>>& exp_avg_sqs,
    const c10::List<std::optional<at::Tensor>>& max_exp_avg_sqs,
    at::ArrayRef<double> beta1,
    at::ArrayRef<double> beta2,
    at::ArrayRef<double> eps,
    at::ArrayRef<double> weight_decay,
    at::ArrayRef<double> step,
    const c10::List<bool>& decoupled,
    const c10::List<bool>& amsgrad,
    const c10::List<bool>& maximize,
    const at::Tensor& losses) {
  const AffinityPlan plan = check_affinity_adam_args(
      grads,
      params,
      exp_avgs,
      exp_avg_sqs,
      max_exp_avg_sqs,
      beta1,
      beta2,
      eps,
      weight_decay,
      step,
      decoupled,
      amsgrad,
      maximize,
      losses);
  const c10::cuda::CUDAGuard device_guard(plan.device);

  std::vector<cuda::AdamHyperparameters> hyperparameters(grads.size());
  for (const auto k : c10::irange(grads.size())) {
    auto& group = hyperparameters[k];
    group.beta1 = beta1[k];
    group.beta2 = beta2[k];
    group.eps = eps[k];
    group.weight_decay = weight_decay[k];
    group.step = step[k];
    group.decoupled = decoupled.get(k);
    group.amsgrad = amsgrad.get(k);
    group.maximize = maximize.get(k);
  }
  return cuda::launch_affinity_adam(
      grads,
      params,
      with_missing_undefined(exp_avgs),
      with_missing_undefined(exp_avg_sqs),
      with_missing_undefined(max_exp_avg_sqs),
      hyperparameters,
      losses,
      plan.accumulate_dtype);
}

}  // namespace
}  // namespace etap

TORCH_LIBRARY_IMPL(etap, CUDA, m) {
  m.impl("affinity", &etap::affinity_cuda);
  m.impl("affinity_sgd", &etap::affinity_sgd_cuda);
  m.impl("affinity_adam", &etap::affinity_adam_cuda);
}
