// The `etap` operator library: every schema, in one place.
//
// Backends register their kernels with TORCH_LIBRARY_IMPL in their own files
// (csrc/cpu/ for the CPU, csrc/*_cuda.cpp for CUDA); fake kernels for
// torch.compile live in etap_torch/ops.py.
#include <Python.h>
#include <torch/library.h>

#include "ensemble.h"

extern "C" {
// `import etap_torch._C` loads this library, which runs the static
// registrations below; the Python module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

bool built_with_cuda() {
#ifdef ETAP_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(etap, m) {
  // Whether this build contains the CUDA kernels.
  m.def("built_with_cuda() -> bool", &built_with_cuda);

  // ---- affinity (algorithm.md section 2) ----------------------------------
  // A[s, t] = sum_k <grads[k][t], updates[k][s]> / losses[t].
  m.def("affinity(Tensor[] grads, Tensor[] updates, Tensor losses) -> Tensor");
  // The SGD family: updates[k][s] = scales[k] * grads[k][s] + offsets[k];
  // a missing offset is zero.
  m.def(
      "affinity_sgd(Tensor[] grads, float[] scales, Tensor?[] offsets, "
      "Tensor losses) -> Tensor");
  // The Adam family: each element of every direction is formed on the fly
  // from the gradient, the moments before the step and the hyperparameters of
  // the parameter's group. A missing moment is zero (fresh state).
  m.def(
      "affinity_adam(Tensor[] grads, Tensor[] params, Tensor?[] exp_avgs, "
      "Tensor?[] exp_avg_sqs, Tensor?[] max_exp_avg_sqs, float[] beta1, "
      "float[] beta2, float[] eps, float[] weight_decay, float[] step, "
      "bool[] decoupled, bool[] amsgrad, bool[] maximize, Tensor losses) "
      "-> Tensor");

  // ---- group features (algorithm.md section 4) ----------------------------
  m.def("group_affinity(Tensor affinity, Tensor groups) -> Tensor");

  // ---- ensemble predictor (algorithm.md section 6) ------------------------
  // The class torch.classes.etap.EnsemblePredictor, with its pickling.
  etap::define_ensemble_predictor(m);

  // ---- group selection (algorithm.md section 7) ---------------------------
  // At most `max_groups` candidates that cover (or partition) every task,
  // with the highest mean served gain; see csrc/grouping.h for the exact
  // comparison and the tie-break. `chosen` is [N + T] bool (N + t: task t
  // alone), `serving` [T] the index of the group serving each task,
  // `served_gain` [T], `objective` and `exact` scalars.
  m.def(
      "select_groups(Tensor groups, Tensor gains, int max_groups, str mode, "
      "bool allow_singletons, str method) -> (Tensor chosen, Tensor serving, "
      "Tensor served_gain, Tensor objective, Tensor exact)");
}
