# aiobridge_add_python_extension: builds a CPython extension module on
# aiobridge. Installed with the CMake package and used the same way inside
# aiobridge's tree, from a parent that add_subdirectory()s it, and after
# find_package(aiobridge CONFIG COMPONENTS python):
#
#   aiobridge_add_python_extension(<name> SOURCES <files>...
#       [BACKEND uv|event|uring]   # default: every backend of the install
#       [PYTHON <interpreter>]     # default: find_package(Python)'s
#       [TARGET <target>]          # default: <name>
#       [OUTPUT_DIRECTORY <dir>])  # default: the current binary directory
#
# The module is <name><EXT_SUFFIX of that interpreter>. The core, the chosen
# backend and the Python bridge are linked in statically with hidden
# symbols: only PyInit_<name> is exported, so extensions built separately
# never clash. With BACKEND, only that backend's library is linked and the
# default runtime uses it. At import, the module needs the `aiobridge`
# Python package (pip install of this repository, or the build tree's
# python/<tag> directory on sys.path).

# _aiobridge_python_info(<interpreter> <out prefix>): sets <prefix>_TAG
# (cp311, cp311d for a debug build), <prefix>_INCLUDE, <prefix>_SUFFIX and
# <prefix>_LIBPYTHON (the library a program embedding it links).
function(_aiobridge_python_info py out)
  get_property(cached GLOBAL PROPERTY "AIOBRIDGE_PYINFO_${py}")
  if(NOT cached)
    execute_process(
      COMMAND "${py}" -c "import os, sys, sysconfig; v = sys.version_info; g = sysconfig.get_config_var; print(f'cp{v[0]}{v[1]}' + ('d' if hasattr(sys, 'gettotalrefcount') else '') + '|' + sysconfig.get_paths()['include'] + '|' + g('EXT_SUFFIX') + '|' + str(int(v >= (3, 8))) + '|' + os.path.join(g('LIBDIR') or '', g('LDLIBRARY') or ''))"
      OUTPUT_VARIABLE cached OUTPUT_STRIP_TRAILING_WHITESPACE
      RESULT_VARIABLE rc ERROR_VARIABLE err)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "aiobridge: cannot query the Python interpreter '${py}': ${err}")
    endif()
    string(REPLACE "|" ";" cached "${cached}")
    list(GET cached 3 new_enough)
    if(NOT new_enough)
      message(FATAL_ERROR "aiobridge: '${py}' is older than CPython 3.8")
    endif()
    set_property(GLOBAL PROPERTY "AIOBRIDGE_PYINFO_${py}" "${cached}")
  endif()
  list(GET cached 0 tag)
  list(GET cached 1 inc)
  list(GET cached 2 suffix)
  set(${out}_TAG ${tag} PARENT_SCOPE)
  set(${out}_INCLUDE ${inc} PARENT_SCOPE)
  list(GET cached 4 libpython)
  set(${out}_SUFFIX ${suffix} PARENT_SCOPE)
  set(${out}_LIBPYTHON ${libpython} PARENT_SCOPE)
endfunction()

# _aiobridge_default_python(<out>): the interpreter of find_package(Python).
function(_aiobridge_default_python out)
  if(NOT Python_EXECUTABLE)
    find_package(Python 3.8 REQUIRED COMPONENTS Interpreter)
  endif()
  set(${out} ${Python_EXECUTABLE} PARENT_SCOPE)
endfunction()

