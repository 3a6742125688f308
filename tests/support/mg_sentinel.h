/* mg_sentinel.h: what the Redis Sentinel tests share: the setup of
 * tests/infra/redis-sentinel.sh (one primary, one replica, three Sentinels;
 * MESHGATE_TEST_SENTINEL_NODES / _MASTER), a lock so the tests that kill its
 * primary never overlap the others (also across test binaries), and killing
 * and restoring the primary.
 */
#ifndef MG_TEST_SENTINEL_H
#define MG_TEST_SENTINEL_H

#include <stddef.h>

/* Maximum time presence and inbox may take to work again after the primary
 * is killed (README "Redis Sentinel"). */
#define MG_SENTINEL_RECOVERY_BOUND_MS 10000

/* flock on $MESHGATE_RUN/sentinel-chaos.lock: exclusive for tests that kill
 * the primary, shared for the others. For a suite's .init / .fini. */
void mg_sentinel_lock(int exclusive);
/* Restarts a node mg_sentinel_kill_primary killed (also after a failed
 * assertion ended the test), waits until the setup is whole, unlocks. */
void mg_sentinel_unlock(void);

/* Runs tests/infra/redis-sentinel.sh with args; its first output line into
 * out (when not NULL). Returns the exit status. */
int mg_sentinel_infra(const char *args, char *out, size_t outlen);

/* Checks the setup is whole, then SIGKILLs the primary the Sentinels name;
 * its "host:port" into old. */
void mg_sentinel_kill_primary(char *old, size_t len);

/* The primary the Sentinels name once it is not old (each Sentinel learns
 * of a switch on its own; bounded 10 s), into now. */
void mg_sentinel_new_primary(const char *old, char *now, size_t len);

#endif
