# Install rules: headers, libraries, the CMake package, pkg-config files and
# the `aiobridge` Python package.
#
#   <prefix>/include/aiobridge.h, include/aiobridge/*.h
#   <libdir>/libaiobridge.so*          (unless AIOB_INSTALL_SHARED is OFF)
#   <libdir>/libaiobridge.a, libaiobridge_<backend>.a
#   <libdir>/libaiobridge_python_<tag>.a   the bridge, one per Python ABI
#   <libdir>/cmake/aiobridge/          aiobridgeConfig.cmake & co.
#   <libdir>/pkgconfig/aiobridge.pc, aiobridge-static.pc
#   <package dir>                      the `aiobridge` Python package
#
# The package directory is AIOB_INSTALL_PYTHON_PACKAGE_DIR, or
# <libdir>/python<X.Y>/site-packages/aiobridge per interpreter. The pip build
# (setup.py) installs with the package directory as the prefix
# (AIOB_INSTALL_PYTHON_PACKAGE_DIR=.) and no shared library.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(AIOB_INSTALL_PYTHON_PACKAGE_DIR "" CACHE STRING
    "Directory of the aiobridge Python package, relative to the prefix (default: <libdir>/python<X.Y>/site-packages/aiobridge)")
set(AIOB_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/aiobridge)

install(FILES include/aiobridge.h DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
# aiobridge/uring.h only with the uring backend (it includes liburing.h).
set(aiob_header_excludes)
if(NOT "uring" IN_LIST AIOB_BACKENDS)
  set(aiob_header_excludes PATTERN uring.h EXCLUDE)
endif()
install(DIRECTORY include/aiobridge DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
        FILES_MATCHING PATTERN "*.h" ${aiob_header_excludes})

get_property(aiob_installed_tags GLOBAL PROPERTY AIOBRIDGE_PYTHON_TAGS)
get_property(aiob_tag_exes GLOBAL PROPERTY AIOBRIDGE_PYTHON_TAG_EXES)
set(aiob_install_targets ${AIOB_EXPORTED_TARGETS})
foreach(tag IN LISTS aiob_installed_tags)
  list(APPEND aiob_install_targets aiobridge_python_${tag})
  if(TARGET aiobridge_testing_${tag})
    list(APPEND aiob_install_targets aiobridge_testing_${tag})
  endif()
endforeach()
install(TARGETS ${aiob_install_targets} EXPORT aiobridgeTargets
        LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
        ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
        INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT aiobridgeTargets NAMESPACE aiobridge::
        DESTINATION ${AIOB_INSTALL_CMAKEDIR})

# The package: 0.x releases are compatible within a minor version.
set(AIOB_CONFIG_BACKENDS ${AIOB_BACKENDS})
set(AIOB_CONFIG_PYTHON_TAGS ${aiob_installed_tags})
set(AIOB_CONFIG_PKG_MODULES)
foreach(b IN LISTS AIOB_BACKENDS)
  string(TOUPPER ${b} B)
  list(APPEND AIOB_CONFIG_PKG_MODULES "AIOB_PKG_${B}=${AIOB_BACKEND_PKG_${b}}")
endforeach()
configure_package_config_file(cmake/aiobridgeConfig.cmake.in
    ${PROJECT_BINARY_DIR}/aiobridgeConfig.cmake
    INSTALL_DESTINATION ${AIOB_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/aiobridgeConfigVersion.cmake
    COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/aiobridgeConfig.cmake
              ${PROJECT_BINARY_DIR}/aiobridgeConfigVersion.cmake
              cmake/aiobridgePython.cmake
        DESTINATION ${AIOB_INSTALL_CMAKEDIR})

# pkg-config: aiobridge.pc links the shared library, aiobridge-static.pc the
# static one (use it with --static). Only the built backends are required.
set(AIOB_PC_REQUIRES)
foreach(b IN LISTS AIOB_BACKENDS)
  list(APPEND AIOB_PC_REQUIRES ${AIOB_BACKEND_PKG_${b}})
endforeach()
string(REPLACE ";" " " AIOB_PC_REQUIRES "${AIOB_PC_REQUIRES}")
file(RELATIVE_PATH AIOB_PC_TO_PREFIX "/prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/prefix")
string(REGEX REPLACE "/$" "" AIOB_PC_TO_PREFIX "${AIOB_PC_TO_PREFIX}")
string(REPLACE ";" " " AIOB_PC_BACKENDS "${AIOB_BACKENDS}")
foreach(pc aiobridge aiobridge-static)
  if(pc STREQUAL "aiobridge" AND NOT AIOB_INSTALL_SHARED)
    continue()
  endif()
  configure_file(cmake/${pc}.pc.in ${PROJECT_BINARY_DIR}/${pc}.pc @ONLY)
  install(FILES ${PROJECT_BINARY_DIR}/${pc}.pc DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
endforeach()

# The Python package: __init__.py, _layout.py (where the headers and the
# CMake package are, relative to the package) and _aiobridge per ABI.
# The backends and the libraries each links, for aiobridge.setup_helpers.
set(aiob_layout_backends "BACKEND_LIBRARIES = {\n")
foreach(b IN LISTS AIOB_BACKENDS)
  string(TOUPPER ${b} B)
  set(libs)
  foreach(l IN LISTS AIOB_PKG_${B}_LIBRARIES)
    string(APPEND libs "\"${l}\", ")
  endforeach()
  string(APPEND aiob_layout_backends "    \"${b}\": [${libs}],\n")
endforeach()
string(APPEND aiob_layout_backends "}\n")
list(LENGTH aiob_installed_tags aiob_ntags)
if(aiob_ntags GREATER 0)
  math(EXPR aiob_last "${aiob_ntags} - 1")
  foreach(i RANGE ${aiob_last})
    list(GET aiob_installed_tags ${i} tag)
    list(GET aiob_tag_exes ${i} py)
    set(pkgdir "${AIOB_INSTALL_PYTHON_PACKAGE_DIR}")
    if(pkgdir STREQUAL "")
      string(REGEX REPLACE "^cp3([0-9]+)d?$" "3.\\1" pyver ${tag})
      set(pkgdir "${CMAKE_INSTALL_LIBDIR}/python${pyver}/site-packages/aiobridge")
    endif()
    cmake_path(NORMAL_PATH pkgdir)
    foreach(what INCLUDE CMAKE)
      if(what STREQUAL "INCLUDE")
        set(to ${CMAKE_INSTALL_INCLUDEDIR})
      else()
        set(to ${AIOB_INSTALL_CMAKEDIR})
      endif()
      file(RELATIVE_PATH rel_${what} "/prefix/${pkgdir}" "/prefix/${to}")
    endforeach()
    file(RELATIVE_PATH rel_LIB "/prefix/${pkgdir}" "/prefix/${CMAKE_INSTALL_LIBDIR}")
    set(layout ${PROJECT_BINARY_DIR}/python-install/${tag}/_layout.py)
    file(WRITE ${layout} "VERSION = \"${PROJECT_VERSION}\"\nINCLUDE_DIR = \"${rel_INCLUDE}\"\nCMAKE_DIR = \"${rel_CMAKE}\"\nLIB_DIR = \"${rel_LIB}\"\n${aiob_layout_backends}")
    install(FILES bindings/python/aiobridge/__init__.py
                  bindings/python/aiobridge/setup_helpers.py ${layout}
            DESTINATION ${pkgdir})
    install(TARGETS aiobridge_module_${tag} LIBRARY DESTINATION ${pkgdir})
  endforeach()
endif()
