/* A program that owns main (AIOB_MAIN) whose main task sleeps until it is
 * cancelled: tests/python/test_embed.py sends it SIGINT. Its drop says it
 * ran, so the test sees that Ctrl-C cancelled the main task. */
#include <aiobridge/embed.h>

#include <stdint.h>
#include <stdio.h>

typedef struct app {
  int co;
  aiob_sleep sleep;
} app;

static aiob_poll app_main(aiob_task *self, void *p) {
  app *a = p;
  AIOB_BEGIN(&a->co);
  aiob_sleep_init(&a->sleep, UINT64_MAX);
  printf("ready\n");
  fflush(stdout);
  AIOB_AWAIT(&a->co, aiob_sleep_poll(self, &a->sleep, NULL));
  AIOB_END(&a->co);
}

static void app_drop(void *p) {
  (void)p;
  printf("main task dropped\n");
  fflush(stdout);
}

int main(int argc, char **argv) {
  static app state;
  static const aiob_task_vtable vt = {.poll = app_main, .drop = app_drop};
  aiob_main_config cfg;
  aiob_main_config_init(&cfg, argc, argv);
  return aiob_main(&cfg, &vt, &state);
}
