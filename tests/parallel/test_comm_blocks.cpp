// Single-process tests of Communicator::all_to_all_blocks on a one-rank world (MPI singleton):
// the self-send through both the MPI override and the default implementation, and every
// argument check. The multi-rank behaviour is checked by tests/parallel/mpi/blocks_check.cpp.
#include <catch2/catch.hpp>

#include <climits>
#include <string>
#include <vector>

#include "parallel/comm_mpi.h"

using namespace dsx;

namespace {

MpiSession& mpi() {
  static MpiSession session;
  return session;
}

// Row r of the send tensor is {10·r, 10·r + 1}: exact in every dtype below (fp8 e4m3 holds
// integers exactly up to 16 and even ones up to 32, hence the rows stay small there).
Tensor numbered_rows(int64_t rows, DType d) {
  std::vector<float> v;
  for (int64_t r = 0; r < rows; ++r) {
    v.push_back(static_cast<float>(d == DType::fp8_e4m3 ? 2 * r : 10 * r));
    v.push_back(static_cast<float>(d == DType::fp8_e4m3 ? 2 * r + 1 : 10 * r + 1));
  }
  return Tensor::from<float>(v, {rows, 2}).to(d);
}

CommHandle blocks(Communicator& c, bool base_default, const Tensor& send, const PeerRowBlocks& sb, const Tensor& recv,
                  const PeerRowBlocks& rb, BlockMatch match = BlockMatch::rows) {
  return base_default ? c.Communicator::all_to_all_blocks(send, sb, recv, rb, match)
                      : c.all_to_all_blocks(send, sb, recv, rb, match);
}

PeerRowBlocks one_peer(std::initializer_list<RowBlock> list) {
  PeerRowBlocks b;
  for (const RowBlock& block : list) b.add(block.offset, block.rows);
  b.end_peer();
  return b;
}

}  // namespace

TEST_CASE("comm: all_to_all_blocks gathers the send blocks in order and scatters them into the receive blocks",
          "[comm][all_to_all_blocks]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  for (const bool base_default : {false, true}) {
    for (DType d : {DType::f32, DType::bf16, DType::fp8_e4m3, DType::i64}) {
      for (const BlockMatch match : {BlockMatch::rows, BlockMatch::blocks}) {
        INFO((base_default ? "default " : "MPI override ")
             << dtype_name(d) << (match == BlockMatch::blocks ? " matched blocks" : ""));
        const Tensor send = numbered_rows(6, d);
        // Sent in this order: rows 4, 5, 0, 1 (an empty block in between).
        const PeerRowBlocks sb = one_peer({{4, 2}, {2, 0}, {0, 1}, {1, 1}});
        // Received into rows 3 | 0, 1 | 5; rows 2, 4 and 6 are no block's and keep -1. (Cut
        // otherwise than the send blocks: a rank's own rows are copied, never messages, so
        // BlockMatch::blocks does not bind them.)
        const PeerRowBlocks rb = one_peer({{3, 1}, {0, 2}, {6, 0}, {5, 1}});
        Tensor recv = Tensor::full({7, 2}, -1.0, d);
        blocks(*world, base_default, send, sb, recv, rb, match).wait();
        const std::vector<double> s = send.to_vector();
        auto row = [&](int64_t r) { return std::vector<double>{s[2 * r], s[2 * r + 1]}; };
        std::vector<double> want;
        for (const auto& r : {row(5), row(0), std::vector<double>{-1, -1}, row(4), std::vector<double>{-1, -1}, row(1),
                              std::vector<double>{-1, -1}}) {
          want.insert(want.end(), r.begin(), r.end());
        }
        REQUIRE(recv.to_vector() == want);
      }
    }
  }
}

