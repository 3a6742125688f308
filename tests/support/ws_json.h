/* ws_json.h: JSON frames and JWTs for WebSocket integration tests.
 *
 * Each helper fails the current Criterion test (cr_assert) instead of
 * returning an error; results are the caller's to free.
 */
#ifndef MG_WS_JSON_H
#define MG_WS_JSON_H

#include "support/ws_client.h"

#include <jansson.h>

/* The next text frame as JSON (the caller json_decref's it); fails the test
 * when none comes within timeout_ms or it is not JSON. */
json_t *mg_wsc_recv_json(mg_wsc *c, int timeout_ms);
/* j[k] when it is a string, else "" (never NULL); lives as long as j. */
const char *mg_json_str(json_t *j, const char *k);
/* The id of a "message" frame j (NULL for other frames), after acking it on
 * c when it came from the inbox ("inbox":true), as a client does. The id
 * lives as long as j. */
const char *mg_wsc_take_message(mg_wsc *c, json_t *j);
/* Sends n messages to user on tx back to back, not waiting (content "<i>",
 * id "<prefix>-<i>"), then reads tx's frames until each was acked, in any
 * order; fails the test unless every id is acked once with want_status
 * ("delivered", "queued", ...) within 15 s of the ack before. */
void mg_wsc_send_acked(mg_wsc *tx, const char *user, const char *prefix, int n,
                       const char *want_status);
/* An HS256 token with "sub" and "exp" (malloc'd, the caller frees). */
char *mg_test_jwt_hs256(const char *secret, const char *sub, long exp);

#endif
