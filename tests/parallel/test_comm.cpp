// Single-process tests of the communicator: MPI runs as a singleton (a world of one rank), so
// every operation's local behaviour and every argument check is covered without mpirun. The
// multi-rank behaviour is checked by tests/parallel/mpi/comm_check.cpp under mpirun.
#include <catch2/catch.hpp>

#include <map>
#include <string>

#include "kernels/error.h"
#include "parallel/comm_mpi.h"
#include "parallel/launch_env.h"
#include "parallel/mesh.h"

using namespace dsx;

namespace {

// MPI is initialised by the first test that needs it and finalised at exit.
MpiSession& mpi() {
  static MpiSession session;
  return session;
}

Tensor iota(Shape shape, DType d, double start = 1.0) {
  Tensor f = Tensor::empty(shape, DType::f64);
  for (int64_t i = 0; i < f.numel(); ++i) f.data<double>()[i] = start + static_cast<double>(i);
  return f.to(d);
}

GetEnv env_of(const std::map<std::string, std::string>& vars) {
  return [vars](const char* name) -> const char* {
    const auto it = vars.find(name);
    return it == vars.end() ? nullptr : it->second.c_str();
  };
}

}  // namespace

TEST_CASE("comm: every operation on a one-rank world leaves or copies the data as a group of one must", "[comm]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  REQUIRE(world->size() == 1);
  REQUIRE(world->rank() == 0);
  REQUIRE(world->name() == "world");
  REQUIRE(world->timeout_s() == 5.0);

  for (DType d : {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64}) {
    INFO(dtype_name(d));
    const Tensor ref = iota({4, 3}, d);
    Tensor t = ref.clone();
    world->all_reduce(t).wait();  // sum over one rank: unchanged (bf16 goes through f32 exactly)
    REQUIRE(t.to_vector() == ref.to_vector());

    Tensor rs = Tensor::zeros({4, 3}, d);
    world->reduce_scatter(ref, rs).wait();
    REQUIRE(rs.to_vector() == ref.to_vector());

    Tensor ag = Tensor::zeros({4, 3}, d);
    world->all_gather(ref, ag).wait();
    REQUIRE(ag.to_vector() == ref.to_vector());

    Tensor b = ref.clone();
    world->broadcast(b, 0).wait();
    REQUIRE(b.to_vector() == ref.to_vector());

    Tensor got = Tensor::zeros({4, 3}, d);
    CommHandle r = world->recv(got, 0, 3);
    CommHandle s = world->send(ref, 0, 3);
    r.wait();
    s.wait();
    REQUIRE(got.to_vector() == ref.to_vector());
  }
  CommHandle h = world->barrier();
  h.wait();
  REQUIRE(h.done());
  REQUIRE(h.test());  // a completed handle stays complete
}

TEST_CASE("comm: all_to_all_v moves exactly the counted rows and leaves spare rows alone", "[comm]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  const std::vector<int64_t> counts = exchange_counts(*world, std::vector<int64_t>{3});
  REQUIRE(counts == std::vector<int64_t>{3});
  const Tensor send = iota({5, 2}, DType::f32);  // only the first 3 rows are sent
  Tensor recv = Tensor::full({4, 2}, -1.0, DType::f32);
  world->all_to_all_v(send, counts, recv, counts).wait();
  REQUIRE(recv.to_vector() == std::vector<double>{1, 2, 3, 4, 5, 6, -1, -1});

  Tensor none = Tensor::full({2, 2}, -1.0, DType::f32);
  const std::vector<int64_t> zero{0};
  world->all_to_all_v(send, zero, none, zero).wait();
  REQUIRE(none.to_vector() == std::vector<double>(4, -1.0));
}

TEST_CASE("comm: test() drives an operation to completion without wait()", "[comm]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  Tensor t = iota({1000}, DType::f32);
  CommHandle h = world->all_reduce(t);
  int polls = 0;
  while (!h.test()) ++polls;  // bounded: the communicator aborts the job after its timeout
  REQUIRE(h.done());
  REQUIRE(t.to_vector() == iota({1000}, DType::f32).to_vector());
}

