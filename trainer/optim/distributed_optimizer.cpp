#include "trainer/optim/distributed_optimizer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/error.h"
#include "kernels/ops/adamw.h"
#include "kernels/ops/elementwise.h"
#include "kernels/ops/grad_norm.h"

namespace dsx {

// One flat bucket of parameters that reduce over the same group.
struct DistributedAdamW::Bucket {
  size_t group = 0;
  std::vector<size_t> slots;  // in layout order
  int64_t used = 0;           // elements holding parameters
  int64_t padded = 0;         // used rounded up to a multiple of the group size
  int64_t shard = 0;          // padded / group size
  Tensor grads, values;       // [padded]; parameters' grad/value are views of these
  // This rank's partition [own_begin, own_end) ∩ [0, used): the elements it counts in the norm
  // and writes to checkpoints. The update range is the partition with zero1, else [0, used).
  int64_t own_begin = 0, own_end = 0;
  int64_t update_begin = 0, update_end = 0;
  Tensor update_grads;         // gradients of the update range (zero1: the reduced shard)
  Tensor exp_avg, exp_avg_sq;  // moments of the update range
  std::vector<Piece> update_pieces, own_pieces;
  int64_t waiting_for = 0;  // parameters not yet reported final in this step
  bool started = false;
  CommHandle reduction, gather;
};

// The buckets that reduce over one communicator, started strictly in index order.
struct DistributedAdamW::Group {
  Communicator* comm = nullptr;
  std::vector<size_t> buckets;
  size_t next_to_start = 0;
};

namespace {

using Clock = std::chrono::steady_clock;

// FNV-1a: a layout fingerprint that is the same in every process (std::hash need not be).
void fnv_mix(uint64_t& h, const void* data, size_t n) {
  const auto* bytes = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) {
    h ^= bytes[i];
    h *= 1099511628211ull;
  }
}

Tensor flat_view(const Tensor& flat, int64_t begin, int64_t length) {
  return flat.slice(begin, begin + length);
}

}  // namespace

DistributedAdamW::DistributedAdamW(ParameterStore& params, const OptimSection& config, Communicator& dp,
                                   Communicator& edp, Communicator& world, DistributedOptimizerOptions options)
    : config_(config),
      options_(options),
      world_(world),
      dtype_(params.dtype()),
      moment_dtype_(config.moments == MomentPrecision::bf16 ? DType::bf16 : params.dtype()) {
  if (options_.bucket_bytes <= 0) {
    throw UserError("distributed optimizer: bucket_bytes must be > 0, got " + std::to_string(options_.bucket_bytes));
  }
  build_buckets(params, dp, edp);
  for (Bucket& b : buckets_) allocate(b);
  check_layouts_agree();
}

DistributedAdamW::~DistributedAdamW() = default;

bool DistributedAdamW::decays(const Parameter& p) const {
  return p.spec.weight_decay && config_.decays(p.spec.name);
}

// Reverse registration order, one open bucket per group, closed when the next parameter would
// overflow it.
void DistributedAdamW::build_buckets(ParameterStore& params, Communicator& dp, Communicator& edp) {
  const int64_t capacity = std::max<int64_t>(1, options_.bucket_bytes / static_cast<int64_t>(dtype_size(dtype_)));
  auto group_of = [&](Communicator* comm) {
    for (size_t g = 0; g < groups_.size(); ++g) {
      if (groups_[g].comm == comm) return g;
    }
    groups_.push_back({comm, {}, 0});
    return groups_.size() - 1;
  };
  group_of(&dp);
  group_of(&edp);  // the same group when edp is dp

  std::vector<Parameter*> order;
  for (Parameter& p : params) {
    if (p.spec.trainable) order.push_back(&p);
  }
  std::reverse(order.begin(), order.end());
  std::vector<int64_t> open(groups_.size(), -1);  // open bucket per group
  for (Parameter* p : order) {
    const size_t g = group_of(p->spec.shard.axis == ShardAxis::expert ? &edp : &dp);
    const int64_t n = p->value.numel();
    if (open[g] < 0 || (buckets_[open[g]].used > 0 && buckets_[open[g]].used + n > capacity)) {
      open[g] = static_cast<int64_t>(buckets_.size());
      buckets_.emplace_back().group = g;
      groups_[g].buckets.push_back(buckets_.size() - 1);
    }
    Bucket& b = buckets_[open[g]];
    const size_t slot = slots_.size();
    slots_.push_back({p, static_cast<size_t>(open[g]), b.used, decays(*p), false});
    slot_of_[p] = slot;
    b.slots.push_back(slot);
    b.used += n;
  }
}

