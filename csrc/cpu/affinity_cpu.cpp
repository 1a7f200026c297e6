// CPU kernels of etap::affinity, etap::affinity_sgd and etap::affinity_adam.
//
// Note [Blocked accumulation on the CPU]
// The inner elements of every shared parameter k (grads[k][t] has n_k of
// them) are cut into chunks of kChunkLength elements; a parameter's chunks
// never cross into the next parameter. Consecutive chunks, in parameter order,
// form blocks of kChunksPerBlock chunks. A chunk loads its rows (converted to
// the accumulation dtype, gathered when strided) into a small per-thread
// scratch buffer, forms its [sources, targets] inner products with kLanes
// independent partial sums per entry, and adds its totals to its block's
// partial matrix. Blocks run in parallel; their partial matrices are summed in
// block order in float64. Every boundary and every order is fixed by the input
// shapes alone, so the result does not depend on the number of threads and is
// the same from run to run. Short partial sums keep float32 accumulation
// exact where a sequential sum is not: 2^25 products of 1 give 33554432.
//
// Note [Layouts]
// When every tensor of a parameter is non-overlapping and dense with the same
// strides (contiguous, channels-last, any permutation), its elements are read
// in memory order: element j of every row lies at offset j. Otherwise each
// tensor is read in the logical (row-major) order of the parameter's shape
// through its own strides, so slices, transposes and expanded stride-0 views
// give the value their contiguous copies would. Offsets are 64-bit.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/SmallVector.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "affinity.h"

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Compiles the hot loops twice, for AVX2 + FMA and for the baseline, and picks
// one when the library loads. The lane count is fixed (kLanes), so both
// versions add in the same order.
#define ETAP_HOT_LOOP \
  __attribute__((target_clones("arch=x86-64-v3", "default")))
// The compiler does not vectorise sqrt under -fmath-errno, so the Adam
// directions have an explicit AVX2 version, picked at run time.
#define ETAP_AVX2_INTRINSICS 1
#include <immintrin.h>
#else
#define ETAP_HOT_LOOP
#define ETAP_AVX2_INTRINSICS 0
#endif

#if defined(__GNUC__)
#define ETAP_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ETAP_ALWAYS_INLINE inline
#endif

