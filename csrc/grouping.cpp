// Choosing task groups: exact subset dynamic programming, branch and bound,
// and a local-search heuristic. See grouping.h for the objective, the exact
// comparison of gains and the tie-break.
#include "grouping.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <unordered_map>

namespace etap {
namespace grouping {
namespace {

// Fixed-point gain, Note [Selection objective and tie-break].
// TODO(int128): __int128 is a GCC/Clang extension; an MSVC build needs a
// two-word integer here.
using Score = __int128;

// Below every reachable sum: |score| < 2^119 and sums have at most 64 terms.
constexpr Score kUnserved = -(static_cast<Score>(1) << 126);

// Auto picks branch and bound only when it visits at most this many
// selections in the worst case.
constexpr double kMaxBranchAndBoundSelections = 5e7;
// Memory the subset programme may take.
constexpr double kMaxDpBytes = 1024.0 * 1024.0 * 1024.0;
// Auto runs the subset programme only up to about this many inner steps
// (minutes; T = 20 with every group and B = 3 is 6e9).
constexpr double kMaxAutoDpWork = 2e10;
// Dominance tests are quadratic in the number of candidates.
constexpr int kMaxDominanceCandidates = 4096;
// Random restarts of the cover heuristic's served-set search.
constexpr int kHeuristicRestarts = 8;
// Nodes the heuristic's partition search may visit.
constexpr int64_t kHeuristicNodes = 2000000;

int popcount(uint64_t mask) {
  return __builtin_popcountll(mask);
}

int lowest_task(uint64_t mask) {
  return __builtin_ctzll(mask);
}

struct Problem {
  int num_tasks = 0;
  int num_candidates = 0;
  SelectionMode mode = SelectionMode::kCover;
  int max_groups = 0;
  uint64_t all_tasks = 0;
  std::vector<uint64_t> members;
  // scores[c * num_tasks + t]
  std::vector<Score> scores;

  Score score(int candidate, int task) const {
    return scores[static_cast<size_t>(candidate) * num_tasks + task];
  }

  Score member_sum(int candidate) const {
    Score sum = 0;
    for (uint64_t rest = members[candidate]; rest; rest &= rest - 1) {
      sum += score(candidate, lowest_task(rest));
    }
    return sum;
  }
};

std::vector<Score> quantize(const std::vector<double>& gains) {
  double largest = 0.0;
  for (double gain : gains) {
    largest = std::max(largest, std::fabs(gain));
  }
  int exponent = 0;
  if (largest > 0.0) {
    std::frexp(largest, &exponent);
  }
  const int shift = 119 - exponent;
  std::vector<Score> scores(gains.size());
  for (size_t i = 0; i < gains.size(); ++i) {
    // Scaling by a power of two is exact; the cast truncates toward zero.
    scores[i] = static_cast<Score>(std::ldexp(gains[i], shift));
  }
  return scores;
}

// A complete selection under the tie-break: a higher value wins, then fewer
// groups, then the descending list of indices that comes first.
struct Incumbent {
  bool found = false;
  Score value = 0;
  std::vector<int> descending;

  bool beaten_by(Score other_value, const std::vector<int>& other_desc) const {
    if (!found || other_value != value) {
      return !found || other_value > value;
    }
    if (other_desc.size() != descending.size()) {
      return other_desc.size() < descending.size();
    }
    return std::lexicographical_compare(
        other_desc.begin(),
        other_desc.end(),
        descending.begin(),
        descending.end());
  }

  // Whether a selection of at least `min_count` groups whose value is at
  // most `bound` could still win.
  bool reachable(Score bound, size_t min_count) const {
    if (!found || bound > value) {
      return true;
    }
    return bound == value && min_count <= descending.size();
  }

