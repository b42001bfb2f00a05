// The NCCL backend of Communicator (parallel/comm.h): GPU tensors, one NCCL communicator per
// group. Built only with DSX_CUDA (the CPU build has no such header in its library).
//
// Making them — after the device is chosen (cuda::select_device(local rank)), because an NCCL
// communicator belongs to the device that is current when it is made:
//
//   MpiSession mpi;
//   MeshComms host = make_mpi_mesh_comms(mesh, timeout_s);   // host tensors (as today)
//   MeshComms gpu = make_nccl_mesh_comms(mesh, *host.world);  // GPU tensors, same groups
//
// or one group at a time: make_nccl_communicator(*host.dp) bootstraps over that MPI group, and
// NcclCommunicator::split() carves sub-groups out of an NCCL communicator. Every call is
// collective over the ranks of the parent (all of them call it, in the same order).
// Keep both: the NCCL communicators refuse host tensors and the MPI ones refuse GPU tensors, so
// host scalars (loss sums, flags), exchange_counts() (it moves host i64 counts) and checkpoint
// barriers stay on the MPI communicators.
//
// Streams (the non-blocking contract of comm.h mapped onto CUDA): all NCCL communicators of a
// device share one high-priority communication stream. An operation records an event on the
// calling thread's current stream (cuda::current_stream(), the compute stream) and makes the
// communication stream wait for it, so it sees everything computed before the call; the
// transfer then runs on the communication stream while later compute proceeds. wait() does
// not block the host: it makes the stream that is current at the wait() wait for an event
// recorded after the transfer, so compute enqueued after wait() sees the results. test() asks
// whether that event has completed (cudaEventQuery); true means the results are in place for
// the host and every stream. barrier() is the exception: its wait() blocks the host until
// every rank has arrived, like the MPI barrier.
// Because the stream is shared, operations run in the order they were issued on this rank, over
// all groups: ranks must issue operations on different groups in the same order (SPMD code
// does), or two groups can wait on each other across ranks.
//
// Point to point: NCCL matches sends and receives in issue order per pair of ranks and has no
// tags; tags are checked like the MPI ones but the messages of a pair must be posted in the
// same order on both sides. A send() or recv() is launched when its handle is waited on or
// tested, or when the next operation of any NCCL communicator of the device is issued — the
// sends and receives pending then go out together (one NCCL group per communicator), so a rank
// may post a send and the matching exchange's receive before waiting on either (launched one by
// one, the two ranks' sends would wait for each other's receives).
//
// bf16 sums are computed in f32 (widened on the compute stream, summed as f32, rounded back once
// on the communication stream), as the MPI backend does. Data that is only moved (gathers,
// broadcasts, all-to-all, send/recv) travels as bytes, so FP8 moves like any other dtype.
//
// Failures: an NCCL error, or an operation that has not completed within the communicator's
// timeout (the MPI parent's parallel.comm_timeout_s) when the host waits for it (barrier's wait,
// test(), a wait() reached after the timeout, communicator creation and destruction), prints one
// message naming the operation, the group and this rank, aborts the NCCL communicator
// (ncclCommAbort) and ends the job (MPI_Abort, exit status kCommAbortExitCode). The
// communicators are non-blocking NCCL communicators, so creation and enqueueing poll
// ncclCommGetAsyncError instead of blocking inside NCCL. A hang that only compute waits on (the
// host never asks) shows at the next host synchronisation; the timeout applies from there.
#pragma once
#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "parallel/comm.h"
#include "parallel/mesh.h"

namespace dsx {

struct NcclGroup;  // the NCCL communicator and its bookkeeping (parallel/comm_nccl.cpp)

class NcclCommunicator final : public Communicator {
 public:
  explicit NcclCommunicator(std::shared_ptr<NcclGroup> group);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override;
  int size() const override;
  const std::string& name() const override;
  const std::vector<int>& world_ranks() const override;
  double timeout_s() const override;

  CommHandle all_reduce(const Tensor& t) override;
  CommHandle reduce_scatter(const Tensor& in, const Tensor& out) override;
  CommHandle all_gather(const Tensor& in, const Tensor& out) override;
  CommHandle all_to_all_v(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                          std::span<const int64_t> recv_counts) override;
  CommHandle send(const Tensor& t, int peer, int tag = 0) override;
  CommHandle recv(const Tensor& t, int peer, int tag = 0) override;
  CommHandle broadcast(const Tensor& t, int root) override;
  CommHandle barrier() override;

  // A communicator over `members` (world ranks, in the new group's rank order; this rank among
  // them), split from this one with ncclCommSplit. Collective over this communicator: every
  // rank calls it with its own group's members, and the groups partition this group's ranks.
  std::unique_ptr<NcclCommunicator> split(const std::string& name, const std::vector<int>& members);

  Device tensor_device() const override { return Device::cuda; }
  cudaStream_t stream() const;  // the communication stream the transfers run on
  int device() const;           // the CUDA device the communicator was made on

 private:
  std::shared_ptr<NcclGroup> g_;
};

// An NCCL communicator over the same ranks as `parent`, an MPI (host tensor) communicator: its
// rank 0 makes an ncclUniqueId and broadcasts it over `parent`. Same name, world ranks and
// timeout as the parent. Collective over `parent`; uses the current CUDA device.
std::unique_ptr<NcclCommunicator> make_nccl_communicator(Communicator& parent);

// Every group of `mesh` as NCCL communicators: the world bootstrapped over `mpi_world` (the
// MPI world communicator, e.g. make_mpi_mesh_comms(...).world), the TP/DP/EP/EDP/PP/model
// groups split from it. Collective over the world; each rank's index in a mesh group list is
// its rank in the communicator, as with make_mpi_mesh_comms.
MeshComms make_nccl_mesh_comms(const Mesh& mesh, Communicator& mpi_world);

}  // namespace dsx
