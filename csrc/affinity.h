// Argument validation and shared finishing steps of the affinity operators.
//
// Every backend (csrc/cpu/, the CUDA launchers) calls the check that matches
// its op before touching memory, so a bad input gets the same message on
// every device. Nothing here reads tensor data except `normalize_by_loss`,
// which uses ATen ops and runs on the tensors' own device; this header is
// safe to include from CUDA sources.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace etap {

// What a backend needs once the arguments are known to be consistent.
struct AffinityPlan {
  // T: the number of tasks (the length of `losses`, the leading dimension of
  // every stack of per-task gradients).
  int64_t num_tasks;
  // The dtype every product is accumulated in: float64 when any input tensor
  // is float64, float32 otherwise (float16 and bfloat16 are upcast).
  at::ScalarType accumulate_dtype;
  // The dtype of the returned [T, T] affinity; equal to accumulate_dtype.
  at::ScalarType output_dtype;
  // The device of every input tensor.
  c10::Device device;
};

// etap::affinity(grads, updates, losses): grads[k] and updates[k] are stacks
// [T, *shape_k] with equal shapes; losses is [T].
AffinityPlan check_affinity_args(
    at::TensorList grads, at::TensorList updates, const at::Tensor& losses);

// etap::affinity_sgd(grads, scales, offsets, losses): one scale and one
// optional offset of shape shape_k per stack grads[k] = [T, *shape_k].
AffinityPlan check_affinity_sgd_args(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    const at::Tensor& losses);

// etap::affinity_adam(...): params[k] and every present moment have shape
// shape_k; every hyperparameter list has one entry per parameter; betas lie
// in [0, 1), eps, weight decay and the step count are finite and >= 0.
AffinityPlan check_affinity_adam_args(
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
    const at::Tensor& losses);

// Turns raw inner products into affinities: raw[s, t] = sum_k <g_t, d_s>
// ([T, T], accumulate dtype) becomes raw[s, t] / losses[t], and every column
// whose loss is not finite or not positive becomes zero. Runs with ATen ops
// on raw's device; returns a new tensor of raw's dtype.
at::Tensor normalize_by_loss(const at::Tensor& raw, const at::Tensor& losses);

}  // namespace etap
