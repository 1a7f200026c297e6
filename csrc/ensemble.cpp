// The ensemble predictor (algorithm.md section 6) on Eigen, float64.
//
// Note [Agreement with scikit-learn]
// The stages reproduce scikit-learn's estimators exactly in exact arithmetic:
// SplineTransformer(knots="uniform", extrapolation="constant",
// include_bias=True) for the basis, Ridge(fit_intercept=True) for every ridge,
// KFold(shuffle=False) for the folds, GridSearchCV's plain mean of per-fold
// mean squared errors and its earliest-candidate tie-break, and
// KNeighborsRegressor(weights="uniform"). Floating-point results agree to
// rounding: ridge is solved from one symmetric eigendecomposition per fold
// for every alpha, where scikit-learn runs one Cholesky solve per alpha.
//
// Note [Ridge from one eigendecomposition]
// With centred features X (n x q, q active columns) and centred targets Y,
// the ridge coefficients are W(alpha) = D diag(1 / (lambda + alpha)) P, where
// - q <= n: X^T X = V diag(lambda) V^T, D = V, P = V^T X^T Y;
// - q > n:  X X^T = Q diag(lambda) Q^T, D = X^T Q, P = Q^T Y (the dual form
//   scikit-learn also switches to, which keeps W in the row space of X).
// A column that is constant on the training rows is centred to exactly zero
// and left out; its coefficient is exactly zero. A direction whose
// regularised eigenvalue is numerically zero (only possible for alpha = 0)
// contributes nothing, which makes alpha = 0 the minimum-norm least squares.
#include "ensemble.h"

// The matrices are small and the grid cells already run in parallel.
#define EIGEN_DONT_PARALLELIZE

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace etap {
namespace {

using RowMatrix =
    Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXd;
using Index = Eigen::Index;

constexpr double kInf = std::numeric_limits<double>::infinity();

int64_t integer_sqrt(int64_t n) {
  auto root = static_cast<int64_t>(std::sqrt(static_cast<double>(n)));
  while (root * root > n) {
    --root;
  }
  while ((root + 1) * (root + 1) <= n) {
    ++root;
  }
  return root;
}

at::Tensor to_tensor(const std::vector<double>& values) {
  return at::tensor(values, at::dtype(at::kDouble));
}

at::Tensor to_tensor(const std::vector<int64_t>& values) {
  return at::tensor(values, at::dtype(at::kLong));
}

// ---- folds ----------------------------------------------------------------

// The number of folds actually used for n samples: at most one per sample,
// and at least two.
int64_t effective_folds(int64_t requested, int64_t n, const char* stage) {
  TORCH_CHECK(
      requested >= 2,
      "Parameter `",
      stage,
      "` should be at least 2 folds. Found ",
      requested,
      ".");
  TORCH_CHECK(
      n >= 2,
      "Cross-validation for `",
      stage,
      "` should have at least 2 samples (the folds are reduced to the number "
      "of samples, and one fold cannot validate). Found ",
      n,
      ".");
  return std::min(requested, n);
}

// Contiguous folds as scikit-learn's KFold(shuffle=False) makes them: the
// first n % folds folds hold one sample more. Returns folds + 1 boundaries.
std::vector<int64_t> fold_boundaries(int64_t n, int64_t folds) {
  std::vector<int64_t> boundaries(folds + 1, 0);
  for (int64_t fold = 0; fold < folds; ++fold) {
    const int64_t size = n / folds + (fold < n % folds ? 1 : 0);
    boundaries[fold + 1] = boundaries[fold] + size;
  }
  return boundaries;
}

std::vector<int64_t> training_rows(int64_t n, int64_t begin, int64_t end) {
  std::vector<int64_t> rows;
  rows.reserve(n - (end - begin));
  for (int64_t row = 0; row < n; ++row) {
    if (row < begin || row >= end) {
      rows.push_back(row);
    }
  }
  return rows;
}

// ---- B-spline basis -------------------------------------------------------

// numpy.linspace(start, stop, num) to the last bit.
std::vector<double> linspace(double start, double stop, int64_t num) {
  std::vector<double> values(num, start);
  if (num <= 1) {
    return values;
  }
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t i = 0; i < num; ++i) {
    values[i] = step == 0.0
                    ? static_cast<double>(i) / static_cast<double>(num - 1) *
                              (stop - start) +
                          start
                    : static_cast<double>(i) * step + start;
  }
  values[num - 1] = stop;
  return values;
}

// The k + 1 B-splines of degree k on knots t that can be non-zero at x, in
// [t[k], t[n]] (n = number of basis functions): writes their values and
// returns the index of the first. Cox-de Boor on the interval t[l] <= x < t[l +
// 1] (the last interval is closed), which is how scipy's BSpline evaluates.
int64_t bspline_band(
    const std::vector<double>& knots, int64_t k, double x, double* values) {
  const auto n = static_cast<int64_t>(knots.size()) - k - 1;
  const auto first_above =
      std::upper_bound(knots.begin() + k + 1, knots.begin() + n, x);
  const int64_t interval = (first_above - knots.begin()) - 1;

  double previous[16];
  values[0] = 1.0;
  for (int64_t j = 1; j <= k; ++j) {
    std::copy(values, values + j, previous);
    values[0] = 0.0;
    for (int64_t m = 1; m <= j; ++m) {
      const double right = knots[interval + m];
      const double left = knots[interval + m - j];
      if (right == left) {
        values[m] = 0.0;
        continue;
      }
      const double weight = previous[m - 1] / (right - left);
      values[m - 1] += weight * (right - x);
      values[m] = weight * (x - left);
    }
  }
  return interval - k;
}

// The values of every B-spline at x, written into row[0, n).
void bspline_values(
    const std::vector<double>& knots, int64_t k, double x, double* row) {
  const auto n = static_cast<int64_t>(knots.size()) - k - 1;
  std::fill(row, row + n, 0.0);
  double values[16];
  const int64_t first = bspline_band(knots, k, x, values);
  std::copy(values, values + k + 1, row + first);
}

// The basis of SplineTransformer(knots="uniform", extrapolation="constant",
// include_bias=True) for one feature.
struct Spline {
  int64_t degree = 0;
  std::vector<double> knots;     // n_knots + 2 * degree
  std::vector<double> at_lower;  // basis values at the first base knot
  std::vector<double> at_upper;  // basis values at the last base knot

  int64_t size() const {
    return static_cast<int64_t>(knots.size()) - degree - 1;
  }
  double lower() const {
    return knots[degree];
  }
  double upper() const {
    return knots[knots.size() - degree - 1];
  }

  // Outside [lower, upper] the first (below) or last (above) `degree` basis
  // values stay at their boundary values and the others are zero.
  void evaluate(double x, double* row) const {
    const int64_t n = size();
    if (x < lower()) {
      std::fill(row, row + n, 0.0);
      std::copy(at_lower.begin(), at_lower.begin() + degree, row);
    } else if (x > upper()) {
      std::fill(row, row + n, 0.0);
      std::copy(at_upper.end() - degree, at_upper.end(), row + n - degree);
    } else {
      bspline_values(knots, degree, x, row);
    }
  }
};

Spline spline_from_knots(std::vector<double> knots, int64_t degree) {
  Spline spline;
  spline.degree = degree;
  spline.knots = std::move(knots);
  spline.at_lower.resize(spline.size());
  spline.at_upper.resize(spline.size());
  bspline_values(spline.knots, degree, spline.lower(), spline.at_lower.data());
  bspline_values(spline.knots, degree, spline.upper(), spline.at_upper.data());
  return spline;
}

// Base knots evenly spaced over [x_min, x_max], extended by `degree` knots on
// each side with the first and last spacing. A constant feature gives equal
// knots, on which every basis value is zero (as in scikit-learn), so the
// ridge after it predicts the mean.
Spline make_spline(
    double x_min, double x_max, int64_t degree, int64_t n_knots) {
  const auto base = linspace(x_min, x_max, n_knots);
  const double first_spacing = base[1] - base[0];
  const double last_spacing = base[n_knots - 1] - base[n_knots - 2];
  const auto below = linspace(
      base[0] - static_cast<double>(degree) * first_spacing,
      base[0] - first_spacing,
      degree);
  const auto above = linspace(
      base[n_knots - 1] + last_spacing,
      base[n_knots - 1] + static_cast<double>(degree) * last_spacing,
      degree);
  std::vector<double> knots;
  knots.reserve(n_knots + 2 * degree);
  knots.insert(knots.end(), below.begin(), below.end());
  knots.insert(knots.end(), base.begin(), base.end());
  knots.insert(knots.end(), above.begin(), above.end());
  return spline_from_knots(std::move(knots), degree);
}

Spline fit_spline(
    const double* values,
    const std::vector<int64_t>& rows,
    int64_t degree,
    int64_t n_knots) {
  double x_min = kInf;
  double x_max = -kInf;
  for (const auto row : rows) {
    x_min = std::min(x_min, values[row]);
    x_max = std::max(x_max, values[row]);
  }
  return make_spline(x_min, x_max, degree, n_knots);
}

RowMatrix spline_design(
    const Spline& spline,
    const double* values,
    const std::vector<int64_t>& rows) {
  RowMatrix design(static_cast<Index>(rows.size()), spline.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    spline.evaluate(values[rows[i]], design.row(static_cast<Index>(i)).data());
  }
  return design;
}

// ---- ridge ----------------------------------------------------------------

// Ridge with an unpenalised intercept for every alpha at once; see
// Note [Ridge from one eigendecomposition].
struct RidgePath {
  Eigen::RowVectorXd feature_mean;  // p
  Eigen::RowVectorXd target_mean;   // m
  std::vector<Index> active;        // columns that are not constant
  Vector eigenvalues;               // r
  RowMatrix directions;             // active x r
  RowMatrix projections;            // r x m
  double cutoff = 0.0;

  Vector weights(double alpha) const {
    Vector weights(eigenvalues.size());
    for (Index i = 0; i < eigenvalues.size(); ++i) {
      const double regularised = std::max(eigenvalues[i], 0.0) + alpha;
      weights[i] = regularised > cutoff ? 1.0 / regularised : 0.0;
    }
    return weights;
  }

  // Coefficients [p, m]; inactive columns get exactly zero.
  RowMatrix coefficients(double alpha) const {
    RowMatrix coef = RowMatrix::Zero(feature_mean.size(), target_mean.size());
    if (eigenvalues.size() == 0) {
      return coef;
    }
    const RowMatrix active_coef =
        directions * (weights(alpha).asDiagonal() * projections);
    for (size_t i = 0; i < active.size(); ++i) {
      coef.row(active[i]) = active_coef.row(static_cast<Index>(i));
    }
    return coef;
  }

  Eigen::RowVectorXd intercept(const RowMatrix& coef) const {
    return target_mean - feature_mean * coef;
  }

  // Features of other rows, centred with the training means, on the active
  // columns, projected onto the directions: [rows, r].
  RowMatrix project(const RowMatrix& features) const {
    RowMatrix centred(features.rows(), static_cast<Index>(active.size()));
    for (size_t i = 0; i < active.size(); ++i) {
      centred.col(static_cast<Index>(i)) =
          features.col(active[i]).array() - feature_mean[active[i]];
    }
    return centred * directions;
  }
};

double column_mean(const RowMatrix& matrix, Index column) {
  const auto values = matrix.col(column);
  // Exact for a constant column, so that it centres to exactly zero.
  if (values.minCoeff() == values.maxCoeff()) {
    return values[0];
  }
  return values.mean();
}

// Fills the eigen-part of `path` from the (lower triangle of the) centred
// Gram matrix of the active columns and their cross products with the
// centred targets [active, m].
void solve_primal(
    RidgePath& path, const Eigen::MatrixXd& gram, const RowMatrix& cross) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(gram);
  TORCH_CHECK(
      solver.info() == Eigen::Success,
      "The ridge eigendecomposition should converge. Found Eigen status ",
      static_cast<int>(solver.info()),
      " for a ",
      gram.rows(),
      " x ",
      gram.cols(),
      " matrix.");
  path.eigenvalues = solver.eigenvalues();
  const double largest = std::max(path.eigenvalues.maxCoeff(), 0.0);
  path.cutoff = largest * static_cast<double>(gram.rows()) *
                std::numeric_limits<double>::epsilon();
  path.directions = solver.eigenvectors();
  path.projections = solver.eigenvectors().transpose() * cross;
}

