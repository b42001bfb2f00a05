# Data tests beyond the Catch2 cases. This file has two roles:
#  * included by tests/CMakeLists.txt: wires the test executable and declares the CLI test;
#  * run as a script (cmake -P, by that CLI test): drives `dsx tokenizer train`, `dsx data prep`
#    and `dsx data inspect` end to end and checks exit codes and messages.

if(CMAKE_SCRIPT_MODE_FILE)
  # run_dsx(<expected exit code> <regex the output must match> <dsx arguments...>)
  function(run_dsx expected_rc regex)
    execute_process(COMMAND ${DSX} ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
    if(NOT rc EQUAL expected_rc)
      message(FATAL_ERROR "dsx ${ARGN}\nexited with ${rc}, expected ${expected_rc}\nstdout: ${out}\nstderr: ${err}")
    endif()
    if(NOT "${out}${err}" MATCHES "${regex}")
      message(FATAL_ERROR "dsx ${ARGN}\noutput does not match '${regex}'\nstdout: ${out}\nstderr: ${err}")
    endif()
  endfunction()

  file(REMOVE_RECURSE ${WORK})
  file(MAKE_DIRECTORY ${WORK}/corpus)
  set(text "")
  foreach(i RANGE 1 120)
    string(APPEND text "Document ${i}: the quick brown fox jumps over the lazy dog. Größe 机器学习 🙂\n\n")
  endforeach()
  file(WRITE ${WORK}/corpus/a.txt "${text}")
  file(WRITE ${WORK}/corpus/b.jsonl "{\"body\": \"json document one\"}\n{\"body\": \"json document two\"}\n")
  file(WRITE ${WORK}/bad.jsonl "{\"body\": \"fine\"}\n{\"title\": \"no body\"}\n")

  run_dsx(0 "--shard-tokens" data prep --help)
  run_dsx(0 "--sample-tokens" data inspect --help)
  run_dsx(0 "wrote" tokenizer train --vocab-size 320 --output ${WORK}/tok.json ${WORK}/corpus/a.txt)

  run_dsx(0 "wrote .*: 122 documents" data prep --tokenizer ${WORK}/tok.json --output ${WORK}/ds
          --split-blank-lines --text-field body --shard-tokens 500 --threads 2 ${WORK}/corpus)
  run_dsx(0 "documents +122.*shards +[0-9]+.*sample.*Document 1: the quick" data inspect ${WORK}/ds
          --tokenizer ${WORK}/tok.json)

  # Bad input: exit code 2 and one message naming the file.
  run_dsx(2 "no such dataset directory" data inspect ${WORK}/nope)
  run_dsx(2 "bad.jsonl:2: field 'body' is missing" data prep --tokenizer ${WORK}/tok.json
          --output ${WORK}/bad --text-field body --quiet ${WORK}/bad.jsonl)
  if(EXISTS ${WORK}/bad/index.json)
    message(FATAL_ERROR "a failed prep left ${WORK}/bad/index.json")
  endif()
  run_dsx(2 "already holds a dataset" data prep --tokenizer ${WORK}/tok.json --output ${WORK}/ds
          --quiet ${WORK}/corpus/a.txt)
  run_dsx(2 "missing.txt" data prep --tokenizer ${WORK}/tok.json --output ${WORK}/x --quiet ${WORK}/missing.txt)
  file(WRITE ${WORK}/ds/shard-00001.h5 "not an hdf5 file")
  run_dsx(2 "shard-00001.h5': not an HDF5 file" data inspect ${WORK}/ds)
  file(REMOVE ${WORK}/ds/index.json)
  run_dsx(2 "index.json' is missing" data inspect ${WORK}/ds)

  file(REMOVE_RECURSE ${WORK})
  return()
endif()

# The dataset tests build foreign / too-new HDF5 files with the HDF5 C API directly.
target_link_libraries(dsx_data_tests PRIVATE HDF5::HDF5)

add_test(NAME data_cli
         COMMAND ${CMAKE_COMMAND} -DDSX=$<TARGET_FILE:dsx> -DWORK=${CMAKE_CURRENT_BINARY_DIR}/data_cli_work
                 -P ${CMAKE_CURRENT_LIST_FILE})
set_tests_properties(data_cli PROPERTIES LABELS data TIMEOUT 120)