// The parts of the bucket's parameters inside [begin, end).
std::vector<DistributedAdamW::Piece> DistributedAdamW::pieces_in(const Bucket& b, int64_t begin, int64_t end) const {
  std::vector<Piece> pieces;
  for (size_t s : b.slots) {
    const Slot& slot = slots_[s];
    const int64_t lo = std::max(begin, slot.offset);
    const int64_t hi = std::min(end, slot.offset + slot.param->value.numel());
    if (lo < hi) pieces.push_back({s, lo - slot.offset, lo, hi - lo});
  }
  return pieces;
}

void DistributedAdamW::allocate(Bucket& b) {
  Communicator& comm = *groups_[b.group].comm;
  const int64_t size = comm.size();
  b.padded = (b.used + size - 1) / size * size;
  b.shard = b.padded / size;
  // Buckets live where the group's communicator moves tensors (the GPU for NCCL).
  const Device device = comm.tensor_device();
  b.grads = Tensor::zeros({b.padded}, dtype_, device);
  b.values = Tensor::zeros({b.padded}, dtype_, device);
  for (size_t s : b.slots) {
    Parameter& p = *slots_[s].param;
    const int64_t n = p.value.numel();
    Tensor value = flat_view(b.values, slots_[s].offset, n).view(p.value.shape());
    Tensor grad = flat_view(b.grads, slots_[s].offset, n).view(p.value.shape());
    value.copy_from(p.value);
    grad.copy_from(p.grad);
    p.value = value;
    p.grad = grad;
  }
  b.own_begin = std::min(b.used, comm.rank() * b.shard);
  b.own_end = std::min(b.used, b.own_begin + b.shard);
  if (options_.zero1) {
    b.update_begin = b.own_begin;
    b.update_end = b.own_end;
    // A group of one reduces nothing: its shard is the whole bucket, read in place.
    b.update_grads = size == 1 ? b.grads : Tensor::zeros({b.shard}, dtype_, device);
  } else {
    b.update_begin = 0;
    b.update_end = b.used;
    b.update_grads = b.grads;
  }
  const int64_t kept = b.update_end - b.update_begin;
  b.exp_avg = Tensor::zeros({kept}, moment_dtype_, device);
  b.exp_avg_sq = Tensor::zeros({kept}, moment_dtype_, device);
  b.update_pieces = pieces_in(b, b.update_begin, b.update_end);
  b.own_pieces = pieces_in(b, b.own_begin, b.own_end);
  b.waiting_for = static_cast<int64_t>(b.slots.size());
}

// Ranks of a group that packed different parameters would reduce mismatched buffers silently;
// compare (bucket count, elements, names and sizes) once, up front.
void DistributedAdamW::check_layouts_agree() {
  for (const Group& g : groups_) {
    if (g.comm->size() == 1) continue;
    uint64_t hash = 1469598103934665603ull;
    int64_t elements = 0;
    for (size_t bi : g.buckets) {
      const Bucket& b = buckets_[bi];
      elements += b.used;
      fnv_mix(hash, &b.used, sizeof b.used);
      for (size_t s : b.slots) {
        const std::string& name = slots_[s].param->spec.name;
        fnv_mix(hash, name.data(), name.size());
      }
    }
    const int64_t mine[3] = {static_cast<int64_t>(g.buckets.size()), elements, static_cast<int64_t>(hash)};
    Tensor in = stage_for(*g.comm, Tensor::from<int64_t>(std::span<const int64_t>(mine, 3), {3}));
    Tensor all = Tensor::empty({3 * static_cast<int64_t>(g.comm->size())}, DType::i64, g.comm->tensor_device());
    g.comm->all_gather(in, all).wait();
    all = unstage(all);
    const int64_t* a = all.data<int64_t>();
    for (int r = 0; r < g.comm->size(); ++r) {
      if (!std::equal(mine, mine + 3, a + 3 * r)) {
        throw std::logic_error("distributed optimizer: group '" + g.comm->name() + "' rank " +
                               std::to_string(g.comm->rank()) + " packed " + std::to_string(mine[0]) + " buckets of " +
                               std::to_string(mine[1]) + " elements but rank " + std::to_string(r) + " packed " +
                               std::to_string(a[3 * r]) + " of " + std::to_string(a[3 * r + 1]) +
                               " (or other parameter names): the ranks hold different parameters");
      }
    }
  }
}

