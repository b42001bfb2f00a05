# `dsx grpo` and the recipe's grpo section through the real binary: help, explain, a short run
# of recipes/tiny-grpo.yaml from a directory that is neither the source nor the build tree, and
# bad values that must stop with exit code 2 and a message naming the key. The convergence test
# (GRPO vs zero advantages) is the Catch case "[grpo][convergence]" in test_grpo_convergence.cpp.
set(_dsx_grpo_expect bash ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh)
set(_dsx_grpo_recipe ${PROJECT_SOURCE_DIR}/recipes/tiny-grpo.yaml)

function(dsx_grpo_cli_test name)
  add_test(NAME grpo.cli.${name} COMMAND ${ARGN})
  set_tests_properties(grpo.cli.${name} PROPERTIES LABELS "trainer;grpo" WORKING_DIRECTORY /tmp)
endfunction()

dsx_grpo_cli_test(help ${_dsx_grpo_expect} 0 "recipe TEXT REQUIRED" "--set" "explain grpo" -- $<TARGET_FILE:dsx> grpo --help)
dsx_grpo_cli_test(explain ${_dsx_grpo_expect} 0 "grpo.group_size" "grpo.epsilon_high" "grpo.rewards[].command"
  "grpo.eval.count" "grpo.debug_advantages" -- $<TARGET_FILE:dsx> recipe explain grpo)
dsx_grpo_cli_test(check ${_dsx_grpo_expect} 0 "valid" "parameters  total 199.8K"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe})

# A few seconds end to end: SFT, evaluation, GRPO steps, the final evaluation and checkpoint.
set(_dsx_grpo_run_dir ${CMAKE_CURRENT_BINARY_DIR}/grpo-cli-run)
dsx_grpo_cli_test(short_run ${_dsx_grpo_expect} 0 "sft     20/20" "eval after step 0" "grpo     3/3 | reward"
  "acc " "gen " "train " "eval after step 3" "done: 3 GRPO steps; held-out accuracy"
  -- $<TARGET_FILE:dsx> grpo ${_dsx_grpo_recipe} --set train.steps=3 --set grpo.sft_steps=20
     --set grpo.prompts_per_step=4 --set grpo.group_size=4 --set grpo.eval.count=8 --set logging.interval=1
     --set checkpoint.resume=never --set logging.run_dir=${_dsx_grpo_run_dir})

# Bad values: one message naming the key, exit code 2, before any work.
dsx_grpo_cli_test(bad.group_size ${_dsx_grpo_expect} 2 "`grpo.group_size` must be >= 2, got 1"
  -- $<TARGET_FILE:dsx> grpo ${_dsx_grpo_recipe} --set grpo.group_size=1)
# (a fragment with an unbalanced "[" would break CMake's list splitting: the range is left out)
dsx_grpo_cli_test(bad.epsilon_low ${_dsx_grpo_expect} 2 "`grpo.epsilon_low` must be in" "got 1"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.epsilon_low=1)
dsx_grpo_cli_test(bad.loss ${_dsx_grpo_expect} 2 "grpo.loss" "dr_grpo"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.loss=ppo)
dsx_grpo_cli_test(bad.two_sources ${_dsx_grpo_expect} 2 "`grpo.prompts` and `grpo.task` (addition) are both set"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.prompts=${_dsx_grpo_recipe})
dsx_grpo_cli_test(bad.refresh_without_beta ${_dsx_grpo_expect} 2 "`grpo.ref_refresh_interval` is set but `grpo.beta` is 0"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.ref_refresh_interval=10)
dsx_grpo_cli_test(bad.resample ${_dsx_grpo_expect} 2 "`grpo.resample_rounds`" "grpo.dynamic_sampling"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.resample_rounds=2)
dsx_grpo_cli_test(bad.unknown_reward ${_dsx_grpo_expect} 2 "`grpo.rewards[1].name` (accuracy) is not a built-in reward"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe}
     "--set" "grpo.rewards=[{name: format}, {name: accuracy}]")
dsx_grpo_cli_test(bad.positions ${_dsx_grpo_expect} 2 "`grpo.max_completion_length` (60) plus the longest addition prompt"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.max_completion_length=60)
dsx_grpo_cli_test(bad.vocab ${_dsx_grpo_expect} 2 "`model.vocab_size` (20) is smaller than the addition task's vocabulary (28)"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set model.vocab_size=20)
dsx_grpo_cli_test(bad.init_checkpoint ${_dsx_grpo_expect} 2 "`grpo.init_checkpoint`: `/nonexistent` is not a checkpoint directory"
  -- $<TARGET_FILE:dsx> recipe check ${_dsx_grpo_recipe} --set grpo.init_checkpoint=/nonexistent)
dsx_grpo_cli_test(no_prompt_source ${_dsx_grpo_expect} 2 "grpo: the recipe has no prompt source"
  -- $<TARGET_FILE:dsx> grpo ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml --set logging.run_dir=${_dsx_grpo_run_dir}-none)
