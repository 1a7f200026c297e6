// The ensemble predictor of algorithm.md section 6: from an affinity matrix
// and a few labelled groups to the gain of every group.
//
// Stages: an affine map z = a * x + b of the group affinity feature x(S, t)
// by least squares; a one-dimensional regressor f(z) (B-spline basis + ridge,
// or k nearest neighbours, each with hyperparameters by K-fold
// cross-validation); a multi-output ridge from the membership vector of a
// group to the residuals of its members. Everything is float64 on the CPU.
//
// The numerical work lives in ensemble.cpp (Eigen); this header only holds
// the class that the `etap` library registers.
#pragma once

#include <torch/custom_class.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace etap {

// Which one-dimensional regressor follows the affine stage.
enum class NonlinearStage : int64_t { kNone = 0, kSpline = 1, kNeighbors = 2 };

struct EnsembleConfig {
  NonlinearStage nonlinear = NonlinearStage::kSpline;
  bool residual = true;
  // Spline + ridge grid. An empty `n_knots` means 2 .. floor(sqrt(n)) + 9
  // for n training pairs.
  std::vector<int64_t> degrees;
  std::vector<int64_t> n_knots;
  std::vector<double> alphas;
  int64_t n_folds = 10;
  // Nearest neighbours grid. Empty means 1 .. min(floor(sqrt(n)) + 20, n) - 1.
  std::vector<int64_t> neighbors;
  int64_t neighbor_folds = 5;
  // Residual ridge grid.
  std::vector<double> residual_alphas;
  int64_t residual_folds = 5;
};

class EnsemblePredictor : public torch::CustomClassHolder {
 public:
  explicit EnsemblePredictor(EnsembleConfig config);

  // affinity [T, T], groups [N, T] bool, gains [N, T] (zero off membership).
  void fit(
      const at::Tensor& affinity,
      const at::Tensor& groups,
      const at::Tensor& gains);

  // groups [M, T] bool -> predicted gains [M, T] float64.
  at::Tensor predict(const at::Tensor& groups) const;

  bool is_fitted() const {
    return fitted_;
  }

  // Everything needed to rebuild the predictor: configuration, fitted
  // parameters and the cross-validation record, as named CPU tensors.
  c10::Dict<std::string, at::Tensor> state() const;
  static c10::intrusive_ptr<EnsemblePredictor> from_state(
      const c10::Dict<std::string, at::Tensor>& state);

 private:
  at::Tensor predict_pairs(const at::Tensor& features) const;

  EnsembleConfig config_;
  bool fitted_ = false;
  int64_t num_tasks_ = 0;
  at::Tensor affinity_;  // [T, T] float64

  double affine_slope_ = 0.0;
  double affine_intercept_ = 0.0;

  // Spline stage: full knot vector, coefficients per basis function.
  int64_t spline_degree_ = 0;
  int64_t spline_n_knots_ = 0;
  double spline_alpha_ = 0.0;
  at::Tensor spline_knots_;  // [n_knots + 2 * degree]
  at::Tensor spline_coef_;   // [n_knots + degree - 1]
  double spline_intercept_ = 0.0;
  at::Tensor spline_scores_;  // [alphas, degrees, n_knots] mean CV error

  // Neighbours stage: the training pairs in their original order.
  int64_t neighbors_k_ = 0;
  at::Tensor neighbor_z_;       // [n]
  at::Tensor neighbor_gain_;    // [n]
  at::Tensor neighbor_scores_;  // [candidates]

  // Residual stage: h(u) = u @ coef + intercept.
  double residual_alpha_ = 0.0;
  at::Tensor residual_coef_;       // [T, T]
  at::Tensor residual_intercept_;  // [T]
  at::Tensor residual_scores_;     // [residual alphas]

  int64_t num_pairs_ = 0;
  int64_t num_groups_ = 0;
};

// Registers the class (and its static helpers) with the `etap` library.
void define_ensemble_predictor(torch::Library& library);

}  // namespace etap
