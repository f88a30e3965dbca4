/* aiobridge tests — a custom backend built on poll(2).
 *
 * Exists to prove that a backend written outside the library, against the
 * public vtable only, drives a runtime (aiob_runtime_config.backend_table).
 * The conformance suite runs against it as the backend "poll".
 */
#ifndef AIOBRIDGE_TESTS_POLL_BACKEND_H
#define AIOBRIDGE_TESTS_POLL_BACKEND_H

#include <aiobridge/backend.h>

#ifdef __cplusplus
extern "C" {
#endif

/* One loop = poll(2) over an eventfd (wake) and the watched fds, plus one
 * absolute-deadline timer. native() returns the backend's loop struct. */
extern const aiob_backend aiob_test_poll_backend;

#ifdef __cplusplus
}
#endif

#endif /* AIOBRIDGE_TESTS_POLL_BACKEND_H */
