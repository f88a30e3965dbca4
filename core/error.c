/* Error strings from the one AIOB_ERRNO_MAP table, and the clock. */
#include "internal.h"

#include <time.h>

const char *aiob_strerror(int err) {
  switch (err) {
#define AIOB__ERR_MSG(name, value, msg)                                        \
  case -(value):                                                               \
    return msg;
    AIOB_ERRNO_MAP(AIOB__ERR_MSG)
#undef AIOB__ERR_MSG
  case AIOB_EBADSTATUS:
    return "aiob_task_fail was given a code >= 0";
  case 0:
    return "success";
  default:
    return "unknown error";
  }
}

const char *aiob_err_name(int err) {
  switch (err) {
#define AIOB__ERR_NAME(name, value, msg)                                       \
  case -(value):                                                               \
    return #name;
    AIOB_ERRNO_MAP(AIOB__ERR_NAME)
#undef AIOB__ERR_NAME
  case AIOB_EBADSTATUS:
    return "EBADSTATUS";
  case 0:
    return "OK";
  default:
    return "UNKNOWN";
  }
}

uint64_t aiob_now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * AIOB_SEC + (uint64_t)ts.tv_nsec;
}

void aiob_output_clear(aiob_output *o) {
  if (o->value && o->free_value)
    o->free_value(o->value);
  o->status = 0;
  o->value = NULL;
  o->free_value = NULL;
}