RidgePath ridge_path(const RowMatrix& features, const RowMatrix& targets) {
  const Index n = features.rows();
  RidgePath path;
  path.feature_mean.resize(features.cols());
  for (Index column = 0; column < features.cols(); ++column) {
    path.feature_mean[column] = column_mean(features, column);
    if (features.col(column).minCoeff() != features.col(column).maxCoeff()) {
      path.active.push_back(column);
    }
  }
  path.target_mean = targets.colwise().mean();

  const auto q = static_cast<Index>(path.active.size());
  if (q == 0) {
    return path;
  }
  RowMatrix centred(n, q);
  for (Index i = 0; i < q; ++i) {
    centred.col(i) = features.col(path.active[i]).array() -
                     path.feature_mean[path.active[i]];
  }
  const RowMatrix centred_targets = targets.rowwise() - path.target_mean;

  if (q <= n) {
    Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(q, q);
    gram.selfadjointView<Eigen::Lower>().rankUpdate(centred.transpose());
    solve_primal(path, gram, centred.transpose() * centred_targets);
    return path;
  }
  // The dual form: eigenvectors Q of X X^T give the directions X^T Q.
  Eigen::MatrixXd kernel = Eigen::MatrixXd::Zero(n, n);
  kernel.selfadjointView<Eigen::Lower>().rankUpdate(centred);
  solve_primal(path, kernel, centred_targets);
  path.directions = centred.transpose() * path.directions;
  return path;
}

RowMatrix select_rows(
    const RowMatrix& matrix, const std::vector<int64_t>& rows) {
  RowMatrix selected(static_cast<Index>(rows.size()), matrix.cols());
  for (size_t i = 0; i < rows.size(); ++i) {
    selected.row(static_cast<Index>(i)) = matrix.row(rows[i]);
  }
  return selected;
}

