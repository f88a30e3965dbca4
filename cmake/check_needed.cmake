cmake_minimum_required(VERSION 3.25)
# ctest helper: checks which backend libraries a shared library links.
#   cmake -DLIB=<path> -DWANT=uv,event -P check_needed.cmake
# Fails if a selected backend's library is missing from DT_NEEDED, or if an
# unselected one is present.
string(REPLACE "," ";" WANT "${WANT}")
execute_process(COMMAND readelf -d ${LIB} OUTPUT_VARIABLE dyn
                COMMAND_ERROR_IS_FATAL ANY)
set(libs uv "libuv\\.so" event "libevent_core" uring "liburing\\.so")
set(ok TRUE)
list(LENGTH libs n)
math(EXPR last "${n} - 1")
foreach(i RANGE 0 ${last} 2)
  math(EXPR j "${i} + 1")
  list(GET libs ${i} name)
  list(GET libs ${j} pattern)
  string(REGEX MATCH "NEEDED[^\n]*${pattern}" hit "${dyn}")
  if(name IN_LIST WANT AND NOT hit)
    message(SEND_ERROR "${LIB}: backend '${name}' selected but its library is not linked")
    set(ok FALSE)
  elseif(NOT name IN_LIST WANT AND hit)
    message(SEND_ERROR "${LIB}: backend '${name}' not selected but linked: ${hit}")
    set(ok FALSE)
  endif()
endforeach()
if(ok)
  message(STATUS "${LIB}: links exactly the libraries of: ${WANT}")
endif()
