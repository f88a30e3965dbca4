/* The default runtime follows AIOBRIDGE_BACKEND (a testing and benchmarking
 * knob). Usage: default_backend <expected backend name | error name>
 * e.g. `AIOBRIDGE_BACKEND=event default_backend event`, or
 * `AIOBRIDGE_BACKEND=nope default_backend ENOENT`. */
#include "aiobridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static aiob_poll ready(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s <backend | error name>\n", argv[0]);
    return 2;
  }
  const char *env = getenv("AIOBRIDGE_BACKEND");
  aiob_runtime *rt;
  int rc = aiob_runtime_default(&rt);
  if (rc < 0) {
    printf("AIOBRIDGE_BACKEND=%s: %s (%s)\n", env ? env : "", aiob_err_name(rc),
           aiob_strerror(rc));
    return strcmp(aiob_err_name(rc), argv[1]) == 0 ? 0 : 1;
  }
  const char *name = aiob_runtime_backend_name(rt);
  printf("AIOBRIDGE_BACKEND=%s: default runtime on \"%s\"\n", env ? env : "",
         name);
  /* The runtime works, not just exists. */
  static const aiob_task_vtable vt = {.poll = ready};
  aiob_task *t;
  rc = aiob_spawn(rt, &vt, NULL, &t);
  if (rc == 0) {
    rc = aiob_task_wait(t, 10 * AIOB_SEC);
    aiob_task_release(t);
  }
  aiob_runtime_default_shutdown();
  return rc == 0 && strcmp(name, argv[1]) == 0 ? 0 : 1;
}