// The ridge path of the spline basis of the training rows, from Gram sums
// over each row's degree + 1 non-zero basis values instead of the dense
// design; the same path as ridge_path on the dense design. Training rows lie
// inside the knot range, so no extrapolation is involved.
RidgePath spline_ridge_path(
    const Spline& spline,
    const double* values,
    const double* gain,
    const std::vector<int64_t>& rows) {
  const Index size = spline.size();
  const auto n = static_cast<Index>(rows.size());
  const int64_t width = spline.degree + 1;
  Eigen::MatrixXd products = Eigen::MatrixXd::Zero(size, size);
  Vector sums = Vector::Zero(size);
  Vector cross = Vector::Zero(size);
  double gain_total = 0.0;
  double band[16];
  for (const auto row : rows) {
    const int64_t first =
        bspline_band(spline.knots, spline.degree, values[row], band);
    for (int64_t a = 0; a < width; ++a) {
      for (int64_t b = 0; b <= a; ++b) {
        products(first + a, first + b) += band[a] * band[b];
      }
      sums[first + a] += band[a];
      cross[first + a] += band[a] * gain[row];
    }
    gain_total += gain[row];
  }

  RidgePath path;
  path.feature_mean = (sums / static_cast<double>(n)).transpose();
  path.target_mean = Eigen::RowVectorXd::Constant(1, gain_total / n);
  for (Index column = 0; column < size; ++column) {
    if (products(column, column) > 0.0) {
      path.active.push_back(column);
    }
  }
  const auto q = static_cast<Index>(path.active.size());
  if (q == 0) {
    return path;
  }
  if (q > n) {
    RowMatrix targets(n, 1);
    for (Index i = 0; i < n; ++i) {
      targets(i, 0) = gain[rows[i]];
    }
    return ridge_path(spline_design(spline, values, rows), targets);
  }
  Eigen::MatrixXd gram(q, q);
  RowMatrix centred_cross(q, 1);
  const auto count = static_cast<double>(n);
  for (Index a = 0; a < q; ++a) {
    const Index column = path.active[a];
    const double mean = path.feature_mean[column];
    for (Index b = 0; b <= a; ++b) {
      const Index other = path.active[b];
      gram(a, b) =
          products(column, other) - count * mean * path.feature_mean[other];
    }
    centred_cross(a, 0) = cross[column] - count * mean * path.target_mean[0];
  }
  solve_primal(path, gram, centred_cross);
  return path;
}

// Mean squared error over every entry of the validation targets, for each
// alpha, of the ridge path fitted on the training rows.
void validation_errors(
    const RidgePath& path,
    const RowMatrix& features,
    const RowMatrix& targets,
    const std::vector<double>& alphas,
    double* errors) {
  const double count = static_cast<double>(targets.size());
  if (path.eigenvalues.size() == 0) {
    const double error =
        (targets.rowwise() - path.target_mean).squaredNorm() / count;
    std::fill(errors, errors + alphas.size(), error);
    return;
  }
  const RowMatrix projected = path.project(features);
  for (size_t a = 0; a < alphas.size(); ++a) {
    const RowMatrix predicted =
        (projected * (path.weights(alphas[a]).asDiagonal() * path.projections))
            .rowwise() +
        path.target_mean;
    errors[a] = (predicted - targets).squaredNorm() / count;
  }
}

// Index of the lowest score; an exact tie goes to the earliest candidate.
int64_t earliest_minimum(const std::vector<double>& scores) {
  int64_t best = 0;
  for (size_t i = 1; i < scores.size(); ++i) {
    if (scores[i] < scores[best]) {
      best = static_cast<int64_t>(i);
    }
  }
  return best;
}

// Mean over folds of the validation error for each alpha; [alphas].
std::vector<double> ridge_cv_scores(
    const RowMatrix& features,
    const RowMatrix& targets,
    const std::vector<double>& alphas,
    int64_t requested_folds,
    const char* stage) {
  const int64_t n = features.rows();
  const int64_t folds = effective_folds(requested_folds, n, stage);
  const auto boundaries = fold_boundaries(n, folds);
  const auto num_alphas = static_cast<int64_t>(alphas.size());
  std::vector<double> errors(folds * num_alphas);
  at::parallel_for(0, folds, 1, [&](int64_t begin, int64_t end) {
    for (int64_t fold = begin; fold < end; ++fold) {
      std::vector<int64_t> validation(boundaries[fold + 1] - boundaries[fold]);
      std::iota(validation.begin(), validation.end(), boundaries[fold]);
      const auto training =
          training_rows(n, boundaries[fold], boundaries[fold + 1]);
      const auto path = ridge_path(
          select_rows(features, training), select_rows(targets, training));
      validation_errors(
          path,
          select_rows(features, validation),
          select_rows(targets, validation),
          alphas,
          errors.data() + fold * num_alphas);
    }
  });
  std::vector<double> scores(num_alphas, 0.0);
  for (int64_t a = 0; a < num_alphas; ++a) {
    for (int64_t fold = 0; fold < folds; ++fold) {
      scores[a] += errors[fold * num_alphas + a];
    }
    scores[a] /= static_cast<double>(folds);
  }
  return scores;
}

// ---- nearest neighbours ---------------------------------------------------

// Training rows ordered by distance to x; an exact tie in distance goes to
// the earlier row. Only the first `count` are ordered.
// TODO(knn-ties): scikit-learn breaks exact ties in the order its KD tree
// visits the points, which no simple rule reproduces; results agree with it
// whenever the k-th and (k+1)-th nearest distances differ.
std::vector<int64_t> nearest_rows(
    const double* values,
    const std::vector<int64_t>& rows,
    double x,
    int64_t count) {
  std::vector<int64_t> order(rows);
  const auto closer = [&](int64_t left, int64_t right) {
    const double left_distance = std::abs(values[left] - x);
    const double right_distance = std::abs(values[right] - x);
    return left_distance < right_distance ||
           (left_distance == right_distance && left < right);
  };
  std::partial_sort(order.begin(), order.begin() + count, order.end(), closer);
  order.resize(count);
  return order;
}

// ---- checks ---------------------------------------------------------------

void check_finite(const at::Tensor& matrix, const char* name) {
  const auto* data = matrix.const_data_ptr<double>();
  const int64_t columns = matrix.size(1);
  for (int64_t i = 0; i < matrix.numel(); ++i) {
    TORCH_CHECK(
        std::isfinite(data[i]),
        "Parameter `",
        name,
        "` should be finite. Found ",
        data[i],
        " at row ",
        i / columns,
        ", column ",
        i % columns,
        ".");
  }
}

void check_groups(
    const at::Tensor& groups, int64_t num_tasks, const char* name) {
  TORCH_CHECK(
      groups.dim() == 2 && groups.size(1) == num_tasks,
      "Parameter `",
      name,
      "` should be a membership matrix [N, T] with T = ",
      num_tasks,
      " tasks. Found shape ",
      groups.sizes(),
      ".");
  TORCH_CHECK(
      groups.scalar_type() == at::kBool,
      "Parameter `",
      name,
      "` should be a bool membership matrix. Found dtype ",
      groups.scalar_type(),
      ".");
}

at::Tensor as_cpu_double(const at::Tensor& tensor) {
  return tensor.to(at::kCPU, at::kDouble).contiguous();
}

at::Tensor as_cpu_bool(const at::Tensor& tensor) {
  return tensor.to(at::kCPU).contiguous();
}

