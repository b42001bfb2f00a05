# `dsx generate` through the real binary (tests/trainer/generate_cli.sh): trains a tiny model on a
# small corpus for a few steps, samples from its checkpoint, and checks --help and each kind of
# bad input.
add_test(NAME generate_cli
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/generate_cli.sh $<TARGET_FILE:dsx> ${PROJECT_SOURCE_DIR}
                 ${CMAKE_CURRENT_BINARY_DIR}/generate_cli)
set_tests_properties(generate_cli PROPERTIES LABELS "trainer;generate" TIMEOUT 120)
