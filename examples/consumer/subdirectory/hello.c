/* A C task on the default runtime: sleeps 1 ms, then returns 42. */
#include <aiobridge.h>

#include <stdint.h>
#include <stdio.h>
#include <string.h>

typedef struct job {
  int co;
  aiob_sleep sleep;
} job;

static aiob_poll job_poll(aiob_task *self, void *state) {
  job *j = state;
  AIOB_BEGIN(&j->co);
  aiob_sleep_init(&j->sleep, AIOB_MSEC);
  AIOB_AWAIT(&j->co, aiob_sleep_poll(self, &j->sleep, NULL));
  aiob_task_return(self, (void *)(intptr_t)42, NULL);
  AIOB_END(&j->co);
}

static const aiob_task_vtable job_vt = {.poll = job_poll};

int main(int argc, char **argv) {
  aiob_runtime *rt;
  int rc = aiob_runtime_default(&rt);
  if (rc < 0) {
    fprintf(stderr, "hello: %s\n", aiob_strerror(rc));
    return 1;
  }
  job j;
  memset(&j, 0, sizeof j);
  aiob_task *t;
  aiob_output out;
  if ((rc = aiob_spawn(rt, &job_vt, &j, &t)) < 0 ||
      (rc = aiob_task_wait(t, 60 * AIOB_SEC)) < 0 ||
      (rc = aiob_task_take_output(t, &out)) < 0) {
    fprintf(stderr, "hello: %s\n", aiob_strerror(rc));
    return 1;
  }
  aiob_task_release(t);
  const char *backend = aiob_runtime_backend_name(rt); /* static string */
  const char *want = argc > 1 ? argv[1] : "uv";
  printf("hello: %ld from a task on %s\n", (long)(intptr_t)out.value, backend);
  aiob_runtime_default_shutdown();
  return (intptr_t)out.value == 42 && strcmp(backend, want) == 0 ? 0 : 1;
}