namespace etap {
namespace {

constexpr int64_t kChunkLength = 512;
constexpr int64_t kChunksPerBlock = 64;
constexpr int kLanes = 8;
constexpr int kTargetTile = 2;

using Offsets = c10::SmallVector<int64_t, 8>;

// ---- reading tensors chunk by chunk ---------------------------------------

// A tensor read as `num_rows` rows of the parameter's n inner elements: a
// stack [T, *shape] has T rows, a parameter-shaped tensor one row.
struct RowReader {
  const char* data = nullptr;
  at::ScalarType dtype = at::kFloat;
  int64_t num_rows = 1;
  int64_t row_stride = 0;
  // Element j of a row lies at offset j (see Note [Layouts]).
  bool linear = true;
  // The coalesced inner layout, used when !linear.
  Offsets sizes;
  Offsets strides;
};

// Drops size-1 dimensions and merges neighbours that step as one.
void coalesce(at::IntArrayRef sizes, at::IntArrayRef strides, RowReader& out) {
  out.sizes.clear();
  out.strides.clear();
  for (const auto d : c10::irange(sizes.size())) {
    if (sizes[d] == 1) {
      continue;
    }
    if (!out.sizes.empty() && out.strides.back() == sizes[d] * strides[d]) {
      out.sizes.back() *= sizes[d];
      out.strides.back() = strides[d];
    } else {
      out.sizes.push_back(sizes[d]);
      out.strides.push_back(strides[d]);
    }
  }
  out.linear =
      out.sizes.empty() || (out.sizes.size() == 1 && out.strides[0] == 1);
}

// Whether the layout (sizes, strides) covers its elements exactly once, in
// some order, without gaps.
bool is_dense(at::IntArrayRef sizes, at::IntArrayRef strides) {
  c10::SmallVector<std::pair<int64_t, int64_t>, 8> dims;
  for (const auto d : c10::irange(sizes.size())) {
    if (sizes[d] != 1) {
      dims.emplace_back(strides[d], sizes[d]);
    }
  }
  std::sort(dims.begin(), dims.end());
  int64_t expected_stride = 1;
  for (const auto& [stride, size] : dims) {
    if (stride != expected_stride) {
      return false;
    }
    expected_stride *= size;
  }
  return true;
}

// The inner (parameter-shaped) sizes and strides of a stack or a tensor.
struct InnerLayout {
  at::IntArrayRef sizes;
  at::IntArrayRef strides;
};

InnerLayout inner_layout(const at::Tensor& tensor, bool is_stack) {
  const int64_t skip = is_stack ? 1 : 0;
  return {tensor.sizes().slice(skip), tensor.strides().slice(skip)};
}

bool same_nontrivial_strides(const InnerLayout& a, const InnerLayout& b) {
  for (const auto d : c10::irange(a.sizes.size())) {
    if (a.sizes[d] != 1 && a.strides[d] != b.strides[d]) {
      return false;
    }
  }
  return true;
}

// Readers for every tensor of one parameter, in memory order when they all
// share one dense layout and in logical order otherwise.
std::vector<RowReader> make_readers(
    const std::vector<std::pair<const at::Tensor*, bool>>& tensors) {
  bool memory_order = true;
  const InnerLayout first = inner_layout(*tensors[0].first, tensors[0].second);
  for (const auto& [tensor, is_stack] : tensors) {
    const InnerLayout layout = inner_layout(*tensor, is_stack);
    memory_order = memory_order && is_dense(layout.sizes, layout.strides) &&
                   same_nontrivial_strides(first, layout);
  }

  std::vector<RowReader> readers;
  readers.reserve(tensors.size());
  for (const auto& [tensor, is_stack] : tensors) {
    RowReader reader;
    reader.data = static_cast<const char*>(tensor->const_data_ptr());
    reader.dtype = tensor->scalar_type();
    reader.num_rows = is_stack ? tensor->size(0) : 1;
    reader.row_stride = is_stack ? tensor->stride(0) : 0;
    if (memory_order) {
      reader.linear = true;
    } else {
      const InnerLayout layout = inner_layout(*tensor, is_stack);
      coalesce(layout.sizes, layout.strides, reader);
    }
    readers.push_back(std::move(reader));
  }
  return readers;
}

// offsets[i] = offset of logical element begin + i of a strided row.
void strided_offsets(
    const RowReader& reader, int64_t begin, int64_t length, int64_t* offsets) {
  const auto& sizes = reader.sizes;
  const auto& strides = reader.strides;
  const int64_t last = static_cast<int64_t>(sizes.size()) - 1;
  std::vector<int64_t> index(sizes.size(), 0);
  int64_t offset = 0;
  int64_t rest = begin;
  for (int64_t d = last; d >= 0; --d) {
    index[d] = rest % sizes[d];
    rest /= sizes[d];
    offset += index[d] * strides[d];
  }
  for (const auto i : c10::irange(length)) {
    offsets[i] = offset;
    int64_t d = last;
    ++index[d];
    offset += strides[d];
    while (d > 0 && index[d] == sizes[d]) {
      offset -= sizes[d] * strides[d];
      index[d] = 0;
      --d;
      ++index[d];
      offset += strides[d];
    }
  }
}

// Per-thread scratch space for one chunk.
template <typename acc_t>
struct ChunkScratch {
  ChunkScratch(int64_t num_value_rows, int64_t num_sums)
      : values(num_value_rows * kChunkLength),
        offsets(kChunkLength),
        sums(num_sums),
        rows(num_value_rows) {}

  acc_t* value_row(int64_t row) {
    return values.data() + row * kChunkLength;
  }

