# GPU tests of the NCCL communicator (parallel/comm_nccl.h), run under mpirun like the tests in
# tests/parallel: -np 1 on any machine with a GPU, -np 2 where two GPUs are visible (the program
# prints why and exits 77, "Skipped", otherwise or where there is no GPU), -np 2 sharing one GPU,
# and a timeout fault that must end the job with a message naming the operation and the rank.
# Label gpu.
if(DSX_CUDA AND TARGET dsx_nccl)
  add_executable(dsx_gpu_parallel_tests
    ${CMAKE_CURRENT_LIST_DIR}/nccl_main.cpp
    ${CMAKE_CURRENT_LIST_DIR}/test_nccl_comm.cpp
    ${CMAKE_CURRENT_LIST_DIR}/sleep_kernel.cu)
  target_link_libraries(dsx_gpu_parallel_tests PRIVATE dsx_parallel Catch2::Catch2)
  target_include_directories(dsx_gpu_parallel_tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
  # One CUDA runtime in the process: the shared one dsx_kernels links, not nvcc's static copy.
  set_target_properties(dsx_gpu_parallel_tests PROPERTIES CUDA_RUNTIME_LIBRARY Shared)

  set(_dsx_nccl_env "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1;NCCL_DEBUG=WARN")
  set(_dsx_nccl_mpirun ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none)
  foreach(np 1 2)
    add_test(NAME gpu.nccl_comm_np${np}
             COMMAND ${_dsx_nccl_mpirun} -np ${np} $<TARGET_FILE:dsx_gpu_parallel_tests>)
    set_tests_properties(gpu.nccl_comm_np${np} PROPERTIES
                         LABELS gpu SKIP_RETURN_CODE 77 ENVIRONMENT "${_dsx_nccl_env}" TIMEOUT 300)
  endforeach()
  # Two ranks on one GPU, as the lent single-GPU machines have (nccl_main.cpp: each rank a host of
  # its own for NCCL, connected over sockets on the loopback interface): real two-rank sums,
  # all-to-all and splits. The [timing] case is left out: the two processes time-slice the GPU.
  add_test(NAME gpu.nccl_comm_np2_one_gpu
           COMMAND ${_dsx_nccl_mpirun} -np 2 $<TARGET_FILE:dsx_gpu_parallel_tests> ~[timing])
  set_tests_properties(gpu.nccl_comm_np2_one_gpu PROPERTIES
                       LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 300
                       ENVIRONMENT "${_dsx_nccl_env};DSX_NCCL_TEST_ONE_GPU=1;NCCL_SOCKET_IFNAME=lo;NCCL_IB_DISABLE=1;NCCL_MNNVL_ENABLE=0")
  # The job exits non-zero by design (MPI_Abort); the message is what passes it.
  add_test(NAME gpu.nccl_timeout
           COMMAND ${_dsx_nccl_mpirun} -np 1 $<TARGET_FILE:dsx_gpu_parallel_tests> --fault-timeout)
  set_tests_properties(gpu.nccl_timeout PROPERTIES
                       LABELS gpu ENVIRONMENT "${_dsx_nccl_env}" TIMEOUT 120
                       PASS_REGULAR_EXPRESSION "communication timeout: barrier #0 of group 'world' \\(NCCL[^\n]*on world rank 0"
                       SKIP_REGULAR_EXPRESSION "SKIPPED:")
endif()
