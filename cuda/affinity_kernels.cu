// CUDA kernels of the affinity family: the generic op, the SGD family and the
// Adam family (algorithm.md section 2).
//
// Note [Affinity tiles]
// ~~~~~~~~~~~~~~~~~~~~~
// Every op computes A[s, t] = sum_k sum_i g_k[t, i] * d_k[s, i] over the
// elements i of every shared parameter k: a [T, P] x [P, T] product where P,
// the number of shared elements, is huge and T is small. The gradients are
// read once from global memory:
//
// * The parameters of one call are described by a table passed by value as
//   the kernel argument (as multi-tensor kernels do): pointers, dtypes,
//   element counts, strides. Each parameter is cut into tiles of
//   kColumns elements; a persistent grid walks the concatenated tile list
//   with a grid stride, so one launch covers every parameter of the table.
//   Only when the list outgrows one table are there several launches.
// * A block stages one tile in shared memory: the target rows g[t, tile]
//   converted to the accumulation type, and the source rows d[s, tile], the
//   directions formed on the fly from the gradient (SGD: scale * g + offset;
//   Adam: from g, the parameter and the moments) or read from `updates`.
//   The staging thread of a column loads all rows of that column at once so
//   many loads are in flight.
// * Each thread then owns a 4 x 4 block of (source, target) pairs and a
//   subset of the tile's columns: per column it reads 4 + 4 staged values and
//   does 16 fused multiply-adds. Row strides are padded so these reads hit
//   distinct banks (or broadcast).
// * Tasks are padded to kTasks in {8, 16, 32}. T > 32 is covered by blocks of
//   32 x 32 (source, target) tasks, one sweep over the gradients per block of
//   tasks.
//
// Note [Deterministic reduction]
// ~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
// The assignment of tiles to blocks depends only on the inputs and the
// device, never on timing. A thread sums each tile on its own and then adds
// the tile's sum to its running total (a blocked order); at the end the
// threads of a block add their totals in a fixed order and write one
// [kTasks, kTasks] partial to a fixed slot of a scratch tensor; a second
// kernel adds the slots of every entry in float64 with a fixed-order CUB
// block reduction and divides by the target's loss. Results are bitwise
// identical run to run on one device.
#include "affinity_kernels.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace etap::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kFinalizeThreads = 128;
// Each thread accumulates a kPairRows x kPairRows block of (source, target).
constexpr int kPairRows = 4;
// Widest block of tasks one sweep handles; larger T sweeps once per block.
constexpr int kMaxTaskBlock = 32;
// Dimensions of a general strided layout after merging dimensions that are
// contiguous with each other in every tensor of the parameter.
constexpr int kMaxDims = 5;
// General strided layouts a table holds; dense parameters need none.
constexpr int kMaxLayouts = 3;
// Distinct Adam hyperparameter groups a table holds.
constexpr int kMaxAdamGroups = 8;
// Bytes of kernel arguments a table may take (the limit is 4 KiB).
constexpr size_t kMaxTableBytes = 3968;

enum DtypeTag : uint8_t {
  kFloat32 = 0,
  kFloat64 = 1,
  kFloat16 = 2,
  kBFloat16 = 3,
};

DtypeTag dtype_tag(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return kFloat32;
    case at::kDouble:
      return kFloat64;
    case at::kHalf:
      return kFloat16;
    case at::kBFloat16:
      return kBFloat16;
    default:
      TORCH_CHECK(
          false,
          "The CUDA affinity kernels should get float64, float32, float16 or "
          "bfloat16 tensors. Found ",
          type,
          ".");
  }
}

// ---------------------------------------------------------------------------
// The tables passed as kernel arguments.

template <int kPointers>
struct StridedLayout {
  // Outermost first; only the first `rank` are used.
  int64_t sizes[kMaxDims];
  int64_t strides[kPointers][kMaxDims];
  int rank;
};

// Pointer 0 is always the gradient stack [T, *shape]; the others are family
// specific. A stack's task stride is its stride along dimension 0.
template <int kPointers_, int kStacks_, int kSlots_>
struct TensorTable {
  static constexpr int kPointers = kPointers_;
  static constexpr int kStacks = kStacks_;
  static constexpr int kSlots = kSlots_;

  const void* data[kSlots][kPointers];
  int64_t task_stride[kSlots][kStacks];
  // Elements of one task's slice of the parameter.
  int64_t numel[kSlots];
  // Tiles of the slots up to and including this one.
  int64_t tile_end[kSlots];
  uint8_t dtype[kSlots][kPointers];
  // -1: every pointer of the slot has the same dense, non-overlapping
  // strides, so element i lies at memory offset i. Otherwise an index into
  // `layouts`.
  int8_t layout[kSlots];
  StridedLayout<kPointers> layouts[kMaxLayouts];
  int num_slots;
  int num_layouts;
};

// Pointers: grads, updates. Both are stacks.
struct GenericTable : TensorTable<2, 2, 64> {};

// Pointers: grads, offsets (nullptr: zero).
struct SgdTable : TensorTable<2, 1, 64> {
  double scale[kSlots];
};

struct AdamGroup {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  double inv_bias_correction1;
  double inv_sqrt_bias_correction2;
  bool decoupled;
  bool amsgrad;
  bool maximize;
};

