/* aiobridge — C and Python's asyncio awaiting each other.
 *
 * Umbrella header: include this one. See docs/ for the guide.
 */
#ifndef AIOBRIDGE_H
#define AIOBRIDGE_H

#include "aiobridge/common.h"
#include "aiobridge/backend.h"
#include "aiobridge/runtime.h"
#include "aiobridge/task.h"

#endif /* AIOBRIDGE_H */