void check_alphas(const std::vector<double>& alphas, const char* name) {
  TORCH_CHECK(
      !alphas.empty(),
      "Parameter `",
      name,
      "` should hold at least one value. Found none.");
  for (const double alpha : alphas) {
    TORCH_CHECK(
        std::isfinite(alpha) && alpha >= 0.0,
        "Parameter `",
        name,
        "` should hold finite, non-negative values. Found ",
        alpha,
        ".");
  }
}

void check_at_least(
    const std::vector<int64_t>& values,
    int64_t minimum,
    bool allow_empty,
    const char* name) {
  TORCH_CHECK(
      allow_empty || !values.empty(),
      "Parameter `",
      name,
      "` should hold at least one value. Found none.");
  for (const auto value : values) {
    TORCH_CHECK(
        value >= minimum,
        "Parameter `",
        name,
        "` should hold values of at least ",
        minimum,
        ". Found ",
        value,
        ".");
  }
}

// x(S, t) for every member t of every group S of two or more tasks, in
// row-major order of the membership matrix; also the group of each pair.
struct Pairs {
  std::vector<double> feature;
  std::vector<int64_t> group;
  std::vector<int64_t> task;
};

Pairs group_pairs(const at::Tensor& affinity, const at::Tensor& groups) {
  const int64_t num_tasks = affinity.size(0);
  const auto* scores = affinity.const_data_ptr<double>();
  const auto* member = groups.const_data_ptr<bool>();
  Pairs pairs;
  std::vector<int64_t> members;
  for (int64_t row = 0; row < groups.size(0); ++row) {
    members.clear();
    for (int64_t task = 0; task < num_tasks; ++task) {
      if (member[row * num_tasks + task]) {
        members.push_back(task);
      }
    }
    TORCH_CHECK(
        !members.empty(),
        "Parameter `groups` should have at least one "
        "task in every row. Found an empty row ",
        row,
        ".");
    if (members.size() < 2) {
      continue;
    }
    for (const auto target : members) {
      double total = 0.0;
      for (const auto source : members) {
        if (source != target) {
          total += scores[source * num_tasks + target];
        }
      }
      pairs.feature.push_back(total / static_cast<double>(members.size() - 1));
      pairs.group.push_back(row);
      pairs.task.push_back(target);
    }
  }
  return pairs;
}

// ---- stage selection --------------------------------------------------------

struct SplineSelection {
  int64_t degree = 0;
  int64_t n_knots = 0;
  double alpha = 0.0;
  std::vector<double> scores;  // [alphas, degrees, n_knots]
  std::vector<int64_t> knot_grid;
};

SplineSelection select_spline(
    const std::vector<double>& z,
    const std::vector<double>& gain,
    const EnsembleConfig& config) {
  const auto n = static_cast<int64_t>(z.size());
  const int64_t folds = effective_folds(config.n_folds, n, "n_folds");
  const auto boundaries = fold_boundaries(n, folds);

  SplineSelection selection;
  selection.knot_grid = config.n_knots;
  if (selection.knot_grid.empty()) {
    for (int64_t knots = 2; knots <= integer_sqrt(n) + 9; ++knots) {
      selection.knot_grid.push_back(knots);
    }
  }
  const auto& degrees = config.degrees;
  const auto& knot_grid = selection.knot_grid;
  const auto& alphas = config.alphas;
  const auto num_degrees = static_cast<int64_t>(degrees.size());
  const auto num_knots = static_cast<int64_t>(knot_grid.size());
  const auto num_alphas = static_cast<int64_t>(alphas.size());

  // One cell per (degree, n_knots, fold): its basis, its eigendecomposition,
  // its validation error for every alpha. Cells write disjoint slots, so the
  // result does not depend on the number of threads.
  const int64_t num_cells = num_degrees * num_knots * folds;
  std::vector<double> errors(num_cells * num_alphas);
  at::parallel_for(0, num_cells, 1, [&](int64_t begin, int64_t end) {
    for (int64_t cell = begin; cell < end; ++cell) {
      const int64_t degree = degrees[cell / (num_knots * folds)];
      const int64_t knots = knot_grid[(cell / folds) % num_knots];
      const int64_t fold = cell % folds;
      std::vector<int64_t> validation(boundaries[fold + 1] - boundaries[fold]);
      std::iota(validation.begin(), validation.end(), boundaries[fold]);
      const auto training =
          training_rows(n, boundaries[fold], boundaries[fold + 1]);

      const auto spline = fit_spline(z.data(), training, degree, knots);
      RowMatrix validation_gain(static_cast<Index>(validation.size()), 1);
      for (size_t i = 0; i < validation.size(); ++i) {
        validation_gain(static_cast<Index>(i), 0) = gain[validation[i]];
      }
      const auto path =
          spline_ridge_path(spline, z.data(), gain.data(), training);
      validation_errors(
          path,
          spline_design(spline, z.data(), validation),
          validation_gain,
          alphas,
          errors.data() + cell * num_alphas);
    }
  });

  // GridSearchCV's order: alpha outermost, then degree, then n_knots.
  selection.scores.assign(num_alphas * num_degrees * num_knots, 0.0);
  for (int64_t a = 0; a < num_alphas; ++a) {
    for (int64_t d = 0; d < num_degrees; ++d) {
      for (int64_t k = 0; k < num_knots; ++k) {
        double total = 0.0;
        for (int64_t fold = 0; fold < folds; ++fold) {
          const int64_t cell = (d * num_knots + k) * folds + fold;
          total += errors[cell * num_alphas + a];
        }
        selection.scores[(a * num_degrees + d) * num_knots + k] =
            total / static_cast<double>(folds);
      }
    }
  }
  const int64_t best = earliest_minimum(selection.scores);
  selection.alpha = alphas[best / (num_degrees * num_knots)];
  selection.degree = degrees[(best / num_knots) % num_degrees];
  selection.n_knots = knot_grid[best % num_knots];
  return selection;
}

struct NeighborSelection {
  int64_t k = 0;
  std::vector<int64_t> grid;
  std::vector<double> scores;  // inf where k exceeds a training fold
};

