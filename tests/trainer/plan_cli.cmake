# `dsx plan` through the real binary.
#
# Its memory estimate against what runs measured: every multi-rank layout of parallel_train.cmake
# (and the single-process reference) leaves a metrics.jsonl whose last step holds rank 0's peak of
# live tensor memory; `dsx plan --measured` compares it with the estimate for rank 0 of the run's
# resolved recipe and exits 1 when they are more than 15% apart. Measured on these runs: ratios
# 0.91 (pp4 x tp2 with sequence parallelism: small temporaries the estimate leaves out weigh more
# in a 2.6 MiB rank) to 1.00. What the bound catches: a held tensor counted twice or not at all,
# e.g. ZeRO-1's reduced-gradient shard counted for a group of one (which reads the bucket in
# place) put dp2 x ep2 at 1.08, the dispatched MoE rows kept after sending at more. The
# single-process checks with activations as large as the model state are in
# test_layout_plan.cpp.
set(_dsx_plan_expect bash ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh)
if(NOT DEFINED DSX_LAYOUTS)  # tests/CMakeLists.txt includes parallel_train.cmake first (alphabetical)
  message(FATAL_ERROR "plan_cli.cmake needs DSX_LAYOUTS from parallel_train.cmake")
endif()
set(_dsx_plan_checked reference)
foreach(layout ${DSX_LAYOUTS})
  dsx_split_layout("${layout}")
  set_tests_properties(parallel_train.${name} PROPERTIES FIXTURES_SETUP layout_run_${name})
  list(APPEND _dsx_plan_checked ${name})
endforeach()
set_tests_properties(parallel_train.reference PROPERTIES FIXTURES_SETUP "layout_reference;layout_run_reference")
# the weight-EMA runs too (the EMA is host memory, part of a CPU rank's peak)
set_tests_properties(parallel_train.reference_ema PROPERTIES
                     FIXTURES_SETUP "layout_reference_ema;layout_run_reference_ema")
foreach(name tp2_dp2_zero1_ema pp2_dp2_ep2_zero1_ema)
  set_tests_properties(parallel_train.${name} PROPERTIES FIXTURES_SETUP layout_run_${name})
endforeach()
list(APPEND _dsx_plan_checked reference_ema tp2_dp2_zero1_ema pp2_dp2_ep2_zero1_ema)
foreach(name ${_dsx_plan_checked})
  add_test(NAME plan_cli.memory_${name}
           COMMAND ${_dsx_plan_expect} 0 "pipeline rank 0: estimated" "ratio" --
                   $<TARGET_FILE:dsx> plan ${DSX_LAYOUT_WORK}/${name}/recipe.yaml --measured ${DSX_LAYOUT_WORK}/${name}
                   --tolerance 0.15)
  set_tests_properties(plan_cli.memory_${name} PROPERTIES FIXTURES_REQUIRED layout_run_${name} LABELS trainer)
endforeach()

# Planning: the tiny recipe on 8 CPU ranks lists its layouts and names the best; DeepSeek-V3 on
# its 2048 GPUs with its own recompute list fits nowhere (dsx keeps activations as f32 tensors;
# the table still shows why, and the plan says what full recompute would give), with full
# recompute it fits; a GRPO recipe is refused.
add_test(NAME plan_cli.tiny_8_ranks
         COMMAND ${_dsx_plan_expect} 0 "recipes/tiny.yaml: 8 devices" "pp 2 x dp 2 x tp 2, ep 2, sp, 1f1b even"
                 "best: --set parallel.pp=" --
                 $<TARGET_FILE:dsx> plan ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --gpus 8 --top 100)
add_test(NAME plan_cli.deepseek_v3_does_not_fit
         COMMAND ${_dsx_plan_expect} 2 "0 fit" "no layout of" "fits in 79.6 GiB per device"
                 "nothing fits; with less activation memory" "--set 'train.recompute=[full]': " --
                 $<TARGET_FILE:dsx> plan ${PROJECT_SOURCE_DIR}/recipes/deepseek-v3-671b.yaml --gpus 2048)
add_test(NAME plan_cli.deepseek_v3_full_recompute
         COMMAND ${_dsx_plan_expect} 0 "best: --set parallel.pp=" "parallel.tp: tensor parallelism has run on CPU" --
                 $<TARGET_FILE:dsx> plan ${PROJECT_SOURCE_DIR}/recipes/deepseek-v3-671b.yaml --gpus 2048
                 --set train.recompute=[full])
add_test(NAME plan_cli.grpo_refused
         COMMAND ${_dsx_plan_expect} 2 "has a grpo section" --
                 $<TARGET_FILE:dsx> plan ${PROJECT_SOURCE_DIR}/recipes/tiny-grpo.yaml)
add_test(NAME plan_cli.missing_run
         COMMAND ${_dsx_plan_expect} 2 "--measured: cannot read" --
                 $<TARGET_FILE:dsx> plan ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --measured ${DSX_LAYOUT_WORK}/no-such-run)
set_tests_properties(plan_cli.tiny_8_ranks plan_cli.deepseek_v3_does_not_fit plan_cli.deepseek_v3_full_recompute
                     plan_cli.grpo_refused plan_cli.missing_run PROPERTIES LABELS trainer)

# --json: the same ranking as data (tests/trainer/plan/check_plan_json.py checks every layout's
# device count, its memory and time parts adding up, and the order).
find_package(Python3 COMPONENTS Interpreter QUIET)
if(Python3_Interpreter_FOUND)
  add_test(NAME plan_cli.json
           COMMAND sh -c "\"$1\" plan \"$2\" --gpus 8 --json | \"$3\" \"$4\" 8" plan_json $<TARGET_FILE:dsx>
                   ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml ${Python3_EXECUTABLE}
                   ${CMAKE_CURRENT_LIST_DIR}/plan/check_plan_json.py)
  set_tests_properties(plan_cli.json PROPERTIES LABELS trainer)
endif()
