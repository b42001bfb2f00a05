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
//                         Rounds with BlockMatch::blocks cut each pair's rows into the same
//                         pieces on both sides (each side adding empty blocks of its own), so
//                         the MPI override sends one message per block; two such calls also run
//                         in flight together and complete in reverse order.
//   blocks_check mismatch KIND TIMEOUT_S
//                         rank 1 cuts the rows it receives from rank 0 unlike rank 0 cuts them,
//                         with BlockMatch::blocks; the job must abort with a message naming the
//                         block (run by run_fault.sh). KIND: larger (rank 0's first block is
//                         larger than rank 1's), smaller, last (rank 1 expects one block of the
//                         size of rank 0's first, and rank 0 sends two), unexpected (rank 1
//                         expects no rows, and rank 0's arrive in the next call).
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

#include "kernels/error.h"
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
  BlockMatch match = BlockMatch::rows;
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

// The pieces of each pair's rows on this rank's side, for the peers in order: `rows[q]` rows
// with peer q. BlockMatch::rows: each side cuts its rows as it likes. BlockMatch::blocks: the
// non-empty pieces of a pair come from a seed both sides share, and each side adds empty pieces
// of its own (they are skipped).
std::vector<std::vector<int64_t>> cut_rows(const Round& r, const std::vector<int64_t>& rows, int me, bool sending,
                                           std::mt19937_64& gen) {
  std::vector<std::vector<int64_t>> cut;
  for (size_t q = 0; q < rows.size(); ++q) {
    if (r.match == BlockMatch::rows) {
      cut.push_back(split_rows(rows[q], gen));
      continue;
    }
    const uint64_t sender = sending ? static_cast<uint64_t>(me) : q, receiver = sending ? q : static_cast<uint64_t>(me);
    std::mt19937_64 pair_gen(7 + static_cast<uint64_t>(r.index) * 1009 + sender * 31 + receiver);
    std::vector<int64_t> pieces;
    for (const int64_t piece : split_rows(rows[q], pair_gen)) {
      if (std::bernoulli_distribution(0.3)(gen)) pieces.push_back(0);  // this side's own empty blocks
      if (piece > 0) pieces.push_back(piece);
    }
    cut.push_back(std::move(pieces));
  }
  return cut;
}

// all_to_all_v's layout (consecutive from row 0 in peer order), cut into the pieces.
PeerRowBlocks consecutive_blocks(const std::vector<std::vector<int64_t>>& pieces) {
  PeerRowBlocks b;
  int64_t at = 0;
  for (const std::vector<int64_t>& peer : pieces) {
    for (const int64_t piece : peer) {
      b.add(at, piece);
      at += piece;
    }
    b.end_peer();
  }
  return b;
}

// Send side: every piece anywhere in the tensor (pieces may overlap: rows are only read).
PeerRowBlocks random_send_blocks(const std::vector<std::vector<int64_t>>& pieces_to, int64_t tensor_rows,
                                 std::mt19937_64& gen) {
  PeerRowBlocks b;
  for (const std::vector<int64_t>& peer : pieces_to) {
    for (const int64_t piece : peer) {
      b.add(std::uniform_int_distribution<int64_t>(0, tensor_rows - piece)(gen), piece);
    }
    b.end_peer();
  }
  return b;
}

