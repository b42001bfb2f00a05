# `mpirun -np N dsx train` gives the single-process result (issue: multi-rank training).
# Every layout trains the tiny recipe (8 routed experts, MTP, 6 steps of 8 sequences) and must
# match the single-process run of the same recipe in every step's loss and in every parameter
# and optimizer moment of the final checkpoint, relative error ≤ 1e-5.
#
# Why 1e-5 in fp32: the layouts sum the same gradients in another order (over micro-batches,
# then over ranks) and run the experts' GEMMs on differently batched rows, so results differ by
# a few fp32 roundings (~1e-7 relative) per step; AdamW's normalised update keeps that from
# growing much over 6 steps. What the test must catch — a token routed to the wrong rank, a
# gradient reduced over the wrong group or not scaled, a moment shard misplaced — gives errors
# of 1e-2 or more.
add_executable(compare_runs ${CMAKE_CURRENT_LIST_DIR}/parallel/compare_runs.cpp)
target_link_libraries(compare_runs PRIVATE dsx_trainer)

set(DSX_LAYOUT_WORK ${CMAKE_CURRENT_BINARY_DIR}/parallel_runs)
set(DSX_LAYOUT_RUN sh ${CMAKE_CURRENT_LIST_DIR}/parallel/run_layout.sh $<TARGET_FILE:dsx> ${MPIEXEC_EXECUTABLE}
                   $<TARGET_FILE:compare_runs> ${DSX_LAYOUT_WORK})
set(DSX_LAYOUT_ENV "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1")
set(DSX_LAYOUT_RTOL 1e-5)

add_test(NAME parallel_train.reference COMMAND ${DSX_LAYOUT_RUN} reference 0 0)
set_tests_properties(parallel_train.reference PROPERTIES FIXTURES_SETUP layout_reference)

