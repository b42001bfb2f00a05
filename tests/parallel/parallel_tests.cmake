# Multi-rank tests of the communicator: programs under tests/parallel/mpi run by mpirun.
# Each job is short (seconds) and uses at most 4 ranks, oversubscribing the cores.

add_executable(comm_check ${CMAKE_CURRENT_LIST_DIR}/mpi/comm_check.cpp)
target_link_libraries(comm_check PRIVATE dsx_parallel)

set(DSX_MPI_TEST_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1")
set(DSX_MPIRUN ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none)

foreach(np 2 4)
  add_test(NAME parallel.comm_collectives_np${np}
           COMMAND ${DSX_MPIRUN} -np ${np} $<TARGET_FILE:comm_check> collectives)
  add_test(NAME parallel.comm_world_size_np${np}
           COMMAND ${DSX_MPIRUN} -np ${np} $<TARGET_FILE:comm_check> world-size)
  set_tests_properties(parallel.comm_collectives_np${np} parallel.comm_world_size_np${np}
                       PROPERTIES ENVIRONMENT "${DSX_MPI_TEST_ENV}" TIMEOUT 120 LABELS parallel)
endforeach()

# all_to_all_blocks (MPI override and the default) against all_to_all_v, on 2 and 3 ranks.
add_executable(blocks_check ${CMAKE_CURRENT_LIST_DIR}/mpi/blocks_check.cpp)
target_link_libraries(blocks_check PRIVATE dsx_parallel)
foreach(np 2 3)
  add_test(NAME parallel.comm_all_to_all_blocks_np${np}
           COMMAND ${DSX_MPIRUN} -np ${np} $<TARGET_FILE:blocks_check>)
  set_tests_properties(parallel.comm_all_to_all_blocks_np${np}
                       PROPERTIES ENVIRONMENT "${DSX_MPI_TEST_ENV}" TIMEOUT 120 LABELS parallel)
endforeach()

# all_to_all_blocks with BlockMatch::blocks whose two sides cut a pair's rows differently: the
# job must end at once (well within the timeout) with a message naming the block.
foreach(kind larger smaller last unexpected)
  add_test(NAME parallel.comm_all_to_all_blocks_mismatch_${kind}
           COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/mpi/run_fault.sh ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:blocks_check>
                   2 mismatch ${kind} 30 20 "on world rank 1: block 0 .* of the rows from group rank 0 received .*blocks disagree")
  set_tests_properties(parallel.comm_all_to_all_blocks_mismatch_${kind}
                       PROPERTIES ENVIRONMENT "${DSX_MPI_TEST_ENV}" TIMEOUT 90 LABELS parallel)
endforeach()

# Faults: the job must end non-zero within comm_timeout_s + 10 s, name the victim rank, and
# leave no process. run_fault.sh MPIEXEC BIN NP MODE VICTIM TIMEOUT_S MAX_SECONDS REGEX
set(DSX_FAULT_TIMEOUT_S 4)
math(EXPR DSX_FAULT_MAX_S "${DSX_FAULT_TIMEOUT_S} + 10")
add_test(NAME parallel.comm_timeout_names_missing_rank
         COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/mpi/run_fault.sh ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:comm_check>
                 4 skip 2 ${DSX_FAULT_TIMEOUT_S} ${DSX_FAULT_MAX_S}
                 "all_reduce #1 of group 'world' .*Never arrived: ranks \\[2\\]")
add_test(NAME parallel.comm_sigkill_ends_job
         COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/mpi/run_fault.sh ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:comm_check>
                 4 kill 2 ${DSX_FAULT_TIMEOUT_S} ${DSX_FAULT_MAX_S}
                 "process rank 2 .*signal 9|Never arrived: ranks \\[2\\]")
set_tests_properties(parallel.comm_timeout_names_missing_rank parallel.comm_sigkill_ends_job
                     PROPERTIES ENVIRONMENT "${DSX_MPI_TEST_ENV}" TIMEOUT 90 LABELS parallel)
