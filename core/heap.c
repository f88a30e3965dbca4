/* Binary min-heap of armed sleeps, ordered by deadline (then by insertion
 * through the array position). Each sleep remembers its index so removal is
 * O(log n). One heap per loop, loop thread only. */
#include "internal.h"

#include <stdlib.h>

void aiob__heap_init(aiob__timer_heap *h) {
  h->items = NULL;
  h->len = h->cap = 0;
}

void aiob__heap_free(aiob__timer_heap *h) {
  free(h->items);
  aiob__heap_init(h);
}

static void heap_set(aiob__timer_heap *h, size_t i, aiob_sleep *s) {
  h->items[i] = s;
  s->heap_index = i;
}

static void heap_up(aiob__timer_heap *h, size_t i) {
  aiob_sleep *s = h->items[i];
  while (i > 0) {
    size_t parent = (i - 1) / 2;
    if (h->items[parent]->deadline <= s->deadline)
      break;
    heap_set(h, i, h->items[parent]);
    i = parent;
  }
  heap_set(h, i, s);
}

static void heap_down(aiob__timer_heap *h, size_t i) {
  aiob_sleep *s = h->items[i];
  for (;;) {
    size_t child = 2 * i + 1;
    if (child >= h->len)
      break;
    if (child + 1 < h->len &&
        h->items[child + 1]->deadline < h->items[child]->deadline)
      child++;
    if (s->deadline <= h->items[child]->deadline)
      break;
    heap_set(h, i, h->items[child]);
    i = child;
  }
  heap_set(h, i, s);
}

int aiob__heap_push(aiob__timer_heap *h, aiob_sleep *s) {
  if (h->len == h->cap) {
    size_t cap = h->cap ? h->cap * 2 : 64;
    aiob_sleep **items = realloc(h->items, cap * sizeof *items);
    if (!items)
      return AIOB_ENOMEM;
    h->items = items;
    h->cap = cap;
  }
  heap_set(h, h->len++, s);
  heap_up(h, s->heap_index);
  return 0;
}

void aiob__heap_remove(aiob__timer_heap *h, aiob_sleep *s) {
  size_t i = s->heap_index;
  aiob_sleep *last = h->items[--h->len];
  if (i == h->len)
    return;
  heap_set(h, i, last);
  if (i > 0 && h->items[(i - 1) / 2]->deadline > last->deadline)
    heap_up(h, i);
  else
    heap_down(h, i);
}
