/* mg_time.h: clocks. Wall time for message timestamps, monotonic for deadlines. */
#ifndef MG_TIME_H
#define MG_TIME_H

#include <stdint.h>
#include <time.h>

static inline int64_t mg_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int64_t mg_mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

static inline int64_t mg_mono_ms(void)
{
    return mg_mono_us() / 1000;
}

#endif
