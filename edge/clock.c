/*
 * clock.c - the edge's clock, real or fake (see internal.h).
 *
 * The fake clock exists for tests of schedules, backoff and bandwidth caps:
 * they move time forward in steps instead of sleeping. It is switched on only
 * by the YY_EDGE_TEST_CLOCK environment variable, and main.c logs a warning
 * when it is.
 */
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

#include "internal.h"

static atomic_bool fake_on;
static _Atomic int64_t fake_ms;   /* unix ms while fake_on */

uint64_t edge__now_ms(void)
{
    struct timespec ts;

    if (atomic_load(&fake_on))
        return (uint64_t)atomic_load(&fake_ms);
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

int64_t edge__wall_ms(void)
{
    struct timespec ts;

    if (atomic_load(&fake_on))
        return atomic_load(&fake_ms);
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

bool edge__clock_init_from_env(void)
{
    const char *v = getenv("YY_EDGE_TEST_CLOCK");
    char *end;
    long long ms;

    if (!v || !v[0])
        return false;
    ms = strtoll(v, &end, 10);
    if (*end != '\0' || ms <= 0)
        return false;
    atomic_store(&fake_ms, (int64_t)ms);
    atomic_store(&fake_on, true);
    return true;
}

bool edge__clock_is_fake(void)
{
    return atomic_load(&fake_on);
}

void edge__clock_set(int64_t wall_ms)
{
    if (atomic_load(&fake_on))
        atomic_store(&fake_ms, wall_ms);
}