void DistributedAdamW::start_reduction(Bucket& b) {
  Communicator& comm = *groups_[b.group].comm;
  b.started = true;
  if (comm.size() == 1) return;
  b.reduction = options_.zero1 ? comm.reduce_scatter(b.grads, b.update_grads) : comm.all_reduce(b.grads);
}

void DistributedAdamW::start_ready_buckets(Group& g) {
  while (g.next_to_start < g.buckets.size()) {
    Bucket& b = buckets_[g.buckets[g.next_to_start]];
    if (b.waiting_for > 0) break;
    start_reduction(b);
    ++g.next_to_start;
  }
}

void DistributedAdamW::grad_ready(Parameter& p) {
  if (!p.spec.trainable) return;
  const auto it = slot_of_.find(&p);
  if (it == slot_of_.end()) {
    throw std::logic_error("distributed optimizer: grad_ready(" + p.spec.name + ") for a parameter of another store");
  }
  Slot& slot = slots_[it->second];
  if (slot.ready) {
    throw std::logic_error("distributed optimizer: grad_ready(" + p.spec.name + ") reported twice in one step");
  }
  slot.ready = true;
  Bucket& b = buckets_[slot.bucket];
  if (--b.waiting_for == 0) start_ready_buckets(groups_[b.group]);
  progress();
}

void DistributedAdamW::progress() {
  for (Bucket& b : buckets_) {
    if (b.started && !b.reduction.done()) b.reduction.test();
  }
}

void DistributedAdamW::wait(CommHandle& h) {
  if (h.done()) return;
  const auto start = Clock::now();
  h.wait();
  exposed_comm_s_ += std::chrono::duration<double>(Clock::now() - start).count();
}

double DistributedAdamW::take_exposed_comm_s() {
  const double s = exposed_comm_s_;
  exposed_comm_s_ = 0;
  return s;
}

// Σ g² over this rank's partition of the reduced gradient.
double DistributedAdamW::own_sum_of_squares(const Bucket& b) const {
  const int64_t n = b.own_end - b.own_begin;
  if (n == 0) return 0;
  if (options_.owns_replicated) {
    const int64_t first = b.own_begin - b.update_begin;  // position of the partition in update_grads
    return ops::sum_of_squares(flat_view(b.update_grads, first, n));
  }
  double sum = 0;  // piece by piece, leaving out the parameters another TP rank counts
  for (const Piece& pc : b.own_pieces) {
    if (slots_[pc.slot].param->spec.shard.axis == ShardAxis::none) continue;
    sum += ops::sum_of_squares(flat_view(b.update_grads, pc.bucket_begin - b.update_begin, pc.length));
  }
  return sum;
}

void DistributedAdamW::update(Bucket& b, double lr) {
  for (const Piece& pc : b.update_pieces) {
    const Slot& slot = slots_[pc.slot];
    const ops::AdamWConfig c{.lr = lr,
                             .beta1 = config_.beta1,
                             .beta2 = config_.beta2,
                             .eps = config_.eps,
                             .weight_decay = slot.decay ? config_.weight_decay : 0.0};
    const int64_t at = pc.bucket_begin - b.update_begin;
    Tensor value = flat_view(b.values, pc.bucket_begin, pc.length);
    Tensor m = flat_view(b.exp_avg, at, pc.length);
    Tensor v = flat_view(b.exp_avg_sq, at, pc.length);
    ops::adamw_step(c, step_, value, flat_view(b.update_grads, at, pc.length), m, v);
  }
}

