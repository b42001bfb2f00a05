# `dsx checkpoint inspect` through the real binary: a directory that is not a checkpoint gives
# exit code 2 and a message naming it.
add_test(NAME checkpoint_cli_missing
         COMMAND ${CMAKE_CURRENT_SOURCE_DIR}/trainer/expect_exit.sh 2 no-such-checkpoint --
                 $<TARGET_FILE:dsx> checkpoint inspect ${CMAKE_CURRENT_BINARY_DIR}/no-such-checkpoint)
set_tests_properties(checkpoint_cli_missing PROPERTIES LABELS trainer)
