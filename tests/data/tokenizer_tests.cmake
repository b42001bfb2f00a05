# Tokenizer tests that are not Catch2 cases (included by tests/CMakeLists.txt).
#  - tokenizer_hf_parity: dsx vs Hugging Face `tokenizers` ids on a mixed corpus. The script
#    installs HF tokenizers into <repo>/.venv (tools/python-env.sh) when it can and otherwise
#    prints "SKIPPED: <reason>" and exits 77, which ctest shows as a skipped test.
#  - tokenizer_cli: `dsx tokenizer` subcommands, --help, and exit code 2 with a clear message
#    for each kind of bad input.
find_program(DSX_PYTHON3 python3)
if(DSX_PYTHON3)
  add_test(NAME tokenizer_hf_parity
           COMMAND ${DSX_PYTHON3} ${CMAKE_CURRENT_LIST_DIR}/hf_parity.py --dsx $<TARGET_FILE:dsx>
                   --repo ${PROJECT_SOURCE_DIR} --workdir ${CMAKE_CURRENT_BINARY_DIR}/tokenizer_hf_parity)
else()
  add_test(NAME tokenizer_hf_parity COMMAND sh -c "echo 'SKIPPED: python3 not found'; exit 77")
endif()
set_tests_properties(tokenizer_hf_parity PROPERTIES SKIP_RETURN_CODE 77 LABELS "data;tokenizer" TIMEOUT 600)

add_test(NAME tokenizer_cli
         COMMAND sh ${CMAKE_CURRENT_LIST_DIR}/tokenizer_cli.sh $<TARGET_FILE:dsx>
                 ${CMAKE_CURRENT_BINARY_DIR}/tokenizer_cli)
set_tests_properties(tokenizer_cli PROPERTIES LABELS "data;tokenizer" TIMEOUT 120)