NeighborSelection select_neighbors(
    const std::vector<double>& z,
    const std::vector<double>& gain,
    const EnsembleConfig& config) {
  const auto n = static_cast<int64_t>(z.size());
  const int64_t folds =
      effective_folds(config.neighbor_folds, n, "neighbor_folds");
  const auto boundaries = fold_boundaries(n, folds);

  NeighborSelection selection;
  selection.grid = config.neighbors;
  if (selection.grid.empty()) {
    for (int64_t k = 1; k < std::min(integer_sqrt(n) + 20, n); ++k) {
      selection.grid.push_back(k);
    }
  }
  const auto& grid = selection.grid;
  const int64_t largest = *std::max_element(grid.begin(), grid.end());

  // A k larger than a training fold cannot be fitted there; scikit-learn
  // scores such a candidate as failed, so it can never be chosen.
  std::vector<double> totals(grid.size(), 0.0);
  std::vector<bool> feasible(grid.size(), true);
  for (int64_t fold = 0; fold < folds; ++fold) {
    const auto training =
        training_rows(n, boundaries[fold], boundaries[fold + 1]);
    const auto training_size = static_cast<int64_t>(training.size());
    const int64_t reach = std::min(largest, training_size);
    std::vector<double> fold_errors(grid.size(), 0.0);
    for (int64_t row = boundaries[fold]; row < boundaries[fold + 1]; ++row) {
      const auto nearest = nearest_rows(z.data(), training, z[row], reach);
      for (size_t c = 0; c < grid.size(); ++c) {
        if (grid[c] > training_size) {
          continue;
        }
        double total = 0.0;
        for (int64_t i = 0; i < grid[c]; ++i) {
          total += gain[nearest[i]];
        }
        const double error = total / static_cast<double>(grid[c]) - gain[row];
        fold_errors[c] += error * error;
      }
    }
    const auto validation_size =
        static_cast<double>(boundaries[fold + 1] - boundaries[fold]);
    for (size_t c = 0; c < grid.size(); ++c) {
      feasible[c] = feasible[c] && grid[c] <= training_size;
      totals[c] += fold_errors[c] / validation_size;
    }
  }
  selection.scores.resize(grid.size());
  for (size_t c = 0; c < grid.size(); ++c) {
    selection.scores[c] =
        feasible[c] ? totals[c] / static_cast<double>(folds) : kInf;
  }
  const int64_t best = earliest_minimum(selection.scores);
  TORCH_CHECK(
      std::isfinite(selection.scores[best]),
      "Parameter `neighbors` should hold a k no larger than the smallest "
      "training fold (",
      n - (boundaries[1] - boundaries[0]),
      " pairs). Found the smallest k ",
      *std::min_element(grid.begin(), grid.end()),
      ".");
  selection.k = grid[best];
  return selection;
}

// ---- state helpers ----------------------------------------------------------

const at::Tensor& state_entry(
    const c10::Dict<std::string, at::Tensor>& state, const std::string& key) {
  const auto found = state.find(key);
  TORCH_CHECK(
      found != state.end(),
      "Parameter `state` should hold the entry '",
      key,
      "'. Found no such entry.");
  return found->value();
}

std::vector<double> double_list(const at::Tensor& tensor) {
  const auto values = tensor.to(at::kDouble).contiguous();
  const auto* data = values.const_data_ptr<double>();
  return std::vector<double>(data, data + values.numel());
}

std::vector<int64_t> long_list(const at::Tensor& tensor) {
  const auto values = tensor.to(at::kLong).contiguous();
  const auto* data = values.const_data_ptr<int64_t>();
  return std::vector<int64_t>(data, data + values.numel());
}

at::Tensor scalar(double value) {
  return at::scalar_tensor(value, at::dtype(at::kDouble));
}

at::Tensor scalar(int64_t value) {
  return at::scalar_tensor(value, at::dtype(at::kLong));
}

at::Tensor empty_double() {
  return at::empty({0}, at::dtype(at::kDouble));
}

}  // namespace

// ---- the predictor ----------------------------------------------------------

EnsemblePredictor::EnsemblePredictor(EnsembleConfig config)
    : config_(std::move(config)) {
  check_at_least(config_.degrees, 1, false, "degrees");
  for (const auto degree : config_.degrees) {
    TORCH_CHECK(
        degree <= 15,
        "Parameter `degrees` should hold values of at "
        "most 15. Found ",
        degree,
        ".");
  }
  check_at_least(config_.n_knots, 2, true, "n_knots");
  check_alphas(config_.alphas, "alphas");
  check_at_least(config_.neighbors, 1, true, "neighbors");
  check_alphas(config_.residual_alphas, "residual_alphas");
  TORCH_CHECK(
      config_.n_folds >= 2,
      "Parameter `n_folds` should be at least "
      "2. Found ",
      config_.n_folds,
      ".");
  TORCH_CHECK(
      config_.neighbor_folds >= 2,
      "Parameter `neighbor_folds` should "
      "be at least 2. Found ",
      config_.neighbor_folds,
      ".");
  TORCH_CHECK(
      config_.residual_folds >= 2,
      "Parameter `residual_folds` should "
      "be at least 2. Found ",
      config_.residual_folds,
      ".");
  spline_scores_ = empty_double();
  neighbor_scores_ = empty_double();
  residual_scores_ = empty_double();
}