  std::vector<acc_t> values;
  std::vector<int64_t> offsets;
  std::vector<acc_t> sums;
  // Where each row of the chunk is read from: the tensor or `values`.
  std::vector<const acc_t*> rows;
};

// Points rows[r] at elements [begin, begin + length) of every row of
// `reader`, as acc_t values: in place when the row is already a run of acc_t,
// converted or gathered into `scratch_rows` (kChunkLength apart) otherwise.
template <typename acc_t>
void load_rows(
    const RowReader& reader,
    int64_t begin,
    int64_t length,
    acc_t* scratch_rows,
    int64_t* offsets,
    const acc_t** rows) {
  if (reader.linear && reader.dtype == c10::CppTypeToScalarType<acc_t>()) {
    const acc_t* base = reinterpret_cast<const acc_t*>(reader.data) + begin;
    for (const auto r : c10::irange(reader.num_rows)) {
      rows[r] = base + r * reader.row_stride;
    }
    return;
  }
  if (!reader.linear) {
    strided_offsets(reader, begin, length, offsets);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, reader.dtype, "etap_load_rows", [&] {
        const scalar_t* base = reinterpret_cast<const scalar_t*>(reader.data);
        for (const auto r : c10::irange(reader.num_rows)) {
          const scalar_t* row = base + r * reader.row_stride;
          acc_t* out = scratch_rows + r * kChunkLength;
          if (reader.linear) {
            row += begin;
            for (const auto i : c10::irange(length)) {
              out[i] = static_cast<acc_t>(row[i]);
            }
          } else {
            for (const auto i : c10::irange(length)) {
              out[i] = static_cast<acc_t>(row[offsets[i]]);
            }
          }
          rows[r] = out;
        }
      });
}

// ---- the inner products ------------------------------------------------

// kLanes partial sums held in one value of a compiler vector type: the AVX2
// version of a hot loop keeps it in one (float) or two (double) registers.
typedef float FloatLanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef double DoubleLanes
    __attribute__((vector_size(kLanes * sizeof(double))));

template <typename acc_t>
struct LanesOf;
template <>
struct LanesOf<float> {
  using type = FloatLanes;
  // Sources per tile: 4 x 2 accumulators fill half the AVX2 registers.
  static constexpr int kSourceTile = 4;
};
template <>
struct LanesOf<double> {
  using type = DoubleLanes;
  static constexpr int kSourceTile = 2;
};

template <typename acc_t, typename lanes_t>
ETAP_ALWAYS_INLINE void load_lanes(const acc_t* values, lanes_t& lanes) {
  std::memcpy(&lanes, values, sizeof(lanes));
}

template <typename lanes_t>
ETAP_ALWAYS_INLINE auto sum_lanes(const lanes_t& lanes) {
  static_assert(kLanes == 8, "sum_lanes adds eight lanes");
  return ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) +
         ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
}

// sums[s * sums_stride + t] += <sources[s], targets[t]> over `length`
// elements, for a tile of kS sources and kT targets.
template <int kS, int kT, typename acc_t>
ETAP_ALWAYS_INLINE void product_tile(
    const acc_t* const* sources,
    const acc_t* const* targets,
    int64_t length,
    acc_t* sums,
    int64_t sums_stride) {
  using lanes_t = typename LanesOf<acc_t>::type;
  const acc_t* source[kS];
  const acc_t* target[kT];
  for (int s = 0; s < kS; ++s) {
    source[s] = sources[s];
  }
  for (int t = 0; t < kT; ++t) {
    target[t] = targets[t];
  }

  lanes_t lanes[kS][kT];
  for (int s = 0; s < kS; ++s) {
    for (int t = 0; t < kT; ++t) {
      lanes[s][t] = lanes_t{};
    }
  }
  const int64_t whole = length - length % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
    lanes_t source_lanes[kS];
    for (int s = 0; s < kS; ++s) {
      load_lanes(source[s] + i, source_lanes[s]);
    }
    for (int t = 0; t < kT; ++t) {
      lanes_t target_lanes;
      load_lanes(target[t] + i, target_lanes);
      for (int s = 0; s < kS; ++s) {
        lanes[s][t] += source_lanes[s] * target_lanes;
      }
    }
  }

  for (int s = 0; s < kS; ++s) {
    for (int t = 0; t < kT; ++t) {
      acc_t total = sum_lanes(lanes[s][t]);
      for (int64_t i = whole; i < length; ++i) {
        total += source[s][i] * target[t][i];
      }
      sums[s * sums_stride + t] += total;
    }
  }
}

template <int kS, typename acc_t>
ETAP_ALWAYS_INLINE void product_row_of_tiles(
    const acc_t* const* sources,
    const acc_t* const* targets,
    int64_t num_targets,
    int64_t length,
    acc_t* sums) {
  int64_t t = 0;
  for (; t + kTargetTile <= num_targets; t += kTargetTile) {
    product_tile<kS, kTargetTile>(
        sources, targets + t, length, sums + t, num_targets);
  }
  for (; t < num_targets; ++t) {
    product_tile<kS, 1>(sources, targets + t, length, sums + t, num_targets);
  }
}

