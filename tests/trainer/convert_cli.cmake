# `dsx convert to-hf` through the real binary, checked with the reference safetensors package
# (tests/trainer/convert/convert_test.sh; skipped when tools/python-env.sh could not install it).
add_test(NAME convert_cli.to_hf
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/convert/convert_test.sh $<TARGET_FILE:dsx> ${PROJECT_SOURCE_DIR}
                 ${CMAKE_CURRENT_BINARY_DIR}/convert_cli)
set_tests_properties(convert_cli.to_hf PROPERTIES LABELS trainer SKIP_RETURN_CODE 77 TIMEOUT 300
                     ENVIRONMENT "OMP_NUM_THREADS=1")

# The weight EMA (optim.ema_decay) exported with `dsx convert to-hf --ema`; runs without one are
# refused by convert and generate (tests/trainer/convert/ema_test.sh).
add_test(NAME convert_cli.ema
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/convert/ema_test.sh $<TARGET_FILE:dsx> ${PROJECT_SOURCE_DIR}
                 ${CMAKE_CURRENT_BINARY_DIR}/convert_cli_ema)
set_tests_properties(convert_cli.ema PROPERTIES LABELS trainer TIMEOUT 300 ENVIRONMENT "OMP_NUM_THREADS=1")
