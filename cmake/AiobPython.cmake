# Python extensions built against every CPython interpreter found.
#
#   AIOB_PYTHONS   list of interpreters (default: /usr/bin/python3,
#                  /usr/bin/python3-dbg, and every pyenv python3)
#
# For each usable interpreter (CPython >= 3.8 with headers) this defines
#   AIOB_PY_TAGS                 list of tags (cp311, cp311d, ...)
#   AIOB_PY_TEST_EXES/_TAGS/_NAMES  every interpreter to test, its tag, and
#                                its name for test names (debian-python3)
#   AIOB_PY_EXE_<tag>            the interpreter
#   AIOB_PY_DIR_<tag>            where its extensions are written
# and aiob_add_python_extension(<name> SOURCES ...) builds <name> for each.
# An interpreter that cannot be used is reported with the reason.

set(AIOB_PYTHONS "" CACHE STRING "Python interpreters to build extensions for")

if(AIOB_PYTHONS STREQUAL "")
  set(candidates /usr/bin/python3 /usr/bin/python3-dbg)
  set(pyenv_root "$ENV{PYENV_ROOT}")
  if(pyenv_root STREQUAL "")
    set(pyenv_root "$ENV{HOME}/.pyenv")
  endif()
  file(GLOB pyenv_pythons "${pyenv_root}/versions/*/bin/python3")
  list(SORT pyenv_pythons COMPARE NATURAL)
  list(APPEND candidates ${pyenv_pythons})
else()
  set(candidates ${AIOB_PYTHONS})
endif()

set(AIOB_PY_TAGS)
set(AIOB_PY_TEST_EXES)
set(AIOB_PY_TEST_TAGS)
set(AIOB_PY_TEST_NAMES)  # test-name form of each interpreter
foreach(py IN LISTS candidates)
  if(NOT EXISTS "${py}")
    message(STATUS "python: ${py}: not present, skipped")
    continue()
  endif()
  execute_process(
    COMMAND "${py}" -c "import sys, sysconfig, os; v = sys.version_info; inc = sysconfig.get_paths()['include']; print(f'{v[0]}.{v[1]}|{inc}|{sysconfig.get_config_var(\"EXT_SUFFIX\")}|{int(hasattr(sys, \"gettotalrefcount\"))}|{int(os.path.exists(os.path.join(inc, \"Python.h\")))}')"
    OUTPUT_VARIABLE info OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc ERROR_QUIET)
  if(NOT rc EQUAL 0)
    message(STATUS "python: ${py}: cannot be queried (too old or broken), skipped")
    continue()
  endif()
  string(REPLACE "|" ";" info "${info}")
  list(GET info 0 ver)
  list(GET info 1 inc)
  list(GET info 2 suffix)
  list(GET info 3 debug)
  list(GET info 4 has_header)
  if(ver VERSION_LESS 3.8)
    message(STATUS "python: ${py}: CPython ${ver} < 3.8, skipped")
    continue()
  endif()
  if(NOT has_header)
    message(STATUS "python: ${py}: no Python.h in ${inc}, skipped")
    continue()
  endif()
  string(REPLACE "." "" tag "cp${ver}")
  if(debug)
    set(tag "${tag}d")
  endif()
  # Every interpreter is tested; one build serves interpreters of one ABI.
  if(py MATCHES "/versions/([^/]+)/bin/")
    set(pyname "pyenv-${CMAKE_MATCH_1}")
  else()
    get_filename_component(pyname ${py} NAME)
    set(pyname "debian-${pyname}")
  endif()
  list(APPEND AIOB_PY_TEST_EXES "${py}")
  list(APPEND AIOB_PY_TEST_TAGS ${tag})
  list(APPEND AIOB_PY_TEST_NAMES ${pyname})
  if(tag IN_LIST AIOB_PY_TAGS)
    message(STATUS "python: ${py}: CPython ${ver} (${tag}, built once for this ABI)")
    continue()
  endif()
  list(APPEND AIOB_PY_TAGS ${tag})
  set(AIOB_PY_EXE_${tag} "${py}")
  set(AIOB_PY_INC_${tag} "${inc}")
  set(AIOB_PY_SUFFIX_${tag} "${suffix}")
  set(AIOB_PY_DIR_${tag} "${CMAKE_BINARY_DIR}/python/${tag}")
  message(STATUS "python: ${py}: CPython ${ver} (${tag})")
endforeach()

# The `aiobridge` module itself (exception types, runtime introspection):
# every aiobridge extension imports it. Target aiobridge_module_<tag>.
foreach(tag IN LISTS AIOB_PY_TAGS)
  set(target aiobridge_module_${tag})
  add_library(${target} MODULE ${PROJECT_SOURCE_DIR}/bindings/python/aiobridge_module.c)
  target_include_directories(${target} PRIVATE ${AIOB_PY_INC_${tag}})
  set_target_properties(${target} PROPERTIES
      OUTPUT_NAME aiobridge PREFIX "" SUFFIX "${AIOB_PY_SUFFIX_${tag}}"
      LIBRARY_OUTPUT_DIRECTORY "${AIOB_PY_DIR_${tag}}"
      C_VISIBILITY_PRESET hidden)
  aiob_target_flags(${target})
endforeach()

# aiob_add_python_extension(<module name> SOURCES <files...>)
# Each extension carries its own copy of the core and the bridge (hidden
# symbols), like a Rust extension carries its own runtime; at import it
# registers that runtime with the `aiobridge` module (built next to it).
function(aiob_add_python_extension name)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  foreach(tag IN LISTS AIOB_PY_TAGS)
    set(target ${name}_${tag})
    add_library(${target} MODULE ${ARG_SOURCES}
                ${PROJECT_SOURCE_DIR}/bindings/python/bridge.c
                $<TARGET_OBJECTS:aiobridge_objects>)
    target_include_directories(${target} PRIVATE ${AIOB_PY_INC_${tag}}
        ${PROJECT_SOURCE_DIR}/include ${PROJECT_SOURCE_DIR}/core)
    target_compile_definitions(${target} PRIVATE _GNU_SOURCE AIOB_STATIC)
    target_link_libraries(${target} PRIVATE Threads::Threads ${AIOB_BACKEND_LIBRARIES})
    set_target_properties(${target} PROPERTIES
        OUTPUT_NAME ${name} PREFIX "" SUFFIX "${AIOB_PY_SUFFIX_${tag}}"
        LIBRARY_OUTPUT_DIRECTORY "${AIOB_PY_DIR_${tag}}"
        C_VISIBILITY_PRESET hidden)
    aiob_target_flags(${target})
    add_dependencies(${target} aiobridge_module_${tag})
  endforeach()
endfunction()
