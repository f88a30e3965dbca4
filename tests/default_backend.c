/* The default runtime follows AIOBRIDGE_BACKEND and AIOBRIDGE_SPIN_US
 * (testing and benchmarking knobs).
 * Usage: default_backend <expected backend name | error name> [spin_us]
 * e.g. `AIOBRIDGE_BACKEND=event default_backend event`,
 * `AIOBRIDGE_BACKEND=nope default_backend ENOENT`, or
 * `AIOBRIDGE_SPIN_US=7 default_backend uv 7`. */
#include "aiobridge.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static aiob_poll ready(aiob_task *t, void *p) {
  (void)t;
  (void)p;
  return AIOB_READY;
}

static void peek_fn(aiob_runtime *rt, void *arg) { *(aiob_runtime **)arg = rt; }

/* aiob_runtime_default_peek never creates the runtime. */
static int peek(aiob_runtime *want) {
  aiob_runtime *seen = NULL;
  int rc = aiob_runtime_default_peek(peek_fn, &seen);
  if (want ? rc != 0 || seen != want : rc != AIOB_ENOENT || seen != NULL) {
    printf("aiob_runtime_default_peek: %s, runtime %p, expected %p\n",
           aiob_err_name(rc), (void *)seen, (void *)want);
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  if (argc != 2 && argc != 3) {
    fprintf(stderr, "usage: %s <backend | error name> [spin_us]\n", argv[0]);
    return 2;
  }
  const char *env = getenv("AIOBRIDGE_BACKEND");
  aiob_runtime *rt;
  if (peek(NULL))
    return 1;
  int rc = aiob_runtime_default(&rt);
  if (rc < 0) {
    const char *spin = getenv("AIOBRIDGE_SPIN_US");
    const char *why = aiob_runtime_config_error();
    printf("AIOBRIDGE_BACKEND=%s AIOBRIDGE_SPIN_US=%s: %s (%s)\n",
           env ? env : "", spin ? spin : "", aiob_err_name(rc), why);
    /* The reason names what was wrong: the backend, or the spin value. */
    const char *named = rc == AIOB_ENOENT ? env : spin;
    if (!named || !strstr(why, named)) {
      printf("the reason does not name \"%s\"\n", named ? named : "");
      return 1;
    }
    return strcmp(aiob_err_name(rc), argv[1]) == 0 ? 0 : 1;
  }
  const char *name = aiob_runtime_backend_name(rt);
  unsigned spin = aiob_runtime_spin_us(rt);
  printf("AIOBRIDGE_BACKEND=%s: default runtime on \"%s\", spin %u us\n",
         env ? env : "", name, spin);
  /* The runtime works, not just exists. */
  static const aiob_task_vtable vt = {.poll = ready};
  aiob_task *t;
  rc = aiob_spawn(rt, &vt, NULL, &t);
  if (rc == 0) {
    rc = aiob_task_wait(t, 10 * AIOB_SEC);
    aiob_task_release(t);
  }
  if (peek(rt))
    return 1;
  aiob_runtime_default_shutdown();
  if (peek(NULL))
    return 1;
  unsigned want = argc == 3 ? (unsigned)atoi(argv[2]) : AIOB_SPIN_US_DEFAULT;
  return rc == 0 && strcmp(name, argv[1]) == 0 && spin == want ? 0 : 1;
}
