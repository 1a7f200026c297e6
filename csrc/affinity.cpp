// Argument validation shared by every backend of the affinity operators.
#include "affinity.h"

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <string>

namespace etap {
namespace {

std::string indexed(const char* list_name, size_t index) {
  return c10::str(list_name, "[", index, "]");
}

// Collects the facts every op checks in the same way: T from `losses`, one
// device, floating dtypes, and whether anything asks for float64.
class ArgumentChecker {
 public:
  ArgumentChecker(const char* op_name, const at::Tensor& losses)
      : op_name_(op_name), device_(c10::kCPU) {
    TORCH_CHECK(
        losses.defined(),
        op_name_,
        ": Parameter `losses` should be a tensor of shape [T]. Found an "
        "undefined tensor.");
    device_ = losses.device();
    check_build_has_device(losses, "losses");
    check_floating(losses, "losses");
    TORCH_CHECK(
        losses.dim() == 1,
        op_name_,
        ": Parameter `losses` should have shape [T] (one loss per task). "
        "Found shape ",
        losses.sizes(),
        ".");
    num_tasks_ = losses.size(0);
  }

  // A non-empty list with one stack [T, *shape_k] per shared parameter.
  void check_stacks(at::TensorList stacks, const char* list_name) {
    TORCH_CHECK(
        !stacks.empty(),
        op_name_,
        ": Parameter `",
        list_name,
        "` should be a non-empty list of per-task stacks [T, *shape]. Found "
        "an empty list.");
    for (const auto k : c10::irange(stacks.size())) {
      const std::string name = indexed(list_name, k);
      check_tensor(stacks[k], name);
      TORCH_CHECK(
          stacks[k].dim() >= 1 && stacks[k].size(0) == num_tasks_,
          op_name_,
          ": Parameter `",
          name,
          "` should be a stack of shape [T, *shape] with T = ",
          num_tasks_,
          " (the length of `losses`). Found shape ",
          stacks[k].sizes(),
          ".");
    }
  }

  void check_length(size_t found, size_t expected, const char* list_name) {
    TORCH_CHECK(
        found == expected,
        op_name_,
        ": Parameter `",
        list_name,
        "` should have one entry per entry of `grads` (",
        expected,
        "). Found ",
        found,
        " entries.");
  }

  // `tensor` must have the shape `expected`, named after `reference`.
  void check_shape(
      const at::Tensor& tensor,
      const std::string& name,
      at::IntArrayRef expected,
      const std::string& reference) {
    check_tensor(tensor, name);
    TORCH_CHECK(
        tensor.sizes() == expected,
        op_name_,
        ": Parameter `",
        name,
        "` should have shape ",
        expected,
        " (",
        reference,
        "). Found shape ",
        tensor.sizes(),
        ".");
  }

  void check_finite_at_least(
      at::ArrayRef<double> values, const char* list_name, double lowest) {
    for (const auto k : c10::irange(values.size())) {
      TORCH_CHECK(
          std::isfinite(values[k]) && values[k] >= lowest,
          op_name_,
          ": Parameter `",
          indexed(list_name, k),
          "` should be a finite number >= ",
          lowest,
          ". Found ",
          values[k],
          ".");
    }
  }

  void check_beta(at::ArrayRef<double> values, const char* list_name) {
    for (const auto k : c10::irange(values.size())) {
      TORCH_CHECK(
          values[k] >= 0.0 && values[k] < 1.0,
          op_name_,
          ": Parameter `",
          indexed(list_name, k),
          "` should lie in [0, 1). Found ",
          values[k],
          ".");
    }
  }

  AffinityPlan plan() const {
    const auto dtype = any_double_ ? at::kDouble : at::kFloat;
    return AffinityPlan{num_tasks_, dtype, dtype, device_};
  }

  int64_t num_tasks() const {
    return num_tasks_;
  }

 private:
  void check_build_has_device(
      const at::Tensor& tensor, const std::string& name) const {
#ifndef ETAP_WITH_CUDA
    TORCH_CHECK(
        !tensor.is_cuda(),
        op_name_,
        ": Parameter `",
        name,
        "` should be on a device this build supports (the CPU: etap_torch "
        "was built without CUDA kernels). Found ",
        tensor.device(),
        ". Rebuild etap_torch with CUDA (see setup.py) or pass CPU tensors.");
#endif
  }

  void check_floating(const at::Tensor& tensor, const std::string& name) {
    const auto dtype = tensor.scalar_type();
    TORCH_CHECK(
        dtype == at::kDouble || dtype == at::kFloat || dtype == at::kHalf ||
            dtype == at::kBFloat16,
        op_name_,
        ": Parameter `",
        name,
        "` should have a floating dtype (float64, float32, float16 or "
        "bfloat16). Found ",
        dtype,
        ".");
    any_double_ = any_double_ || dtype == at::kDouble;
  }

  void check_tensor(const at::Tensor& tensor, const std::string& name) {
    TORCH_CHECK(
        tensor.defined(),
        op_name_,
        ": Parameter `",
        name,
        "` should be a tensor. Found an undefined tensor.");
    check_build_has_device(tensor, name);
    TORCH_CHECK(
        tensor.device() == device_,
        op_name_,
        ": Parameter `",
        name,
        "` should be on the device of `losses` (",
        device_,
        "). Found ",
        tensor.device(),
        ".");
    check_floating(tensor, name);
  }