void EnsemblePredictor::fit(
    const at::Tensor& affinity,
    const at::Tensor& groups,
    const at::Tensor& gains) {
  TORCH_CHECK(
      affinity.dim() == 2 && affinity.size(0) == affinity.size(1),
      "Parameter `affinity` should be a square matrix [T, T]. Found shape ",
      affinity.sizes(),
      ".");
  TORCH_CHECK(
      at::isFloatingType(affinity.scalar_type()),
      "Parameter `affinity` should have a floating dtype. Found ",
      affinity.scalar_type(),
      ".");
  const int64_t num_tasks = affinity.size(0);
  check_groups(groups, num_tasks, "groups");
  TORCH_CHECK(
      gains.sizes() == groups.sizes(),
      "Parameter `gains` should have the shape of `groups` ",
      groups.sizes(),
      ". Found ",
      gains.sizes(),
      ".");
  TORCH_CHECK(
      at::isFloatingType(gains.scalar_type()),
      "Parameter `gains` should have a floating dtype. Found ",
      gains.scalar_type(),
      ".");
  const auto affinity64 = as_cpu_double(affinity);
  const auto groups_cpu = as_cpu_bool(groups);
  const auto gains64 = as_cpu_double(gains);
  check_finite(affinity64, "affinity");
  check_finite(gains64, "gains");
  {
    const auto* member = groups_cpu.const_data_ptr<bool>();
    const auto* gain = gains64.const_data_ptr<double>();
    for (int64_t i = 0; i < gains64.numel(); ++i) {
      TORCH_CHECK(
          member[i] || gain[i] == 0.0,
          "Parameter `gains` should be zero off membership. Found ",
          gain[i],
          " at row ",
          i / num_tasks,
          ", column ",
          i % num_tasks,
          ", where the task is not a member.");
    }
  }

  fitted_ = false;
  const auto pairs = group_pairs(affinity64, groups_cpu);
  const auto num_pairs = static_cast<int64_t>(pairs.feature.size());
  TORCH_CHECK(
      num_pairs > 0,
      "Parameter `groups` should hold at least one group of two or more "
      "tasks. Found none among ",
      groups.size(0),
      " rows.");
  std::vector<double> gain(num_pairs);
  {
    const auto* gain_data = gains64.const_data_ptr<double>();
    for (int64_t i = 0; i < num_pairs; ++i) {
      gain[i] = gain_data[pairs.group[i] * num_tasks + pairs.task[i]];
    }
  }

  // Affine stage: least squares of gain on x; a constant x gets slope 0.
  const auto& feature = pairs.feature;
  const double feature_mean =
      std::accumulate(feature.begin(), feature.end(), 0.0) / num_pairs;
  const double gain_mean =
      std::accumulate(gain.begin(), gain.end(), 0.0) / num_pairs;
  double covariance = 0.0;
  double variance = 0.0;
  for (int64_t i = 0; i < num_pairs; ++i) {
    covariance += (feature[i] - feature_mean) * (gain[i] - gain_mean);
    variance += (feature[i] - feature_mean) * (feature[i] - feature_mean);
  }
  const auto [lowest, highest] =
      std::minmax_element(feature.begin(), feature.end());
  const double slope = *lowest == *highest ? 0.0 : covariance / variance;
  TORCH_CHECK(
      std::isfinite(slope),
      "The affine stage should have a finite "
      "slope. Found ",
      slope,
      " (feature variance ",
      variance,
      ").");
  affine_slope_ = slope;
  affine_intercept_ = gain_mean - slope * feature_mean;
  std::vector<double> z(num_pairs);
  for (int64_t i = 0; i < num_pairs; ++i) {
    z[i] = affine_slope_ * feature[i] + affine_intercept_;
  }

  // Non-linear stage.
  affinity_ = affinity64;
  num_tasks_ = num_tasks;
  num_pairs_ = num_pairs;
  spline_scores_ = empty_double();
  neighbor_scores_ = empty_double();
  residual_scores_ = empty_double();
  if (config_.nonlinear == NonlinearStage::kSpline) {
    const auto selection = select_spline(z, gain, config_);
    std::vector<int64_t> all(num_pairs);
    std::iota(all.begin(), all.end(), 0);
    const auto spline =
        fit_spline(z.data(), all, selection.degree, selection.n_knots);
    const auto path = spline_ridge_path(spline, z.data(), gain.data(), all);
    const RowMatrix coef = path.coefficients(selection.alpha);
    const double intercept = path.intercept(coef)[0];
    TORCH_CHECK(
        coef.allFinite() && std::isfinite(intercept),
        "The spline ridge should have finite coefficients. Found a "
        "non-finite value for degree ",
        selection.degree,
        ", n_knots ",
        selection.n_knots,
        ", alpha ",
        selection.alpha,
        ".");
    spline_degree_ = selection.degree;
    spline_n_knots_ = selection.n_knots;
    spline_alpha_ = selection.alpha;
    spline_knots_ = to_tensor(spline.knots);
    spline_coef_ =
        to_tensor(std::vector<double>(coef.data(), coef.data() + coef.size()));
    spline_intercept_ = intercept;
    spline_scores_ =
        to_tensor(selection.scores)
            .view(
                {static_cast<int64_t>(config_.alphas.size()),
                 static_cast<int64_t>(config_.degrees.size()),
                 static_cast<int64_t>(selection.knot_grid.size())});
  } else if (config_.nonlinear == NonlinearStage::kNeighbors) {
    const auto selection = select_neighbors(z, gain, config_);
    neighbors_k_ = selection.k;
    neighbor_z_ = to_tensor(z);
    neighbor_gain_ = to_tensor(gain);
    neighbor_scores_ = to_tensor(selection.scores);
  }

  // Residual stage on the groups of two or more tasks, in their order.
  num_groups_ = 0;
  residual_coef_ = at::zeros({num_tasks, num_tasks}, at::kDouble);
  residual_intercept_ = at::zeros({num_tasks}, at::kDouble);
  residual_alpha_ = 0.0;
  const auto fitted_gain = predict_pairs(to_tensor(pairs.feature));
  std::vector<int64_t> group_rows;
  for (int64_t i = 0; i < num_pairs; ++i) {
    if (group_rows.empty() || group_rows.back() != pairs.group[i]) {
      group_rows.push_back(pairs.group[i]);
    }
  }
  num_groups_ = static_cast<int64_t>(group_rows.size());
  if (!config_.residual) {
    fitted_ = true;
    return;
  }
  RowMatrix membership = RowMatrix::Zero(num_groups_, num_tasks);
  RowMatrix residual = RowMatrix::Zero(num_groups_, num_tasks);
  {
    const auto* fitted = fitted_gain.const_data_ptr<double>();
    int64_t group = -1;
    for (int64_t i = 0; i < num_pairs; ++i) {
      if (i == 0 || pairs.group[i] != pairs.group[i - 1]) {
        ++group;
      }
      membership(group, pairs.task[i]) = 1.0;
      residual(group, pairs.task[i]) = gain[i] - fitted[i];
    }
  }
  const auto scores = ridge_cv_scores(
      membership,
      residual,
      config_.residual_alphas,
      config_.residual_folds,
      "residual_folds");
  const double alpha = config_.residual_alphas[earliest_minimum(scores)];
  const auto path = ridge_path(membership, residual);
  const RowMatrix coef = path.coefficients(alpha);
  const Eigen::RowVectorXd intercept = path.intercept(coef);
  TORCH_CHECK(
      coef.allFinite() && intercept.allFinite(),
      "The residual ridge should have finite coefficients. Found a non-finite "
      "value for alpha ",
      alpha,
      ".");
  residual_alpha_ = alpha;
  residual_coef_ =
      to_tensor(std::vector<double>(coef.data(), coef.data() + coef.size()))
          .view({num_tasks, num_tasks});
  residual_intercept_ = to_tensor(
      std::vector<double>(
          intercept.data(), intercept.data() + intercept.size()));
  residual_scores_ = to_tensor(scores);
  fitted_ = true;
}

// f(a * x + b) for features x [n]; the residual stage is not included.
at::Tensor EnsemblePredictor::predict_pairs(const at::Tensor& features) const {
  const int64_t n = features.numel();
  const auto* x = features.const_data_ptr<double>();
  auto output = at::empty({n}, at::kDouble);
  auto* predicted = output.mutable_data_ptr<double>();
  if (config_.nonlinear == NonlinearStage::kSpline) {
    const auto spline =
        spline_from_knots(double_list(spline_knots_), spline_degree_);
    const auto* coef = spline_coef_.const_data_ptr<double>();
    std::vector<double> row(spline.size());
    for (int64_t i = 0; i < n; ++i) {
      spline.evaluate(affine_slope_ * x[i] + affine_intercept_, row.data());
      double total = spline_intercept_;
      for (int64_t j = 0; j < spline.size(); ++j) {
        total += row[j] * coef[j];
      }
      predicted[i] = total;
    }
  } else if (config_.nonlinear == NonlinearStage::kNeighbors) {
    const auto* z = neighbor_z_.const_data_ptr<double>();
    const auto* gain = neighbor_gain_.const_data_ptr<double>();
    std::vector<int64_t> rows(neighbor_z_.numel());
    std::iota(rows.begin(), rows.end(), 0);
    for (int64_t i = 0; i < n; ++i) {
      const auto nearest = nearest_rows(
          z, rows, affine_slope_ * x[i] + affine_intercept_, neighbors_k_);
      double total = 0.0;
      for (const auto row : nearest) {
        total += gain[row];
      }
      predicted[i] = total / static_cast<double>(neighbors_k_);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      predicted[i] = affine_slope_ * x[i] + affine_intercept_;
    }
  }
  return output;
}

at::Tensor EnsemblePredictor::predict(const at::Tensor& groups) const {
  TORCH_CHECK(
      fitted_,
      "The predictor should be fitted before `predict`. "
      "Found an unfitted predictor.");
  check_groups(groups, num_tasks_, "groups");
  const auto groups_cpu = as_cpu_bool(groups);
  const auto pairs = group_pairs(affinity_, groups_cpu);
  const auto fitted_gain = predict_pairs(to_tensor(pairs.feature));

  auto output = at::zeros({groups.size(0), num_tasks_}, at::kDouble);
  auto* predicted = output.mutable_data_ptr<double>();
  const auto* fitted = fitted_gain.const_data_ptr<double>();
  const auto* member = groups_cpu.const_data_ptr<bool>();
  const auto* coef = residual_coef_.const_data_ptr<double>();
  const auto* intercept = residual_intercept_.const_data_ptr<double>();
  for (size_t i = 0; i < pairs.feature.size(); ++i) {
    const int64_t group = pairs.group[i];
    const int64_t target = pairs.task[i];
    double total = fitted[i];
    if (config_.residual) {
      double correction = intercept[target];
      for (int64_t task = 0; task < num_tasks_; ++task) {
        if (member[group * num_tasks_ + task]) {
          correction += coef[task * num_tasks_ + target];
        }
      }
      total += correction;
    }
    predicted[group * num_tasks_ + target] = total;
  }
  return output;
}