// Pointers: grads, params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs (the
// moments may be nullptr: zero).
struct AdamTable : TensorTable<5, 1, 36> {
  uint8_t group[kSlots];
  AdamGroup groups[kMaxAdamGroups];
  int num_groups;
};

static_assert(sizeof(GenericTable) <= kMaxTableBytes, "table too large");
static_assert(sizeof(SgdTable) <= kMaxTableBytes, "table too large");
static_assert(sizeof(AdamTable) <= kMaxTableBytes, "table too large");

// The (source, target) block of tasks one sweep computes.
struct TaskBlock {
  int64_t source_begin;
  int64_t target_begin;
  int num_sources;
  int num_targets;
};

// ---------------------------------------------------------------------------
// Element loads.

template <typename T>
struct TypeMarker {
  using type = T;
};

// Calls `body(TypeMarker<scalar_t>{})` for the dtype `tag` names, so the
// loop inside `body` is compiled once per dtype and issues its loads back to
// back. A float32 accumulator never meets float64 data (the host picks a
// float64 accumulator then), so that case is not compiled for it.
template <typename acc_t, typename Body>
__device__ __forceinline__ void with_element_type(uint8_t tag, Body&& body) {
  if constexpr (std::is_same_v<acc_t, double>) {
    if (tag == kFloat64) {
      body(TypeMarker<double>{});
      return;
    }
  }
  if (tag == kFloat16) {
    body(TypeMarker<c10::Half>{});
  } else if (tag == kBFloat16) {
    body(TypeMarker<c10::BFloat16>{});
  } else {
    body(TypeMarker<float>{});
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t
load_tagged(const void* data, int64_t offset, uint8_t tag) {
  acc_t value = 0;
  with_element_type<acc_t>(tag, [&](auto marker) {
    using scalar_t = typename decltype(marker)::type;
    value = static_cast<acc_t>(static_cast<const scalar_t*>(data)[offset]);
  });
  return value;
}

// Memory offsets of element `element` of one task's slice, for every pointer
// of the slot.
template <typename Table>
__device__ __forceinline__ void element_offsets(
    const Table& table,
    int slot,
    int64_t element,
    int64_t (&offsets)[Table::kPointers]) {
  const int layout_index = table.layout[slot];
  if (layout_index < 0) {
#pragma unroll
    for (int p = 0; p < Table::kPointers; ++p) {
      offsets[p] = element;
    }
    return;
  }
  const auto& layout = table.layouts[layout_index];
#pragma unroll
  for (int p = 0; p < Table::kPointers; ++p) {
    offsets[p] = 0;
  }
  int64_t remaining = element;
  for (int dim = layout.rank - 1; dim > 0; --dim) {
    const int64_t index = remaining % layout.sizes[dim];
    remaining /= layout.sizes[dim];
#pragma unroll
    for (int p = 0; p < Table::kPointers; ++p) {
      offsets[p] += index * layout.strides[p][dim];
    }
  }
#pragma unroll
  for (int p = 0; p < Table::kPointers; ++p) {
    offsets[p] += remaining * layout.strides[p][0];
  }
}

// ---------------------------------------------------------------------------
// The three families: where the source rows come from and, unless they are
// the directions already, how an element of a direction is formed from the
// source task's value (load_column once per element, direction per task).

struct GenericFamily {
  using Table = GenericTable;
  // Source rows are read from `updates` and are the directions themselves.
  static constexpr int kSourcePointer = 1;
  static constexpr int kSourceStack = 1;
  static constexpr bool kDirectionIsValue = true;
};

// A[s, t] = sum_k scale_k <g_s, g_t> + <offset_k, g_t>: the scaled Gram of
// the gradients plus their projections on the offsets, accumulated in one
// pass as <scale_k g_s + offset_k, g_t>, with the direction formed per tile
// in shared memory only.
// TODO(sgd-symmetry): the Gram part is symmetric; accumulating only the pair
// tiles with s <= t plus the projections would halve the multiply-adds, which
// matters at T = 32 where the sweep is no longer bound by memory.
struct SgdFamily {
  using Table = SgdTable;
  static constexpr int kSourcePointer = 0;
  static constexpr int kSourceStack = 0;
  static constexpr bool kDirectionIsValue = false;

  template <typename acc_t>
  struct Column {
    acc_t scale;
    acc_t offset;
  };

  template <typename acc_t>
  static __device__ __forceinline__ Column<acc_t> load_column(
      const Table& table,
      int slot,
      const int64_t (&offsets)[Table::kPointers]) {
    Column<acc_t> column;
    column.scale = static_cast<acc_t>(table.scale[slot]);
    const void* offset_data = table.data[slot][1];
    column.offset =
        offset_data == nullptr
            ? acc_t(0)
            : load_tagged<acc_t>(offset_data, offsets[1], table.dtype[slot][1]);
    return column;
  }

  template <typename acc_t>
  static __device__ __forceinline__ acc_t
  direction(acc_t grad, const Column<acc_t>& column) {
    return column.scale * grad + column.offset;
  }
};

struct AdamFamily {
  using Table = AdamTable;
  static constexpr int kSourcePointer = 0;
  static constexpr int kSourceStack = 0;
  static constexpr bool kDirectionIsValue = false;

  // Everything about one element that does not depend on the source task.
  template <typename acc_t>
  struct Column {
    acc_t beta1_exp_avg;
    acc_t beta2_exp_avg_sq;
    acc_t one_minus_beta1;
    acc_t one_minus_beta2;
    acc_t max_exp_avg_sq;
    acc_t coupled_decay;
    acc_t decoupled_decay;
    acc_t inv_bias_correction1;
    acc_t inv_sqrt_bias_correction2;
    acc_t eps;
    bool amsgrad;
    bool maximize;
  };

  template <typename acc_t>
  static __device__ __forceinline__ acc_t load_or_zero(
      const Table& table,
      int slot,
      int pointer,
      const int64_t (&offsets)[Table::kPointers]) {
    const void* data = table.data[slot][pointer];
    return data == nullptr
               ? acc_t(0)
               : load_tagged<acc_t>(
                     data, offsets[pointer], table.dtype[slot][pointer]);
  }

  template <typename acc_t>
  static __device__ __forceinline__ Column<acc_t> load_column(
      const Table& table,
      int slot,
      const int64_t (&offsets)[Table::kPointers]) {
    const AdamGroup& group = table.groups[table.group[slot]];
    const acc_t param = load_or_zero<acc_t>(table, slot, 1, offsets);
    const acc_t exp_avg = load_or_zero<acc_t>(table, slot, 2, offsets);
    const acc_t exp_avg_sq = load_or_zero<acc_t>(table, slot, 3, offsets);
    const acc_t beta1 = static_cast<acc_t>(group.beta1);
    const acc_t beta2 = static_cast<acc_t>(group.beta2);
    const acc_t weight_decay = static_cast<acc_t>(group.weight_decay);
    // torch.optim skips the decay when its factor is zero, so an infinite
    // parameter does not turn the direction into 0 * inf.
    const acc_t decay =
        group.weight_decay != 0.0 ? weight_decay * param : acc_t(0);

    Column<acc_t> column;
    column.beta1_exp_avg = beta1 * exp_avg;
    column.beta2_exp_avg_sq = beta2 * exp_avg_sq;
    column.one_minus_beta1 = acc_t(1) - beta1;
    column.one_minus_beta2 = acc_t(1) - beta2;
    column.max_exp_avg_sq =
        group.amsgrad ? load_or_zero<acc_t>(table, slot, 4, offsets) : acc_t(0);
    column.coupled_decay = group.decoupled ? acc_t(0) : decay;
    column.decoupled_decay = group.decoupled ? decay : acc_t(0);
    column.inv_bias_correction1 =
        static_cast<acc_t>(group.inv_bias_correction1);
    column.inv_sqrt_bias_correction2 =
        static_cast<acc_t>(group.inv_sqrt_bias_correction2);
    column.eps = static_cast<acc_t>(group.eps);
    column.amsgrad = group.amsgrad;
    column.maximize = group.maximize;
    return column;
  }

  // d = (m' / bc1) / (sqrt(w) / sqrt(bc2) + eps) + decoupled decay, with
  // h = (-g if maximize else g) + coupled decay, m' = b1 m + (1 - b1) h,
  // v' = b2 v + (1 - b2) h^2 and w = max(v_max, v') under amsgrad, else v'.
  template <typename acc_t>
  static __device__ __forceinline__ acc_t
  direction(acc_t grad, const Column<acc_t>& column) {
    const acc_t step_grad =
        (column.maximize ? -grad : grad) + column.coupled_decay;
    const acc_t exp_avg =
        column.beta1_exp_avg + column.one_minus_beta1 * step_grad;
    const acc_t exp_avg_sq = column.beta2_exp_avg_sq +
                             column.one_minus_beta2 * step_grad * step_grad;
    // Written as a comparison so that a NaN second moment propagates.
    const acc_t second_moment =
        column.amsgrad && column.max_exp_avg_sq > exp_avg_sq
            ? column.max_exp_avg_sq
            : exp_avg_sq;
    const acc_t denominator =
        ::sqrt(second_moment) * column.inv_sqrt_bias_correction2 + column.eps;
    return exp_avg * column.inv_bias_correction1 / denominator +
           column.decoupled_decay;
  }
};

// ---------------------------------------------------------------------------
// The tile kernel (Note [Affinity tiles]).

// TODO(affinity-small-t): a staging thread has one load in flight per task
// row, so when T is well below the padded kTasks (T <= 4, or T = 9..12) few
// memory requests are open per thread and the sweep may fall short of the
// copy bandwidth. Staging several columns per thread in that case would fix
// it; it needs measuring on a GPU first.
template <int kTasks, typename acc_t>
struct TileShape {
  // About 16 KiB of staged values per side.
  static constexpr int kColumns =
      std::min(256, 4096 / kTasks) * 4 / static_cast<int>(sizeof(acc_t));
  // Row padding in elements; see the bank analysis in Note [Affinity tiles].
  static constexpr int kPad = 32 / kTasks;
  static constexpr int kRowStride = kColumns + kPad;
  static constexpr int kRowLanes = kThreads / kColumns;
  static constexpr int kRowsPerThread = kTasks / kRowLanes;
  static constexpr int kPairTilesPerSide = kTasks / kPairRows;
  static constexpr int kPairTiles = kPairTilesPerSide * kPairTilesPerSide;
  static constexpr int kColumnLanes = kThreads / kPairTiles;
  static constexpr int kStagedValues = 2 * kTasks * kRowStride;
  static constexpr int kLaneSumValues = kColumnLanes * kTasks * kTasks;
  static constexpr int kSharedValues = std::max(kStagedValues, kLaneSumValues);

  static_assert(kThreads % kColumns == 0, "a tile column needs whole lanes");
  static_assert(kTasks % kRowLanes == 0, "rows must split evenly");
  static_assert(kThreads % kPairTiles == 0, "pair tiles must split evenly");
};

// Loads rows [first_task + row_lane + j * kRowLanes] of one column of a stack.
template <typename acc_t, int kRows, int kRowLanes>
__device__ __forceinline__ void load_rows(
    const void* data,
    uint8_t tag,
    int64_t task_stride,
    int64_t offset,
    int64_t first_task,
    int num_tasks,
    int row_lane,
    acc_t (&values)[kRows]) {
  with_element_type<acc_t>(tag, [&](auto marker) {
    using scalar_t = typename decltype(marker)::type;
    const scalar_t* column =
        static_cast<const scalar_t*>(data) + offset + first_task * task_stride;
#pragma unroll
    for (int j = 0; j < kRows; ++j) {
      const int row = row_lane + j * kRowLanes;
      values[j] = row < num_tasks
                      ? static_cast<acc_t>(
                            column[static_cast<int64_t>(row) * task_stride])
                      : acc_t(0);
    }
  });
}

// Writes the target rows and the source directions of one tile to shared
// memory. Rows beyond the task block are never written (they stay zero).
template <typename Family, int kTasks, typename acc_t>
__device__ __forceinline__ void stage_tile(
    const typename Family::Table& table,
    int slot,
    const TaskBlock& tasks,
    int64_t column_begin,
    int columns,
    bool sources_are_targets,
    acc_t* targets,
    acc_t* sources) {
  using Shape = TileShape<kTasks, acc_t>;
  const int column = threadIdx.x % Shape::kColumns;
  const int row_lane = threadIdx.x / Shape::kColumns;
  if (column >= columns) {
    return;
  }

  int64_t offsets[Family::Table::kPointers];
  element_offsets(table, slot, column_begin + column, offsets);

  acc_t values[Shape::kRowsPerThread];
  load_rows<acc_t, Shape::kRowsPerThread, Shape::kRowLanes>(
      table.data[slot][0],
      table.dtype[slot][0],
      table.task_stride[slot][0],
      offsets[0],
      tasks.target_begin,
      tasks.num_targets,
      row_lane,
      values);
#pragma unroll
  for (int j = 0; j < Shape::kRowsPerThread; ++j) {
    const int row = row_lane + j * Shape::kRowLanes;
    if (row < tasks.num_targets) {
      targets[row * Shape::kRowStride + column] = values[j];
    }
  }

  if (!sources_are_targets) {
    constexpr int kSource = Family::kSourcePointer;
    load_rows<acc_t, Shape::kRowsPerThread, Shape::kRowLanes>(
        table.data[slot][kSource],
        table.dtype[slot][kSource],
        table.task_stride[slot][Family::kSourceStack],
        offsets[kSource],
        tasks.source_begin,
        tasks.num_sources,
        row_lane,
        values);
#pragma unroll
    for (int j = 0; j < Shape::kRowsPerThread; ++j) {
      const int row = row_lane + j * Shape::kRowLanes;
      if (row < tasks.num_sources) {
        sources[row * Shape::kRowStride + column] = values[j];
      }
    }
  }
  if constexpr (!Family::kDirectionIsValue) {
    // The source values of this column were written by this thread, so they
    // are read back without a barrier. Forming the directions from shared
    // memory, a few at a time, keeps the registers of the loads above free.
    const acc_t* source_values = sources_are_targets ? targets : sources;
    const auto column_state =
        Family::template load_column<acc_t>(table, slot, offsets);
#pragma unroll 2
    for (int j = 0; j < Shape::kRowsPerThread; ++j) {
      const int row = row_lane + j * Shape::kRowLanes;
      if (row < tasks.num_sources) {
        const int index = row * Shape::kRowStride + column;
        sources[index] = Family::direction(source_values[index], column_state);
      }
    }
  }
}

// Grid-strides over the tiles of one table and writes this block's
// [kTasks, kTasks] partial sums (row: source, column: target) to
// partials[blockIdx.x].
template <typename Family, int kTasks, typename acc_t>
__global__ void __launch_bounds__(kThreads, 2) affinity_tiles_kernel(
    const typename Family::Table table,
    const TaskBlock tasks,
    const int64_t total_tiles,
    acc_t* __restrict__ partials) {
  using Shape = TileShape<kTasks, acc_t>;
  __shared__ acc_t shared[Shape::kSharedValues];
  acc_t* targets = shared;
  acc_t* sources = shared + kTasks * Shape::kRowStride;
  for (int i = threadIdx.x; i < Shape::kStagedValues; i += kThreads) {
    shared[i] = acc_t(0);
  }

  const bool sources_are_targets =
      Family::kSourcePointer == 0 && tasks.source_begin == tasks.target_begin;
  const int pair_tile = threadIdx.x % Shape::kPairTiles;
  const int column_lane = threadIdx.x / Shape::kPairTiles;
  const int source_row = (pair_tile / Shape::kPairTilesPerSide) * kPairRows;
  const int target_row = (pair_tile % Shape::kPairTilesPerSide) * kPairRows;
  const bool active =
      source_row < tasks.num_sources && target_row < tasks.num_targets;
  const acc_t* source_values = sources + source_row * Shape::kRowStride;
  const acc_t* target_values = targets + target_row * Shape::kRowStride;

  acc_t total[kPairRows][kPairRows];
#pragma unroll
  for (int a = 0; a < kPairRows; ++a) {
#pragma unroll
    for (int b = 0; b < kPairRows; ++b) {
      total[a][b] = acc_t(0);
    }
  }

  int slot = 0;
  for (int64_t tile = blockIdx.x; tile < total_tiles; tile += gridDim.x) {
    while (tile >= table.tile_end[slot]) {
      ++slot;
    }
    const int64_t first_tile = slot == 0 ? 0 : table.tile_end[slot - 1];
    const int64_t column_begin = (tile - first_tile) * Shape::kColumns;
    const int columns = static_cast<int>(
        std::min<int64_t>(Shape::kColumns, table.numel[slot] - column_begin));

    __syncthreads();
    stage_tile<Family, kTasks, acc_t>(
        table,
        slot,
        tasks,
        column_begin,
        columns,
        sources_are_targets,
        targets,
        sources);
    __syncthreads();

    if (active) {
      acc_t tile_sum[kPairRows][kPairRows];
#pragma unroll
      for (int a = 0; a < kPairRows; ++a) {
#pragma unroll
        for (int b = 0; b < kPairRows; ++b) {
          tile_sum[a][b] = acc_t(0);
        }
      }
#pragma unroll 4
      for (int c = column_lane; c < columns; c += Shape::kColumnLanes) {
        acc_t direction[kPairRows];
        acc_t grad[kPairRows];
#pragma unroll
        for (int a = 0; a < kPairRows; ++a) {
          direction[a] = source_values[a * Shape::kRowStride + c];
          grad[a] = target_values[a * Shape::kRowStride + c];
        }
#pragma unroll
        for (int a = 0; a < kPairRows; ++a) {
#pragma unroll
          for (int b = 0; b < kPairRows; ++b) {
            tile_sum[a][b] += direction[a] * grad[b];
          }
        }
      }
#pragma unroll
      for (int a = 0; a < kPairRows; ++a) {
#pragma unroll
        for (int b = 0; b < kPairRows; ++b) {
          total[a][b] += tile_sum[a][b];
        }
      }
    }
  }

  // Per-lane totals to shared memory, then a fixed-order sum over lanes.
  __syncthreads();
  acc_t* lane_sums = shared;
#pragma unroll
  for (int a = 0; a < kPairRows; ++a) {
#pragma unroll
    for (int b = 0; b < kPairRows; ++b) {
      lane_sums
          [(column_lane * kTasks + source_row + a) * kTasks + target_row + b] =
              total[a][b];
    }
  }
  __syncthreads();
  acc_t* block_partial =
      partials + static_cast<int64_t>(blockIdx.x) * kTasks * kTasks;
  for (int entry = threadIdx.x; entry < kTasks * kTasks; entry += kThreads) {
    acc_t sum = acc_t(0);
    for (int lane = 0; lane < Shape::kColumnLanes; ++lane) {
      sum += lane_sums[lane * kTasks * kTasks + entry];
    }
    block_partial[entry] = sum;
  }
}

// One block per (source, target) entry of the task block: adds the entry
// over all partials in a fixed order (Note [Deterministic reduction]) and
// divides by the target's loss; a loss that is not finite or not positive
// gives zero.
template <typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_affinity_kernel(
    const acc_t* __restrict__ partials,
    const int64_t num_partials,
    const int task_stride,
    const TaskBlock tasks,
    const void* losses,
    const int64_t loss_stride,
    const uint8_t loss_tag,
    const int64_t num_tasks,
    acc_t* __restrict__ affinity) {
  const int source = blockIdx.x / tasks.num_targets;
  const int target = blockIdx.x % tasks.num_targets;
  const int64_t entry = source * task_stride + target;
  const int64_t partial_size = static_cast<int64_t>(task_stride) * task_stride;

  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < num_partials; i += kFinalizeThreads) {
    sum += static_cast<double>(partials[i * partial_size + entry]);
  }
  using BlockReduce = cub::BlockReduce<double, kFinalizeThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  sum = BlockReduce(reduce_storage).Sum(sum);

  if (threadIdx.x == 0) {
    const int64_t target_task = tasks.target_begin + target;
    const double loss =
        load_tagged<double>(losses, target_task * loss_stride, loss_tag);
    const bool usable =
        loss > 0.0 && loss <= std::numeric_limits<double>::max();
    affinity[(tasks.source_begin + source) * num_tasks + target_task] =
        usable ? static_cast<acc_t>(sum / loss) : acc_t(0);
  }
}

// ---------------------------------------------------------------------------
// Host side: describing the parameters and filling the tables.

// One non-empty shared parameter, as the tables need it.
struct Parameter {
  int index;  // k, the position in the op's lists
  std::array<const void*, 5> data{};
  std::array<uint8_t, 5> dtype{};
  std::array<int64_t, 2> task_stride{};
  int64_t numel = 0;
  bool dense = true;
  int rank = 0;
  std::array<int64_t, kMaxDims> sizes{};
  std::array<std::array<int64_t, kMaxDims>, 5> strides{};
};

// A tensor of the parameter: a stack [T, *shape] (dimension 0 dropped) or a
// per-parameter tensor of shape `shape`. Undefined tensors take no part.
struct Operand {
  const at::Tensor* tensor;
  bool stacked;
};

bool is_dense(
    const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides) {
  std::vector<std::pair<int64_t, int64_t>> by_stride;
  for (size_t d = 0; d < sizes.size(); ++d) {
    by_stride.emplace_back(strides[d], sizes[d]);
  }
  std::sort(by_stride.begin(), by_stride.end());
  int64_t expected = 1;
  for (const auto& [stride, size] : by_stride) {
    if (stride != expected) {
      return false;
    }
    expected *= size;
  }
  return true;
}

Parameter describe_parameter(
    int index,
    const char* argument,
    c10::IntArrayRef shape,
    const std::vector<Operand>& operands) {
  Parameter parameter;
  parameter.index = index;
  parameter.numel = c10::multiply_integers(shape);

  // Dimensions of size one never move an offset; drop them.
  std::vector<int64_t> sizes;
  std::vector<std::vector<int64_t>> strides(operands.size());
  for (size_t d = 0; d < shape.size(); ++d) {
    if (shape[d] == 1) {
      continue;
    }
    sizes.push_back(shape[d]);
    for (size_t p = 0; p < operands.size(); ++p) {
      const at::Tensor* tensor = operands[p].tensor;
      if (tensor == nullptr || !tensor->defined()) {
        continue;
      }
      const int64_t dim =
          static_cast<int64_t>(d) + (operands[p].stacked ? 1 : 0);
      strides[p].push_back(tensor->stride(dim));
    }
  }

  for (size_t p = 0; p < operands.size(); ++p) {
    const at::Tensor* tensor = operands[p].tensor;
    if (tensor == nullptr || !tensor->defined()) {
      continue;
    }
    parameter.data[p] = tensor->data_ptr();
    parameter.dtype[p] = dtype_tag(tensor->scalar_type());
    if (operands[p].stacked) {
      // Stacks come first among the operands: stack index = operand index.
      TORCH_INTERNAL_ASSERT(p < parameter.task_stride.size());
      parameter.task_stride[p] = tensor->stride(0);
    }
  }

  // The fast case: every tensor has the same dense strides, so they can all
  // be walked in memory order (contiguous, channels-last, a common
  // transposition).
  const std::vector<int64_t>& reference = strides[0];
  bool same_strides = true;
  for (size_t p = 1; p < operands.size(); ++p) {
    const at::Tensor* tensor = operands[p].tensor;
    if (tensor != nullptr && tensor->defined() && strides[p] != reference) {
      same_strides = false;
    }
  }
  if (same_strides && is_dense(sizes, reference)) {
    parameter.dense = true;
    return parameter;
  }

  // The general case: walk the elements in row-major order of `shape`, with
  // every run of dimensions that is contiguous in all tensors merged into one.
  parameter.dense = false;
  std::vector<int64_t> merged_sizes;
  std::vector<std::vector<int64_t>> merged_strides(operands.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    bool mergeable = !merged_sizes.empty();
    for (size_t p = 0; p < operands.size() && mergeable; ++p) {
      if (strides[p].empty()) {
        continue;
      }
      mergeable =
          strides[p][d] == merged_strides[p].back() * merged_sizes.back();
    }
    if (mergeable) {
      merged_sizes.back() *= sizes[d];
      continue;
    }
    merged_sizes.push_back(sizes[d]);
    for (size_t p = 0; p < operands.size(); ++p) {
      if (!strides[p].empty()) {
        merged_strides[p].push_back(strides[p][d]);
      }
    }
  }
  // TODO(affinity-rank): layouts that stay above kMaxDims dimensions after
  // merging are rejected instead of walked by a slower path.
  TORCH_CHECK(
      static_cast<int>(merged_sizes.size()) <= kMaxDims,
      "Parameter `",
      argument,
      "[",
      index,
      "]` should have strides that merge into at most ",
      kMaxDims,
      " dimensions on CUDA. Found ",
      merged_sizes.size(),
      " (sizes ",
      shape,
      ").");
  parameter.rank = static_cast<int>(merged_sizes.size());
  // merged_* are innermost first; the table is outermost first.
  for (int d = 0; d < parameter.rank; ++d) {
    parameter.sizes[d] = merged_sizes[parameter.rank - 1 - d];
    for (size_t p = 0; p < operands.size(); ++p) {
      if (!merged_strides[p].empty()) {
        parameter.strides[p][d] = merged_strides[p][parameter.rank - 1 - d];
      }
    }
  }
  return parameter;
}

// Fills tables slot by slot; `add_extra(table, slot, parameter)` records the
// family's own data and returns false when the table has no room for it.
template <typename Table, typename AddExtra>
std::vector<Table> build_tables(
    const std::vector<Parameter>& parameters,
    int64_t tile_columns,
    AddExtra add_extra) {
  std::vector<Table> tables;
  auto open_table = [&tables]() {
    // Value-initialised: every pointer null, every count zero.
    tables.push_back(Table{});
  };
  open_table();
  for (const Parameter& parameter : parameters) {
    for (int attempt = 0; attempt < 2; ++attempt) {
      Table& table = tables.back();
      const bool slots_full = table.num_slots == Table::kSlots;
      const bool layouts_full =
          !parameter.dense && table.num_layouts == kMaxLayouts;
      if (!slots_full && !layouts_full &&
          add_extra(table, table.num_slots, parameter)) {
        const int slot = table.num_slots++;
        for (int p = 0; p < Table::kPointers; ++p) {
          table.data[slot][p] = parameter.data[p];
          table.dtype[slot][p] = parameter.dtype[p];
        }
        for (int stack = 0; stack < Table::kStacks; ++stack) {
          table.task_stride[slot][stack] = parameter.task_stride[stack];
        }
        table.numel[slot] = parameter.numel;
        const int64_t tiles =
            (parameter.numel + tile_columns - 1) / tile_columns;
        table.tile_end[slot] =
            (slot == 0 ? 0 : table.tile_end[slot - 1]) + tiles;
        table.layout[slot] = -1;
        if (!parameter.dense) {
          const int layout_index = table.num_layouts++;
          auto& layout = table.layouts[layout_index];
          layout.rank = parameter.rank;
          for (int d = 0; d < kMaxDims; ++d) {
            layout.sizes[d] = parameter.sizes[d];
            for (int p = 0; p < Table::kPointers; ++p) {
              layout.strides[p][d] = parameter.strides[p][d];
            }
          }
          table.layout[slot] = static_cast<int8_t>(layout_index);
        }
        break;
      }
      TORCH_INTERNAL_ASSERT(
          attempt == 0 && table.num_slots > 0,
          "a parameter does not fit in an empty affinity table");
      open_table();
    }
  }
  return tables;
}

int blocks_per_device(const void* kernel) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int multiprocessors = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &multiprocessors, cudaDevAttrMultiProcessorCount, device));
  int blocks_per_multiprocessor = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks_per_multiprocessor, kernel, kThreads, 0));
  return std::max(1, multiprocessors * std::max(1, blocks_per_multiprocessor));
}

