# `mpirun -np N dsx grpo` (data parallelism, parallel.dp = N) gives the single-process result.
# A few GRPO steps of recipes/tiny-grpo.yaml (settings in grpo_parallel/run_grpo_layout.sh) run
# in one process and on 2 ranks; every metrics line (SFT, evaluations, GRPO steps: rewards,
# accuracy, loss, gradient norm, KL, clip fractions, entropy, lengths, counts) and every tensor
# of the final checkpoint (policy, reference model, AdamW moments) must agree:
#
# - dp2 in f64, relative error ≤ 1e-10 (measured 4e-15): the ranks sample the same completions
#   (per-request Philox seeds keyed by the request's index in the whole step) and compute the
#   same numbers, only summed in another order (gradients over 2 ranks, per-rank partial sums of
#   the loss and metrics, differently batched GEMM rows), a few f64 roundings (1e-16) per step.
#   Any logic error is orders of magnitude above: padding rows to each rank's own longest row
#   (the router counts pad positions into its loads) gave 4e-2 on a router bias; a normaliser
#   over one rank's tokens instead of the step's is a factor ~2.
# - dp2 with ZeRO-1 in f32 (the recipe's dtype), relative error ≤ 1e-5 (measured 5e-6): the same
#   reorderings cost ~1e-7 per fp32 rounding, and AdamW's normalised update (m/√v) turns the
#   rounding noise of near-zero gradient elements into parameter differences of that order.
add_executable(compare_grpo_runs ${CMAKE_CURRENT_LIST_DIR}/grpo_parallel/compare_grpo_runs.cpp)
target_link_libraries(compare_grpo_runs PRIVATE dsx_trainer)

set(DSX_GRPO_DP_WORK ${CMAKE_CURRENT_BINARY_DIR}/grpo_parallel_runs)
set(DSX_GRPO_DP_RUN sh ${CMAKE_CURRENT_LIST_DIR}/grpo_parallel/run_grpo_layout.sh $<TARGET_FILE:dsx>
                    ${MPIEXEC_EXECUTABLE} $<TARGET_FILE:compare_grpo_runs> ${DSX_GRPO_DP_WORK})
add_test(NAME grpo_parallel.reference_f64 COMMAND ${DSX_GRPO_DP_RUN} reference_f64 - 0 0 --set model.dtype=f64)
add_test(NAME grpo_parallel.reference_f32 COMMAND ${DSX_GRPO_DP_RUN} reference_f32 - 0 0)
set_tests_properties(grpo_parallel.reference_f64 PROPERTIES FIXTURES_SETUP grpo_dp_reference_f64)
set_tests_properties(grpo_parallel.reference_f32 PROPERTIES FIXTURES_SETUP grpo_dp_reference_f32)
add_test(NAME grpo_parallel.dp2_f64 COMMAND ${DSX_GRPO_DP_RUN} dp2_f64 reference_f64 2 1e-10
         --set model.dtype=f64 --set parallel.dp=2 --set parallel.zero=0)
add_test(NAME grpo_parallel.dp2_zero1_f32 COMMAND ${DSX_GRPO_DP_RUN} dp2_zero1_f32 reference_f32 2 1e-5
         --set parallel.dp=2 --set parallel.zero=1)
set_tests_properties(grpo_parallel.dp2_f64 PROPERTIES FIXTURES_REQUIRED grpo_dp_reference_f64)
set_tests_properties(grpo_parallel.dp2_zero1_f32 PROPERTIES FIXTURES_REQUIRED grpo_dp_reference_f32)
set_tests_properties(grpo_parallel.reference_f64 grpo_parallel.reference_f32 grpo_parallel.dp2_f64
                     grpo_parallel.dp2_zero1_f32 PROPERTIES
                     ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1"
                     TIMEOUT 300 LABELS "trainer;grpo;parallel" RESOURCE_LOCK mpi_cores)

# Layouts the GRPO stage refuses, before any work, with a message naming the key.
set(_dsx_grpo_dp_expect bash ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh)
set(_dsx_grpo_dp_recipe ${PROJECT_SOURCE_DIR}/recipes/tiny-grpo.yaml)
function(dsx_grpo_layout_test name)
  add_test(NAME grpo_parallel.refuse.${name} COMMAND ${_dsx_grpo_dp_expect} ${ARGN})
  set_tests_properties(grpo_parallel.refuse.${name} PROPERTIES LABELS "trainer;grpo" WORKING_DIRECTORY /tmp)
endfunction()
dsx_grpo_layout_test(ep 2 "`parallel.ep` (2): the GRPO stage does not shard experts"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.dp=2 --set parallel.ep=2)
dsx_grpo_layout_test(pp 2 "`parallel.pp` (2): the GRPO stage runs data-parallel only"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.pp=2)
dsx_grpo_layout_test(tp 2 "`parallel.tp` (2): the GRPO stage runs data-parallel only"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.tp=2)
dsx_grpo_layout_test(uneven_prompts 2 "`grpo.prompts_per_step` (6) must be a multiple of `parallel.dp` (4)"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.dp=4 --set grpo.prompts_per_step=6)
dsx_grpo_layout_test(shuffled_advantages 2 "`grpo.debug_advantages: shuffled` permutes advantages across the whole step"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.dp=2 --set grpo.debug_advantages=shuffled)
dsx_grpo_layout_test(lr_in_tokens 2 "the GRPO stage counts steps: give `optim.schedule` (and its segments) in steps"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set optim.schedule.unit=tokens)
# The pre-training batch keys do not constrain the GRPO stage's layout (its batches are prompt groups).
add_test(NAME grpo_parallel.train_global_batch_unused COMMAND ${_dsx_grpo_dp_expect} 0 "valid"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_dp_recipe} --set parallel.dp=2 --set train.global_batch=3)
set_tests_properties(grpo_parallel.train_global_batch_unused PROPERTIES LABELS "trainer;grpo" WORKING_DIRECTORY /tmp)
# parallel.dp = 2 started as one process: says how to launch it, before touching MPI.
dsx_grpo_layout_test(started_alone 2 "needs that many processes" "mpirun -np 2"
  -- $<TARGET_FILE:dsx> grpo ${_dsx_grpo_dp_recipe} --set parallel.dp=2 --set checkpoint.resume=never
     --set logging.run_dir=${CMAKE_CURRENT_BINARY_DIR}/grpo-dp-alone)