// The last num_sources (< kS) source rows.
template <int kS, typename acc_t>
ETAP_ALWAYS_INLINE void product_remaining_rows(
    const acc_t* const* sources,
    int64_t num_sources,
    const acc_t* const* targets,
    int64_t num_targets,
    int64_t length,
    acc_t* sums) {
  if constexpr (kS > 1) {
    if (num_sources == kS - 1) {
      product_row_of_tiles<kS - 1>(sources, targets, num_targets, length, sums);
    } else {
      product_remaining_rows<kS - 1>(
          sources, num_sources, targets, num_targets, length, sums);
    }
  }
}

// sums[s * num_targets + t] += <sources[s], targets[t]> for every pair.
template <typename acc_t>
ETAP_ALWAYS_INLINE void accumulate_products_impl(
    const acc_t* const* sources,
    int64_t num_sources,
    const acc_t* const* targets,
    int64_t num_targets,
    int64_t length,
    acc_t* sums) {
  constexpr int kSourceTile = LanesOf<acc_t>::kSourceTile;
  int64_t s = 0;
  for (; s + kSourceTile <= num_sources; s += kSourceTile) {
    product_row_of_tiles<kSourceTile>(
        sources + s, targets, num_targets, length, sums + s * num_targets);
  }
  product_remaining_rows<kSourceTile>(
      sources + s,
      num_sources - s,
      targets,
      num_targets,
      length,
      sums + s * num_targets);
}

ETAP_HOT_LOOP void accumulate_products(
    const float* const* sources,
    int64_t num_sources,
    const float* const* targets,
    int64_t num_targets,
    int64_t length,
    float* sums) {
  accumulate_products_impl(
      sources, num_sources, targets, num_targets, length, sums);
}

ETAP_HOT_LOOP void accumulate_products(
    const double* const* sources,
    int64_t num_sources,
    const double* const* targets,
    int64_t num_targets,
    int64_t length,
    double* sums) {
  accumulate_products_impl(
      sources, num_sources, targets, num_targets, length, sums);
}

// ---- the chunked, blocked reduction --------------------------------------

struct Chunk {
  int64_t param;
  int64_t begin;
  int64_t length;
};

std::vector<Chunk> make_chunks(at::TensorList grads) {
  std::vector<Chunk> chunks;
  for (const auto k : c10::irange(grads.size())) {
    const int64_t num_tasks = grads[k].size(0);
    const int64_t inner = num_tasks == 0 ? 0 : grads[k].numel() / num_tasks;
    for (int64_t begin = 0; begin < inner; begin += kChunkLength) {
      chunks.push_back(
          {static_cast<int64_t>(k),
           begin,
           std::min(kChunkLength, inner - begin)});
    }
  }
  return chunks;
}

// Runs add_chunk(chunk, scratch, block_sums) for every chunk, with one
// [T, T] acc_t partial per block, and returns the float64 [T, T] sum of the
// partials in block order (see Note [Blocked accumulation on the CPU]).
template <typename acc_t, typename AddChunk>
at::Tensor reduce_chunks(
    int64_t num_tasks,
    const std::vector<Chunk>& chunks,
    int64_t num_value_rows,
    int64_t num_chunk_sums,
    const AddChunk& add_chunk) {
  const int64_t matrix_size = num_tasks * num_tasks;
  const int64_t num_chunks = static_cast<int64_t>(chunks.size());
  const int64_t num_blocks =
      (num_chunks + kChunksPerBlock - 1) / kChunksPerBlock;
  std::vector<acc_t> block_sums(num_blocks * matrix_size, acc_t(0));

  at::parallel_for(0, num_blocks, 1, [&](int64_t first, int64_t last) {
    ChunkScratch<acc_t> scratch(num_value_rows, num_chunk_sums);
    for (const auto block : c10::irange(first, last)) {
      acc_t* block_sum = block_sums.data() + block * matrix_size;
      const int64_t end = std::min(num_chunks, (block + 1) * kChunksPerBlock);
      for (int64_t c = block * kChunksPerBlock; c < end; ++c) {
        add_chunk(chunks[c], scratch, block_sum);
      }
    }
  });

  at::Tensor raw = at::zeros({num_tasks, num_tasks}, at::kDouble);
  double* raw_data = raw.mutable_data_ptr<double>();
  for (const auto block : c10::irange(num_blocks)) {
    const acc_t* block_sum = block_sums.data() + block * matrix_size;
    for (const auto e : c10::irange(matrix_size)) {
      raw_data[e] += static_cast<double>(block_sum[e]);
    }
  }
  return raw;
}