TEST_CASE("comm: bad arguments are refused before anything is sent", "[comm]") {
  mpi();
  auto world = make_mpi_world_communicator(5.0);
  const Tensor f = iota({4, 2}, DType::f32);
  SECTION("counts of the wrong length, negative, or beyond the tensor") {
    Tensor out = Tensor::zeros({4, 2}, DType::f32);
    REQUIRE_THROWS_WITH(world->all_to_all_v(f, std::vector<int64_t>{1, 1}, out, std::vector<int64_t>{1}),
                        Catch::Contains("send counts have 2 entries for group 'world' of 1"));
    REQUIRE_THROWS_WITH(world->all_to_all_v(f, std::vector<int64_t>{-1}, out, std::vector<int64_t>{1}),
                        Catch::Contains("negative"));
    REQUIRE_THROWS_WITH(world->all_to_all_v(f, std::vector<int64_t>{5}, out, std::vector<int64_t>{5}),
                        Catch::Contains("send counts add up to 5 rows"));
    REQUIRE_THROWS_WITH(exchange_counts(*world, std::vector<int64_t>{1, 2}),
                        Catch::Contains("2 counts for a group of 1"));
  }
  SECTION("FP8 rows move bit for bit, and are never summed") {
    Tensor bits = Tensor::empty({3, 2}, DType::fp8_e4m3);
    for (int64_t i = 0; i < 6; ++i) bits.data<fp8_e4m3>()[i].bits = static_cast<uint8_t>(0x31 + 17 * i);
    Tensor out = Tensor::zeros({3, 2}, DType::fp8_e4m3);
    world->all_to_all_v(bits, std::vector<int64_t>{3}, out, std::vector<int64_t>{3}).wait();
    for (int64_t i = 0; i < 6; ++i) REQUIRE(out.data<fp8_e4m3>()[i].bits == bits.data<fp8_e4m3>()[i].bits);
    REQUIRE_THROWS_WITH(world->reduce_scatter(bits, out), Catch::Contains("cannot sum fp8_e4m3"));
  }
  SECTION("dtype and shape mismatches") {
    REQUIRE_THROWS_WITH(world->all_reduce(Tensor::zeros({4}, DType::fp8_e4m3)), Catch::Contains("fp8_e4m3"));
    REQUIRE_THROWS_WITH(world->all_gather(f, Tensor::zeros({4, 2}, DType::f64)), Catch::Contains("dtypes differ"));
    REQUIRE_THROWS_WITH(world->all_gather(f, Tensor::zeros({4, 3}, DType::f32)), Catch::Contains("row shapes differ"));
    REQUIRE_THROWS_WITH(world->reduce_scatter(f, Tensor::zeros({3, 2}, DType::f32)),
                        Catch::Contains("must have 1 x the rows of out"));
    REQUIRE_THROWS_WITH(world->all_reduce(Tensor()), Catch::Contains("undefined"));
  }
  SECTION("peers, roots and tags outside the group") {
    REQUIRE_THROWS_WITH(world->send(f, 1), Catch::Contains("peer 1 is outside group 'world' of 1"));
    REQUIRE_THROWS_WITH(world->recv(f, 0, 40000), Catch::Contains("tag 40000"));
    REQUIRE_THROWS_WITH(world->broadcast(f, 2), Catch::Contains("root 2"));
  }
}

TEST_CASE("comm: the mesh factory builds every group and the world size is checked", "[comm]") {
  mpi();
  const MeshSizes one{};
  check_world_size(one, 8);
  MeshComms c = make_mpi_mesh_comms(build_mesh(one, 0), 7.0);
  for (Communicator* g : {c.world.get(), c.tp.get(), c.dp.get(), c.ep.get(), c.edp.get(), c.pp.get(), c.model.get()}) {
    REQUIRE(g->size() == 1);
    REQUIRE(g->timeout_s() == 7.0);
  }
  REQUIRE(c.ep->name() == "ep");
  REQUIRE(c.edp->name() == "edp");

  REQUIRE_THROWS_AS(check_world_size(MeshSizes{.pp = 1, .dp = 2, .tp = 1, .ep = 1}, 0), UserError);
  REQUIRE_THROWS_WITH(check_world_size(MeshSizes{.pp = 1, .dp = 2, .tp = 1, .ep = 1}, 0),
                      Catch::Contains("started 1 ranks") && Catch::Contains("needs 2"));
  REQUIRE_THROWS_WITH(make_mpi_world_communicator(0.0), Catch::Contains("parallel.comm_timeout_s must be > 0"));
}

TEST_CASE("launch env: OpenMPI, Slurm and no launcher", "[comm][launch]") {
  SECTION("OpenMPI") {
    const LaunchEnv e = read_launch_env(env_of({{"OMPI_COMM_WORLD_RANK", "5"},
                                                {"OMPI_COMM_WORLD_SIZE", "8"},
                                                {"OMPI_COMM_WORLD_LOCAL_RANK", "1"},
                                                {"OMPI_COMM_WORLD_LOCAL_SIZE", "4"}}));
    REQUIRE(e.launcher == "openmpi");
    REQUIRE((e.rank == 5 && e.world_size == 8 && e.local_rank == 1 && e.local_size == 4));
    REQUIRE(select_device(e, 4) == 1);
    REQUIRE(select_device(e, 1) == 0);
    REQUIRE(describe_launch(e) == "rank 5/8 (local 1/4, openmpi)");
  }
  SECTION("Slurm, without --ntasks-per-node") {
    const LaunchEnv e = read_launch_env(env_of({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "4"}, {"SLURM_LOCALID", "3"}}));
    REQUIRE(e.launcher == "slurm");
    REQUIRE((e.rank == 3 && e.world_size == 4 && e.local_rank == 3 && e.local_size == 4));
  }
  SECTION("mpirun inside a Slurm allocation: OpenMPI's variables describe the job") {
    const LaunchEnv e = read_launch_env(env_of(
        {{"SLURM_PROCID", "0"}, {"SLURM_NTASKS", "1"}, {"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "3"}}));
    REQUIRE(e.launcher == "openmpi");
    REQUIRE((e.rank == 2 && e.world_size == 3 && e.local_rank == 0));
  }
  SECTION("no launcher: one process") {
    const LaunchEnv e = read_launch_env(env_of({}));
    REQUIRE(e.launcher == "none");
    REQUIRE((e.rank == 0 && e.world_size == 1 && e.local_rank == 0));
  }
  SECTION("malformed values name the variable") {
    REQUIRE_THROWS_WITH(read_launch_env(env_of({{"SLURM_PROCID", "x1"}})),
                        Catch::Contains("SLURM_PROCID='x1' is not an integer >= 0"));
    REQUIRE_THROWS_WITH(read_launch_env(env_of({{"OMPI_COMM_WORLD_RANK", "4"}, {"OMPI_COMM_WORLD_SIZE", "4"}})),
                        Catch::Contains("OMPI_COMM_WORLD_RANK=4 but OMPI_COMM_WORLD_SIZE=4"));
    REQUIRE_THROWS_AS(read_launch_env(env_of({{"OMPI_COMM_WORLD_RANK", "0"}, {"OMPI_COMM_WORLD_SIZE", "0"}})),
                      UserError);
    REQUIRE_THROWS_AS(select_device(LaunchEnv{}, 0), UserError);
  }
}