# _aiobridge_resolve(<name> <python or ""> <backend or ""> <info prefix>
#                    <core var>): the interpreter's facts (see
# _aiobridge_python_info; its bridge target exists afterwards) and the core
# target for the backend, or a configure error that says what exists.
function(_aiobridge_resolve name py backend out core_out)
  if(NOT py)
    _aiobridge_default_python(py)
  endif()
  _aiobridge_python_info("${py}" info)
  get_property(tags GLOBAL PROPERTY AIOBRIDGE_PYTHON_TAGS)
  get_property(backends GLOBAL PROPERTY AIOBRIDGE_BACKENDS)
  if(NOT TARGET aiobridge::python_${info_TAG} AND COMMAND aiob_python_add_tag)
    aiob_python_add_tag(${info_TAG} "${py}")  # inside aiobridge's tree
  endif()
  if(NOT TARGET aiobridge::python_${info_TAG})
    message(FATAL_ERROR
      "${name}: this aiobridge has no Python bridge for ${info_TAG} (${py}); "
      "it has: ${tags}. Build aiobridge for that interpreter (pip install "
      "it with that interpreter, or configure it with -DAIOB_PYTHONS=${py}).")
  endif()
  set(core aiobridge::aiobridge_static)
  if(backend)
    if(NOT backend IN_LIST backends)
      message(FATAL_ERROR
        "${name}: backend '${backend}' is not in this aiobridge (it has: ${backends})")
    endif()
    set(core aiobridge::${backend})
  endif()
  foreach(v TAG INCLUDE SUFFIX LIBPYTHON)
    set(${out}_${v} ${info_${v}} PARENT_SCOPE)
  endforeach()
  set(${core_out} ${core} PARENT_SCOPE)
endfunction()

function(aiobridge_add_python_extension name)
  cmake_parse_arguments(ARG "" "BACKEND;PYTHON;TARGET;OUTPUT_DIRECTORY" "SOURCES" ${ARGN})
  if(ARG_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "aiobridge_add_python_extension(${name}): unknown arguments ${ARG_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "aiobridge_add_python_extension(${name}): SOURCES is empty")
  endif()
  set(target ${name})
  if(ARG_TARGET)
    set(target ${ARG_TARGET})
  endif()
  _aiobridge_resolve(${name} "${ARG_PYTHON}" "${ARG_BACKEND}" info core)
  add_library(${target} MODULE ${ARG_SOURCES})
  target_include_directories(${target} PRIVATE ${info_INCLUDE})
  target_link_libraries(${target} PRIVATE aiobridge::python_${info_TAG} ${core})
  set_target_properties(${target} PROPERTIES
      OUTPUT_NAME ${name} PREFIX "" SUFFIX "${info_SUFFIX}"
      C_VISIBILITY_PRESET hidden)
  if(ARG_OUTPUT_DIRECTORY)
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${ARG_OUTPUT_DIRECTORY})
  endif()
  if(TARGET aiobridge_module_${info_TAG})
    add_dependencies(${target} aiobridge_module_${info_TAG})
  endif()
endfunction()

# aiobridge_add_python_executable(<name> SOURCES <files>...
#     [BACKEND uv|event|uring] [PYTHON <interpreter>] [TESTING])
#
# A C program that embeds that interpreter (include aiobridge/embed.h:
# aiob_main, AIOB_MAIN), linked with its libpython, the Python bridge and
# the core with the chosen backend; TESTING adds the async test harness
# (aiobridge/testing.h, with cmocka). It finds the `aiobridge` package on
# sys.path when it is installed, and uses a built-in copy otherwise.
function(aiobridge_add_python_executable name)
  cmake_parse_arguments(ARG "TESTING" "BACKEND;PYTHON" "SOURCES" ${ARGN})
  if(ARG_UNPARSED_ARGUMENTS OR NOT ARG_SOURCES)
    message(FATAL_ERROR "aiobridge_add_python_executable(${name} SOURCES ... [BACKEND b] [PYTHON exe])")
  endif()
  _aiobridge_resolve(${name} "${ARG_PYTHON}" "${ARG_BACKEND}" info core)
  if(NOT EXISTS "${info_LIBPYTHON}")
    message(FATAL_ERROR
      "aiobridge_add_python_executable(${name}): no libpython for "
      "${info_TAG} at '${info_LIBPYTHON}' (Debian: install python3-dev)")
  endif()
  set(testing)
  if(ARG_TESTING)
    if(NOT TARGET aiobridge::testing_${info_TAG})
      message(FATAL_ERROR
        "aiobridge_add_python_executable(${name}): this aiobridge has no test "
        "harness for ${info_TAG} (it is built where cmocka is found: Debian "
        "libcmocka-dev)")
    endif()
    set(testing aiobridge::testing_${info_TAG})
  endif()
  add_executable(${name} ${ARG_SOURCES})
  target_include_directories(${name} PRIVATE ${info_INCLUDE})
  target_link_libraries(${name} PRIVATE ${testing} aiobridge::python_${info_TAG}
                        ${core} ${info_LIBPYTHON})
endfunction()
