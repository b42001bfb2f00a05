// Multi-rank check of Communicator::all_to_all_blocks, run under mpirun by ctest
// (parallel_tests.cmake) with 2 and 3 ranks:
//
//   blocks_check          random row blocks (empty blocks, peers with no rows, self-sends,
//                         overlapping send blocks, gaps between receive blocks) in every dtype
//                         the communicator moves, through the MPI override and through the
//                         default implementation (Communicator::all_to_all_blocks, called
//                         qualified), each compared byte for byte with a reference built from
//                         all_to_all_v and plain memcpy gathers/scatters. Rows are random bytes
//                         (NaN patterns included): both paths must move bits, never values.
//
// Exit status 0 when every check passed on every rank.
#include <mpi.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "parallel/comm_mpi.h"

using namespace dsx;

namespace {

int g_failures = 0;
int g_checks = 0;

const std::vector<DType> kTypes = {DType::f32, DType::f64,      DType::bf16,    DType::i32,
                                   DType::i64, DType::fp8_e4m3, DType::fp8_e5m2};

enum class Impl { mpi_override, base_default };
enum class Completion { wait, poll_test, handle_destroyed };

// How a round lays out its blocks.
enum class Layout {
  scattered,      // random blocks on both sides
  consecutive,    // all_to_all_v's layout on both sides (the default's no-copy path)
  dispatch_like,  // consecutive send, scattered receive
  combine_like,   // scattered send, consecutive receive
};

struct Round {
  int index = 0;
  Layout layout = Layout::scattered;
  Shape row_shape;            // the shape of one row (empty: 1-D tensors)
  double zero_pair = 0;       // probability that a (sender, receiver) pair moves no rows
  bool silent_rank0 = false;  // rank 0 sends nothing to anyone
};

// Rows sender p sends receiver q in a round: the same on every rank (shared seed).
std::vector<std::vector<int64_t>> pair_rows(const Round& r, int n) {
  std::mt19937_64 gen(1000 + static_cast<uint64_t>(r.index));
  std::uniform_int_distribution<int64_t> rows(1, 7);
  std::bernoulli_distribution zero(r.zero_pair);
  std::vector<std::vector<int64_t>> m(static_cast<size_t>(n), std::vector<int64_t>(static_cast<size_t>(n)));
  for (int p = 0; p < n; ++p)
    for (int q = 0; q < n; ++q) m[p][q] = (zero(gen) || (r.silent_rank0 && p == 0)) ? 0 : rows(gen);
  return m;
}

// Splits `rows` into 1..3 pieces, with empty pieces sprinkled in.
std::vector<int64_t> split_rows(int64_t rows, std::mt19937_64& gen) {
  std::vector<int64_t> pieces;
  int64_t left = rows;
  const int n_pieces = std::uniform_int_distribution<int>(1, 3)(gen);
  for (int i = 0; i < n_pieces; ++i) {
    if (std::bernoulli_distribution(0.25)(gen)) pieces.push_back(0);
    const int64_t take = i + 1 == n_pieces ? left : std::uniform_int_distribution<int64_t>(0, left)(gen);
    pieces.push_back(take);
    left -= take;
  }
  return pieces;
}

// Send side: every piece anywhere in the tensor (pieces may overlap: rows are only read).
PeerRowBlocks random_send_blocks(const std::vector<int64_t>& rows_to, int64_t tensor_rows, std::mt19937_64& gen) {
  PeerRowBlocks b;
  for (const int64_t rows : rows_to) {
    for (const int64_t piece : split_rows(rows, gen)) {
      b.add(std::uniform_int_distribution<int64_t>(0, tensor_rows - piece)(gen), piece);
    }
    b.end_peer();
  }
  return b;
}

// Receive side: the pieces of all peers in a shuffled order, laid out without overlap and with
// random gaps; each peer's list keeps its pieces in order. Returns the blocks and the rows used.
PeerRowBlocks random_recv_blocks(const std::vector<int64_t>& rows_from, int64_t& tensor_rows, std::mt19937_64& gen) {
  struct Piece {
    int peer;
    int64_t rows, offset = 0;
  };
  std::vector<Piece> pieces;
  for (size_t p = 0; p < rows_from.size(); ++p) {
    for (const int64_t rows : split_rows(rows_from[p], gen)) pieces.push_back({static_cast<int>(p), rows});
  }
  std::vector<size_t> placement(pieces.size());
  std::iota(placement.begin(), placement.end(), size_t{0});
  std::shuffle(placement.begin(), placement.end(), gen);
  int64_t at = 0;
  for (const size_t i : placement) {
    at += std::uniform_int_distribution<int64_t>(0, 2)(gen);  // a gap that must stay untouched
    pieces[i].offset = at;
    at += pieces[i].rows;
  }
  tensor_rows = at + 1;
  PeerRowBlocks b;
  for (size_t p = 0; p < rows_from.size(); ++p) {
    for (const Piece& piece : pieces) {
      if (piece.peer == static_cast<int>(p)) b.add(piece.offset, piece.rows);
    }
    b.end_peer();
  }
  return b;
}

Tensor tensor_of_rows(int64_t rows, const Shape& row_shape, DType d) {
  Shape shape{rows};
  shape.insert(shape.end(), row_shape.begin(), row_shape.end());
  return Tensor::empty(shape, d);
}

size_t row_bytes(const Tensor& t) {
  return static_cast<size_t>(row_elements(t)) * dtype_size(t.dtype());
}

char* row_at(const Tensor& t, int64_t row) {
  return static_cast<char*>(t.raw()) + static_cast<size_t>(row) * row_bytes(t);
}

void fill_random_bytes(const Tensor& t, std::mt19937_64& gen) {
  auto* p = static_cast<unsigned char*>(t.raw());
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<unsigned char>(gen());
}

// The reference: the send blocks gathered by memcpy, all_to_all_v, the receive blocks
// scattered by memcpy into a copy of recv's initial bytes.
Tensor reference(Communicator& c, const Tensor& send, const PeerRowBlocks& sb, const Tensor& recv_initial,
                 const PeerRowBlocks& rb) {
  const int n = c.size();
  std::vector<int64_t> send_counts(static_cast<size_t>(n)), recv_counts(static_cast<size_t>(n));
  for (int p = 0; p < n; ++p) {
    send_counts[p] = sb.rows_of(p);
    recv_counts[p] = rb.rows_of(p);
  }
  const int64_t send_rows = std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0});
  const int64_t recv_rows = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
  Shape row_shape(send.shape().begin() + 1, send.shape().end());
  Tensor packed = tensor_of_rows(send_rows, row_shape, send.dtype());
  int64_t at = 0;
  for (const RowBlock& b : sb.blocks) {
    std::memcpy(row_at(packed, at), row_at(send, b.offset), static_cast<size_t>(b.rows) * row_bytes(send));
    at += b.rows;
  }
  Tensor arrived = tensor_of_rows(recv_rows, row_shape, send.dtype());
  c.all_to_all_v(packed, send_counts, arrived, recv_counts).wait();
  Tensor out = recv_initial.clone();
  at = 0;
  for (const RowBlock& b : rb.blocks) {
    std::memcpy(row_at(out, b.offset), row_at(arrived, at), static_cast<size_t>(b.rows) * row_bytes(out));
    at += b.rows;
  }
  return out;
}

