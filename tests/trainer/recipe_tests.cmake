# `dsx recipe` through the command line: every bad recipe under bad_recipes/ exits 2 with the
# message fragments its "# expect:" lines name; shipped recipes check with exit 0 from any
# working directory; --set, explain and --help behave. Included by tests/CMakeLists.txt.
set(_dsx_expect bash ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh)
set(_dsx_recipes ${PROJECT_SOURCE_DIR}/recipes)

function(dsx_recipe_cli_test name)
  add_test(NAME recipe.cli.${name} COMMAND ${ARGN})
  # A directory that is neither the source nor the build tree: nothing may depend on it.
  set_tests_properties(recipe.cli.${name} PROPERTIES LABELS "trainer;recipe" WORKING_DIRECTORY /tmp)
endfunction()

file(GLOB _dsx_bad_recipes CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/bad_recipes/*.yaml)
foreach(recipe ${_dsx_bad_recipes})
  get_filename_component(name ${recipe} NAME_WE)
  file(STRINGS ${recipe} expected REGEX "^# expect: ")
  list(TRANSFORM expected REPLACE "^# expect: " "")
  dsx_recipe_cli_test(bad.${name} ${_dsx_expect} 2 ${expected} -- $<TARGET_FILE:dsx> recipe check ${recipe})
endforeach()

# The pipeline schedule as data: 4 stages of the tiny model, 8 micro-batches: 1F1B's textbook
# bubble (P - 1) / (n + P - 1) = 3/11, and the drawing's last stage starting after 3 forwards.
dsx_recipe_cli_test(schedule.pp4 ${_dsx_expect} 0 "pipeline: 1f1b over stage 0/4: embedding, layers 0-0"
  "stage 3: RA0<2 RE0<2 F0 BW0 SG0>2 SEG0>2 RA1<2" "33 units per step, bubble 27.3%" "stage  3 |...0aa1bb"
  "in flight at most (their activations are stored): stage 0: 4 | stage 1: 3 | stage 2: 2 | stage 3: 1"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=4 --set train.global_batch=8
     --set train.micro_batch=1)
# DualPipeV on 2 ranks (4 one-layer stages, 8 micro-batches): rank 1 is the bottom of the V
# (its chunk 0 hands over to its chunk 1 without a message); half a unit of idle time per step.
dsx_recipe_cli_test(schedule.dualpipev ${_dsx_expect} 0
  "pipeline: dualpipev over rank 0: stage 0/4: embedding, layers 0-0 + stage 3/4: layers 3-3, head + 1 MTP"
  "stage 1: RA0<0 F0 F0' SA0'>0 RA1<0 F1 F1' SA1'>0" "24.5 units per step, bubble 2.0%" "stage 0: 5 | stage 1: 5"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=2 --set parallel.pp_schedule=dualpipev
     --set train.global_batch=8 --set train.micro_batch=1)
# On GPUs (NCCL: one in-order stream per rank, sends paired with receives by order) DualPipeV
# cannot run from three ranks on: the checker names the first pair of ranks out of order.
dsx_recipe_cli_test(schedule.dualpipev_nccl_pp3 ${_dsx_expect} 2
  "parallel.pp_schedule: dualpipev cannot run with 3 ranks on GPUs (NCCL, one in-order stream per rank)"
  "NCCL, which pairs them by order, would mix them up"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=3 --set parallel.pp_schedule=dualpipev
     --set model.num_hidden_layers=6 --set model.device=cuda --set train.micro_batch=1)
# Interleaved 1F1B on 2 ranks x 2 chunks (4 one-layer stages dealt round the ranks, 8
# micro-batches): 1F1B's idle time over the chunks, 3 x 8 + 3 x 1 / 2 = 25.5 units against 27;
# rank 0 holds 2·2 + 1 chunk micro-batches; the turn from rank 1's chunk 0 to rank 0's chunk 1 is a
# message naming that chunk.
dsx_recipe_cli_test(schedule.interleaved_1f1b ${_dsx_expect} 0
  "pipeline: interleaved_1f1b over rank 0: stage 0/4: embedding, layers 0-0 + stage 2/4: layers 2-2 | rank 1: stage 1/4: layers 1-1 + stage 3/4: layers 3-3, head + 1 MTP"
  "stage 1: RA0<0 RE0<0 F0 SA0>0' SE0>0'" "25.5 units per step, bubble 5.9%" "stage 0: 5 | stage 1: 3"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=2
     --set parallel.pp_schedule=interleaved_1f1b --set train.global_batch=8 --set train.micro_batch=1)
# ... and the same on GPUs, where one in-order NCCL stream per rank carries the transfers (each
# steady forward paired with a backward into one group, as Megatron does).
dsx_recipe_cli_test(schedule.interleaved_1f1b_nccl ${_dsx_expect} 0 "25.5 units per step, bubble 5.9%"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=2
     --set parallel.pp_schedule=interleaved_1f1b --set model.device=cuda --set train.global_batch=8
     --set train.micro_batch=1)
# The balanced split gives the tiny model's first stage three layers (the last runs the head and
# MTP); on the clock with stages weighted by model FLOPs (16 micro-batches) that takes 51.2 units
# against the even split's 65.3 (stages 0.68 and 1.32 of the mean).
dsx_recipe_cli_test(schedule.balanced_split ${_dsx_expect} 0
  "pipeline: 1f1b over stage 0/2: embedding, layers 0-2 | stage 1/2: layers 3-3, head + 1 MTP"
  "(parallel.pp_split balanced; stages relative to the mean: 1.00 1.00): 51.2038 units per step, bubble 6.3%"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=2 --set parallel.pp_split=balanced
     --set train.micro_batch=1)
dsx_recipe_cli_test(schedule.even_split_weighted ${_dsx_expect} 0
  "(parallel.pp_split even; stages relative to the mean: 0.68 1.32): 65.3229 units per step, bubble 26.5%"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml --set parallel.pp=2 --set train.micro_batch=1)
dsx_recipe_cli_test(schedule.one_stage ${_dsx_expect} 0 "stage 0: F0 BW0 F1 BW1" "bubble 0.0%"
  -- $<TARGET_FILE:dsx> recipe schedule ${_dsx_recipes}/tiny.yaml)
dsx_recipe_cli_test(check.tiny ${_dsx_expect} 0 "valid" "4 layers (1 dense + 3 MoE)" "parameters  total"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml)
dsx_recipe_cli_test(check.deepseek_v3 ${_dsx_expect} 0 "valid" "total 671." "2048 ranks"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/deepseek-v3-671b.yaml)
dsx_recipe_cli_test(check.deepseek_v2_lite ${_dsx_expect} 0 "valid" "total 15.7B"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/deepseek-v2-lite-16b.yaml)
dsx_recipe_cli_test(check.resolved ${_dsx_expect} 0 "kv_lora_rank: 32" "run_dir: runs/tiny"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml --resolved)
dsx_recipe_cli_test(check.set_valid ${_dsx_expect} 0 "hidden 96" "recompute rmsnorm"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml --set model.hidden_size=96
     --set train.recompute=[rmsnorm])
dsx_recipe_cli_test(check.set_unknown_key ${_dsx_expect} 2 "unknown key `optim.learning_rate`"
  "did you mean `optim.lr`?" -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml --set optim.learning_rate=1)
dsx_recipe_cli_test(check.set_wrong_type ${_dsx_expect} 2 "`train.steps` must be an integer, got `many`"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml --set train.steps=many)
dsx_recipe_cli_test(check.set_inconsistent ${_dsx_expect} 2 "`model.topk_group` (5) exceeds `model.n_group` (4)"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_recipes}/tiny.yaml --set model.topk_group=5)
dsx_recipe_cli_test(check.missing_file ${_dsx_expect} 2 "cannot read recipe `no-such-recipe.yaml`"
  -- $<TARGET_FILE:dsx> recipe check no-such-recipe.yaml)
dsx_recipe_cli_test(check.help ${_dsx_expect} 0 "RECIPE" "--set" -- $<TARGET_FILE:dsx> recipe check --help)
dsx_recipe_cli_test(explain.all ${_dsx_expect} 0 "model.kv_lora_rank" "optim.schedule.segments[].until"
  "logging.peak_flops" -- $<TARGET_FILE:dsx> recipe explain)
dsx_recipe_cli_test(explain.section ${_dsx_expect} 0 "optim.lr  (number; default 0.00022)"
  -- $<TARGET_FILE:dsx> recipe explain optim)
dsx_recipe_cli_test(explain.unknown_section ${_dsx_expect} 2 "unknown recipe section `modle`"
  "did you mean `model`?" -- $<TARGET_FILE:dsx> recipe explain modle)
dsx_recipe_cli_test(explain.help ${_dsx_expect} 0 "SECTION" -- $<TARGET_FILE:dsx> recipe explain --help)