# name  ranks  recipe overrides
set(DSX_LAYOUTS
    "dp2|2|--set parallel.dp=2 --set parallel.zero=0"
    "dp2_zero1|2|--set parallel.dp=2 --set parallel.zero=1 --set logging.rank_logs=true"
    "dp2_ep2|2|--set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=1"
    "dp4_ep4|4|--set parallel.dp=4 --set parallel.ep=4 --set parallel.zero=0"
    "dp4_ep4_no_overlap|4|--set parallel.dp=4 --set parallel.ep=4 --set parallel.zero=0 --set parallel.overlap_a2a=false"
    "dp4_ep2|4|--set parallel.dp=4 --set parallel.ep=2 --set parallel.zero=1"
    "dp8_ep4_zero1|8|--set parallel.dp=8 --set parallel.ep=4 --set parallel.zero=1"
    # Pipeline parallelism (1F1B, 8 micro-batches): 2 stages; 4 stages of one layer each, the two
    # middle ones passing the MTP embeddings on; and PP with DP, EP and ZeRO-1 at once.
    "pp2|2|--set parallel.pp=2"
    "pp4|4|--set parallel.pp=4"
    "pp2_dp2_ep2_zero1|4|--set parallel.pp=2 --set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=1"
    # Zero-bubble (input and weight passes split, the weight passes filling the waits).
    "pp4_zero_bubble|4|--set parallel.pp=4 --set parallel.pp_schedule=zero_bubble"
    "pp2_dp2_zero_bubble_zero1|4|--set parallel.pp=2 --set parallel.dp=2 --set parallel.zero=1 --set parallel.pp_schedule=zero_bubble"
    # DualPipeV: 4 stages of one layer on 2 ranks, rank 0 holding layers 0 and 3 with the
    # embedding, head and MTP module, rank 1 layers 1 and 2 (the bottom of the V); alone and with
    # DP, EP and ZeRO-1.
    "pp2_dualpipev|2|--set parallel.pp=2 --set parallel.pp_schedule=dualpipev"
    # The balanced split: 3 layers on the first stage, 1 with the head and MTP on the last.
    "pp2_balanced|2|--set parallel.pp=2 --set parallel.pp_split=balanced"
    "pp2_dp2_ep2_dualpipev_zero1|4|--set parallel.pp=2 --set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=1 --set parallel.pp_schedule=dualpipev"
    # Interleaved 1F1B: 4 stages of one layer dealt round 2 ranks (rank 0 layers 0 and 2 with the
    # embedding, rank 1 layers 1 and 3 with the head and MTP; the MTP embeddings pass through
    # stages 1 and 2, and rank 1's chunk 0 sends to rank 0's chunk 1); alone, with DP, EP and
    # ZeRO-1, and under TP with sequence parallelism.
    "pp2_interleaved|2|--set parallel.pp=2 --set parallel.pp_schedule=interleaved_1f1b"
    "pp2_dp2_ep2_zero1_interleaved|4|--set parallel.pp=2 --set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=1 --set parallel.pp_schedule=interleaved_1f1b"
    "pp2_tp2_sp_interleaved|4|--set parallel.pp=2 --set parallel.tp=2 --set parallel.sequence_parallel=true --set parallel.pp_schedule=interleaved_1f1b"
    # Tensor parallelism: heads, MLP widths and the vocabulary split over 2 ranks, the routed
    # experts over the EP × TP ranks; with DP and ZeRO-1, with EP (experts over 4 ranks), under
    # pipeline stages, and with every step's full recompute and the overlapped dispatch off.
    "tp2|2|--set parallel.tp=2"
    "tp2_dp2_zero1|4|--set parallel.tp=2 --set parallel.dp=2 --set parallel.zero=1"
    "tp2_dp2_ep2|4|--set parallel.tp=2 --set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=0"
    "pp2_tp2|4|--set parallel.pp=2 --set parallel.tp=2"
    "tp2_recompute_no_overlap|2|--set parallel.tp=2 --set train.recompute=[full] --set parallel.overlap_a2a=false"
    # Sequence parallelism: the residual stream and the norms on half of the tokens per rank.
    "tp2_sp|2|--set parallel.tp=2 --set parallel.sequence_parallel=true"
    "tp2_sp_dp2_ep2_zero1|4|--set parallel.tp=2 --set parallel.sequence_parallel=true --set parallel.dp=2 --set parallel.ep=2 --set parallel.zero=1"
    "tp2_sp_recompute|2|--set parallel.tp=2 --set parallel.sequence_parallel=true --set train.recompute=[rmsnorm,mla_up_proj,moe_act]"
    # ... and under pipeline stages, which then pass each rank's half of the tokens (hidden states
    # and MTP embeddings): 1F1B over 4 stages (the middle ones passing the MTP embeddings on) and
    # DualPipeV (rank 0 keeping them).
    "pp4_tp2_sp|8|--set parallel.pp=4 --set parallel.tp=2 --set parallel.sequence_parallel=true"
    "pp2_tp2_sp_dualpipev|4|--set parallel.pp=2 --set parallel.tp=2 --set parallel.sequence_parallel=true --set parallel.pp_schedule=dualpipev")
# "name|np|overrides" -> name, np and the override arguments, in the caller's scope.
macro(dsx_split_layout entry)
  string(REPLACE "|" ";" fields "${entry}")
  list(GET fields 0 name)
  list(GET fields 1 np)
  list(GET fields 2 overrides)
  separate_arguments(overrides UNIX_COMMAND "${overrides}")
endmacro()
set(DSX_LAYOUT_TESTS parallel_train.reference)
foreach(layout ${DSX_LAYOUTS})
  dsx_split_layout("${layout}")
  add_test(NAME parallel_train.${name} COMMAND ${DSX_LAYOUT_RUN} ${name} ${np} ${DSX_LAYOUT_RTOL} ${overrides})
  set_tests_properties(parallel_train.${name} PROPERTIES FIXTURES_REQUIRED layout_reference)
  list(APPEND DSX_LAYOUT_TESTS parallel_train.${name})
endforeach()

# DeepSeek-V3's wire formats: tokens dispatched in FP8 (1×128 scales), combined in bf16. The
# numerics differ from the reference on purpose; the loss curve must stay within 1%: one E4M3
# rounding (≤ 6.25% per element, ~2% RMS) of the experts' inputs and one bf16 rounding of their
# outputs move a 6-step loss of ~8 by about 1e-3 relative.
add_test(NAME parallel_train.dp2_ep2_fp8_dispatch
         COMMAND ${DSX_LAYOUT_RUN} dp2_ep2_fp8_dispatch 2 1e-2L --set parallel.dp=2 --set parallel.ep=2
                 --set precision.dispatch=fp8 --set precision.combine=bf16)
