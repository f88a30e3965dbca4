# Warning and sanitizer flags for the project's own targets.
if(NOT AIOB_SANITIZE STREQUAL "" AND
   NOT AIOB_SANITIZE STREQUAL "address" AND NOT AIOB_SANITIZE STREQUAL "thread")
  message(FATAL_ERROR "AIOB_SANITIZE must be empty, 'address' or 'thread'")
endif()

set(AIOB_SANITIZE_FLAGS)
if(AIOB_SANITIZE STREQUAL "address")
  set(AIOB_SANITIZE_FLAGS -fsanitize=address,undefined -fno-sanitize-recover=all
                          -fno-omit-frame-pointer)
elseif(AIOB_SANITIZE STREQUAL "thread")
  set(AIOB_SANITIZE_FLAGS -fsanitize=thread -fno-omit-frame-pointer)
endif()
if(AIOB_SANITIZE_FLAGS)
  add_compile_options(${AIOB_SANITIZE_FLAGS})
  add_link_options(${AIOB_SANITIZE_FLAGS})
endif()

function(aiob_target_flags target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wshadow
      $<$<COMPILE_LANGUAGE:C>:-Wstrict-prototypes -Wmissing-prototypes>
      $<$<BOOL:${AIOB_WERROR}>:-Werror>)
endfunction()