at::Tensor finish(
    const at::Tensor& raw, const at::Tensor& losses, const AffinityPlan& plan) {
  return normalize_by_loss(raw, losses).to(plan.output_dtype);
}

// ---- etap::affinity ------------------------------------------------------

template <typename acc_t>
at::Tensor affinity_raw(
    at::TensorList grads, at::TensorList updates, int64_t num_tasks) {
  std::vector<std::vector<RowReader>> readers;
  for (const auto k : c10::irange(grads.size())) {
    readers.push_back(make_readers({{&grads[k], true}, {&updates[k], true}}));
  }
  const int64_t T = num_tasks;

  auto add_chunk =
      [&](const Chunk& chunk, ChunkScratch<acc_t>& scratch, acc_t* block_sum) {
        const RowReader& target_reader = readers[chunk.param][0];
        const RowReader& source_reader = readers[chunk.param][1];
        const acc_t** targets = scratch.rows.data();
        const acc_t** sources = scratch.rows.data() + T;
        load_rows(
            target_reader,
            chunk.begin,
            chunk.length,
            scratch.value_row(0),
            scratch.offsets.data(),
            targets);
        load_rows(
            source_reader,
            chunk.begin,
            chunk.length,
            scratch.value_row(T),
            scratch.offsets.data(),
            sources);
        accumulate_products(sources, T, targets, T, chunk.length, block_sum);
      };
  return reduce_chunks<acc_t>(T, make_chunks(grads), 2 * T, 0, add_chunk);
}

at::Tensor affinity_cpu(
    at::TensorList grads, at::TensorList updates, const at::Tensor& losses) {
  const AffinityPlan plan = check_affinity_args(grads, updates, losses);
  const at::Tensor raw =
      plan.accumulate_dtype == at::kDouble
          ? affinity_raw<double>(grads, updates, plan.num_tasks)
          : affinity_raw<float>(grads, updates, plan.num_tasks);
  return finish(raw, losses, plan);
}

// ---- etap::affinity_sgd --------------------------------------------------

// The direction of source s on parameter k is scales[k] * g_s + offsets[k],
// so <g_t, d_s> = scales[k] * <g_t, g_s> + <g_t, offsets[k]>: one pass forms
// the Gram of the gradients and their projections on the offset.
template <typename acc_t>
at::Tensor affinity_sgd_raw(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    int64_t num_tasks) {
  std::vector<at::Tensor> offset_tensors;
  std::vector<std::vector<RowReader>> readers;
  for (const auto k : c10::irange(grads.size())) {
    const std::optional<at::Tensor> offset = offsets[k];
    offset_tensors.push_back(offset.has_value() ? *offset : at::Tensor());
  }
  for (const auto k : c10::irange(grads.size())) {
    if (offset_tensors[k].defined()) {
      readers.push_back(
          make_readers({{&grads[k], true}, {&offset_tensors[k], false}}));
    } else {
      readers.push_back(make_readers({{&grads[k], true}}));
    }
  }
  const int64_t T = num_tasks;

  auto add_chunk = [&](const Chunk& chunk,
                       ChunkScratch<acc_t>& scratch,
                       acc_t* block_sum) {
    const auto& param_readers = readers[chunk.param];
    const bool has_offset = param_readers.size() == 2;
    const int64_t num_sources = has_offset ? T + 1 : T;
    const acc_t** rows = scratch.rows.data();
    load_rows(
        param_readers[0],
        chunk.begin,
        chunk.length,
        scratch.value_row(0),
        scratch.offsets.data(),
        rows);
    if (has_offset) {
      load_rows(
          param_readers[1],
          chunk.begin,
          chunk.length,
          scratch.value_row(T),
          scratch.offsets.data(),
          rows + T);
    }

    acc_t* products = scratch.sums.data();
    std::fill(products, products + num_sources * T, acc_t(0));
    accumulate_products(rows, num_sources, rows, T, chunk.length, products);

    const auto scale = static_cast<acc_t>(scales[chunk.param]);
    for (const auto s : c10::irange(T)) {
      for (const auto t : c10::irange(T)) {
        const acc_t projection = has_offset ? products[T * T + t] : acc_t(0);
        block_sum[s * T + t] += scale * products[s * T + t] + projection;
      }
    }
  };
  return reduce_chunks<acc_t>(
      T, make_chunks(grads), T + 1, (T + 1) * T, add_chunk);
}

