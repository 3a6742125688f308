/* mg_id.h: message ids.
 *
 * UUIDv7 (RFC 9562): 48 bits of Unix milliseconds then random bits, so ids
 * sort by creation time and never collide across gateways. Thread-safe.
 */
#ifndef MG_ID_H
#define MG_ID_H

#include <stddef.h>

#define MG_ID_LEN 36 /* canonical text form, without the NUL */

/* Writes a new UUIDv7 into out (at least MG_ID_LEN + 1 bytes). */
void mg_id_new(char out[MG_ID_LEN + 1]);

#endif