  const char* op_name_;
  c10::Device device_;
  int64_t num_tasks_ = 0;
  bool any_double_ = false;
};

std::string parameter_shape_of(size_t k) {
  return c10::str("the shape of `grads[", k, "]` without its task dimension");
}

}  // namespace

AffinityPlan check_affinity_args(
    at::TensorList grads, at::TensorList updates, const at::Tensor& losses) {
  ArgumentChecker checker("etap::affinity", losses);
  checker.check_stacks(grads, "grads");
  checker.check_length(updates.size(), grads.size(), "updates");
  for (const auto k : c10::irange(grads.size())) {
    checker.check_shape(
        updates[k],
        indexed("updates", k),
        grads[k].sizes(),
        c10::str("the shape of `grads[", k, "]`"));
  }
  return checker.plan();
}

AffinityPlan check_affinity_sgd_args(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    const at::Tensor& losses) {
  ArgumentChecker checker("etap::affinity_sgd", losses);
  checker.check_stacks(grads, "grads");
  checker.check_length(scales.size(), grads.size(), "scales");
  checker.check_length(offsets.size(), grads.size(), "offsets");
  checker.check_finite_at_least(scales, "scales", -INFINITY);
  for (const auto k : c10::irange(grads.size())) {
    const std::optional<at::Tensor> offset = offsets[k];
    if (offset.has_value() && offset->defined()) {
      checker.check_shape(
          *offset,
          indexed("offsets", k),
          grads[k].sizes().slice(1),
          parameter_shape_of(k));
    }
  }
  return checker.plan();
}

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
    const at::Tensor& losses) {
  ArgumentChecker checker("etap::affinity_adam", losses);
  checker.check_stacks(grads, "grads");
  const size_t count = grads.size();
  checker.check_length(params.size(), count, "params");
  checker.check_length(exp_avgs.size(), count, "exp_avgs");
  checker.check_length(exp_avg_sqs.size(), count, "exp_avg_sqs");
  checker.check_length(max_exp_avg_sqs.size(), count, "max_exp_avg_sqs");
  checker.check_length(beta1.size(), count, "beta1");
  checker.check_length(beta2.size(), count, "beta2");
  checker.check_length(eps.size(), count, "eps");
  checker.check_length(weight_decay.size(), count, "weight_decay");
  checker.check_length(step.size(), count, "step");
  checker.check_length(decoupled.size(), count, "decoupled");
  checker.check_length(amsgrad.size(), count, "amsgrad");
  checker.check_length(maximize.size(), count, "maximize");
  checker.check_beta(beta1, "beta1");
  checker.check_beta(beta2, "beta2");
  checker.check_finite_at_least(eps, "eps", 0.0);
  checker.check_finite_at_least(weight_decay, "weight_decay", 0.0);
  checker.check_finite_at_least(step, "step", 0.0);

  for (const auto k : c10::irange(count)) {
    const auto shape = grads[k].sizes().slice(1);
    const std::string reference = parameter_shape_of(k);
    checker.check_shape(params[k], indexed("params", k), shape, reference);
    const std::optional<at::Tensor> exp_avg = exp_avgs[k];
    if (exp_avg.has_value() && exp_avg->defined()) {
      checker.check_shape(*exp_avg, indexed("exp_avgs", k), shape, reference);
    }
    const std::optional<at::Tensor> exp_avg_sq = exp_avg_sqs[k];
    if (exp_avg_sq.has_value() && exp_avg_sq->defined()) {
      checker.check_shape(
          *exp_avg_sq, indexed("exp_avg_sqs", k), shape, reference);
    }
    const std::optional<at::Tensor> max_exp_avg_sq = max_exp_avg_sqs[k];
    if (amsgrad.get(k) && max_exp_avg_sq.has_value() &&
        max_exp_avg_sq->defined()) {
      checker.check_shape(
          *max_exp_avg_sq, indexed("max_exp_avg_sqs", k), shape, reference);
    }
  }
  return checker.plan();
}

at::Tensor normalize_by_loss(const at::Tensor& raw, const at::Tensor& losses) {
  const at::Tensor target_loss = losses.to(raw.scalar_type());
  const at::Tensor valid = at::isfinite(target_loss) & (target_loss > 0);
  const at::Tensor safe_loss =
      at::where(valid, target_loss, at::ones_like(target_loss));
  const at::Tensor scaled = raw / safe_loss.unsqueeze(0);
  return at::where(valid.unsqueeze(0).expand_as(raw), scaled, 0.0);
}

}  // namespace etap

#ifndef ETAP_WITH_CUDA
// A build without CUDA kernels still receives CUDA tensors from the
// dispatcher when torch itself has CUDA. Route them to the checks, which
// reject them with a message that says how to fix it, instead of the
// dispatcher's generic "no kernel" error.
namespace {

at::Tensor affinity_without_cuda(
    at::TensorList grads, at::TensorList updates, const at::Tensor& losses) {
  etap::check_affinity_args(grads, updates, losses);
  TORCH_CHECK(false, "etap::affinity: this build has no CUDA kernels.");
}

at::Tensor affinity_sgd_without_cuda(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    const at::Tensor& losses) {
  etap::check_affinity_sgd_args(grads, scales, offsets, losses);
  TORCH_CHECK(false, "etap::affinity_sgd: this build has no CUDA kernels.");
}

at::Tensor affinity_adam_without_cuda(
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
  etap::check_affinity_adam_args(
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
  TORCH_CHECK(false, "etap::affinity_adam: this build has no CUDA kernels.");
}

}  // namespace

TORCH_LIBRARY_IMPL(etap, CUDA, m) {
  m.impl("affinity", &affinity_without_cuda);
  m.impl("affinity_sgd", &affinity_sgd_without_cuda);
  m.impl("affinity_adam", &affinity_adam_without_cuda);
}
#endif