at::Tensor affinity_sgd_cpu(
    at::TensorList grads,
    at::ArrayRef<double> scales,
    const c10::List<std::optional<at::Tensor>>& offsets,
    const at::Tensor& losses) {
  const AffinityPlan plan =
      check_affinity_sgd_args(grads, scales, offsets, losses);
  const at::Tensor raw =
      plan.accumulate_dtype == at::kDouble
          ? affinity_sgd_raw<double>(grads, scales, offsets, plan.num_tasks)
          : affinity_sgd_raw<float>(grads, scales, offsets, plan.num_tasks);
  return finish(raw, losses, plan);
}

// ---- etap::affinity_adam -------------------------------------------------

// One parameter's Adam hyperparameters, folded into the constants of
//   h = sign * g + coupled_decay * p
//   m' = beta1 * m + (1 - beta1) * h,  v' = beta2 * v + (1 - beta2) * h^2
//   w = max(v_max, v') with amsgrad, v' otherwise
//   d = step_size * m' / (sqrt(w) * inv_sqrt_bias2 + eps) + decoupled_decay * p
// which is torch.optim.Adam's (AdamW's) displacement divided by the learning
// rate: step_size = 1 / (1 - beta1^(k+1)), denominator
// sqrt(w) / sqrt(1 - beta2^(k+1)) + eps.
template <typename acc_t>
struct AdamConstants {
  acc_t sign;
  acc_t coupled_decay;
  acc_t decoupled_decay;
  acc_t beta1;
  acc_t one_minus_beta1;
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t step_size;
  acc_t inv_sqrt_bias2;
  acc_t eps;
};

template <typename acc_t>
ETAP_ALWAYS_INLINE acc_t adam_direction(
    const AdamConstants<acc_t>& c,
    acc_t grad,
    acc_t param,
    acc_t exp_avg,
    acc_t exp_avg_sq,
    acc_t max_exp_avg_sq) {
  const acc_t h = c.sign * grad + c.coupled_decay * param;
  const acc_t new_m = c.beta1 * exp_avg + c.one_minus_beta1 * h;
  const acc_t new_v = c.beta2 * exp_avg_sq + c.one_minus_beta2 * h * h;
  // Written so that a NaN in new_v is kept.
  const acc_t w = new_v < max_exp_avg_sq ? max_exp_avg_sq : new_v;
  const acc_t denominator = std::sqrt(w) * c.inv_sqrt_bias2 + c.eps;
  return c.step_size * new_m / denominator + c.decoupled_decay * param;
}

// The rows a chunk of Adam directions is formed from. Absent state rows
// point at zeros; max_exp_avg_sq is zeros unless amsgrad, and w >= 0, so
// taking the maximum is harmless then.
template <typename acc_t>
struct AdamRows {
  const acc_t* const* grads;
  const acc_t* param;
  const acc_t* exp_avg;
  const acc_t* exp_avg_sq;
  const acc_t* max_exp_avg_sq;
};

// Fills directions[s * kChunkLength + i] for every source s and element
// i < length, starting at element `first`.
template <typename acc_t>
void adam_directions_portable(
    const AdamRows<acc_t>& rows,
    int64_t num_tasks,
    const AdamConstants<acc_t>& c,
    int64_t first,
    int64_t length,
    acc_t* directions) {
  for (const auto s : c10::irange(num_tasks)) {
    const acc_t* grad = rows.grads[s];
    acc_t* direction = directions + s * kChunkLength;
    for (int64_t i = first; i < length; ++i) {
      direction[i] = adam_direction(
          c,
          grad[i],
          rows.param[i],
          rows.exp_avg[i],
          rows.exp_avg_sq[i],
          rows.max_exp_avg_sq[i]);
    }
  }
}