template <typename Family, int kTasks, typename acc_t, typename AddExtra>
void run_sweeps(
    const std::vector<Parameter>& parameters,
    AddExtra add_extra,
    const at::Tensor& losses,
    at::Tensor& affinity) {
  using Shape = TileShape<kTasks, acc_t>;
  using Table = typename Family::Table;
  const std::vector<Table> tables =
      build_tables<Table>(parameters, Shape::kColumns, add_extra);

  const auto kernel = affinity_tiles_kernel<Family, kTasks, acc_t>;
  const int64_t max_blocks =
      blocks_per_device(reinterpret_cast<const void*>(kernel));
  std::vector<int64_t> grids;
  int64_t num_partials = 0;
  for (const Table& table : tables) {
    const int64_t tiles = table.tile_end[table.num_slots - 1];
    grids.push_back(std::min(tiles, max_blocks));
    num_partials += grids.back();
  }
  at::Tensor partials =
      at::empty({num_partials, kTasks * kTasks}, affinity.options());

  const int64_t num_tasks = losses.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (int64_t source = 0; source < num_tasks; source += kTasks) {
    for (int64_t target = 0; target < num_tasks; target += kTasks) {
      TaskBlock tasks;
      tasks.source_begin = source;
      tasks.target_begin = target;
      tasks.num_sources =
          static_cast<int>(std::min<int64_t>(kTasks, num_tasks - source));
      tasks.num_targets =
          static_cast<int>(std::min<int64_t>(kTasks, num_tasks - target));

      acc_t* partial = partials.data_ptr<acc_t>();
      for (size_t i = 0; i < tables.size(); ++i) {
        kernel<<<static_cast<unsigned int>(grids[i]), kThreads, 0, stream>>>(
            tables[i],
            tasks,
            tables[i].tile_end[tables[i].num_slots - 1],
            partial);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        partial += grids[i] * kTasks * kTasks;
      }
      finalize_affinity_kernel<acc_t>
          <<<tasks.num_sources * tasks.num_targets,
             kFinalizeThreads,
             0,
             stream>>>(
              partials.data_ptr<acc_t>(),
              num_partials,
              kTasks,
              tasks,
              losses.data_ptr(),
              losses.stride(0),
              dtype_tag(losses.scalar_type()),
              num_tasks,
              affinity.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
}

// Picks the padded task count and the accumulation type, then sweeps.
template <typename Family, typename AddExtra>
at::Tensor run_family(
    const std::vector<Parameter>& parameters,
    at::ScalarType accumulate_dtype,
    AddExtra add_extra,
    const at::Tensor& losses) {
  TORCH_INTERNAL_ASSERT(
      accumulate_dtype == at::kFloat || accumulate_dtype == at::kDouble);
  const bool float64 = accumulate_dtype == at::kDouble;
  const c10::cuda::CUDAGuard device_guard(losses.device());
  const int64_t num_tasks = losses.size(0);
  const auto options =
      losses.options().dtype(float64 ? at::kDouble : at::kFloat);
  if (parameters.empty() || num_tasks == 0) {
    return at::zeros({num_tasks, num_tasks}, options);
  }
  for (const Parameter& parameter : parameters) {
    for (size_t p = 0; p < parameter.data.size(); ++p) {
      // A float32 accumulator compiles no float64 loads.
      TORCH_INTERNAL_ASSERT(
          float64 || parameter.data[p] == nullptr ||
          parameter.dtype[p] != kFloat64);
    }
  }
  at::Tensor affinity = at::empty({num_tasks, num_tasks}, options);
  auto with_tasks = [&](auto acc_marker) {
    using acc_t = typename decltype(acc_marker)::type;
    if (num_tasks <= 8) {
      run_sweeps<Family, 8, acc_t>(parameters, add_extra, losses, affinity);
    } else if (num_tasks <= 16) {
      run_sweeps<Family, 16, acc_t>(parameters, add_extra, losses, affinity);
    } else {
      run_sweeps<Family, kMaxTaskBlock, acc_t>(
          parameters, add_extra, losses, affinity);
    }
  };
  if (float64) {
    with_tasks(TypeMarker<double>{});
  } else {
    with_tasks(TypeMarker<float>{});
  }
  return affinity;
}

}  // namespace

at::Tensor launch_affinity(
    at::TensorList grads,
    at::TensorList updates,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype) {
  std::vector<Parameter> parameters;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (grads[k].numel() == 0) {
      continue;
    }
    parameters.push_back(describe_parameter(
        static_cast<int>(k),
        "updates",
        grads[k].sizes().slice(1),
        {{&grads[k], true}, {&updates[k], true}}));
  }
  return run_family<GenericFamily>(
      parameters,
      accumulate_dtype,
      [](GenericTable&, int, const Parameter&) { return true; },
      losses);
}

at::Tensor launch_affinity_sgd(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    at::TensorList offsets,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype) {
  std::vector<Parameter> parameters;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (grads[k].numel() == 0) {
      continue;
    }
    parameters.push_back(describe_parameter(
        static_cast<int>(k),
        "offsets",
        grads[k].sizes().slice(1),
        {{&grads[k], true}, {&offsets[k], false}}));
  }
  return run_family<SgdFamily>(
      parameters,
      accumulate_dtype,
      [scales](SgdTable& table, int slot, const Parameter& parameter) {
        table.scale[slot] = scales[parameter.index];
        return true;
      },
      losses);
}

