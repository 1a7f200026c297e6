// Host-side launchers of the CUDA affinity kernels.
//
// This header holds no CUDA-only types, so the C++ files in csrc/ include it
// and call into cuda/ through these functions alone. Every launcher expects
// inputs that csrc/affinity.h has already validated: one CUDA device, `T`
// rows in every stack, matching shapes, floating dtypes, `losses` of shape
// [T]. Each returns the affinity A of shape [T, T] on that device,
// A[s, t] = sum_k <grads[k][t], d_k[s]> / losses[t] (zero in every column
// whose loss is not finite or not positive), accumulated in and returned as
// `accumulate_dtype`: float32, or float64 when any input is float64.
#pragma once

#include <ATen/core/Tensor.h>

namespace etap::cuda {

// The hyperparameters of one shared parameter's optimizer group, as
// torch.optim.Adam / AdamW hold them; `step` is the count before the step.
struct AdamHyperparameters {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  double step = 0.0;
  bool decoupled = false;
  bool amsgrad = false;
  bool maximize = false;
};

// The generic op: d_k[s] = updates[k][s].
at::Tensor launch_affinity(
    at::TensorList grads,
    at::TensorList updates,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype);

// The SGD family: d_k[s] = scales[k] * grads[k][s] + offsets[k]; an
// undefined offset is zero.
at::Tensor launch_affinity_sgd(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    at::TensorList offsets,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype);

// The Adam family: every element of d_k[s] is formed from grads[k][s],
// params[k], the moments before the step and hyperparameters[k]
// (algorithm.md 2.1). An undefined moment is zero (fresh optimizer state);
// max_exp_avg_sqs[k] is read only when hyperparameters[k].amsgrad.
at::Tensor launch_affinity_adam(
    at::TensorList grads,
    at::TensorList params,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    at::ArrayRef<AdamHyperparameters> hyperparameters,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype);

}  // namespace etap::cuda
