// The MPI backend of Communicator (parallel/comm.h): CPU tensors, non-blocking MPI calls on
// sub-communicators split from MPI_COMM_WORLD along the mesh's groups.
//
// Progress: OpenMPI advances non-blocking collectives only inside MPI calls, so a transfer
// started before a piece of compute moves while the compute calls CommHandle::test() or
// when wait() is reached.
#pragma once
#include <memory>

#include "parallel/comm.h"
#include "parallel/mesh.h"

namespace dsx {

// Exit status of a job aborted by a communication timeout or MPI error.
inline constexpr int kCommAbortExitCode = 3;

// MPI for the life of the process part that communicates: initialises MPI (thread level
// FUNNELED: only the thread that created the session calls MPI) unless already initialised,
// and finalises it on destruction if it initialised it. Communicators must be destroyed first.
class MpiSession {
 public:
  MpiSession();
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  int world_rank() const;
  int world_size() const;

 private:
  bool owns_ = false;
};

// A communicator over all ranks (MPI_COMM_WORLD duplicated). Collective over the world.
std::unique_ptr<Communicator> make_mpi_world_communicator(double timeout_s);

// Every group of `mesh` (this rank's mesh). Collective over the world: all ranks call it with
// the same sizes. Groups are split from the world in the mesh's group order, so a rank's
// index in each mesh group list is its rank in the communicator.
MeshComms make_mpi_mesh_comms(const Mesh& mesh, double timeout_s);

// Compares the world size MPI was started with to the recipe's layout (validate_mesh) and
// throws dsx::UserError with the same message on every rank when they differ.
void check_world_size(const MeshSizes& sizes, int64_t n_routed_experts);

}  // namespace dsx
