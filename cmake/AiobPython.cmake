# Python extensions built against every CPython interpreter found.
#
#   AIOB_PYTHONS   list of interpreters (default: /usr/bin/python3,
#                  /usr/bin/python3-dbg, and every pyenv python3; inside a
#                  parent project, the parent's find_package(Python))
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

if(AIOB_PYTHONS STREQUAL "" AND NOT AIOB_TOP)
  # Inside a parent project: its interpreter (find_package(Python)).
  _aiobridge_default_python(candidates)
elseif(AIOB_PYTHONS STREQUAL "")
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
  set(AIOB_PY_DIR_${tag} "${PROJECT_BINARY_DIR}/python/${tag}")
  message(STATUS "python: ${py}: CPython ${ver} (${tag})")
endforeach()

# aiob_python_add_tag(<tag> <interpreter>): for one Python ABI, the bridge
# archive aiobridge::python_<tag> (the bridge sources below, static, hidden
# symbols) and the `aiobridge` package in ${AIOB_PYTHON_BUILD_DIR}/<tag>:
# __init__.py, _layout.py and the _aiobridge module (target
# aiobridge_module_<tag>). aiobridge_add_python_extension calls it for an
# interpreter whose tag is not built yet.
set(AIOB_PYTHON_BUILD_DIR ${PROJECT_BINARY_DIR}/python)
set_property(GLOBAL PROPERTY AIOBRIDGE_PYTHON_BUILD_DIR ${AIOB_PYTHON_BUILD_DIR})
set_property(GLOBAL PROPERTY AIOBRIDGE_SOURCE_DIR ${PROJECT_SOURCE_DIR})
# The bridge's sources in bindings/python/, one per concept
# (bridge_internal.h says what each holds; aiobridge_module.c is the
# package's C module, built in for embedding programs that run without the
# package). A global property, as the two above: aiob_python_add_tag may
# run in a parent project's scope.
set_property(GLOBAL PROPERTY AIOBRIDGE_PYTHON_BRIDGE_SOURCES
    release.c errors.c duration.c port.c locals.c ctask.c local.c await.c shapes.c source.c stream_out.c stream_in.c bridge.c
    embed.c aiobridge_module.c)
function(aiob_python_add_tag tag py)
  get_property(src GLOBAL PROPERTY AIOBRIDGE_SOURCE_DIR)
  get_property(pydir GLOBAL PROPERTY AIOBRIDGE_PYTHON_BUILD_DIR)
  _aiobridge_python_info("${py}" info)
  get_property(bridge_sources GLOBAL PROPERTY AIOBRIDGE_PYTHON_BRIDGE_SOURCES)
  list(TRANSFORM bridge_sources PREPEND ${src}/bindings/python/)
  set(lib aiobridge_python_${tag})
  add_library(${lib} STATIC ${bridge_sources})
  target_include_directories(${lib} PRIVATE ${info_INCLUDE} ${src}/core)
  target_include_directories(${lib} PUBLIC
      $<BUILD_INTERFACE:${src}/include> $<INSTALL_INTERFACE:include>)
  target_compile_definitions(${lib} PRIVATE _GNU_SOURCE AIOB_STATIC)
  target_link_libraries(${lib} PUBLIC Threads::Threads)
  set_target_properties(${lib} PROPERTIES EXPORT_NAME python_${tag}
      C_VISIBILITY_PRESET hidden POSITION_INDEPENDENT_CODE ON)
  aiob_target_flags(${lib})
  add_library(aiobridge::python_${tag} ALIAS ${lib})

  # The async test harness (aiobridge/testing.h), where cmocka is found.
  if(TARGET PkgConfig::AIOB_PKG_CMOCKA)
    set(tlib aiobridge_testing_${tag})
    add_library(${tlib} STATIC ${src}/bindings/python/testing.c)
    target_include_directories(${tlib} PRIVATE ${info_INCLUDE} ${src}/core)
    target_compile_definitions(${tlib} PRIVATE _GNU_SOURCE AIOB_STATIC)
    target_link_libraries(${tlib} PUBLIC ${lib} PkgConfig::AIOB_PKG_CMOCKA)
    set_target_properties(${tlib} PROPERTIES EXPORT_NAME testing_${tag}
        C_VISIBILITY_PRESET hidden POSITION_INDEPENDENT_CODE ON)
    aiob_target_flags(${tlib})
    add_library(aiobridge::testing_${tag} ALIAS ${tlib})
  endif()

  set(mod aiobridge_module_${tag})
  add_library(${mod} MODULE ${src}/bindings/python/aiobridge_module.c)
  target_include_directories(${mod} PRIVATE ${info_INCLUDE})
  set_target_properties(${mod} PROPERTIES
      OUTPUT_NAME _aiobridge PREFIX "" SUFFIX "${info_SUFFIX}"
      LIBRARY_OUTPUT_DIRECTORY "${pydir}/${tag}/aiobridge"
      C_VISIBILITY_PRESET hidden)
  aiob_target_flags(${mod})
  foreach(f __init__.py setup_helpers.py)
    configure_file(${src}/bindings/python/aiobridge/${f} ${pydir}/${tag}/aiobridge/${f} COPYONLY)
  endforeach()
  file(WRITE ${pydir}/${tag}/aiobridge/_layout.py
       "VERSION = \"${aiobridge_VERSION}\"\nINCLUDE_DIR = None\nCMAKE_DIR = None\nLIB_DIR = None\nBACKEND_LIBRARIES = {}\n")
  set_property(GLOBAL APPEND PROPERTY AIOBRIDGE_PYTHON_TAGS ${tag})
  set_property(GLOBAL APPEND PROPERTY AIOBRIDGE_PYTHON_TAG_EXES "${py}")
endfunction()

pkg_check_modules(AIOB_PKG_CMOCKA QUIET IMPORTED_TARGET GLOBAL cmocka)
set_property(GLOBAL PROPERTY AIOBRIDGE_PYTHON_TAGS "")
foreach(tag IN LISTS AIOB_PY_TAGS)
  aiob_python_add_tag(${tag} "${AIOB_PY_EXE_${tag}}")
endforeach()

# aiob_add_python_extension(<name> SOURCES <files...>): this tree's own
# extensions (the demo, the guide), built for every interpreter found into
# python/<tag>/, on every backend of AIOB_BACKENDS.
function(aiob_add_python_extension name)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  foreach(tag IN LISTS AIOB_PY_TAGS)
    aiobridge_add_python_extension(${name} SOURCES ${ARG_SOURCES}
        PYTHON "${AIOB_PY_EXE_${tag}}" TARGET ${name}_${tag}
        OUTPUT_DIRECTORY "${AIOB_PY_DIR_${tag}}")
    aiob_target_flags(${name}_${tag})
  endforeach()
endfunction()
