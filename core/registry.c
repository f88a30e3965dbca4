/* The one place the core names backends: the compiled-in tables. */
#include "internal.h"

#include <string.h>

#ifdef AIOB_HAVE_UV
extern const aiob_backend aiob__backend_uv;
#endif
#ifdef AIOB_HAVE_EVENT
extern const aiob_backend aiob__backend_event;
#endif
#ifdef AIOB_HAVE_URING
extern const aiob_backend aiob__backend_uring;
#endif

static const aiob_backend *const compiled[] = {
#ifdef AIOB_HAVE_UV
    &aiob__backend_uv,
#endif
#ifdef AIOB_HAVE_EVENT
    &aiob__backend_event,
#endif
#ifdef AIOB_HAVE_URING
    &aiob__backend_uring,
#endif
    NULL,
};

#define NCOMPILED (sizeof compiled / sizeof compiled[0] - 1)

const aiob_backend *aiob_backend_find(const char *name) {
  if (!name)
    return NULL;
  for (size_t i = 0; i < NCOMPILED; i++)
    if (strcmp(compiled[i]->name, name) == 0)
      return compiled[i];
  return NULL;
}

/* The default backend first, then the others in build order. */
const aiob_backend *aiob_backend_at(unsigned i) {
  const aiob_backend *def = aiob_backend_find(AIOB_DEFAULT_BACKEND);
  if (i == 0)
    return def;
  unsigned seen = 1;
  for (size_t k = 0; k < NCOMPILED; k++) {
    if (compiled[k] == def)
      continue;
    if (seen++ == i)
      return compiled[k];
  }
  return NULL;
}

#define REQUIRED_END                                                           \
  (offsetof(aiob_backend, timer_stop) + sizeof(void (*)(void *)))

int aiob_backend_validate(const aiob_backend *b) {
  if (!b || b->abi_major != AIOB_BACKEND_ABI_MAJOR || b->size < REQUIRED_END ||
      !b->name || !b->name[0] || !b->loop_init || !b->loop_close || !b->run ||
      !b->wake || !b->timer_start || !b->timer_stop)
    return AIOB_EINVAL;
  return 0;
}