#if ETAP_AVX2_INTRINSICS
__attribute__((target("avx2,fma"))) void adam_directions_avx2(
    const AdamRows<float>& rows,
    int64_t num_tasks,
    const AdamConstants<float>& c,
    int64_t length,
    float* directions) {
  const __m256 sign = _mm256_set1_ps(c.sign);
  const __m256 coupled_decay = _mm256_set1_ps(c.coupled_decay);
  const __m256 decoupled_decay = _mm256_set1_ps(c.decoupled_decay);
  const __m256 beta1 = _mm256_set1_ps(c.beta1);
  const __m256 one_minus_beta1 = _mm256_set1_ps(c.one_minus_beta1);
  const __m256 beta2 = _mm256_set1_ps(c.beta2);
  const __m256 one_minus_beta2 = _mm256_set1_ps(c.one_minus_beta2);
  const __m256 step_size = _mm256_set1_ps(c.step_size);
  const __m256 inv_sqrt_bias2 = _mm256_set1_ps(c.inv_sqrt_bias2);
  const __m256 eps = _mm256_set1_ps(c.eps);
  const int64_t whole = length - length % 8;
  for (const auto s : c10::irange(num_tasks)) {
    const float* grad = rows.grads[s];
    float* direction = directions + s * kChunkLength;
    for (int64_t i = 0; i < whole; i += 8) {
      const __m256 param = _mm256_loadu_ps(rows.param + i);
      const __m256 h = _mm256_add_ps(
          _mm256_mul_ps(sign, _mm256_loadu_ps(grad + i)),
          _mm256_mul_ps(coupled_decay, param));
      const __m256 new_m = _mm256_add_ps(
          _mm256_mul_ps(beta1, _mm256_loadu_ps(rows.exp_avg + i)),
          _mm256_mul_ps(one_minus_beta1, h));
      const __m256 new_v = _mm256_add_ps(
          _mm256_mul_ps(beta2, _mm256_loadu_ps(rows.exp_avg_sq + i)),
          _mm256_mul_ps(_mm256_mul_ps(one_minus_beta2, h), h));
      const __m256 max_v = _mm256_loadu_ps(rows.max_exp_avg_sq + i);
      const __m256 w = _mm256_blendv_ps(
          new_v, max_v, _mm256_cmp_ps(new_v, max_v, _CMP_LT_OQ));
      const __m256 denominator =
          _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(w), inv_sqrt_bias2), eps);
      const __m256 value = _mm256_add_ps(
          _mm256_div_ps(_mm256_mul_ps(step_size, new_m), denominator),
          _mm256_mul_ps(decoupled_decay, param));
      _mm256_storeu_ps(direction + i, value);
    }
  }
  adam_directions_portable(rows, num_tasks, c, whole, length, directions);
}
#endif

void adam_directions(
    const AdamRows<float>& rows,
    int64_t num_tasks,
    const AdamConstants<float>& constants,
    int64_t length,
    float* directions) {
#if ETAP_AVX2_INTRINSICS
  static const bool has_avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (has_avx2) {
    adam_directions_avx2(rows, num_tasks, constants, length, directions);
    return;
  }
#endif
  adam_directions_portable(rows, num_tasks, constants, 0, length, directions);
}

// TODO(adam-f64-simd): float64 directions take the scalar path (sqrt and
// division one element at a time); float64 training is rare enough that the
// explicit vector version is left out.
void adam_directions(
    const AdamRows<double>& rows,
    int64_t num_tasks,
    const AdamConstants<double>& constants,
    int64_t length,
    double* directions) {
  adam_directions_portable(rows, num_tasks, constants, 0, length, directions);
}

at::Tensor present(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? *tensor : at::Tensor();
}