  void offer(Score other_value, std::vector<int> chosen) {
    std::sort(chosen.begin(), chosen.end(), std::greater<int>());
    if (beaten_by(other_value, chosen)) {
      found = true;
      value = other_value;
      descending = std::move(chosen);
    }
  }
};

// ---- subset dynamic programme (Note [Cover as a partition into served sets])

struct DpState {
  Score value;
  uint32_t block;  // the served set of the group added last
  int32_t group;   // -1: no structure reaches this mask
  int32_t count;
};

double dp_bytes(int num_tasks, int layers) {
  return std::ldexp(1.0, num_tasks) *
         (layers * sizeof(DpState) + sizeof(Score) + sizeof(int32_t));
}

std::vector<int> solve_subset_dp(const Problem& problem) {
  const int num_tasks = problem.num_tasks;
  const size_t num_masks = size_t{1} << num_tasks;
  const uint32_t full = static_cast<uint32_t>(num_masks - 1);
  const int layers = problem.max_groups + 1;

  // Block weights w(P) and the lowest-index candidate that attains them.
  std::vector<Score> block_value(num_masks, kUnserved);
  std::vector<int32_t> block_group(num_masks, -1);
  auto offer_block = [&](uint64_t block, Score value, int candidate) {
    if (block_group[block] < 0 || value > block_value[block]) {
      block_value[block] = value;
      block_group[block] = candidate;
    }
  };
  std::vector<Score> subset_sum;
  std::vector<uint32_t> subset_mask;
  std::vector<int> member_tasks;
  for (int c = 0; c < problem.num_candidates; ++c) {
    if (problem.mode == SelectionMode::kPartition) {
      offer_block(problem.members[c], problem.member_sum(c), c);
      continue;
    }
    member_tasks.clear();
    for (uint64_t rest = problem.members[c]; rest; rest &= rest - 1) {
      member_tasks.push_back(lowest_task(rest));
    }
    const size_t num_subsets = size_t{1} << member_tasks.size();
    subset_sum.assign(num_subsets, 0);
    subset_mask.assign(num_subsets, 0);
    for (size_t i = 1; i < num_subsets; ++i) {
      const int task = member_tasks[__builtin_ctzll(i)];
      const size_t without = i & (i - 1);
      subset_sum[i] = subset_sum[without] + problem.score(c, task);
      subset_mask[i] = subset_mask[without] | (uint32_t{1} << task);
      offer_block(subset_mask[i], subset_sum[i], c);
    }
  }

  // table[k][mask]: the best structure of at most k blocks over `mask`.
  std::vector<DpState> table(layers * num_masks, DpState{0, 0, -1, 0});
  auto at = [&](int layer, uint32_t mask) -> DpState& {
    return table[layer * num_masks + mask];
  };
  for (int layer = 0; layer < layers; ++layer) {
    at(layer, 0) = DpState{0, 0, -1, 0};
  }
  auto groups_of = [&](int layer, uint32_t mask, std::vector<int>& out) {
    while (mask != 0) {
      const DpState& state = at(layer, mask);
      out.push_back(state.group);
      mask ^= state.block;
      --layer;
    }
  };
  std::vector<int> challenger, holder;
  auto descending = [](std::vector<int>& list) {
    std::sort(list.begin(), list.end(), std::greater<int>());
  };

  for (int layer = 1; layer < layers; ++layer) {
    for (uint32_t mask = 1; mask <= full; ++mask) {
      const uint32_t low = mask & (~mask + 1);
      const uint32_t others = mask ^ low;
      DpState best{0, 0, -1, 0};
      bool reached = false;
      for (uint32_t sub = others;; sub = (sub - 1) & others) {
        const uint32_t block = sub | low;
        const int32_t group = block_group[block];
        const uint32_t rest = mask ^ block;
        if (group >= 0 && (rest == 0 || at(layer - 1, rest).group >= 0)) {
          const DpState& before = at(layer - 1, rest);
          const Score value = block_value[block] + before.value;
          const int32_t count = before.count + 1;
          bool better = !reached || value > best.value;
          if (reached && value == best.value) {
            if (count != best.count) {
              better = count < best.count;
            } else {
              challenger.assign(1, group);
              groups_of(layer - 1, rest, challenger);
              holder.assign(1, best.group);
              groups_of(layer - 1, mask ^ best.block, holder);
              descending(challenger);
              descending(holder);
              better = std::lexicographical_compare(
                  challenger.begin(),
                  challenger.end(),
                  holder.begin(),
                  holder.end());
            }
          }
          if (better) {
            best = DpState{value, block, group, count};
            reached = true;
          }
        }
        if (sub == 0) {
          break;
        }
      }
      at(layer, mask) = best;
    }
  }

  std::vector<int> chosen;
  if (at(layers - 1, full).group >= 0) {
    groups_of(layers - 1, full, chosen);
    std::sort(chosen.begin(), chosen.end());
  }
  return chosen;
}

// ---- dominated candidates ------------------------------------------------

// Candidate j can be dropped when another candidate i serves every member of
// j at least as well and is preferred by the tie-break (lower index), or
// serves every member strictly better: then any selection holding j is either
// improved or left unchanged with one group fewer by swapping j for i, so no
// winning selection holds j. In partition mode only a candidate with the same
// members can stand in for another.
std::vector<int> undominated(const Problem& problem) {
  const int count = problem.num_candidates;
  std::vector<int> kept;
  if (problem.mode == SelectionMode::kPartition) {
    std::unordered_map<uint64_t, int> best_by_members;
    for (int c = 0; c < count; ++c) {
      auto found = best_by_members.find(problem.members[c]);
      if (found == best_by_members.end()) {
        best_by_members.emplace(problem.members[c], c);
      } else if (problem.member_sum(c) > problem.member_sum(found->second)) {
        found->second = c;
      }
    }
    for (const auto& entry : best_by_members) {
      kept.push_back(entry.second);
    }
    std::sort(kept.begin(), kept.end());
    return kept;
  }
  if (count > kMaxDominanceCandidates) {
    kept.resize(count);
    for (int c = 0; c < count; ++c) {
      kept[c] = c;
    }
    return kept;
  }
  for (int j = 0; j < count; ++j) {
    bool dominated = false;
    for (int i = 0; i < count && !dominated; ++i) {
      const uint64_t inner = problem.members[j];
      if (i == j || (problem.members[i] & inner) != inner) {
        continue;
      }
      bool at_least = true;
      bool strictly = true;
      for (uint64_t rest = inner; rest; rest &= rest - 1) {
        const int task = lowest_task(rest);
        const Score mine = problem.score(j, task);
        const Score theirs = problem.score(i, task);
        at_least = at_least && theirs >= mine;
        strictly = strictly && theirs > mine;
      }
      dominated = strictly || (at_least && i < j);
    }
    if (!dominated) {
      kept.push_back(j);
    }
  }
  return kept;
}

// ---- cover: local search -------------------------------------------------

struct CoverQuality {
  int uncovered;
  Score value;  // over the covered tasks