TEST_CASE("comm: all_to_all_blocks with nothing to move, and with all_to_all_v's layout", "[comm][all_to_all_blocks]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  for (const bool base_default : {false, true}) {
    INFO((base_default ? "default" : "MPI override"));
    const Tensor send = numbered_rows(3, DType::f32);
    Tensor recv = Tensor::full({4, 2}, -1.0, DType::f32);
    PeerRowBlocks none;
    none.end_peer();  // peer 0 has no blocks at all
    blocks(*world, base_default, send, none, recv, none).wait();
    REQUIRE(recv.to_vector() == std::vector<double>(8, -1.0));

    const std::vector<int64_t> three{3};
    blocks(*world, base_default, send, PeerRowBlocks::consecutive(three), recv, PeerRowBlocks::consecutive(three))
        .wait();
    REQUIRE(recv.to_vector() == std::vector<double>{0, 1, 10, 11, 20, 21, -1, -1});
  }
}

TEST_CASE("comm: all_to_all_blocks refuses bad blocks before anything is sent", "[comm][all_to_all_blocks]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  const Tensor f = numbered_rows(4, DType::f32);
  Tensor out = Tensor::zeros({4, 2}, DType::f32);
  const PeerRowBlocks ok = one_peer({{0, 2}});
  for (const bool base_default : {false, true}) {
    INFO((base_default ? "default" : "MPI override"));
    PeerRowBlocks two_peers = ok;
    two_peers.end_peer();
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, two_peers, out, ok),
                        Catch::Contains("send blocks have lists for 2 peers in a group of 1"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, ok, out, one_peer({{3, 2}})),
                        Catch::Contains("recv block of peer 0 (rows 3 + 2) is not a row range of f32[4, 2]"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, one_peer({{1, -1}}), out, ok),
                        Catch::Contains("send block of peer 0 (rows 1 + -1)"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, one_peer({{-1, 1}}), out, ok),
                        Catch::Contains("send block of peer 0 (rows -1 + 1)"));
    PeerRowBlocks unordered;
    unordered.add(0, 1);
    unordered.add(1, 1);
    unordered.peer_start = {0, 3};  // claims more blocks than there are
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, unordered, out, ok),
                        Catch::Contains("peer_start must rise from 0 to the 2 blocks"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, ok, Tensor::zeros({4, 2}, DType::bf16), ok),
                        Catch::Contains("dtypes differ"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, ok, Tensor::zeros({4, 3}, DType::f32), ok),
                        Catch::Contains("row shapes differ"));
    REQUIRE_THROWS_WITH(blocks(*world, base_default, f, ok, out, one_peer({{3, 2}}), BlockMatch::blocks),
                        Catch::Contains("recv block of peer 0 (rows 3 + 2) is not a row range of f32[4, 2]"));
  }
}

TEST_CASE("comm: the MPI all_to_all_blocks refuses a self-send of another size than it receives",
          "[comm][all_to_all_blocks]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  const Tensor f = numbered_rows(4, DType::f32);
  Tensor out = Tensor::zeros({4, 2}, DType::f32);
  REQUIRE_THROWS_WITH(world->all_to_all_blocks(f, one_peer({{0, 2}}), out, one_peer({{0, 1}})),
                      Catch::Contains("rank 0 of group 'world' sends 2 rows to itself but expects to receive 1"));
  REQUIRE_THROWS_WITH(world->all_to_all_blocks(f, one_peer({{0, 2}}), out, one_peer({{0, 1}}), BlockMatch::blocks),
                      Catch::Contains("rank 0 of group 'world' sends 2 rows to itself but expects to receive 1"));
}

TEST_CASE("comm: the MPI all_to_all_blocks refuses a block of more rows than an MPI int counts",
          "[comm][all_to_all_blocks]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  // 2 GiB of address space, never touched: the check comes before any transfer.
  const int64_t rows = int64_t{INT_MAX} + 1;
  const Tensor huge = Tensor::empty({rows, 1}, DType::fp8_e4m3);
  const PeerRowBlocks all = one_peer({{0, rows}});
  REQUIRE_THROWS_WITH(world->all_to_all_blocks(huge, all, huge, all),
                      Catch::Contains("count 2147483648 does not fit an MPI int count"));
}
