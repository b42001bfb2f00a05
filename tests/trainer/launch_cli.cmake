# `dsx launch` through the real binary: the mpirun command it would run, the sbatch script it
# writes (and submits, to a fake sbatch in launch/fake_bin/), layouts and flags it refuses before
# starting anything, and one real 2-rank training run under mpirun. Included by tests/CMakeLists.txt.
set(_dsx_launch_expect bash ${CMAKE_CURRENT_LIST_DIR}/expect_exit.sh)
set(_dsx_launch_recipe ${PROJECT_SOURCE_DIR}/recipes/tiny.yaml)
set(_dsx_launch_work ${CMAKE_CURRENT_BINARY_DIR}/launch_runs)

# A 2-rank layout: the printed command is mpirun -np 2 ... dsx train RECIPE with every --set and
# --stop-after passed on, a value with a space and a quote shell-quoted; nothing starts.
add_test(NAME launch.mpirun_dry_run
         COMMAND ${_dsx_launch_expect} 0 "dsx launch: 2 ranks (1 node x 2 ranks per node) of dsx train, with mpirun"
                 "mpirun -np 2 --bind-to none -x OMP_NUM_THREADS" " train ${_dsx_launch_recipe} --set parallel.dp=2"
                 "--set 'logging.run_dir=${_dsx_launch_work}/it'\\''s a run' --stop-after 3"
                 "dry run, nothing started"
                 -- $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe} --set parallel.dp=2
                 --set "logging.run_dir=${_dsx_launch_work}/it's a run" --stop-after 3 --dry-run)
# --nodes x --ranks-per-node must be the recipe's world size; the message names both sides.
add_test(NAME launch.layout_mismatch
         COMMAND ${_dsx_launch_expect} 2 "parallel.dp (2)" "= 2 ranks, but --nodes 2 x --ranks-per-node 3 = 6"
                 -- $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe} --set parallel.dp=2 --nodes 2 --ranks-per-node 3
                 --set logging.run_dir=${_dsx_launch_work}/layout_mismatch --dry-run)
# The recipe is validated before anything starts.
add_test(NAME launch.bad_recipe
         COMMAND ${_dsx_launch_expect} 2 "`parallel.ep` (3) must divide `parallel.dp` (4)"
                 -- $<TARGET_FILE:dsx> launch ${CMAKE_CURRENT_LIST_DIR}/bad_recipes/ep_not_dividing_dp.yaml --dry-run)
# A flag of the other launcher is refused, not ignored.
add_test(NAME launch.other_launchers_flag
         COMMAND ${_dsx_launch_expect} 2 "--hostfile applies to --launcher mpirun only"
                 -- $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe} --launcher slurm --hostfile /etc/hosts --dry-run
                 --set logging.run_dir=${_dsx_launch_work}/other_launchers_flag)
# Without mpirun on PATH (only the fake Slurm commands there): one message saying so.
add_test(NAME launch.mpirun_missing
         COMMAND ${_dsx_launch_expect} 2 "mpirun is not on PATH"
                 -- env PATH=${CMAKE_CURRENT_LIST_DIR}/launch/fake_bin $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe}
                 --set logging.run_dir=${_dsx_launch_work}/mpirun_missing)
add_test(NAME launch.slurm_dry_run
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/launch/slurm_dry_run.sh $<TARGET_FILE:dsx> ${_dsx_launch_recipe}
                 ${_dsx_launch_work}/slurm_dry_run)
add_test(NAME launch.slurm_submit
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/launch/slurm_submit.sh $<TARGET_FILE:dsx> ${_dsx_launch_recipe}
                 ${_dsx_launch_work}/slurm_submit)
set_tests_properties(launch.mpirun_dry_run launch.layout_mismatch launch.bad_recipe launch.other_launchers_flag
                     launch.mpirun_missing launch.slurm_dry_run launch.slurm_submit PROPERTIES LABELS trainer TIMEOUT 60)

# The real thing: two data-parallel ranks under the mpirun dsx launch execs, two short steps
# (the settings of parallel/run_layout.sh); "done:" comes from rank 0 only after both ranks
# finished, and dsx train refuses a dp=2 recipe started as one process.
add_test(NAME launch.mpirun_train_dp2
         COMMAND sh -c "rm -rf \"$1\" && shift && exec \"$@\"" launch ${_dsx_launch_work}/train_dp2
                 ${_dsx_launch_expect} 0 "mpirun -np 2" "done: step 2"
                 -- $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe} --set parallel.dp=2 --set train.steps=2
                 --set train.global_batch=8 --set train.micro_batch=1 --set train.seq_len=32
                 --set optim.schedule.warmup=1 --set logging.interval=1
                 --set logging.run_dir=${_dsx_launch_work}/train_dp2 --mpirun-arg=--oversubscribe)
set_tests_properties(launch.mpirun_train_dp2 PROPERTIES LABELS "trainer;parallel" TIMEOUT 120
                     ENVIRONMENT "OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMP_NUM_THREADS=1"
                     RESOURCE_LOCK mpi_cores)
# A layout the ranks would refuse (here DeepSeek-V3's DualPipe, not built) is refused before a job
# is submitted, with the ranks' own message.
add_test(NAME launch.layout_not_built
         COMMAND ${_dsx_launch_expect} 2 "parallel.pp_schedule: dualpipe is not built yet"
                 -- $<TARGET_FILE:dsx> launch ${PROJECT_SOURCE_DIR}/recipes/deepseek-v3-671b.yaml --launcher slurm
                 --nodes 256 --ranks-per-node 8 --dry-run --set logging.run_dir=${_dsx_launch_work}/layout_not_built)
set_tests_properties(launch.layout_not_built PROPERTIES LABELS trainer)
# A layout whose pipeline transfers one in-order NCCL stream per rank cannot keep (DualPipeV on
# three GPUs) is refused before anything starts, saying why.
add_test(NAME launch.pipeline_stuck_on_nccl
         COMMAND ${_dsx_launch_expect} 2
                 "parallel.pp_schedule: dualpipev with parallel.pp = 3 cannot run on GPUs (NCCL, one in-order stream per rank)"
                 "or device: cpu"
                 -- $<TARGET_FILE:dsx> launch ${_dsx_launch_recipe} --set parallel.pp=3
                 --set parallel.pp_schedule=dualpipev --set model.num_hidden_layers=6 --set model.device=cuda
                 --set train.micro_batch=1 --dry-run --set logging.run_dir=${_dsx_launch_work}/pipeline_stuck_on_nccl)
set_tests_properties(launch.pipeline_stuck_on_nccl PROPERTIES LABELS trainer)