  bool better_than(const CoverQuality& other) const {
    if (uncovered != other.uncovered) {
      return uncovered < other.uncovered;
    }
    return value > other.value;
  }
};

std::vector<Score> served_by(
    const Problem& problem, const std::vector<int>& chosen, int skip) {
  std::vector<Score> served(problem.num_tasks, kUnserved);
  for (size_t i = 0; i < chosen.size(); ++i) {
    if (static_cast<int>(i) == skip) {
      continue;
    }
    for (uint64_t rest = problem.members[chosen[i]]; rest; rest &= rest - 1) {
      const int task = lowest_task(rest);
      served[task] = std::max(served[task], problem.score(chosen[i], task));
    }
  }
  return served;
}

CoverQuality quality_of(const std::vector<Score>& served) {
  CoverQuality quality{0, 0};
  for (Score value : served) {
    if (value == kUnserved) {
      ++quality.uncovered;
    } else {
      quality.value += value;
    }
  }
  return quality;
}

CoverQuality quality_with(
    const Problem& problem,
    const std::vector<Score>& served,
    const CoverQuality& base,
    int candidate) {
  CoverQuality quality = base;
  for (uint64_t rest = problem.members[candidate]; rest; rest &= rest - 1) {
    const int task = lowest_task(rest);
    const Score gain = problem.score(candidate, task);
    if (served[task] == kUnserved) {
      --quality.uncovered;
      quality.value += gain;
    } else if (gain > served[task]) {
      quality.value += gain - served[task];
    }
  }
  return quality;
}

// Greedy additions to `chosen`, then best-improvement moves (drop, add, or
// swap one group) until none improves coverage or value.
std::vector<int> cover_local_search(
    const Problem& problem,
    const std::vector<int>& pool,
    std::vector<int> chosen) {
  CoverQuality current = quality_of(served_by(problem, chosen, -1));
  while (static_cast<int>(chosen.size()) < problem.max_groups) {
    const std::vector<Score> served = served_by(problem, chosen, -1);
    int best = -1;
    CoverQuality best_quality = current;
    for (int candidate : pool) {
      const CoverQuality q = quality_with(problem, served, current, candidate);
      if (q.better_than(best_quality)) {
        best = candidate;
        best_quality = q;
      }
    }
    if (best < 0) {
      break;
    }
    chosen.push_back(best);
    current = best_quality;
  }

  for (int round = 0; round < 10000; ++round) {
    std::vector<int> best_move;
    CoverQuality best_quality = current;
    const int size = static_cast<int>(chosen.size());
    for (int skip = -1; skip < size; ++skip) {
      if (skip < 0 && size >= problem.max_groups) {
        continue;
      }
      const std::vector<Score> served = served_by(problem, chosen, skip);
      const CoverQuality base = quality_of(served);
      std::vector<int> kept;
      for (int i = 0; i < size; ++i) {
        if (i != skip) {
          kept.push_back(chosen[i]);
        }
      }
      if (skip >= 0 && !kept.empty() && base.better_than(best_quality)) {
        best_quality = base;
        best_move = kept;
      }
      for (int candidate : pool) {
        if (std::find(kept.begin(), kept.end(), candidate) != kept.end()) {
          continue;
        }
        const CoverQuality q = quality_with(problem, served, base, candidate);
        if (q.better_than(best_quality)) {
          best_quality = q;
          best_move = kept;
          best_move.push_back(candidate);
        }
      }
    }
    if (best_move.empty()) {
      break;
    }
    chosen = best_move;
    current = best_quality;
  }
  if (current.uncovered > 0) {
    chosen.clear();
  }
  return chosen;
}

// Local search over served sets (Note [Cover as a partition into served
// sets]): the tasks are split into at most B blocks, each block is served by
// the candidate containing it with the highest sum over the block, and a move
// sends one task to another (or a new) block. Unlike group swaps, a move never
// breaks coverage, so it escapes the optima where every swap would uncover a
// task.
class ServedSetSearch {
 public:
  ServedSetSearch(const Problem& problem, const std::vector<int>& pool)
      : problem_(problem), pool_(pool) {}

  std::vector<int> improve(const std::vector<int>& start) {
    if (start.empty()) {
      return start;
    }
    return improve_blocks(blocks_of(start));
  }