void run_blocks(Communicator& c, Impl impl, Completion completion, const Tensor& send, const PeerRowBlocks& sb,
                const Tensor& recv, const PeerRowBlocks& rb) {
  CommHandle h = impl == Impl::mpi_override ? c.all_to_all_blocks(send, sb, recv, rb)
                                            : c.Communicator::all_to_all_blocks(send, sb, recv, rb);
  switch (completion) {
    case Completion::wait:
      h.wait();
      break;
    case Completion::poll_test:
      while (!h.test()) {
      }
      break;
    case Completion::handle_destroyed:
      break;  // the handle's destructor completes it
  }
}

std::string describe(const Round& r, DType d, Impl impl, Completion completion) {
  static const char* layouts[] = {"scattered", "consecutive", "dispatch-like", "combine-like"};
  static const char* completions[] = {"wait", "test", "destroyed handle"};
  return "round " + std::to_string(r.index) + " (" + layouts[static_cast<int>(r.layout)] + ") " +
         std::string(dtype_name(d)) + (impl == Impl::mpi_override ? " MPI override" : " default") + ", " +
         completions[static_cast<int>(completion)];
}

void check_round(Communicator& c, const Round& r) {
  const int n = c.size(), me = c.rank();
  const auto m = pair_rows(r, n);
  std::vector<int64_t> rows_to(static_cast<size_t>(n)), rows_from(static_cast<size_t>(n));
  for (int q = 0; q < n; ++q) {
    rows_to[q] = m[me][q];
    rows_from[q] = m[q][me];
  }
  int case_index = 0;
  for (DType d : kTypes) {
    for (Impl impl : {Impl::mpi_override, Impl::base_default}) {
      const auto completion = static_cast<Completion>(case_index++ % 3);
      std::mt19937_64 gen(static_cast<uint64_t>(r.index) * 7919 + static_cast<uint64_t>(me) * 104729 +
                          static_cast<uint64_t>(case_index));
      const bool consecutive_send = r.layout == Layout::consecutive || r.layout == Layout::dispatch_like;
      const bool consecutive_recv = r.layout == Layout::consecutive || r.layout == Layout::combine_like;
      const int64_t sent_rows = std::accumulate(rows_to.begin(), rows_to.end(), int64_t{0});
      const int64_t send_tensor_rows = sent_rows + 2;  // spare rows nobody sends
      const PeerRowBlocks sb =
          consecutive_send ? PeerRowBlocks::consecutive(rows_to) : random_send_blocks(rows_to, send_tensor_rows, gen);
      int64_t recv_tensor_rows = std::accumulate(rows_from.begin(), rows_from.end(), int64_t{0}) + 2;
      const PeerRowBlocks rb = consecutive_recv ? PeerRowBlocks::consecutive(rows_from)
                                                : random_recv_blocks(rows_from, recv_tensor_rows, gen);

      const Tensor send = tensor_of_rows(send_tensor_rows, r.row_shape, d);
      fill_random_bytes(send, gen);
      const Tensor initial = tensor_of_rows(recv_tensor_rows, r.row_shape, d);
      fill_random_bytes(initial, gen);  // rows no block covers must keep these bytes
      const Tensor want = reference(c, send, sb, initial, rb);
      const Tensor got = initial.clone();
      run_blocks(c, impl, completion, send, sb, got, rb);

      ++g_checks;
      if (got.nbytes() != want.nbytes() || std::memcmp(got.raw(), want.raw(), got.nbytes()) != 0) {
        ++g_failures;
        std::fprintf(stderr, "rank %d: FAILED all_to_all_blocks %s\n", me, describe(r, d, impl, completion).c_str());
      }
    }
  }
}

}  // namespace

int main() {
  MpiSession mpi;
  int failures = 0;
  {
    auto world = make_mpi_world_communicator(60.0);
    const std::vector<Round> rounds = {
        {0, Layout::scattered, {3}, 0.0, false},   {1, Layout::scattered, {5}, 0.4, false},
        {2, Layout::scattered, {2, 3}, 0.2, true},  // rows of a 3-D tensor; rank 0 sends nothing
        {3, Layout::scattered, {}, 0.3, false},     // 1-D tensors: a row is one element
        {4, Layout::consecutive, {4}, 0.3, false}, {5, Layout::dispatch_like, {130}, 0.2, false},
        {6, Layout::combine_like, {7}, 0.2, true}, {7, Layout::scattered, {1}, 1.0, false},  // nobody sends anything
    };
    for (const Round& r : rounds) check_round(*world, r);
    failures = g_failures;
  }
  int all_failures = 0;
  MPI_Allreduce(&failures, &all_failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == 0) {
    std::printf("blocks_check: %d checks per rank, %d failures over all ranks\n", g_checks, all_failures);
  }
  return all_failures == 0 ? 0 : 1;
}
