/* aiobridge — common definitions: export macro, error codes, time units.
 *
 * Every function in aiobridge returns 0 (or a non-negative value) on success
 * and a negative errno-style code on failure. The codes are the negated
 * <errno.h> values, so a Python binding can map them to the OSError subclass
 * Python uses for the same errno.
 */
#ifndef AIOBRIDGE_COMMON_H
#define AIOBRIDGE_COMMON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(AIOB_STATIC)
#define AIOB_API
#elif defined(AIOB_BUILDING)
#define AIOB_API __attribute__((visibility("default")))
#else
#define AIOB_API
#endif

#define AIOB_VERSION_MAJOR 0
#define AIOB_VERSION_MINOR 1
#define AIOB_VERSION_PATCH 0

/* Time units for durations expressed in nanoseconds. */
#define AIOB_USEC UINT64_C(1000)
#define AIOB_MSEC UINT64_C(1000000)
#define AIOB_SEC UINT64_C(1000000000)

/* X(name, errno value, message): the one table behind aiob_strerror and
 * aiob_err_name. AIOB_<name> is the negated errno value. */
#define AIOB_ERRNO_MAP(X)                                                      \
  X(EPERM, EPERM, "operation not permitted")                                   \
  X(ENOENT, ENOENT, "no such backend or entry")                                \
  X(EINTR, EINTR, "interrupted")                                               \
  X(EIO, EIO, "input/output error")                                            \
  X(EBADF, EBADF, "bad file descriptor")                                       \
  X(EAGAIN, EAGAIN, "resource temporarily unavailable")                        \
  X(ENOMEM, ENOMEM, "out of memory")                                           \
  X(EACCES, EACCES, "permission denied")                                       \
  X(EBUSY, EBUSY, "resource busy or already in use")                           \
  X(EEXIST, EEXIST, "already exists")                                          \
  X(EINVAL, EINVAL, "invalid argument")                                        \
  X(EMFILE, EMFILE, "too many open files")                                     \
  X(ENOSPC, ENOSPC, "no space left")                                           \
  X(EPIPE, EPIPE, "broken pipe")                                               \
  X(ERANGE, ERANGE, "result out of range")                                     \
  X(EDEADLK, EDEADLK, "operation would deadlock")                              \
  X(ENOSYS, ENOSYS, "function not implemented")                                \
  X(ENOTSUP, ENOTSUP, "operation not supported by this backend")               \
  X(ECONNREFUSED, ECONNREFUSED, "connection refused")                          \
  X(ECONNRESET, ECONNRESET, "connection reset by peer")                        \
  X(ETIMEDOUT, ETIMEDOUT, "timed out")                                         \
  X(EALREADY, EALREADY, "operation already completed")                         \
  X(ECANCELED, ECANCELED, "operation canceled")                                \
  X(ESHUTDOWN, ESHUTDOWN, "runtime is shut down")

enum aiob_errno {
#define AIOB__ERR_ENUM(name, value, msg) AIOB_##name = -(value),
  AIOB_ERRNO_MAP(AIOB__ERR_ENUM)
#undef AIOB__ERR_ENUM
};

/* The status of a task that called aiob_task_fail with a code >= 0. Not an
 * errno: it lies below the errno range, as codes of the caller's own do. */
#define AIOB_EBADSTATUS (-100001)

/* Human-readable message for an aiobridge error code (or any negated errno).
 * Never NULL; the string is static. Thread-safe. */
AIOB_API const char *aiob_strerror(int err);

/* Symbolic name ("EINVAL") of an aiobridge error code, or "UNKNOWN".
 * Never NULL; the string is static. Thread-safe. */
AIOB_API const char *aiob_err_name(int err);

/* Monotonic clock in nanoseconds (CLOCK_MONOTONIC). Thread-safe. */
AIOB_API uint64_t aiob_now_ns(void);

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_COMMON_H */
