/* The async test harness (aiobridge/testing.h): every selected test is a C
 * task started as a CTask from a small asyncio driver (a semaphore for
 * --jobs, asyncio.wait_for for --timeout), on the loop that aiob_main's
 * machinery runs on the main thread. Outcomes are recorded, Python is
 * finalized, and then cmocka reports one test per C test, so its output
 * and exit status are what ctest and CI already read. */
#include "aiobridge/testing.h"

#include "bridge_internal.h"

#include <fnmatch.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static aiob_test *registry;
static aiob_test **registry_tail = &registry;

void aiob_test_register(aiob_test *t) {
  t->next = NULL;
  *registry_tail = t;
  registry_tail = &t->next;
}

void aiob_test_fail(aiob_task *self, const char *file, int line,
                    const char *fmt, ...) {
  char msg[1024];
  int n = snprintf(msg, sizeof msg, "%s:%d: ", file, line);
  if (n < 0)
    n = 0;
  if ((size_t)n >= sizeof msg)
    n = (int)sizeof msg - 1; /* a very long path: the message is cut */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
  va_end(ap);
  if (aiob_py_task_raise(self, PyExc_AssertionError, msg) < 0)
    aiob_task_fail(self, AIOB_ENOMEM);
}

/* One selected test and its outcome. */
typedef struct test_run {
  aiob_test *test;
  aiob_task_vtable vt;
  aiob_py_bridge *b;
  int reported;
  char *failure; /* NULL: passed */
} test_run;

/* make(): the test's CTask, on the running loop (GIL). */
static PyObject *make_task(PyObject *cap, PyObject *unused) {
  (void)unused;
  test_run *r = PyCapsule_GetPointer(cap, NULL);
  if (!r)
    return NULL;
  void *state = calloc(1, r->test->state_size ? r->test->state_size : 1);
  if (!state)
    return PyErr_NoMemory();
  PyObject *task = aiob_py_future_into_py(r->b, &r->vt, state, NULL);
  if (!task)
    free(state);
  return task;
}

/* report(failure or None): records the outcome (GIL). */
static PyObject *report(PyObject *cap, PyObject *failure) {
  test_run *r = PyCapsule_GetPointer(cap, NULL);
  if (!r)
    return NULL;
  r->reported = 1;
  free(r->failure);
  r->failure = NULL;
  if (failure != Py_None) {
    const char *text = PyUnicode_AsUTF8(failure);
    if (!text)
      return NULL;
    r->failure = strdup(text);
    if (!r->failure) /* still a failure, never a pass */
      r->failure = strdup("out of memory recording the failure");
    if (!r->failure)
      return PyErr_NoMemory();
  }
  Py_RETURN_NONE;
}

static PyMethodDef make_def = {"make", make_task, METH_NOARGS, NULL};
static PyMethodDef report_def = {"report", report, METH_O, NULL};

static const char driver_source[] =
    "import asyncio, traceback\n"
    "async def drive(tests, timeout, jobs):\n"
    "    sem = asyncio.Semaphore(jobs)\n"
    "    async def one(make, report):\n"
    "        async with sem:\n"
    "            try:\n"
    "                await asyncio.wait_for(make(), timeout)\n"
    "            except asyncio.TimeoutError:\n"
    "                report(f'timed out after {timeout:g} s (cancelled)')\n"
    "            except (KeyboardInterrupt, SystemExit):\n"
    "                raise\n"
    "            except BaseException as e:  # CancelledError: the C task's\n"
    "                report(''.join(traceback.format_exception(\n"
    "                    type(e), e, e.__traceback__)).rstrip())\n"
    "            else:\n"
    "                report(None)\n"
    "    await asyncio.gather(*(one(m, r) for m, r in tests))\n";

/* drive(tests, timeout, jobs) as a coroutine, or NULL (exception set). */
static PyObject *driver(test_run *runs, size_t n, double timeout, long jobs) {
  PyObject *drive = aiob__py_source_fn(driver_source, "drive");
  PyObject *tests = drive ? PyList_New(0) : NULL, *coro = NULL;
  if (!tests)
    goto out;
  for (size_t i = 0; i < n; i++) {
    PyObject *cap = PyCapsule_New(&runs[i], NULL, NULL);
    PyObject *make = cap ? PyCFunction_New(&make_def, cap) : NULL;
    PyObject *rep = cap ? PyCFunction_New(&report_def, cap) : NULL;
    PyObject *pair = make && rep ? PyTuple_Pack(2, make, rep) : NULL;
    int rc = pair ? PyList_Append(tests, pair) : -1;
    Py_XDECREF(pair);
    Py_XDECREF(rep);
    Py_XDECREF(make);
    Py_XDECREF(cap);
    if (rc < 0)
      goto out;
  }
  coro = PyObject_CallFunction(drive, "Odl", tests, timeout, jobs);
out:
  Py_XDECREF(tests);
  Py_XDECREF(drive);
  return coro;
}