  // Starts from the given blocks (non-empty, at most B); returns no groups
  // when some block lies in no candidate.
  std::vector<int> improve_blocks(std::vector<uint64_t> blocks) {
    std::vector<Best> best(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      best[i] = best_for(blocks[i]);
      if (best[i].candidate < 0) {
        return {};
      }
    }
    for (int round = 0; round < 10000; ++round) {
      Score best_change = 0;
      int best_task = -1;
      size_t from_block = 0, to_block = 0;
      Best from_best{}, to_best{};
      for (size_t i = 0; i < blocks.size(); ++i) {
        for (uint64_t rest = blocks[i]; rest; rest &= rest - 1) {
          const int task = lowest_task(rest);
          const uint64_t bit = uint64_t{1} << task;
          const Best shrunk = best_for(blocks[i] & ~bit);
          if (shrunk.candidate < 0) {
            continue;
          }
          const bool can_open =
              static_cast<int>(blocks.size()) < problem_.max_groups;
          const size_t targets = blocks.size() + (can_open ? 1 : 0);
          for (size_t j = 0; j < targets; ++j) {
            if (j == i) {
              continue;
            }
            const uint64_t grown = (j < blocks.size() ? blocks[j] : 0) | bit;
            const Best joined = best_for(grown);
            if (joined.candidate < 0) {
              continue;
            }
            const Score before =
                best[i].value + (j < blocks.size() ? best[j].value : 0);
            const Score change = shrunk.value + joined.value - before;
            if (change > best_change) {
              best_change = change;
              best_task = task;
              from_block = i;
              to_block = j;
              from_best = shrunk;
              to_best = joined;
            }
          }
        }
      }
      if (best_task < 0) {
        break;
      }
      const uint64_t bit = uint64_t{1} << best_task;
      if (to_block == blocks.size()) {
        blocks.push_back(0);
        best.push_back(Best{});
      }
      blocks[from_block] &= ~bit;
      blocks[to_block] |= bit;
      best[from_block] = from_best;
      best[to_block] = to_best;
      if (blocks[from_block] == 0) {
        blocks.erase(blocks.begin() + from_block);
        best.erase(best.begin() + from_block);
      }
    }
    std::vector<int> chosen;
    for (const Best& block : best) {
      if (std::find(chosen.begin(), chosen.end(), block.candidate) ==
          chosen.end()) {
        chosen.push_back(block.candidate);
      }
    }
    return chosen;
  }

 private:
  struct Best {
    Score value = 0;
    int candidate = -1;
  };

  // An empty block costs nothing and needs no group.
  Best best_for(uint64_t block) const {
    Best best;
    if (block == 0) {
      best.candidate = kNoGroupNeeded;
      return best;
    }
    for (int c : pool_) {
      if ((problem_.members[c] & block) != block) {
        continue;
      }
      Score value = 0;
      for (uint64_t rest = block; rest; rest &= rest - 1) {
        value += problem_.score(c, lowest_task(rest));
      }
      if (best.candidate < 0 || value > best.value) {
        best.value = value;
        best.candidate = c;
      }
    }
    return best;
  }

  // Each task goes to the chosen group serving it best.
  std::vector<uint64_t> blocks_of(const std::vector<int>& chosen) const {
    std::vector<uint64_t> blocks(chosen.size(), 0);
    for (int t = 0; t < problem_.num_tasks; ++t) {
      int holder = -1;
      for (size_t i = 0; i < chosen.size(); ++i) {
        if (((problem_.members[chosen[i]] >> t) & 1) &&
            (holder < 0 || problem_.score(chosen[i], t) >
                               problem_.score(chosen[holder], t))) {
          holder = static_cast<int>(i);
        }
      }
      blocks[holder] |= uint64_t{1} << t;
    }
    blocks.erase(
        std::remove(blocks.begin(), blocks.end(), uint64_t{0}), blocks.end());
    return blocks;
  }

  static constexpr int kNoGroupNeeded = std::numeric_limits<int>::max();

  const Problem& problem_;
  const std::vector<int>& pool_;
};

// ---- cover: branch and bound ---------------------------------------------

// Enumerates selections as increasing sequences over `order` (candidates by
// decreasing total gain). Two bounds prune a node:
//  - each task ends at most at the larger of its served score and the best
//    score any later candidate offers it (a task no later candidate holds
//    cannot be covered);
//  - submodularity: from the current served scores (for an uncovered task, the
//    lowest score any candidate gives it, which every final score reaches),
//    r more groups raise the sum by at most the r largest single-group
//    improvements.
// Both stay valid for negative gains since they never assume a served score
// is at least zero.
// TODO(cover-bound): on dense candidate sets (every group of 10+ tasks) these
// bounds prune too little for B >= 4; the subset programme covers T <= 20, and
// a tighter bound would extend exact answers past it.
class CoverBranchAndBound {
 public:
  CoverBranchAndBound(const Problem& problem, std::vector<int> order)
      : problem_(problem), order_(std::move(order)) {
    const int num_tasks = problem.num_tasks;
    const size_t count = order_.size();
    later_best_.assign((count + 1) * num_tasks, kUnserved);
    lowest_.assign(num_tasks, 0);
    for (size_t j = count; j-- > 0;) {
      const int c = order_[j];
      for (int t = 0; t < num_tasks; ++t) {
        later_best_[j * num_tasks + t] = later_best_[(j + 1) * num_tasks + t];
      }
      for (uint64_t rest = problem.members[c]; rest; rest &= rest - 1) {
        const int task = lowest_task(rest);
        Score& slot = later_best_[j * num_tasks + task];
        slot = std::max(slot, problem.score(c, task));
        lowest_[task] = std::min(lowest_[task], problem.score(c, task));
      }
    }
  }

