/* Errors carried in task outputs.
 *
 * A C task fails with a Python exception (aiob_py_task_raise, or an awaited
 * awaitable that raised) by returning a py_error with status
 * AIOB_PY_EXCEPTION: plain C data that crosses threads without the GIL and
 * becomes the exception on the loop thread (aiob__py_exception_for), as
 * errno-style codes become their OSError subclass there. */
#include "bridge_internal.h"

#include <stdlib.h>
#include <string.h>

void aiob__py_error_free(void *p) {
  py_error *e = p;
  aiob_py_release(e->exc);
  free(e->msg);
  free(e);
}

int aiob_py_task_raise(aiob_task *self, PyObject *exc_type, const char *msg) {
  py_error *e = calloc(1, sizeof *e);
  if (!e || !(e->msg = strdup(msg ? msg : ""))) {
    free(e);
    return AIOB_ENOMEM;
  }
  e->type = exc_type;
  aiob_task_fail(self, AIOB_PY_EXCEPTION);
  aiob_task_return(self, e, aiob__py_error_free);
  return 0;
}

/* The current exception, normalized and with its traceback attached, as a
 * new reference (NULL if none was set); the error indicator is cleared. */
PyObject *aiob__py_take_exception(void) {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (value && tb)
    PyException_SetTraceback(value, tb);
  Py_XDECREF(type);
  Py_XDECREF(tb);
  return value;
}

/* A new exception object for a failed output (GIL); shutdown_error is the
 * bridge's aiobridge.ShutdownError. */
PyObject *aiob__py_exception_for(PyObject *shutdown_error, aiob_output *out) {
  if (out->status == AIOB_PY_EXCEPTION && out->value) {
    py_error *e = out->value;
    if (e->exc) {
      Py_INCREF(e->exc);
      return e->exc;
    }
    return PyObject_CallFunction(e->type, "s", e->msg);
  }
  if (out->status == AIOB_PY_EXCEPTION)
    return PyObject_CallFunction(PyExc_RuntimeError, "s", "unknown error");
  if (out->status == AIOB_ESHUTDOWN) /* not ESHUTDOWN's BrokenPipeError */
    return PyObject_CallFunction(shutdown_error, "s",
                                 "aiobridge: the runtime is shutting down");
  /* OSError(errno, msg) returns the subclass Python uses for that errno. */
  int err = -out->status;
  return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}
