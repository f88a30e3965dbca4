# The libraries, each with an aiobridge:: name that is the same inside this
# tree, for a parent that add_subdirectory()s it, and from an install:
#
#   aiobridge::aiobridge         libaiobridge.so: the core and every backend
#                                of AIOB_BACKENDS; exports only aiob_* API
#   aiobridge::aiobridge_static  libaiobridge.a: the same, static
#   aiobridge::<backend>         libaiobridge_<backend>.a: the core and that
#                                one backend, which is also the default
#                                runtime's; links only that backend's library
#
# Static archives are position-independent with hidden symbols, so they link
# into shared objects (Python extensions) without exporting anything.
set(AIOB_CORE_SOURCES blocking.c error.c heap.c hosted.c io.c mpsc.c promise.c runtime.c
    spin_gate.c task.c timer.c)
list(TRANSFORM AIOB_CORE_SOURCES PREPEND ${PROJECT_SOURCE_DIR}/core/)
list(TRANSFORM AIOB_BACKEND_SOURCES PREPEND ${PROJECT_SOURCE_DIR}/)
set(AIOB_INCLUDE_DIR ${PROJECT_SOURCE_DIR}/include)

# Shared library objects: the public API gets default visibility.
add_library(aiobridge_objects OBJECT ${AIOB_CORE_SOURCES} ${AIOB_BACKEND_SOURCES}
            ${PROJECT_SOURCE_DIR}/core/registry.c)
target_compile_definitions(aiobridge_objects PRIVATE AIOB_BUILDING
    AIOB_DEFAULT_BACKEND="${AIOB_DEFAULT_BACKEND}" ${AIOB_BACKEND_DEFINITIONS})

# Static objects, compiled once: the core without its registry, and each
# backend. The registry (which backends exist, which one is the default) is
# compiled once per archive.
add_library(aiobridge_core_objects OBJECT ${AIOB_CORE_SOURCES})
target_compile_definitions(aiobridge_core_objects PRIVATE AIOB_STATIC)
add_library(aiobridge_registry_objects OBJECT ${PROJECT_SOURCE_DIR}/core/registry.c)
target_compile_definitions(aiobridge_registry_objects PRIVATE AIOB_STATIC
    AIOB_DEFAULT_BACKEND="${AIOB_DEFAULT_BACKEND}" ${AIOB_BACKEND_DEFINITIONS})
set(aiob_object_targets aiobridge_objects aiobridge_core_objects aiobridge_registry_objects)
set(aiob_backend_objects)
foreach(b IN LISTS AIOB_BACKENDS)
  string(TOUPPER ${b} B)
  add_library(aiobridge_${b}_objects OBJECT ${PROJECT_SOURCE_DIR}/backends/${b}/${b}_backend.c)
  target_compile_definitions(aiobridge_${b}_objects PRIVATE AIOB_STATIC)
  add_library(aiobridge_registry_${b}_objects OBJECT ${PROJECT_SOURCE_DIR}/core/registry.c)
  target_compile_definitions(aiobridge_registry_${b}_objects PRIVATE AIOB_STATIC
      AIOB_DEFAULT_BACKEND="${b}" AIOB_HAVE_${B})
  list(APPEND aiob_object_targets aiobridge_${b}_objects aiobridge_registry_${b}_objects)
  list(APPEND aiob_backend_objects $<TARGET_OBJECTS:aiobridge_${b}_objects>)
endforeach()
foreach(t IN LISTS aiob_object_targets)
  target_include_directories(${t} PRIVATE ${AIOB_INCLUDE_DIR} ${PROJECT_SOURCE_DIR}/core)
  target_compile_definitions(${t} PRIVATE _GNU_SOURCE)
  target_link_libraries(${t} PRIVATE ${AIOB_BACKEND_LIBRARIES})
  aiob_target_flags(${t})
endforeach()

# aiob_library(<target> <SHARED|STATIC> <output name> <backend libs> OBJECTS...)
function(aiob_library target kind output libs)
  add_library(${target} ${kind})
  target_sources(${target} PRIVATE ${ARGN})
  target_include_directories(${target} PUBLIC
      $<BUILD_INTERFACE:${AIOB_INCLUDE_DIR}> $<INSTALL_INTERFACE:include>)
  target_link_libraries(${target} PUBLIC Threads::Threads PRIVATE ${libs})
  set_target_properties(${target} PROPERTIES OUTPUT_NAME ${output})
  aiob_target_flags(${target})
endfunction()

aiob_library(aiobridge SHARED aiobridge "${AIOB_BACKEND_LIBRARIES}"
             $<TARGET_OBJECTS:aiobridge_objects>)
set_target_properties(aiobridge PROPERTIES
    VERSION ${PROJECT_VERSION} SOVERSION ${PROJECT_VERSION_MAJOR}
    EXPORT_NAME aiobridge)
aiob_library(aiobridge_static STATIC aiobridge "${AIOB_BACKEND_LIBRARIES}"
             $<TARGET_OBJECTS:aiobridge_core_objects> ${aiob_backend_objects}
             $<TARGET_OBJECTS:aiobridge_registry_objects>)
set_target_properties(aiobridge_static PROPERTIES EXPORT_NAME aiobridge_static)
add_library(aiobridge::aiobridge ALIAS aiobridge)
add_library(aiobridge::aiobridge_static ALIAS aiobridge_static)
set(AIOB_EXPORTED_TARGETS aiobridge_static)
if(AIOB_INSTALL_SHARED)
  list(APPEND AIOB_EXPORTED_TARGETS aiobridge)
endif()
foreach(b IN LISTS AIOB_BACKENDS)
  aiob_library(aiobridge_${b} STATIC aiobridge_${b} "${AIOB_BACKEND_LIB_${b}}"
               $<TARGET_OBJECTS:aiobridge_core_objects>
               $<TARGET_OBJECTS:aiobridge_${b}_objects>
               $<TARGET_OBJECTS:aiobridge_registry_${b}_objects>)
  set_target_properties(aiobridge_${b} PROPERTIES EXPORT_NAME ${b})
  add_library(aiobridge::${b} ALIAS aiobridge_${b})
  list(APPEND AIOB_EXPORTED_TARGETS aiobridge_${b})
endforeach()
set_property(GLOBAL PROPERTY AIOBRIDGE_BACKENDS ${AIOB_BACKENDS})
