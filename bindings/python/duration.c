/* Durations: a Python number of seconds (or of another unit) as the
 * nanoseconds aiob_sleep_init takes, for extensions that accept timeouts
 * and delays from Python. */
#include "bridge_internal.h"

#include <math.h>

int aiob_py_duration_ns(PyObject *number, double unit_ns, uint64_t *out) {
  double v = PyFloat_AsDouble(number);
  if (v == -1.0 && PyErr_Occurred())
    return -1;
  if (isnan(v)) {
    PyErr_SetString(PyExc_ValueError, "duration is NaN");
    return -1;
  }
  if (v < 0) {
    PyErr_SetString(PyExc_ValueError, "negative duration");
    return -1;
  }
  double ns = v * unit_ns;
  /* 2^64 and beyond (inf included) do not fit: the longest sleep there is,
   * about 584 years, is "forever" as asyncio.sleep(math.inf) is. */
  *out = ns >= 18446744073709551616.0 ? UINT64_MAX : (uint64_t)ns;
  return 0;
}