double DistributedAdamW::step(double lr) {
  for (Group& g : groups_) {
    for (size_t bi : g.buckets) buckets_[bi].waiting_for = 0;
    start_ready_buckets(g);
  }

  // Each element is counted once: by the rank owning its partition in its group. Summing over
  // the world is then right when the DP/EDP groups' replicas of every pipeline stage together
  // span the world: true for pp > 1 (stages hold disjoint parameters); for tp > 1 the parameters
  // replicated over TP (ShardAxis::none) are counted by TP rank 0 only (options_.owns_replicated).
  double sum_sq = 0;
  for (Bucket& b : buckets_) {
    wait(b.reduction);
    sum_sq += own_sum_of_squares(b);
    progress();
  }
  Tensor total = stage_for(world_, Tensor::full({1}, sum_sq, DType::f64));
  CommHandle norm_reduce = world_.all_reduce(total);
  wait(norm_reduce);
  const double norm = std::sqrt(unstage(total).item());

  // ops::clip_grad_norm's rule, with the norm of the whole model.
  const double clip = config_.grad_clip;
  if (clip > 0 && std::isfinite(norm) && norm > clip) {
    const double scale = clip / (norm + 1e-6);
    for (Bucket& b : buckets_) {
      Tensor g = flat_view(b.update_grads, 0, b.update_end - b.update_begin);
      if (g.numel() > 0) ops::scale_(g, scale);
    }
  }

  ++step_;
  for (Bucket& b : buckets_) {
    update(b, lr);
    Communicator& comm = *groups_[b.group].comm;
    if (options_.zero1 && comm.size() > 1) {
      b.gather = comm.all_gather(flat_view(b.values, comm.rank() * b.shard, b.shard), b.values);
    }
    for (Bucket& other : buckets_) {
      if (!other.gather.done()) other.gather.test();
    }
  }
  for (Bucket& b : buckets_) wait(b.gather);

  for (Slot& s : slots_) s.ready = false;
  for (Group& g : groups_) g.next_to_start = 0;
  for (Bucket& b : buckets_) {
    b.waiting_for = static_cast<int64_t>(b.slots.size());
    b.started = false;
  }
  return norm;
}

// The moment boxes of the given pieces of every bucket (moment_boxes: in the parameters' global shapes).
std::vector<ckpt::TensorSlice> DistributedAdamW::moment_boxes(bool own_only) {
  std::vector<ckpt::TensorSlice> out;
  for (Bucket& b : buckets_) {
    for (const Piece& pc : own_only ? b.own_pieces : b.update_pieces) {
      const Parameter& p = *slots_[pc.slot].param;
      if (own_only && !options_.owns_replicated && p.spec.shard.axis == ShardAxis::none) continue;  // TP rank 0's
      const int64_t at = pc.bucket_begin - b.update_begin;
      for (const auto& [prefix, flat] : {std::pair<const char*, const Tensor&>{"optim.exp_avg.", b.exp_avg},
                                         std::pair<const char*, const Tensor&>{"optim.exp_avg_sq.", b.exp_avg_sq}}) {
        for (ckpt::TensorSlice& box :
             dsx::moment_boxes(prefix + p.spec.name, p, pc.param_begin, flat_view(flat, at, pc.length)))
          out.push_back(std::move(box));
      }
    }
  }
  return out;
}

std::vector<ckpt::TensorSlice> DistributedAdamW::state_slices() {
  return moment_boxes(/*own_only=*/true);
}

std::vector<ckpt::LoadRequest> DistributedAdamW::state_requests() {
  std::vector<ckpt::LoadRequest> out;
  for (ckpt::TensorSlice& s : moment_boxes(/*own_only=*/false)) {
    out.push_back({std::move(s.name), std::move(s.global_shape), std::move(s.offset), std::move(s.data)});
  }
  return out;
}

int64_t DistributedAdamW::bucket_count() const {
  return static_cast<int64_t>(buckets_.size());
}

}  // namespace dsx
