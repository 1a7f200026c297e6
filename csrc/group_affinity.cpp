// x(S, t) = mean over s in S, s != t, of A[s, t] (algorithm.md section 4).
//
// Written with ATen operations only, so the one composite kernel serves every
// device, autograd and tracing.
#include <ATen/ATen.h>
#include <torch/library.h>

namespace etap {
namespace {

at::Tensor group_affinity(
    const at::Tensor& affinity, const at::Tensor& groups) {
  TORCH_CHECK(
      affinity.dim() == 2 && affinity.sym_size(0) == affinity.sym_size(1),
      "Parameter `affinity` should be a square matrix [T, T]. Found shape ",
      affinity.sym_sizes(),
      ".");
  TORCH_CHECK(
      at::isFloatingType(affinity.scalar_type()),
      "Parameter `affinity` should have a floating dtype. Found ",
      affinity.scalar_type(),
      ".");
  TORCH_CHECK(
      groups.dim() == 2 && groups.sym_size(1) == affinity.sym_size(0),
      "Parameter `groups` should be a membership matrix [N, T] with T = ",
      affinity.sym_size(0),
      " tasks. Found shape ",
      groups.sym_sizes(),
      ".");
  TORCH_CHECK(
      groups.scalar_type() == at::kBool,
      "Parameter `groups` should be a bool membership matrix. Found dtype ",
      groups.scalar_type(),
      ".");
  TORCH_CHECK(
      groups.device() == affinity.device(),
      "Parameter `groups` should be on the device of `affinity` (",
      affinity.device(),
      "). Found ",
      groups.device(),
      ".");

  // The diagonal (a task's effect on itself) never enters the feature, not
  // even as an infinity or a NaN.
  const auto diagonal =
      at::eye_symint(affinity.sym_size(0), groups.options().dtype(at::kBool));
  const auto off_diagonal =
      at::where(diagonal, at::zeros_like(affinity), affinity);
  const auto membership = groups.to(affinity.scalar_type());
  const auto totals = at::matmul(membership, off_diagonal);
  const auto others =
      groups.sum(1, /*keepdim=*/true, affinity.scalar_type()) - 1;
  const auto has_feature = at::logical_and(groups, others >= 1);
  return at::where(
      has_feature, totals / others.clamp_min(1), at::zeros_like(totals));
}

}  // namespace

TORCH_LIBRARY_IMPL(etap, CompositeImplicitAutograd, m) {
  m.impl("group_affinity", &group_affinity);
}

}  // namespace etap
