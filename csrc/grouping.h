// Choosing task groups (algorithm.md section 7).
//
// Given candidate groups (bitmasks over T <= 64 tasks) and the gain of every
// member in every candidate, choose at most B candidates that together cover
// every task, maximising the sum over tasks of the served gain.
//
// Note [Selection objective and tie-break]
// ----------------------------------------
// cover:     a task may sit in several chosen groups; it is served by the
//            chosen group that gives it the highest gain.
// partition: every task sits in exactly one chosen group.
// Both modes require every task to be served.
//
// Gains are compared exactly, on a fixed-point grid: with M the largest
// |gain| and M < 2^E, every gain g becomes the 128-bit integer
// trunc(g * 2^(119 - E)) (truncation toward zero). Sums of at most 64 such
// integers cannot overflow, and they do not depend on the order of addition,
// so "equal objective" has an exact meaning. Gains smaller than M * 2^-119 in
// magnitude count as zero.
//
// Among selections with the highest objective, the one with the fewest groups
// wins; among those, the one whose candidate indices, sorted in descending
// order, come first lexicographically (the largest index is as small as
// possible, then the second largest, ...).
//
// Note [Cover as a partition into served sets]
// --------------------------------------------
// Given a cover selection, split the tasks by the group that serves them: the
// served sets P_1..P_k partition the tasks and P_i lies inside group g_i. With
//   w(P) = max over candidates g containing P of sum_{t in P} gain(g, t),
// the objective of the selection is at most sum_i w(P_i); conversely every
// partition of the tasks into k sets P_i is matched by the selection of the
// maximising groups, whose objective is at least sum_i w(P_i). So the cover
// optimum equals the best partition of the tasks into at most B sets under the
// weight w, a subset dynamic programme over 2^T masks. The partition mode is
// the same programme with w(P) defined only for the candidates themselves.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace etap {
namespace grouping {

enum class SelectionMode { kCover, kPartition };

enum class SearchMethod {
  // The subset programme when it fits (T <= kMaxDpTasks, its memory and a
  // cap on its steps), else branch and bound when the number of selections is
  // small enough, else the heuristic.
  kAuto,
  kSubsetDp,
  kBranchAndBound,
  // Cover: greedy start, group swaps, served-set moves and restarts (never
  // exact). Partition: branch and bound with a node budget, exact only when
  // it finishes.
  kHeuristic,
};

constexpr int kMaxTasks = 64;
constexpr int kMaxDpTasks = 20;

struct Candidates {
  int num_tasks = 0;
  // members[c]: bit t set when task t belongs to candidate c.
  std::vector<uint64_t> members;
  // gains[c * num_tasks + t]: gain of task t in candidate c (0 off members).
  std::vector<double> gains;

  int size() const {
    return static_cast<int>(members.size());
  }
};

struct Selection {
  // Indices into the candidates, ascending.
  std::vector<int> chosen;
  // Whether the search proved the choice optimal.
  bool exact = false;
  // The search that produced it: "subset_dp", "branch_and_bound", "heuristic".
  std::string method;
};

// Throws c10::Error when no selection of at most max_groups candidates
// covers (cover) or partitions (partition) the tasks.
Selection select_groups(
    const Candidates& candidates,
    int max_groups,
    SelectionMode mode,
    SearchMethod method);

}  // namespace grouping
}  // namespace etap