template <typename acc_t>
at::Tensor affinity_adam_raw(
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
    int64_t num_tasks) {
  const size_t count = grads.size();

  // Per parameter: the state tensors that are read (params only with weight
  // decay, the maximum only with amsgrad) and where each one's reader sits.
  constexpr int kParam = 0;
  constexpr int kExpAvg = 1;
  constexpr int kExpAvgSq = 2;
  constexpr int kMaxExpAvgSq = 3;
  std::vector<std::array<at::Tensor, 4>> state(count);
  std::vector<std::array<int, 4>> reader_index(count);
  std::vector<std::vector<RowReader>> readers;
  std::vector<AdamConstants<acc_t>> constants;
  for (const auto k : c10::irange(count)) {
    state[k][kParam] = weight_decay[k] != 0.0 ? params[k] : at::Tensor();
    state[k][kExpAvg] = present(exp_avgs[k]);
    state[k][kExpAvgSq] = present(exp_avg_sqs[k]);
    state[k][kMaxExpAvgSq] =
        amsgrad.get(k) ? present(max_exp_avg_sqs[k]) : at::Tensor();

    std::vector<std::pair<const at::Tensor*, bool>> tensors = {
        {&grads[k], true}};
    for (const auto j : c10::irange(4)) {
      if (state[k][j].defined()) {
        reader_index[k][j] = static_cast<int>(tensors.size());
        tensors.emplace_back(&state[k][j], false);
      } else {
        reader_index[k][j] = -1;
      }
    }
    readers.push_back(make_readers(tensors));

    const double bias1 = 1.0 - std::pow(beta1[k], step[k] + 1.0);
    const double bias2 = 1.0 - std::pow(beta2[k], step[k] + 1.0);
    const double decay = weight_decay[k];
    constants.push_back(
        AdamConstants<acc_t>{
            static_cast<acc_t>(maximize.get(k) ? -1.0 : 1.0),
            static_cast<acc_t>(decoupled.get(k) ? 0.0 : decay),
            static_cast<acc_t>(decoupled.get(k) ? decay : 0.0),
            static_cast<acc_t>(beta1[k]),
            static_cast<acc_t>(1.0 - beta1[k]),
            static_cast<acc_t>(beta2[k]),
            static_cast<acc_t>(1.0 - beta2[k]),
            static_cast<acc_t>(1.0 / bias1),
            static_cast<acc_t>(1.0 / std::sqrt(bias2)),
            static_cast<acc_t>(eps[k])});
  }
  const int64_t T = num_tasks;

  auto add_chunk = [&](const Chunk& chunk,
                       ChunkScratch<acc_t>& scratch,
                       acc_t* block_sum) {
    const auto& param_readers = readers[chunk.param];
    const acc_t** grad_rows = scratch.rows.data();
    const acc_t** direction_rows = scratch.rows.data() + T;
    load_rows(
        param_readers[0],
        chunk.begin,
        chunk.length,
        scratch.value_row(0),
        scratch.offsets.data(),
        grad_rows);

    const acc_t* zeros = scratch.value_row(2 * T + 4);
    std::array<const acc_t*, 4> state_rows = {zeros, zeros, zeros, zeros};
    for (const auto j : c10::irange(4)) {
      const int index = reader_index[chunk.param][j];
      if (index >= 0) {
        load_rows(
            param_readers[index],
            chunk.begin,
            chunk.length,
            scratch.value_row(2 * T + j),
            scratch.offsets.data(),
            &state_rows[j]);
      }
    }

    acc_t* directions = scratch.value_row(T);
    const AdamRows<acc_t> rows{
        grad_rows,
        state_rows[kParam],
        state_rows[kExpAvg],
        state_rows[kExpAvgSq],
        state_rows[kMaxExpAvgSq]};
    adam_directions(rows, T, constants[chunk.param], chunk.length, directions);
    for (const auto s : c10::irange(T)) {
      direction_rows[s] = directions + s * kChunkLength;
    }
    accumulate_products(
        direction_rows, T, grad_rows, T, chunk.length, block_sum);
  };
  // Scratch rows: T gradients, T directions, four state rows, one of zeros.
  return reduce_chunks<acc_t>(T, make_chunks(grads), 2 * T + 5, 0, add_chunk);
}

at::Tensor affinity_adam_cpu(
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
  const AffinityPlan plan = check_affinity_adam_args(
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
  auto run = [&](auto zero) {
    using acc_t = decltype(zero);
    return affinity_adam_raw<acc_t>(
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
        plan.num_tasks);
  };
  const at::Tensor raw =
      plan.accumulate_dtype == at::kDouble ? run(0.0) : run(0.0f);
  return finish(raw, losses, plan);
}

}  // namespace
}  // namespace etap

TORCH_LIBRARY_IMPL(etap, CPU, m) {
  m.impl("affinity", &etap::affinity_cpu);
  m.impl("affinity_sgd", &etap::affinity_sgd_cpu);
  m.impl("affinity_adam", &etap::affinity_adam_cpu);
}
