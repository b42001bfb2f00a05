# The tiny recipe on the GPU vs the CPU: every step's loss within 5e-3 relative over 50
# steps. Why 5e-3: each op agrees with its CPU twin to ~1e-6 (tests/gpu), AdamW's normalised
# updates carry such differences into every weight, and a router near-tie flipped by them
# moves one token's loss; over 50 steps of the tiny run that stays well under 1e-3 of a loss
# of ~2-6, and a wrong kernel (a missing scale, a transposed GEMM) is off by O(1).
if(DSX_CUDA)
  add_test(NAME gpu.train_tiny
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/gpu_train.sh $<TARGET_FILE:dsx> $<TARGET_FILE:compare_runs>
                   ${CMAKE_CURRENT_BINARY_DIR}/gpu_train 50 5e-3)
  set_tests_properties(gpu.train_tiny PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 900)
endif()

# The multi-GPU code path (MPI + NCCL communicators, distributed optimizer with its buckets on
# the GPU) on one GPU: `mpirun -np 1 dsx train` with device cuda takes it. Same tolerance.
if(DSX_CUDA AND MPIEXEC_EXECUTABLE)
  add_test(NAME gpu.train_tiny_mpi_np1
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/gpu_train.sh $<TARGET_FILE:dsx> $<TARGET_FILE:compare_runs>
                   ${CMAKE_CURRENT_BINARY_DIR}/gpu_train_np1 50 5e-3 ${MPIEXEC_EXECUTABLE})
  set_tests_properties(gpu.train_tiny_mpi_np1 PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 900)
endif()

# Pipeline parallelism on the GPU: two stages as two ranks sharing the one GPU, activations and
# MTP embeddings sent by NCCL send/recv in 1F1B groups. Same tolerance against the CPU run.
if(DSX_CUDA AND MPIEXEC_EXECUTABLE)
  add_test(NAME gpu.train_tiny_pp2_one_gpu
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/gpu_train.sh $<TARGET_FILE:dsx> $<TARGET_FILE:compare_runs>
                   ${CMAKE_CURRENT_BINARY_DIR}/gpu_train_pp2 50 5e-3 ${MPIEXEC_EXECUTABLE} 2 --set parallel.pp=2)
  set_tests_properties(gpu.train_tiny_pp2_one_gpu PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 900)
  # DualPipeV on two ranks: the one V the NCCL stream can carry (the schedule checker shows its
  # transfers neither deadlock nor pair out of order; from three ranks they deadlock). It needs
  # 2 x pp micro-batches: 4 of 4 sequences (the same global batch as the CPU run's 2 of 8).
  add_test(NAME gpu.train_tiny_pp2_dualpipev_one_gpu
           COMMAND ${CMAKE_CURRENT_LIST_DIR}/gpu_train.sh $<TARGET_FILE:dsx> $<TARGET_FILE:compare_runs>
                   ${CMAKE_CURRENT_BINARY_DIR}/gpu_train_pp2_dualpipev 50 5e-3 ${MPIEXEC_EXECUTABLE} 2
                   --set parallel.pp=2 --set parallel.pp_schedule=dualpipev --set train.micro_batch=4)
  set_tests_properties(gpu.train_tiny_pp2_dualpipev_one_gpu PROPERTIES LABELS gpu SKIP_RETURN_CODE 77 TIMEOUT 900)
endif()