c10::Dict<std::string, at::Tensor> EnsemblePredictor::state() const {
  c10::Dict<std::string, at::Tensor> state;
  state.insert(
      "config.nonlinear", scalar(static_cast<int64_t>(config_.nonlinear)));
  state.insert("config.residual", scalar(int64_t{config_.residual}));
  state.insert("config.degrees", to_tensor(config_.degrees));
  state.insert("config.n_knots", to_tensor(config_.n_knots));
  state.insert("config.alphas", to_tensor(config_.alphas));
  state.insert("config.n_folds", scalar(config_.n_folds));
  state.insert("config.neighbors", to_tensor(config_.neighbors));
  state.insert("config.neighbor_folds", scalar(config_.neighbor_folds));
  state.insert("config.residual_alphas", to_tensor(config_.residual_alphas));
  state.insert("config.residual_folds", scalar(config_.residual_folds));
  state.insert("fitted", scalar(int64_t{fitted_}));
  if (!fitted_) {
    return state;
  }
  state.insert("affinity", affinity_.clone());
  state.insert("num_pairs", scalar(num_pairs_));
  state.insert("num_groups", scalar(num_groups_));
  state.insert("affine.slope", scalar(affine_slope_));
  state.insert("affine.intercept", scalar(affine_intercept_));
  if (config_.nonlinear == NonlinearStage::kSpline) {
    state.insert("spline.degree", scalar(spline_degree_));
    state.insert("spline.n_knots", scalar(spline_n_knots_));
    state.insert("spline.alpha", scalar(spline_alpha_));
    state.insert("spline.knots", spline_knots_.clone());
    state.insert("spline.coef", spline_coef_.clone());
    state.insert("spline.intercept", scalar(spline_intercept_));
    state.insert("spline.cv_scores", spline_scores_.clone());
  } else if (config_.nonlinear == NonlinearStage::kNeighbors) {
    state.insert("neighbors.k", scalar(neighbors_k_));
    state.insert("neighbors.z", neighbor_z_.clone());
    state.insert("neighbors.gain", neighbor_gain_.clone());
    state.insert("neighbors.cv_scores", neighbor_scores_.clone());
  }
  if (config_.residual) {
    state.insert("residual.alpha", scalar(residual_alpha_));
    state.insert("residual.coef", residual_coef_.clone());
    state.insert("residual.intercept", residual_intercept_.clone());
    state.insert("residual.cv_scores", residual_scores_.clone());
  }
  return state;
}

c10::intrusive_ptr<EnsemblePredictor> EnsemblePredictor::from_state(
    const c10::Dict<std::string, at::Tensor>& state) {
  const auto entry = [&](const std::string& key) {
    return state_entry(state, key).to(at::kCPU).contiguous();
  };
  const auto as_long = [&](const std::string& key) {
    return entry(key).to(at::kLong).item<int64_t>();
  };
  const auto as_double = [&](const std::string& key) {
    return entry(key).to(at::kDouble).item<double>();
  };
  const auto as_double_tensor = [&](const std::string& key) {
    return entry(key).to(at::kDouble).contiguous().clone();
  };

  EnsembleConfig config;
  const int64_t nonlinear = as_long("config.nonlinear");
  TORCH_CHECK(
      nonlinear >= 0 && nonlinear <= 2,
      "Parameter `state` should "
      "hold 'config.nonlinear' in {0, 1, 2}. Found ",
      nonlinear,
      ".");
  config.nonlinear = static_cast<NonlinearStage>(nonlinear);
  config.residual = as_long("config.residual") != 0;
  config.degrees = long_list(entry("config.degrees"));
  config.n_knots = long_list(entry("config.n_knots"));
  config.alphas = double_list(entry("config.alphas"));
  config.n_folds = as_long("config.n_folds");
  config.neighbors = long_list(entry("config.neighbors"));
  config.neighbor_folds = as_long("config.neighbor_folds");
  config.residual_alphas = double_list(entry("config.residual_alphas"));
  config.residual_folds = as_long("config.residual_folds");
  auto predictor = c10::make_intrusive<EnsemblePredictor>(std::move(config));
  if (as_long("fitted") == 0) {
    return predictor;
  }

  auto& self = *predictor;
  self.affinity_ = as_double_tensor("affinity");
  TORCH_CHECK(
      self.affinity_.dim() == 2 &&
          self.affinity_.size(0) == self.affinity_.size(1),
      "Parameter `state` should hold a square 'affinity'. Found shape ",
      self.affinity_.sizes(),
      ".");
  self.num_tasks_ = self.affinity_.size(0);
  self.num_pairs_ = as_long("num_pairs");
  self.num_groups_ = as_long("num_groups");
  self.affine_slope_ = as_double("affine.slope");
  self.affine_intercept_ = as_double("affine.intercept");
  if (self.config_.nonlinear == NonlinearStage::kSpline) {
    self.spline_degree_ = as_long("spline.degree");
    self.spline_n_knots_ = as_long("spline.n_knots");
    self.spline_alpha_ = as_double("spline.alpha");
    self.spline_knots_ = as_double_tensor("spline.knots");
    self.spline_coef_ = as_double_tensor("spline.coef");
    self.spline_intercept_ = as_double("spline.intercept");
    self.spline_scores_ = as_double_tensor("spline.cv_scores");
    TORCH_CHECK(
        self.spline_knots_.numel() ==
                self.spline_n_knots_ + 2 * self.spline_degree_ &&
            self.spline_coef_.numel() ==
                self.spline_n_knots_ + self.spline_degree_ - 1,
        "Parameter `state` should hold n_knots + 2 * degree spline knots and "
        "n_knots + degree - 1 coefficients. Found ",
        self.spline_knots_.numel(),
        " knots and ",
        self.spline_coef_.numel(),
        " coefficients for degree ",
        self.spline_degree_,
        ", n_knots ",
        self.spline_n_knots_,
        ".");
  } else if (self.config_.nonlinear == NonlinearStage::kNeighbors) {
    self.neighbors_k_ = as_long("neighbors.k");
    self.neighbor_z_ = as_double_tensor("neighbors.z");
    self.neighbor_gain_ = as_double_tensor("neighbors.gain");
    self.neighbor_scores_ = as_double_tensor("neighbors.cv_scores");
    TORCH_CHECK(
        self.neighbors_k_ >= 1 &&
            self.neighbors_k_ <= self.neighbor_z_.numel() &&
            self.neighbor_gain_.numel() == self.neighbor_z_.numel(),
        "Parameter `state` should hold 1 <= k <= n neighbour pairs. Found k ",
        self.neighbors_k_,
        " and ",
        self.neighbor_z_.numel(),
        " pairs.");
  }
  if (self.config_.residual) {
    self.residual_alpha_ = as_double("residual.alpha");
    self.residual_coef_ = as_double_tensor("residual.coef");
    self.residual_intercept_ = as_double_tensor("residual.intercept");
    self.residual_scores_ = as_double_tensor("residual.cv_scores");
    TORCH_CHECK(
        self.residual_coef_.sizes() ==
                at::IntArrayRef({self.num_tasks_, self.num_tasks_}) &&
            self.residual_intercept_.numel() == self.num_tasks_,
        "Parameter `state` should hold a [T, T] residual coefficient matrix "
        "and [T] intercepts for T = ",
        self.num_tasks_,
        ". Found ",
        self.residual_coef_.sizes(),
        " and ",
        self.residual_intercept_.sizes(),
        ".");
  } else {
    self.residual_coef_ =
        at::zeros({self.num_tasks_, self.num_tasks_}, at::kDouble);
    self.residual_intercept_ = at::zeros({self.num_tasks_}, at::kDouble);
  }
  self.fitted_ = true;
  return predictor;
}