set_tests_properties(parallel_train.dp2_ep2_fp8_dispatch PROPERTIES FIXTURES_REQUIRED layout_reference)
list(APPEND DSX_LAYOUT_TESTS parallel_train.dp2_ep2_fp8_dispatch)

# Pipeline stages with DeepSeek-V3's precision recipe (FP8 GEMMs, bf16 activations) and full
# recompute: the same bits as one process with the same settings (its own reference).
set(DSX_LAYOUT_FP8 --set precision.gemm=fp8_blockwise --set precision.activations=bf16 --set train.recompute=[full])
add_test(NAME parallel_train.reference_fp8 COMMAND ${DSX_LAYOUT_RUN} reference_fp8 0 0 ${DSX_LAYOUT_FP8})
add_test(NAME parallel_train.pp2_fp8_recompute
         COMMAND ${DSX_LAYOUT_RUN} pp2_fp8_recompute 2 ${DSX_LAYOUT_RTOL} --set parallel.pp=2 ${DSX_LAYOUT_FP8})
set_tests_properties(parallel_train.reference_fp8 PROPERTIES FIXTURES_SETUP layout_reference_fp8
                     ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel RESOURCE_LOCK mpi_cores)
# Tensor parallelism with the same precision recipe cannot give the same bits: a row-parallel GEMM
# quantizes each rank's part of its input dimension in its own 1x128 tiles (64 columns per rank in
# this model, against 128 in one process), and each rank rounds its partial output to bf16 before
# the sum. The loss curve must stay within 0.5% (measured 5.3e-4 relative over 6 steps).
add_test(NAME parallel_train.tp2_fp8_recompute
         COMMAND ${DSX_LAYOUT_RUN} tp2_fp8_recompute 2 5e-3L --set parallel.tp=2 ${DSX_LAYOUT_FP8})
set_tests_properties(parallel_train.pp2_fp8_recompute parallel_train.tp2_fp8_recompute PROPERTIES
                     FIXTURES_REQUIRED layout_reference_fp8
                     ENVIRONMENT "${DSX_LAYOUT_ENV};DSX_LAYOUT_REFERENCE=reference_fp8" TIMEOUT 300 LABELS parallel
                     RESOURCE_LOCK mpi_cores)

# The weight EMA (optim.ema_decay): each rank averages what it writes to checkpoints, so layouts
# that split tensors over TP, layers over PP and experts over EP, with DP replicas keeping none,
# together store the same ema.* tensors as one process (compared like the weights, 1e-5).
set(DSX_LAYOUT_EMA --set optim.ema_decay=0.9)
add_test(NAME parallel_train.reference_ema COMMAND ${DSX_LAYOUT_RUN} reference_ema 0 0 ${DSX_LAYOUT_EMA})
add_test(NAME parallel_train.tp2_dp2_zero1_ema
         COMMAND ${DSX_LAYOUT_RUN} tp2_dp2_zero1_ema 4 ${DSX_LAYOUT_RTOL} --set parallel.tp=2 --set parallel.dp=2
                 --set parallel.zero=1 ${DSX_LAYOUT_EMA})
add_test(NAME parallel_train.pp2_dp2_ep2_zero1_ema
         COMMAND ${DSX_LAYOUT_RUN} pp2_dp2_ep2_zero1_ema 4 ${DSX_LAYOUT_RTOL} --set parallel.pp=2 --set parallel.dp=2
                 --set parallel.ep=2 --set parallel.zero=1 ${DSX_LAYOUT_EMA})
set_tests_properties(parallel_train.reference_ema PROPERTIES FIXTURES_SETUP layout_reference_ema
                     ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel RESOURCE_LOCK mpi_cores)
set_tests_properties(parallel_train.tp2_dp2_zero1_ema parallel_train.pp2_dp2_ep2_zero1_ema PROPERTIES
                     FIXTURES_REQUIRED layout_reference_ema
                     ENVIRONMENT "${DSX_LAYOUT_ENV};DSX_LAYOUT_REFERENCE=reference_ema" TIMEOUT 300 LABELS parallel
                     RESOURCE_LOCK mpi_cores)

# DualPipeV on three ranks (six stages of one layer, so a six-layer model with its own reference):
# the layout whose transfers would deadlock on one in-order stream, here on non-blocking MPI.
# Interleaved 1F1B over six stages too.
add_test(NAME parallel_train.reference_6_layers
         COMMAND ${DSX_LAYOUT_RUN} reference_6_layers 0 0 --set model.num_hidden_layers=6)