// Receive side: the pieces of all peers in a shuffled order, laid out without overlap and with
// random gaps; each peer's list keeps its pieces in order. Returns the blocks and the rows used.
PeerRowBlocks random_recv_blocks(const std::vector<std::vector<int64_t>>& pieces_from, int64_t& tensor_rows,
                                 std::mt19937_64& gen) {
  struct Piece {
    int peer;
    int64_t rows, offset = 0;
  };
  std::vector<Piece> pieces;
  for (size_t p = 0; p < pieces_from.size(); ++p) {
    for (const int64_t rows : pieces_from[p]) pieces.push_back({static_cast<int>(p), rows});
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
  for (size_t p = 0; p < pieces_from.size(); ++p) {
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

CommHandle start_blocks(Communicator& c, Impl impl, const Tensor& send, const PeerRowBlocks& sb, const Tensor& recv,
                        const PeerRowBlocks& rb, BlockMatch match) {
  return impl == Impl::mpi_override ? c.all_to_all_blocks(send, sb, recv, rb, match)
                                    : c.Communicator::all_to_all_blocks(send, sb, recv, rb, match);
}

void run_blocks(Communicator& c, Impl impl, Completion completion, const Tensor& send, const PeerRowBlocks& sb,
                const Tensor& recv, const PeerRowBlocks& rb, BlockMatch match) {
  CommHandle h = start_blocks(c, impl, send, sb, recv, rb, match);
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
  return "round " + std::to_string(r.index) + " (" + layouts[static_cast<int>(r.layout)] +
         (r.match == BlockMatch::blocks ? ", matched blocks" : "") + ") " + std::string(dtype_name(d)) +
         (impl == Impl::mpi_override ? " MPI override" : " default") + ", " + completions[static_cast<int>(completion)];
}

// One all_to_all_blocks of a round: this rank's tensors and blocks, and the expected result.
struct Case {
  Tensor send, initial, want;
  PeerRowBlocks sb, rb;
};

Case make_case(Communicator& c, const Round& r, DType d, int case_index) {
  const int n = c.size(), me = c.rank();
  const auto m = pair_rows(r, n);
  std::vector<int64_t> rows_to(static_cast<size_t>(n)), rows_from(static_cast<size_t>(n));
  for (int q = 0; q < n; ++q) {
    rows_to[q] = m[me][q];
    rows_from[q] = m[q][me];
  }
  std::mt19937_64 gen(static_cast<uint64_t>(r.index) * 7919 + static_cast<uint64_t>(me) * 104729 +
                      static_cast<uint64_t>(case_index));
  const bool consecutive_send = r.layout == Layout::consecutive || r.layout == Layout::dispatch_like;
  const bool consecutive_recv = r.layout == Layout::consecutive || r.layout == Layout::combine_like;
  const int64_t sent_rows = std::accumulate(rows_to.begin(), rows_to.end(), int64_t{0});
  const int64_t send_tensor_rows = sent_rows + 2;  // spare rows nobody sends
  const auto pieces_to = cut_rows(r, rows_to, me, /*sending=*/true, gen);
  const auto pieces_from = cut_rows(r, rows_from, me, /*sending=*/false, gen);
  Case k;
  k.sb = consecutive_send ? consecutive_blocks(pieces_to) : random_send_blocks(pieces_to, send_tensor_rows, gen);
  int64_t recv_tensor_rows = std::accumulate(rows_from.begin(), rows_from.end(), int64_t{0}) + 2;
  k.rb = consecutive_recv ? consecutive_blocks(pieces_from) : random_recv_blocks(pieces_from, recv_tensor_rows, gen);
  k.send = tensor_of_rows(send_tensor_rows, r.row_shape, d);
  fill_random_bytes(k.send, gen);
  k.initial = tensor_of_rows(recv_tensor_rows, r.row_shape, d);
  fill_random_bytes(k.initial, gen);  // rows no block covers must keep these bytes
  k.want = reference(c, k.send, k.sb, k.initial, k.rb);
  return k;
}

void expect_same(const Tensor& got, const Tensor& want, int me, const std::string& what) {
  ++g_checks;
  if (got.nbytes() != want.nbytes() || std::memcmp(got.raw(), want.raw(), got.nbytes()) != 0) {
    ++g_failures;
    std::fprintf(stderr, "rank %d: FAILED all_to_all_blocks %s\n", me, what.c_str());
  }
}

void check_round(Communicator& c, const Round& r) {
  int case_index = 0;
  for (DType d : kTypes) {
    for (Impl impl : {Impl::mpi_override, Impl::base_default}) {
      const auto completion = static_cast<Completion>(case_index++ % 3);
      const Case k = make_case(c, r, d, case_index);
      const Tensor got = k.initial.clone();
      run_blocks(c, impl, completion, k.send, k.sb, got, k.rb, r.match);
      expect_same(got, k.want, c.rank(), describe(r, d, impl, completion));
    }
  }
}

// Two calls in flight together (as the FP8 rows and their scales travel), the second waited
// first: their messages between a pair must not cross.
void check_in_flight_together(Communicator& c, const Round& first, const Round& second) {
  const Case a = make_case(c, first, DType::f32, 0), b = make_case(c, second, DType::bf16, 1);
  const Tensor got_a = a.initial.clone(), got_b = b.initial.clone();
  CommHandle ha = c.all_to_all_blocks(a.send, a.sb, got_a, a.rb, first.match);
  CommHandle hb = c.all_to_all_blocks(b.send, b.sb, got_b, b.rb, second.match);
  hb.wait();
  ha.wait();
  expect_same(
      got_a, a.want, c.rank(),
      "in flight together, the first (" + describe(first, DType::f32, Impl::mpi_override, Completion::wait) + ")");
  expect_same(
      got_b, b.want, c.rank(),
      "in flight together, the second (" + describe(second, DType::bf16, Impl::mpi_override, Completion::wait) + ")");
}

// Blocks consecutive from row 0, cut as `cut`, for `peer` alone (none for the other peers; -1:
// none at all).
PeerRowBlocks blocks_for(int peers, int peer, const std::vector<int64_t>& cut) {
  PeerRowBlocks b;
  int64_t at = 0;
  for (int p = 0; p < peers; ++p) {
    for (const int64_t rows : p == peer ? cut : std::vector<int64_t>{}) {
      b.add(at, rows);
      at += rows;
    }
    b.end_peer();
  }
  return b;
}

// Rank 0 sends rank 1 8 rows as blocks of 4 and 4; rank 1 cuts them otherwise (`kind`) with
// BlockMatch::blocks, or ("unexpected") expects none, and the rows meet the next call. No other
// pair moves rows. Returns only if the job was not aborted.
void run_mismatch(Communicator& c, const std::string& kind) {
  check(c.size() >= 2, "blocks_check mismatch", "needs 2 ranks or more");
  std::vector<int64_t> received;  // rank 1's cut
  if (kind == "larger") {
    received = {2, 6};
  } else if (kind == "smaller") {
    received = {6, 2};
  } else if (kind == "last") {
    received = {4};
  } else if (kind != "unexpected") {
    throw UserError("blocks_check mismatch: KIND is larger, smaller, last or unexpected, got '" + kind + "'");
  }
  const int n = c.size(), sender = c.rank() == 0 ? 1 : -1, receiver = c.rank() == 1 ? 0 : -1;
  const Tensor t = Tensor::zeros({8, 16}, DType::f32);
  c.all_to_all_blocks(t, blocks_for(n, sender, {4, 4}), t.clone(), blocks_for(n, receiver, received),
                      BlockMatch::blocks)
      .wait();
  if (kind == "unexpected") {
    c.all_to_all_blocks(t, blocks_for(n, sender, {4}), t.clone(), blocks_for(n, receiver, {4}), BlockMatch::blocks)
        .wait();
  }
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  if (argc == 4 && std::string(argv[1]) == "mismatch") {
    auto world = make_mpi_world_communicator(std::stod(argv[3]));
    run_mismatch(*world, argv[2]);
    std::printf("blocks_check mismatch %s: the call completed\n", argv[2]);
    return 0;
  }
  int failures = 0;
  {
    auto world = make_mpi_world_communicator(60.0);
    const std::vector<Round> rounds = {
        {0, Layout::scattered, {3}, 0.0, false},
        {1, Layout::scattered, {5}, 0.4, false},
        {2, Layout::scattered, {2, 3}, 0.2, true},  // rows of a 3-D tensor; rank 0 sends nothing
        {3, Layout::scattered, {}, 0.3, false},     // 1-D tensors: a row is one element
        {4, Layout::consecutive, {4}, 0.3, false},
        {5, Layout::dispatch_like, {130}, 0.2, false},
        {6, Layout::combine_like, {7}, 0.2, true},
        {7, Layout::scattered, {1}, 1.0, false},  // nobody sends anything
        // The same pieces on both sides: one message per block.
        {8, Layout::scattered, {3}, 0.0, false, BlockMatch::blocks},
        {9, Layout::scattered, {}, 0.3, true, BlockMatch::blocks},
        {10, Layout::dispatch_like, {130}, 0.2, false, BlockMatch::blocks},
        {11, Layout::combine_like, {2, 5}, 0.2, false, BlockMatch::blocks},
        {12, Layout::consecutive, {4}, 0.0, false, BlockMatch::blocks},
        {13, Layout::scattered, {1}, 1.0, false, BlockMatch::blocks},
    };
    for (const Round& r : rounds) check_round(*world, r);
    check_in_flight_together(*world, rounds[10], rounds[11]);
    check_in_flight_together(*world, rounds[8], rounds[1]);  // one message per block, then Ialltoallw
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