// ---- helpers exposed for tests and for users who want one stage
// --------------

namespace {

// The spline basis fitted on `fit_values` [n], evaluated at `values` [m]:
// [m, n_knots + degree - 1].
at::Tensor spline_basis(
    const at::Tensor& fit_values,
    const at::Tensor& values,
    int64_t degree,
    int64_t n_knots) {
  TORCH_CHECK(
      degree >= 1 && degree <= 15,
      "Parameter `degree` should be in "
      "[1, 15]. Found ",
      degree,
      ".");
  TORCH_CHECK(
      n_knots >= 2,
      "Parameter `n_knots` should be at least 2. "
      "Found ",
      n_knots,
      ".");
  TORCH_CHECK(
      fit_values.dim() == 1 && fit_values.numel() >= 1,
      "Parameter `fit_values` should be a non-empty vector. Found shape ",
      fit_values.sizes(),
      ".");
  TORCH_CHECK(
      values.dim() == 1,
      "Parameter `values` should be a vector. "
      "Found shape ",
      values.sizes(),
      ".");
  const auto fit64 = as_cpu_double(fit_values);
  const auto values64 = as_cpu_double(values);
  check_finite(fit64.view({1, -1}), "fit_values");
  check_finite(values64.view({1, -1}), "values");
  std::vector<int64_t> all(fit64.numel());
  std::iota(all.begin(), all.end(), 0);
  const auto spline =
      fit_spline(fit64.const_data_ptr<double>(), all, degree, n_knots);
  auto basis = at::empty({values64.numel(), spline.size()}, at::kDouble);
  const auto* x = values64.const_data_ptr<double>();
  for (int64_t i = 0; i < values64.numel(); ++i) {
    spline.evaluate(x[i], basis.mutable_data_ptr<double>() + i * spline.size());
  }
  return basis;
}

RowMatrix matrix_of(const at::Tensor& tensor, const char* name) {
  TORCH_CHECK(
      tensor.dim() == 2,
      "Parameter `",
      name,
      "` should be a matrix. "
      "Found shape ",
      tensor.sizes(),
      ".");
  const auto values = as_cpu_double(tensor);
  check_finite(values, name);
  return Eigen::Map<const RowMatrix>(
      values.const_data_ptr<double>(), values.size(0), values.size(1));
}

// Mean cross-validated squared error per alpha of ridge from features [n, p]
// to targets [n, m] with contiguous folds.
at::Tensor ridge_cv(
    const at::Tensor& features,
    const at::Tensor& targets,
    std::vector<double> alphas,
    int64_t n_folds) {
  check_alphas(alphas, "alphas");
  const auto x = matrix_of(features, "features");
  const auto y = matrix_of(targets, "targets");
  TORCH_CHECK(
      x.rows() == y.rows(),
      "Parameter `targets` should have as many "
      "rows as `features` (",
      x.rows(),
      "). Found ",
      y.rows(),
      ".");
  return to_tensor(ridge_cv_scores(x, y, alphas, n_folds, "n_folds"));
}

// Ridge coefficients [p, m] and intercept [m] for one alpha.
std::tuple<at::Tensor, at::Tensor> ridge_fit(
    const at::Tensor& features, const at::Tensor& targets, double alpha) {
  check_alphas({alpha}, "alpha");
  const auto x = matrix_of(features, "features");
  const auto y = matrix_of(targets, "targets");
  TORCH_CHECK(
      x.rows() == y.rows() && x.rows() >= 1,
      "Parameter `targets` "
      "should have as many rows as `features` (",
      x.rows(),
      ", at least 1). "
      "Found ",
      y.rows(),
      ".");
  const auto path = ridge_path(x, y);
  const RowMatrix coef = path.coefficients(alpha);
  const Eigen::RowVectorXd intercept = path.intercept(coef);
  return {
      to_tensor(std::vector<double>(coef.data(), coef.data() + coef.size()))
          .view({x.cols(), y.cols()}),
      to_tensor(
          std::vector<double>(
              intercept.data(), intercept.data() + intercept.size()))};
}

// Boundaries of the contiguous folds used for n samples: [folds + 1].
std::vector<int64_t> kfold_boundaries(int64_t n, int64_t n_folds) {
  return fold_boundaries(n, effective_folds(n_folds, n, "n_folds"));
}

}  // namespace

void define_ensemble_predictor(torch::Library& library) {
  library.class_<EnsemblePredictor>("EnsemblePredictor")
      .def(
          torch::init([](int64_t nonlinear,
                         bool residual,
                         std::vector<int64_t> degrees,
                         std::vector<int64_t> n_knots,
                         std::vector<double> alphas,
                         int64_t n_folds,
                         std::vector<int64_t> neighbors,
                         int64_t neighbor_folds,
                         std::vector<double> residual_alphas,
                         int64_t residual_folds) {
            TORCH_CHECK(
                nonlinear >= 0 && nonlinear <= 2,
                "Parameter `nonlinear` "
                "should be 0 (none), 1 (spline) or 2 (neighbours). Found ",
                nonlinear,
                ".");
            EnsembleConfig config;
            config.nonlinear = static_cast<NonlinearStage>(nonlinear);
            config.residual = residual;
            config.degrees = std::move(degrees);
            config.n_knots = std::move(n_knots);
            config.alphas = std::move(alphas);
            config.n_folds = n_folds;
            config.neighbors = std::move(neighbors);
            config.neighbor_folds = neighbor_folds;
            config.residual_alphas = std::move(residual_alphas);
            config.residual_folds = residual_folds;
            return c10::make_intrusive<EnsemblePredictor>(std::move(config));
          }))
      .def("fit", &EnsemblePredictor::fit)
      .def("predict", &EnsemblePredictor::predict)
      .def("is_fitted", &EnsemblePredictor::is_fitted)
      .def("state", &EnsemblePredictor::state)
      .def_static("from_state", &EnsemblePredictor::from_state)
      .def_static("spline_basis", &spline_basis)
      .def_static("ridge_cv", &ridge_cv)
      .def_static("ridge_fit", &ridge_fit)
      .def_static("kfold_boundaries", &kfold_boundaries)
      .def_pickle(
          [](const c10::intrusive_ptr<EnsemblePredictor>& self) {
            return self->state();
          },
          [](c10::Dict<std::string, at::Tensor> state) {
            return EnsemblePredictor::from_state(state);
          });
}

}  // namespace etap