add_test(NAME parallel_train.pp3_dualpipev
         COMMAND ${DSX_LAYOUT_RUN} pp3_dualpipev 3 ${DSX_LAYOUT_RTOL} --set model.num_hidden_layers=6
                 --set parallel.pp=3 --set parallel.pp_schedule=dualpipev)
# Interleaved 1F1B with three chunks per rank (six one-layer stages on two ranks, two turns).
add_test(NAME parallel_train.pp2_interleaved_3_chunks
         COMMAND ${DSX_LAYOUT_RUN} pp2_interleaved_3_chunks 2 ${DSX_LAYOUT_RTOL} --set model.num_hidden_layers=6
                 --set parallel.pp=2 --set parallel.pp_schedule=interleaved_1f1b --set parallel.pp_chunks=3)
set_tests_properties(parallel_train.reference_6_layers PROPERTIES FIXTURES_SETUP layout_reference_6_layers
                     ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel RESOURCE_LOCK mpi_cores)
set_tests_properties(parallel_train.pp3_dualpipev parallel_train.pp2_interleaved_3_chunks PROPERTIES FIXTURES_REQUIRED layout_reference_6_layers
                     ENVIRONMENT "${DSX_LAYOUT_ENV};DSX_LAYOUT_REFERENCE=reference_6_layers" TIMEOUT 300
                     LABELS parallel RESOURCE_LOCK mpi_cores)

# Resume tests: WRITER's checkpoints are copied into a fresh run directory and training goes on
# there with each target layout ("name|np|overrides", np 0 = one process); every one must end at
# the reference's final state.
function(dsx_layout_resume_tests prefix writer fixture)
  foreach(target ${ARGN})
    dsx_split_layout("${target}")
    set(test parallel_train.resume_${prefix}_as_${name})
    add_test(NAME ${test}
             COMMAND sh -c "rm -rf \"$1\" && mkdir -p \"$1\" && cp -r \"$2/checkpoints\" \"$1/\" && shift 2 && exec \"$@\""
                     resume ${DSX_LAYOUT_WORK}/resume-${prefix}-${name} ${DSX_LAYOUT_WORK}/${writer}
                     ${DSX_LAYOUT_RUN} resume-${prefix}-${name} ${np} ${DSX_LAYOUT_RTOL} ${overrides})
    set_tests_properties(${test} PROPERTIES FIXTURES_REQUIRED "layout_reference;${fixture}"
                         ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel RESOURCE_LOCK mpi_cores)
  endforeach()
endfunction()

# A checkpoint written by 4 ranks (EP4) at step 3 resumes with 2 ranks (EP2) and with 1 process,
# and both continue the reference's loss curve to the same final state.
add_test(NAME parallel_train.ep4_writer COMMAND ${DSX_LAYOUT_RUN} ep4_writer 4 ${DSX_LAYOUT_RTOL}
         --set parallel.dp=4 --set parallel.ep=4 --set parallel.zero=1 --stop-after 3)
set_tests_properties(parallel_train.ep4_writer PROPERTIES FIXTURES_REQUIRED layout_reference
                     FIXTURES_SETUP ep4_checkpoint)
list(APPEND DSX_LAYOUT_TESTS parallel_train.ep4_writer)  # its environment (run as root) like the others
dsx_layout_resume_tests(ep4 ep4_writer ep4_checkpoint "ep2|2|--set parallel.dp=2 --set parallel.ep=2" "single|0|")
set_tests_properties(${DSX_LAYOUT_TESTS} PROPERTIES ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel
                     RESOURCE_LOCK mpi_cores)

# A checkpoint written by a 2-stage pipeline with DP2 + ZeRO-1 (each stage writes its own layers)
# resumes in one process, as a 4-stage pipeline, with the balanced split (3 + 1 layers) and as a
# DualPipeV (two chunks per rank): checkpoints name tensors, not ranks or stages.
add_test(NAME parallel_train.pp2_writer COMMAND ${DSX_LAYOUT_RUN} pp2_writer 4 ${DSX_LAYOUT_RTOL}
         --set parallel.pp=2 --set parallel.dp=2 --set parallel.zero=1 --stop-after 3)