  void start_from(const std::vector<int>& chosen) {
    if (chosen.empty()) {
      return;
    }
    const CoverQuality q = quality_of(served_by(problem_, chosen, -1));
    if (q.uncovered == 0) {
      incumbent_.offer(q.value, chosen);
    }
  }

  std::vector<int> run() {
    std::vector<Score> served(problem_.num_tasks, kUnserved);
    std::vector<int> chosen;
    search(0, served, chosen);
    std::vector<int> result = incumbent_.descending;
    std::sort(result.begin(), result.end());
    return result;
  }

 private:
  void search(
      size_t from, const std::vector<Score>& served, std::vector<int>& chosen) {
    const int num_tasks = problem_.num_tasks;
    const CoverQuality here = quality_of(served);
    if (!chosen.empty() && here.uncovered == 0) {
      incumbent_.offer(here.value, chosen);
    }
    const int remaining = problem_.max_groups - static_cast<int>(chosen.size());
    if (remaining == 0 || from >= order_.size()) {
      return;
    }
    if (!marginal_bound_allows(from, served, remaining, chosen.size() + 1)) {
      return;
    }
    std::vector<Score> next(num_tasks);
    for (size_t j = from; j < order_.size(); ++j) {
      // later_best_ only shrinks with j, so a failed bound ends the loop.
      Score bound = 0;
      for (int t = 0; t < num_tasks; ++t) {
        const Score best = std::max(served[t], later_best_[j * num_tasks + t]);
        if (best == kUnserved) {
          return;
        }
        bound += best;
      }
      if (!incumbent_.reachable(bound, chosen.size() + 1)) {
        return;
      }
      const int c = order_[j];
      next = served;
      for (uint64_t rest = problem_.members[c]; rest; rest &= rest - 1) {
        const int task = lowest_task(rest);
        next[task] = std::max(next[task], problem_.score(c, task));
      }
      chosen.push_back(c);
      search(j + 1, next, chosen);
      chosen.pop_back();
    }
  }

  bool marginal_bound_allows(
      size_t from,
      const std::vector<Score>& served,
      int remaining,
      size_t min_count) {
    if (!incumbent_.found) {
      return true;
    }
    Score base = 0;
    std::vector<Score> floor(problem_.num_tasks);
    for (int t = 0; t < problem_.num_tasks; ++t) {
      floor[t] = served[t] == kUnserved ? lowest_[t] : served[t];
      base += floor[t];
    }
    top_.assign(remaining, 0);
    for (size_t j = from; j < order_.size(); ++j) {
      const int c = order_[j];
      Score improvement = 0;
      for (uint64_t rest = problem_.members[c]; rest; rest &= rest - 1) {
        const int task = lowest_task(rest);
        const Score gain = problem_.score(c, task);
        if (gain > floor[task]) {
          improvement += gain - floor[task];
        }
      }
      // top_ is kept in ascending order; replace its smallest entry.
      if (improvement > top_[0]) {
        top_[0] = improvement;
        for (int i = 1; i < remaining && top_[i] < top_[i - 1]; ++i) {
          std::swap(top_[i], top_[i - 1]);
        }
      }
    }
    Score bound = base;
    for (Score improvement : top_) {
      bound += improvement;
    }
    return incumbent_.reachable(bound, min_count);
  }

  const Problem& problem_;
  std::vector<int> order_;
  std::vector<Score> later_best_;
  std::vector<Score> lowest_;
  std::vector<Score> top_;
  Incumbent incumbent_;
};

// ---- partition: branch and bound -----------------------------------------

// Picks, for the lowest task not yet placed, the group that holds it; the
// bound adds to the placed value each unplaced task's best score anywhere.
// With a node budget it is the partition heuristic: candidates are tried in
// decreasing total gain, so the first complete partitions are greedy ones.
class PartitionBranchAndBound {
 public:
  PartitionBranchAndBound(
      const Problem& problem, const std::vector<int>& pool, int64_t node_budget)
      : problem_(problem), nodes_left_(node_budget) {
    by_lowest_task_.resize(problem.num_tasks);
    best_score_.assign(problem.num_tasks, kUnserved);
    sums_.assign(problem.num_candidates, 0);
    for (int c : pool) {
      sums_[c] = problem.member_sum(c);
      by_lowest_task_[lowest_task(problem.members[c])].push_back(c);
      for (uint64_t rest = problem.members[c]; rest; rest &= rest - 1) {
        const int task = lowest_task(rest);
        best_score_[task] = std::max(best_score_[task], problem.score(c, task));
      }
    }
    for (auto& bucket : by_lowest_task_) {
      std::stable_sort(bucket.begin(), bucket.end(), [&](int a, int b) {
        return sums_[a] > sums_[b];
      });
    }
  }

  std::vector<int> run() {
    std::vector<int> chosen;
    search(0, 0, chosen);
    std::vector<int> result = incumbent_.descending;
    std::sort(result.begin(), result.end());
    return result;
  }

