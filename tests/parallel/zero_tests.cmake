# Multi-rank tests of the data-parallel optimizer (bucketed reduction, ZeRO-1, checkpoints):
# tests/parallel/mpi/zero_check.cpp run by mpirun, each job a few seconds on at most 4 ranks.

add_executable(zero_check ${CMAKE_CURRENT_LIST_DIR}/mpi/zero_check.cpp)
target_link_libraries(zero_check PRIVATE dsx_trainer)

set(DSX_ZERO_TEST_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1")
set(DSX_ZERO_MPIRUN ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none)

foreach(np 1 2 4)
  add_test(NAME parallel.zero_equivalence_np${np}
           COMMAND ${DSX_ZERO_MPIRUN} -np ${np} $<TARGET_FILE:zero_check> equivalence)
  set_tests_properties(parallel.zero_equivalence_np${np}
                       PROPERTIES ENVIRONMENT "${DSX_ZERO_TEST_ENV}" TIMEOUT 120 LABELS parallel)
endforeach()

# Saved by 4 ranks (and reloaded there in other layouts), then loaded by 2 ranks.
string(REPLACE ";" " " _dsx_zero_mpirun "${DSX_ZERO_MPIRUN}")
add_test(NAME parallel.zero_checkpoint_np4_to_np2
         COMMAND sh -c "d=$(mktemp -d) && ${_dsx_zero_mpirun} -np 4 $<TARGET_FILE:zero_check> ckpt \"$d\" && ${_dsx_zero_mpirun} -np 2 $<TARGET_FILE:zero_check> ckpt-load \"$d\"; rc=$?; rm -rf \"$d\"; exit $rc")
set_tests_properties(parallel.zero_checkpoint_np4_to_np2
                     PROPERTIES ENVIRONMENT "${DSX_ZERO_TEST_ENV}" TIMEOUT 120 LABELS parallel)