set_tests_properties(parallel_train.pp2_writer PROPERTIES FIXTURES_REQUIRED layout_reference
                     FIXTURES_SETUP pp2_checkpoint ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel
                     RESOURCE_LOCK mpi_cores)
dsx_layout_resume_tests(pp2 pp2_writer pp2_checkpoint "pp4|4|--set parallel.pp=4" "single|0|"
                        "pp2_balanced|2|--set parallel.pp=2 --set parallel.pp_split=balanced"
                        "pp2_dualpipev|2|--set parallel.pp=2 --set parallel.pp_schedule=dualpipev"
                        "tp2|2|--set parallel.tp=2")

# A checkpoint written with TP2 x DP2 + ZeRO-1 (each TP rank writes its box of the split tensors,
# moments as boxes of their parameters' shapes) resumes in one process and as TP2 alone.
add_test(NAME parallel_train.tp2_writer COMMAND ${DSX_LAYOUT_RUN} tp2_writer 4 ${DSX_LAYOUT_RTOL}
         --set parallel.tp=2 --set parallel.dp=2 --set parallel.zero=1 --stop-after 3)
set_tests_properties(parallel_train.tp2_writer PROPERTIES FIXTURES_REQUIRED layout_reference
                     FIXTURES_SETUP tp2_checkpoint ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300 LABELS parallel
                     RESOURCE_LOCK mpi_cores)
dsx_layout_resume_tests(tp2 tp2_writer tp2_checkpoint "single|0|" "tp2|2|--set parallel.tp=2")

# A rank SIGKILLed mid-training ends the whole job within comm_timeout_s + 10 s, naming it.
add_test(NAME parallel_train.sigkill_rank_ends_job
         COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/parallel/kill_rank.sh $<TARGET_FILE:dsx> ${MPIEXEC_EXECUTABLE}
                 ${DSX_LAYOUT_WORK} 2 4)
set_tests_properties(parallel_train.sigkill_rank_ends_job PROPERTIES ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300
                     LABELS parallel RESOURCE_LOCK mpi_cores)

# SIGTERM to one rank of a two-stage pipeline: all ranks stop at one step with a complete
# checkpoint, and the resumed run ends where an uninterrupted single-process run ends.
add_test(NAME parallel_train.sigterm_rank_stops_all_pp2
         COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/parallel/term_rank.sh $<TARGET_FILE:dsx> ${MPIEXEC_EXECUTABLE}
                 $<TARGET_FILE:compare_runs> ${DSX_LAYOUT_WORK} 1)
set_tests_properties(parallel_train.sigterm_rank_stops_all_pp2 PROPERTIES ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 300
                     LABELS parallel RESOURCE_LOCK mpi_cores)

# Layouts that do not fit how the job was started fail before any work, saying what to do.
add_test(NAME parallel_train.started_alone
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh 2 "started alone; launch it with mpirun -np 2" --
                 $<TARGET_FILE:dsx> train ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --set parallel.dp=2
                 --set logging.run_dir=${DSX_LAYOUT_WORK}/started_alone)
add_test(NAME parallel_train.world_size_mismatch
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh 2 "the launcher started 2 ranks but the recipe's layout" --
                 ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none -np 2 $<TARGET_FILE:dsx> train
                 ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --set parallel.dp=4 --set train.micro_batch=4
                 --set logging.run_dir=${DSX_LAYOUT_WORK}/world_size_mismatch)
# Layouts this build cannot train yet are refused before any work, naming the key.
add_test(NAME parallel_train.pp_dualpipe_refused
         COMMAND ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh 2 "parallel.pp_schedule: dualpipe is not built yet; use 1f1b, interleaved_1f1b, zero_bubble or dualpipev" --
                 ${MPIEXEC_EXECUTABLE} --oversubscribe --bind-to none -np 2 $<TARGET_FILE:dsx> train
                 ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --set parallel.pp=2 --set parallel.pp_schedule=dualpipe
                 --set train.global_batch=8 --set train.micro_batch=1
                 --set logging.run_dir=${DSX_LAYOUT_WORK}/pp_dualpipe_refused)
set_tests_properties(parallel_train.started_alone parallel_train.world_size_mismatch parallel_train.pp_dualpipe_refused
                     PROPERTIES ENVIRONMENT "${DSX_LAYOUT_ENV}" TIMEOUT 60 LABELS parallel)