  bool finished() const {
    return !out_of_nodes_;
  }

 private:
  void search(uint64_t placed, Score value, std::vector<int>& chosen) {
    if (nodes_left_ >= 0 && nodes_left_-- == 0) {
      out_of_nodes_ = true;
    }
    if (out_of_nodes_) {
      return;
    }
    if (placed == problem_.all_tasks) {
      incumbent_.offer(value, chosen);
      return;
    }
    if (static_cast<int>(chosen.size()) == problem_.max_groups) {
      return;
    }
    Score bound = value;
    for (uint64_t rest = problem_.all_tasks & ~placed; rest; rest &= rest - 1) {
      const Score best = best_score_[lowest_task(rest)];
      if (best == kUnserved) {
        return;
      }
      bound += best;
    }
    if (!incumbent_.reachable(bound, chosen.size() + 1)) {
      return;
    }
    const int task = lowest_task(problem_.all_tasks & ~placed);
    for (int c : by_lowest_task_[task]) {
      if (problem_.members[c] & placed) {
        continue;
      }
      chosen.push_back(c);
      search(placed | problem_.members[c], value + sums_[c], chosen);
      chosen.pop_back();
    }
  }

  const Problem& problem_;
  std::vector<std::vector<int>> by_lowest_task_;
  std::vector<Score> best_score_;
  std::vector<Score> sums_;
  int64_t nodes_left_;
  bool out_of_nodes_ = false;
  Incumbent incumbent_;
};

// ---- choosing the search -------------------------------------------------

double selections_at_most(double pool, int max_groups) {
  double total = 0.0;
  double term = 1.0;
  for (int k = 1; k <= max_groups && k <= pool; ++k) {
    term = term * (pool - k + 1) / k;
    total += term;
  }
  return total;
}

bool dp_fits(const Problem& problem) {
  return problem.num_tasks <= kMaxDpTasks &&
         dp_bytes(problem.num_tasks, problem.max_groups + 1) <= kMaxDpBytes;
}

double dp_work(const Problem& problem) {
  double blocks = 0.0;
  for (uint64_t members : problem.members) {
    blocks += problem.mode == SelectionMode::kCover
                  ? std::ldexp(1.0, popcount(members))
                  : 1.0;
  }
  return blocks + problem.max_groups * std::pow(3.0, problem.num_tasks) / 2.0;
}

std::vector<int> by_total_gain(const Problem& problem, std::vector<int> pool) {
  std::vector<Score> sums(problem.num_candidates, 0);
  for (int c : pool) {
    sums[c] = problem.member_sum(c);
  }
  std::stable_sort(pool.begin(), pool.end(), [&](int a, int b) {
    return sums[a] > sums[b];
  });
  return pool;
}

}  // namespace

Selection select_groups(
    const Candidates& candidates,
    int max_groups,
    SelectionMode mode,
    SearchMethod method) {
  TORCH_CHECK(
      candidates.num_tasks >= 1 && candidates.num_tasks <= kMaxTasks,
      "Parameter `groups` should have between 1 and ",
      kMaxTasks,
      " tasks (columns). Found ",
      candidates.num_tasks,
      ".");
  TORCH_CHECK(
      max_groups >= 1,
      "Parameter `max_groups` should be at least 1. Found ",
      max_groups,
      ".");

  Problem problem;
  problem.num_tasks = candidates.num_tasks;
  problem.num_candidates = candidates.size();
  problem.mode = mode;
  problem.max_groups = std::min(max_groups, candidates.num_tasks);
  problem.all_tasks = candidates.num_tasks == 64
                          ? ~uint64_t{0}
                          : (uint64_t{1} << candidates.num_tasks) - 1;
  problem.members = candidates.members;
  problem.scores = quantize(candidates.gains);

  // Dominance is quadratic; the programme is picked first when it is cheaper
  // than even the unpruned enumeration.
  std::vector<int> pool;
  if (method == SearchMethod::kAuto) {
    const bool dp_in_time =
        dp_fits(problem) && dp_work(problem) <= kMaxAutoDpWork;
    const bool dp_cheaper =
        dp_in_time &&
        dp_work(problem) <=
            selections_at_most(problem.num_candidates, problem.max_groups);
    if (dp_cheaper) {
      method = SearchMethod::kSubsetDp;
    } else {
      pool = undominated(problem);
      const double selections =
          selections_at_most(pool.size(), problem.max_groups);
      if (dp_in_time && (dp_work(problem) <= selections ||
                         selections > kMaxBranchAndBoundSelections)) {
        method = SearchMethod::kSubsetDp;
      } else if (selections <= kMaxBranchAndBoundSelections) {
        method = SearchMethod::kBranchAndBound;
      } else {
        method = SearchMethod::kHeuristic;
      }
    }
  }

  Selection selection;
  if (method == SearchMethod::kSubsetDp) {
    TORCH_CHECK(
        dp_fits(problem),
        "Parameter `method` should be \"subset_dp\" only for at most ",
        kMaxDpTasks,
        " tasks and a table under 1 GiB. Found ",
        problem.num_tasks,
        " tasks and max_groups ",
        problem.max_groups,
        ".");
    selection.chosen = solve_subset_dp(problem);
    selection.exact = true;
    selection.method = "subset_dp";
  } else {
    if (pool.empty()) {
      pool = undominated(problem);
    }
    pool = by_total_gain(problem, std::move(pool));
    const bool heuristic = method == SearchMethod::kHeuristic;
    selection.method = heuristic ? "heuristic" : "branch_and_bound";
    if (mode == SelectionMode::kCover) {
      // Group swaps and served-set moves take turns until neither helps.
      std::vector<int> start = cover_local_search(problem, pool, {});
      for (int round = 0; round < 100 && !start.empty(); ++round) {
        const std::vector<int> moved = cover_local_search(
            problem, pool, ServedSetSearch(problem, pool).improve(start));
        if (!quality_of(served_by(problem, moved, -1))
                 .better_than(quality_of(served_by(problem, start, -1)))) {
          break;
        }
        start = moved;
      }
      // Restarts from fixed pseudo-random splits of the tasks into B blocks.
      uint64_t state = 0x9e3779b97f4a7c15ULL;
      for (int restart = 0; restart < kHeuristicRestarts; ++restart) {
        std::vector<uint64_t> blocks(problem.max_groups, 0);
        for (int t = 0; t < problem.num_tasks; ++t) {
          state = state * 6364136223846793005ULL + 1442695040888963407ULL;
          blocks[(state >> 33) % problem.max_groups] |= uint64_t{1} << t;
        }
        blocks.erase(
            std::remove(blocks.begin(), blocks.end(), uint64_t{0}),
            blocks.end());
        std::vector<int> moved =
            ServedSetSearch(problem, pool).improve_blocks(blocks);
        if (moved.empty()) {
          continue;
        }
        moved = cover_local_search(problem, pool, moved);
        if (start.empty() ||
            quality_of(served_by(problem, moved, -1))
                .better_than(quality_of(served_by(problem, start, -1)))) {
          start = moved;
        }
      }
      if (heuristic) {
        selection.chosen = start;
        std::sort(selection.chosen.begin(), selection.chosen.end());
        selection.exact = false;
      } else {
        CoverBranchAndBound search(problem, pool);
        search.start_from(start);
        selection.chosen = search.run();
        selection.exact = true;
      }
    } else {
      PartitionBranchAndBound search(
          problem, pool, heuristic ? kHeuristicNodes : -1);
      selection.chosen = search.run();
      selection.exact = search.finished();
    }
  }

  TORCH_CHECK_VALUE(
      !selection.chosen.empty(),
      "Parameter `max_groups` should allow a selection that ",
      mode == SelectionMode::kCover ? "covers" : "partitions",
      " every task. Found none with at most ",
      problem.max_groups,
      " of the ",
      problem.num_candidates,
      " candidate groups",
      selection.exact ? "" : " (the heuristic search found none)",
      ".");
  return selection;
}

}  // namespace grouping

namespace {

using grouping::Candidates;
using grouping::SearchMethod;
using grouping::SelectionMode;

std::string describe_group(const at::Tensor& groups, int64_t row) {
  std::ostringstream out;
  out << "group " << row << " (tasks ";
  bool first = true;
  auto members = groups.accessor<bool, 2>()[row];
  for (int64_t t = 0; t < groups.size(1); ++t) {
    if (members[t]) {
      out << (first ? "" : ", ") << t;
      first = false;
    }
  }
  out << (first ? "none)" : ")");
  return out.str();
}

SelectionMode parse_mode(c10::string_view mode) {
  if (mode == "cover") {
    return SelectionMode::kCover;
  }
  TORCH_CHECK_VALUE(
      mode == "partition",
      "Parameter `mode` should be \"cover\" or \"partition\". Found \"",
      std::string(mode),
      "\".");
  return SelectionMode::kPartition;
}

SearchMethod parse_method(c10::string_view method) {
  if (method == "auto") {
    return SearchMethod::kAuto;
  }
  if (method == "subset_dp") {
    return SearchMethod::kSubsetDp;
  }
  if (method == "branch_and_bound") {
    return SearchMethod::kBranchAndBound;
  }
  TORCH_CHECK_VALUE(
      method == "heuristic",
      "Parameter `method` should be one of \"auto\", \"subset_dp\", "
      "\"branch_and_bound\", \"heuristic\". Found \"",
      std::string(method),
      "\".");
  return SearchMethod::kHeuristic;
}

// Candidates 0..N-1 are the rows of `groups`; candidate N + t is task t alone
// (gain 0). Without singletons, one-task rows and N + t are left out, except
// for a single task, whose only grouping is itself.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
select_groups_cpu(
    const at::Tensor& groups,
    const at::Tensor& gains,
    int64_t max_groups,
    c10::string_view mode_name,
    bool allow_singletons,
    c10::string_view method_name) {
  TORCH_CHECK(
      groups.dim() == 2 && groups.scalar_type() == at::kBool,
      "Parameter `groups` should be a 2-D bool membership matrix [N, T]. "
      "Found ",
      groups.dim(),
      "-D ",
      groups.scalar_type(),
      ".");
  TORCH_CHECK(
      gains.dim() == 2 && at::isFloatingType(gains.scalar_type()),
      "Parameter `gains` should be a 2-D floating tensor [N, T]. Found ",
      gains.dim(),
      "-D ",
      gains.scalar_type(),
      ".");
  TORCH_CHECK(
      gains.sizes() == groups.sizes(),
      "Parameter `gains` should have the shape of `groups` ",
      groups.sizes(),
      ". Found ",
      gains.sizes(),
      ".");
  const int64_t num_rows = groups.size(0);
  const int64_t num_tasks = groups.size(1);
  TORCH_CHECK_VALUE(
      num_tasks >= 1 && num_tasks <= grouping::kMaxTasks,
      "Parameter `groups` should have between 1 and ",
      grouping::kMaxTasks,
      " tasks (columns; membership is a 64-bit mask). Found ",
      num_tasks,
      ".");
  TORCH_CHECK_VALUE(
      max_groups >= 1,
      "Parameter `max_groups` should be at least 1. Found ",
      max_groups,
      ".");
  const SelectionMode mode = parse_mode(mode_name);
  const SearchMethod method = parse_method(method_name);

  const at::Tensor member_table = groups.cpu().contiguous();
  const at::Tensor gain_table = gains.cpu().to(at::kDouble).contiguous();
  auto member = member_table.accessor<bool, 2>();
  auto gain = gain_table.accessor<double, 2>();
  const bool singletons = allow_singletons || num_tasks == 1;

  Candidates candidates;
  candidates.num_tasks = static_cast<int>(num_tasks);
  std::vector<int64_t> origin;
  for (int64_t row = 0; row < num_rows; ++row) {
    uint64_t mask = 0;
    for (int64_t t = 0; t < num_tasks; ++t) {
      const double value = gain[row][t];
      TORCH_CHECK_VALUE(
          std::isfinite(value),
          "Parameter `gains` should be finite. Found ",
          value,
          " for task ",
          t,
          " in ",
          describe_group(member_table, row),
          ".");
      TORCH_CHECK_VALUE(
          member[row][t] || value == 0.0,
          "Parameter `gains` should be 0 off the membership. Found ",
          value,
          " for task ",
          t,
          ", not a member of ",
          describe_group(member_table, row),
          ".");
      if (member[row][t]) {
        mask |= uint64_t{1} << t;
      }
    }
    TORCH_CHECK_VALUE(
        mask != 0,
        "Parameter `groups` should have at least one task in every row. "
        "Found an empty row ",
        row,
        ".");
    if (grouping::popcount(mask) == 1) {
      const int task = grouping::lowest_task(mask);
      TORCH_CHECK_VALUE(
          gain[row][task] == 0.0,
          "Parameter `gains` should be 0 for a one-task group (a task alone "
          "is the baseline). Found ",
          gain[row][task],
          " in ",
          describe_group(member_table, row),
          ".");
      if (!singletons) {
        continue;
      }
    }
    candidates.members.push_back(mask);
    for (int64_t t = 0; t < num_tasks; ++t) {
      candidates.gains.push_back(gain[row][t]);
    }
    origin.push_back(row);
  }
  if (singletons) {
    for (int64_t t = 0; t < num_tasks; ++t) {
      candidates.members.push_back(uint64_t{1} << t);
      candidates.gains.insert(candidates.gains.end(), num_tasks, 0.0);
      origin.push_back(num_rows + t);
    }
  }

  const int clamped = static_cast<int>(std::min(max_groups, num_tasks));
  const grouping::Selection selection =
      grouping::select_groups(candidates, clamped, mode, method);

  at::Tensor chosen = at::zeros({num_rows + num_tasks}, at::kBool);
  at::Tensor serving = at::full({num_tasks}, -1, at::kLong);
  at::Tensor served_gain = at::zeros({num_tasks}, at::kDouble);
  auto chosen_out = chosen.accessor<bool, 1>();
  auto serving_out = serving.accessor<int64_t, 1>();
  auto served_out = served_gain.accessor<double, 1>();
  // Each task is served by the chosen group with its highest gain; among
  // equal gains, the lowest index.
  for (int c : selection.chosen) {
    chosen_out[origin[c]] = true;
    for (int64_t t = 0; t < num_tasks; ++t) {
      const double value = candidates.gains[c * num_tasks + t];
      if (((candidates.members[c] >> t) & 1) &&
          (serving_out[t] < 0 || value > served_out[t] ||
           (value == served_out[t] && origin[c] < serving_out[t]))) {
        serving_out[t] = origin[c];
        served_out[t] = value;
      }
    }
  }
  double total = 0.0;
  for (int64_t t = 0; t < num_tasks; ++t) {
    total += served_out[t];
  }
  at::Tensor objective =
      at::scalar_tensor(total / num_tasks, at::TensorOptions(at::kDouble));
  at::Tensor exact =
      at::scalar_tensor(selection.exact, at::TensorOptions(at::kBool));
  return {chosen, serving, served_gain, objective, exact};
}

}  // namespace
}  // namespace etap

TORCH_LIBRARY_IMPL(etap, CPU, m) {
  m.impl("select_groups", &etap::select_groups_cpu);
}
