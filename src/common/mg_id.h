/* mg_id.h: message ids.
 *
 * UUIDv7 (RFC 9562): 48 bits of Unix milliseconds then random bits, so ids
 * sort by creation time and never collide across gateways. Thread-safe.
 */
#ifndef MG_ID_H
#define MG_ID_H

#include <stddef.h>
#include <stdint.h>

#define MG_ID_LEN 36 /* canonical text form, without the NUL */

/* Writes a new UUIDv7 into out (at least MG_ID_LEN + 1 bytes). */
void mg_id_new(char out[MG_ID_LEN + 1]);

/* 64 random bits from a per-thread xorshift64* seeded by getrandom(): unique,
 * not secret (ids, trace and span ids, sampling). Thread-safe. */
uint64_t mg_random64(void);

#endif