/* cmocka test: the recorded outcome. */
static void check_outcome(void **state) {
  test_run *r = *state;
  if (!r->reported) /* a driver failure stops before cmocka: defensive */
    fail_msg("%s did not run to an outcome", r->test->name);
  if (r->failure)
    fail_msg("%s", r->failure);
}

static int usage(const char *prog) {
  fprintf(stderr,
          "usage: %s [PATTERN...] [--timeout SEC] [--jobs N] [--list]\n", prog);
  return 2;
}

static int selected(const aiob_test *t, char **patterns, int npatterns) {
  if (npatterns == 0)
    return 1;
  for (int i = 0; i < npatterns; i++)
    if (fnmatch(patterns[i], t->name, 0) == 0)
      return 1;
  return 0;
}

int aiob_test_main(int argc, char **argv) {
  const char *prog = argc > 0 ? argv[0] : "tests";
  double timeout = 60;
  long jobs = 1;
  int list = 0, npatterns = 0;
  char **patterns = calloc((size_t)(argc > 0 ? argc : 1), sizeof *patterns);
  if (!patterns)
    return 1;
  for (int i = 1; i < argc; i++) {
    char *end = NULL;
    if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc) {
      timeout = strtod(argv[++i], &end);
      if (*end || !(timeout > 0))
        return free(patterns), usage(prog);
    } else if (strcmp(argv[i], "--jobs") == 0 && i + 1 < argc) {
      jobs = strtol(argv[++i], &end, 10);
      if (*end || jobs < 1)
        return free(patterns), usage(prog);
    } else if (strcmp(argv[i], "--list") == 0) {
      list = 1;
    } else if (argv[i][0] == '-') {
      return free(patterns), usage(prog);
    } else {
      patterns[npatterns++] = argv[i];
    }
  }
  size_t n = 0;
  for (aiob_test *t = registry; t; t = t->next)
    n += (size_t)selected(t, patterns, npatterns);
  test_run *runs = calloc(n ? n : 1, sizeof *runs);
  struct CMUnitTest *cases = calloc(n ? n : 1, sizeof *cases);
  if (!runs || !cases) {
    free(patterns);
    free(runs);
    free(cases);
    return 1;
  }
  size_t k = 0;
  for (aiob_test *t = registry; t; t = t->next) {
    if (!selected(t, patterns, npatterns))
      continue;
    if (list)
      printf("%s\n", t->name);
    runs[k].test = t;
    runs[k].vt = (aiob_task_vtable){.poll = t->poll, .drop = free};
    cases[k] = (struct CMUnitTest){
        .name = t->name, .test_func = check_outcome, .initial_state = &runs[k]};
    k++;
  }
  free(patterns);
  if (list || n == 0) {
    if (n == 0)
      fprintf(stderr, "%s: no test matches\n", prog);
    free(runs);
    free(cases);
    return list ? 0 : 1;
  }

  aiob_main_config cfg;
  aiob_main_config_init(&cfg, 1, argv);
  aiob_py_bridge *b;
  PyObject *factory, *res = NULL;
  int status = aiob__py_main_start(&cfg, &b, &factory);
  if (status == 0) {
    for (size_t i = 0; i < n; i++)
      runs[i].b = b;
    PyObject *coro = driver(runs, n, timeout, jobs);
    if (coro) {
      res = aiob__py_main_run(factory, coro);
      Py_DECREF(coro);
    }
  }
  status = aiob__py_main_finish(b, factory, res, status);
  int failed = status;
  if (status == 0)
    failed = _cmocka_run_group_tests("aiobridge", cases, n, NULL, NULL);
  for (size_t i = 0; i < n; i++)
    free(runs[i].failure);
  free(runs);
  free(cases);
  return failed ? 1 : 0;
}
