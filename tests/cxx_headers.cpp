// The public headers compile as C++ and the API links from C++.
#include "aiobridge.h"

#include <cstdio>
#include <cstring>

static aiob_poll poll_once(aiob_task *task, void *state) {
  (void)task;
  *static_cast<int *>(state) += 1;
  return AIOB_READY;
}

int main() {
  aiob_runtime *rt = nullptr;
  int rc = aiob_runtime_new(&rt, nullptr);
  if (rc < 0) {
    std::fprintf(stderr, "runtime: %s\n", aiob_strerror(rc));
    return 1;
  }
  static const aiob_task_vtable vt = {poll_once, nullptr, "cxx.poll_once"};
  int polls = 0;
  aiob_task *t = nullptr;
  rc = aiob_spawn(rt, &vt, &polls, &t);
  if (rc == 0)
    rc = aiob_task_wait(t, 10 * AIOB_SEC);
  aiob_task_release(t);
  aiob_runtime_free(rt);
  if (rc < 0 || polls != 1 ||
      std::strcmp(aiob_err_name(AIOB_EINVAL), "EINVAL")) {
    std::fprintf(stderr, "rc=%d polls=%d\n", rc, polls);
    return 1;
  }
  std::puts("C++: ok");
  return 0;
}