at::Tensor launch_affinity_adam(
    at::TensorList grads,
    at::TensorList params,
    at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs,
    at::TensorList max_exp_avg_sqs,
    at::ArrayRef<AdamHyperparameters> hyperparameters,
    const at::Tensor& losses,
    at::ScalarType accumulate_dtype) {
  const at::Tensor none;
  std::vector<Parameter> parameters;
  for (size_t k = 0; k < grads.size(); ++k) {
    if (grads[k].numel() == 0) {
      continue;
    }
    const at::Tensor& max_exp_avg_sq =
        hyperparameters[k].amsgrad ? max_exp_avg_sqs[k] : none;
    parameters.push_back(describe_parameter(
        static_cast<int>(k),
        "params",
        grads[k].sizes().slice(1),
        {{&grads[k], true},
         {&params[k], false},
         {&exp_avgs[k], false},
         {&exp_avg_sqs[k], false},
         {&max_exp_avg_sq, false}}));
  }
  auto add_group = [hyperparameters](
                       AdamTable& table, int slot, const Parameter& parameter) {
    const AdamHyperparameters& h = hyperparameters[parameter.index];
    AdamGroup group{};
    group.beta1 = h.beta1;
    group.beta2 = h.beta2;
    group.eps = h.eps;
    group.weight_decay = h.weight_decay;
    // The optimizer's bias corrections after the step: count step + 1.
    group.inv_bias_correction1 = 1.0 / (1.0 - std::pow(h.beta1, h.step + 1.0));
    group.inv_sqrt_bias_correction2 =
        1.0 / std::sqrt(1.0 - std::pow(h.beta2, h.step + 1.0));
    group.decoupled = h.decoupled;
    group.amsgrad = h.amsgrad;
    group.maximize = h.maximize;
    auto same = [&group](const AdamGroup& other) {
      return other.beta1 == group.beta1 && other.beta2 == group.beta2 &&
             other.eps == group.eps &&
             other.weight_decay == group.weight_decay &&
             other.inv_bias_correction1 == group.inv_bias_correction1 &&
             other.inv_sqrt_bias_correction2 ==
                 group.inv_sqrt_bias_correction2 &&
             other.decoupled == group.decoupled &&
             other.amsgrad == group.amsgrad && other.maximize == group.maximize;
    };
    int found = -1;
    for (int g = 0; g < table.num_groups && found < 0; ++g) {
      if (same(table.groups[g])) {
        found = g;
      }
    }
    if (found < 0) {
      if (table.num_groups == kMaxAdamGroups) {
        return false;
      }
      found = table.num_groups++;
      table.groups[found] = group;
    }
    table.group[slot] = static_cast<uint8_t>(found);
    return true;
  };
  return run_family<AdamFamily>(
      parameters, accumulate_dtype, add_group, losses);
}

}  // namespace etap::cuda
