# Validates AIOB_BACKENDS / AIOB_DEFAULT_BACKEND and finds each selected
# backend's library through pkg-config. Sets:
#   AIOB_BACKEND_SOURCES      sources of the selected backends
#   AIOB_BACKEND_LIBRARIES    imported targets to link
#   AIOB_BACKEND_DEFINITIONS  AIOB_HAVE_<NAME> for the registry
#   AIOB_BACKEND_PKG_<name>   its pkg-config module (for aiobridge.pc)
#   AIOB_BACKEND_LIB_<name>   its imported target
# Only the selected backends' libraries are linked. The imported targets are
# global, so a parent project that add_subdirectory()s aiobridge links them.
find_package(PkgConfig REQUIRED)

set(AIOB_BACKEND_SOURCES)
set(AIOB_BACKEND_LIBRARIES)
set(AIOB_BACKEND_DEFINITIONS)

if(AIOB_BACKENDS STREQUAL "")
  message(FATAL_ERROR "AIOB_BACKENDS is empty: choose from ${AIOB_ALL_BACKENDS}")
endif()
list(REMOVE_DUPLICATES AIOB_BACKENDS)

# aiob_require_pkg(<prefix> <pkg-config module> <Debian package>)
macro(aiob_require_pkg prefix module debpkg)
  pkg_check_modules(${prefix} QUIET IMPORTED_TARGET GLOBAL ${module})
  if(NOT ${prefix}_FOUND)
    message(FATAL_ERROR
      "${module} not found through pkg-config: install the Debian package "
      "${debpkg} (scripts/deps.sh does it)")
  endif()
endmacro()

foreach(b IN LISTS AIOB_BACKENDS)
  if(NOT b IN_LIST AIOB_ALL_BACKENDS)
    message(FATAL_ERROR "Unknown backend '${b}' in AIOB_BACKENDS; known: ${AIOB_ALL_BACKENDS}")
  endif()
  string(TOUPPER ${b} B)
  list(APPEND AIOB_BACKEND_DEFINITIONS AIOB_HAVE_${B})
  if(b STREQUAL "uv")
    aiob_require_pkg(AIOB_PKG_UV libuv libuv1-dev)
    list(APPEND AIOB_BACKEND_SOURCES backends/uv/uv_backend.c)
    list(APPEND AIOB_BACKEND_LIBRARIES PkgConfig::AIOB_PKG_UV)
    set(AIOB_BACKEND_PKG_${b} libuv)
    set(AIOB_BACKEND_LIB_${b} PkgConfig::AIOB_PKG_UV)
  elseif(b STREQUAL "event")
    aiob_require_pkg(AIOB_PKG_EVENT libevent_core libevent-dev)
    list(APPEND AIOB_BACKEND_SOURCES backends/event/event_backend.c)
    list(APPEND AIOB_BACKEND_LIBRARIES PkgConfig::AIOB_PKG_EVENT)
    set(AIOB_BACKEND_PKG_${b} libevent_core)
    set(AIOB_BACKEND_LIB_${b} PkgConfig::AIOB_PKG_EVENT)
  elseif(b STREQUAL "uring")
    aiob_require_pkg(AIOB_PKG_URING liburing liburing-dev)
    list(APPEND AIOB_BACKEND_SOURCES backends/uring/uring_backend.c)
    list(APPEND AIOB_BACKEND_LIBRARIES PkgConfig::AIOB_PKG_URING)
    set(AIOB_BACKEND_PKG_${b} liburing)
    set(AIOB_BACKEND_LIB_${b} PkgConfig::AIOB_PKG_URING)
  endif()
endforeach()

if(AIOB_DEFAULT_BACKEND STREQUAL "")
  list(GET AIOB_BACKENDS 0 AIOB_DEFAULT_BACKEND)
  set(AIOB_DEFAULT_BACKEND ${AIOB_DEFAULT_BACKEND} CACHE STRING
      "Backend of the default runtime (default: first of AIOB_BACKENDS)" FORCE)
endif()
if(NOT AIOB_DEFAULT_BACKEND IN_LIST AIOB_BACKENDS)
  message(FATAL_ERROR
    "AIOB_DEFAULT_BACKEND '${AIOB_DEFAULT_BACKEND}' is not built; AIOB_BACKENDS is '${AIOB_BACKENDS}'")
endif()
