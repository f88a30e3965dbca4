/* Errors carried in task outputs.
 *
 * A C task fails with a Python exception (aiob_py_task_raise, an errno with
 * file names, or an awaited awaitable that raised) by returning a py_error
 * with status AIOB_PY_EXCEPTION: plain C data that crosses threads without
 * the GIL and becomes the exception on the loop thread
 * (aiob__py_exception_for), as errno-style codes become their OSError
 * subclass there. */
#include "bridge_internal.h"

#include <stdlib.h>
#include <string.h>

void aiob__py_error_free(void *p) {
  py_error *e = p;
  aiob_py_release(e->exc);
  free(e->msg);
  free(e->filename);
  free(e->filename2);
  free(e);
}

static char *dup_or_null(const char *s, bool *failed) {
  char *d = s ? strdup(s) : NULL;
  *failed |= s && !d;
  return d;
}

/* Fills *out with a failure carried as a py_error: exc_type(msg), or (type
 * NULL) OSError(err, strerror(err), filename, None, filename2). No GIL
 * needed. Returns 0, or AIOB_ENOMEM with *out untouched. */
int aiob__py_error_output(aiob_output *out, PyObject *type, const char *msg,
                          int err, const char *filename,
                          const char *filename2) {
  py_error *e = calloc(1, sizeof *e);
  if (!e)
    return AIOB_ENOMEM;
  bool failed = false;
  e->type = type;
  e->err = err;
  e->msg = dup_or_null(type ? (msg ? msg : "") : NULL, &failed);
  e->filename = dup_or_null(filename, &failed);
  e->filename2 = dup_or_null(filename2, &failed);
  if (failed) {
    aiob__py_error_free(e);
    return AIOB_ENOMEM;
  }
  *out = (aiob_output){AIOB_PY_EXCEPTION, e, aiob__py_error_free};
  return 0;
}

int aiob_py_task_raise(aiob_task *self, PyObject *exc_type, const char *msg) {
  if (!exc_type)
    return AIOB_EINVAL;
  aiob_output out;
  int rc = aiob__py_error_output(&out, exc_type, msg, 0, NULL, NULL);
  if (rc == 0)
    aiob_task_forward(self, &out);
  return rc;
}

int aiob_py_task_fail_path(aiob_task *self, int err, const char *filename,
                           const char *filename2) {
  if (err >= 0 || err < -4095) {
    aiob_task_fail(self, err);
    return AIOB_EINVAL;
  }
  aiob_output out;
  int rc = aiob__py_error_output(&out, NULL, NULL, -err, filename, filename2);
  if (rc == 0)
    aiob_task_forward(self, &out);
  else
    aiob_task_fail(self, err);
  return rc;
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

/* A file name as Python's os functions give it (the file system encoding,
 * undecodable bytes escaped), or None. */
static PyObject *fs_name(const char *name) {
  if (!name)
    Py_RETURN_NONE;
  return PyUnicode_DecodeFSDefault(name);
}

/* OSError(err, strerror, filename, None, filename2): the subclass Python
 * uses for that errno, its message decoded as Python decodes strerror's
 * (the locale's, undecodable bytes escaped). */
static PyObject *os_error(int err, const char *filename,
                          const char *filename2) {
  PyObject *text = PyUnicode_DecodeLocale(strerror(err), "surrogateescape");
  PyObject *f1 = fs_name(filename), *f2 = fs_name(filename2);
  PyObject *exc = text && f1 && f2
                      ? PyObject_CallFunction(PyExc_OSError, "iOOOO", err, text,
                                              f1, Py_None, f2)
                      : NULL;
  Py_XDECREF(text);
  Py_XDECREF(f1);
  Py_XDECREF(f2);
  return exc;
}

/* type(msg), msg decoded as UTF-8 with bad bytes replaced: a message from C
 * (localized text, a host name) never turns into a UnicodeDecodeError. */
static PyObject *raise_with(PyObject *type, const char *msg) {
  PyObject *text =
      PyUnicode_DecodeUTF8(msg, (Py_ssize_t)strlen(msg), "replace");
  PyObject *exc = text ? PyObject_CallOneArg(type, text) : NULL;
  Py_XDECREF(text);
  return exc;
}

/* SystemError(msg) for a bug in a C task; msg is consumed (NULL: NULL). */
static PyObject *bug(PyObject *msg) {
  PyObject *exc = msg ? PyObject_CallOneArg(PyExc_SystemError, msg) : NULL;
  Py_XDECREF(msg);
  return exc;
}

/* A new exception object for a failed output (GIL); shutdown_error is the
 * bridge's aiobridge.ShutdownError, name the task's (or NULL). A status
 * that is no errno, no Python exception and no aiobridge code is a bug in
 * the C task: SystemError names the task and the status. */
PyObject *aiob__py_exception_for(PyObject *shutdown_error, aiob_output *out,
                                 const char *name) {
  int st = out->status;
  const char *who = name ? name : "a C task";
  /* Only the bridge's own py_error values carry an exception: a status of
   * AIOB_PY_EXCEPTION set by hand, with any other value, carries none. */
  if (st == AIOB_PY_EXCEPTION && out->value &&
      out->free_value == aiob__py_error_free) {
    py_error *e = out->value;
    if (e->exc) {
      Py_INCREF(e->exc);
      return e->exc;
    }
    if (!e->type)
      return os_error(e->err, e->filename, e->filename2);
    return raise_with(e->type, e->msg);
  }
  if (st == AIOB_PY_EXCEPTION)
    return bug(PyUnicode_FromFormat(
        "aiobridge: %s failed with AIOB_PY_EXCEPTION but carried no "
        "exception (pass an awaited failure on with aiob_task_forward, or "
        "raise with aiob_py_task_raise)",
        who));
  if (st == AIOB_ESHUTDOWN) /* not ESHUTDOWN's BrokenPipeError */
    return PyObject_CallFunction(shutdown_error, "s",
                                 "aiobridge: the runtime is shutting down");
  if (st == AIOB_EBADSTATUS)
    return bug(PyUnicode_FromFormat("aiobridge: %s failed with a status >= 0 "
                                    "(aiob_task_fail, or a blocking "
                                    "function's return, needs a negative "
                                    "error code)",
                                    who));
  if (st < -4095)
    return bug(PyUnicode_FromFormat("aiobridge: %s failed with the status %d, "
                                    "which is not a negated errno",
                                    who, st));
  return os_error(-st, NULL, NULL);
}
