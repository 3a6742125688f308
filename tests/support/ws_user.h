/* ws_user.h: a test user's WebSocket connection read by its own thread: it
 * counts the message ids shown to the user (acking inbox messages, as a
 * client does) and, when the server closes the connection, asks the test
 * for a new one (the test says where: the same gateway after a restart,
 * another one after a kill).
 *
 * Thread-safety: every function may be called from any test thread; dial
 * runs on the reader thread.
 */
#ifndef MG_TEST_WS_USER_H
#define MG_TEST_WS_USER_H

#include "support/ws_client.h"

#include <stdbool.h>

typedef struct mg_wsuser mg_wsuser;

/* A new connection for the user, or NULL for "not now": the reader asks
 * again every 100 ms, for 60 s at most, then stops reading. */
typedef mg_wsc *(*mg_wsuser_dial_fn)(void *arg);

/* Starts reading ws (taken over) on a thread of its own. */
mg_wsuser *mg_wsuser_start(mg_wsc *ws, mg_wsuser_dial_fn dial, void *arg);
/* Times message id was shown to the user. */
int mg_wsuser_count(mg_wsuser *u, const char *id);
/* Waits up to timeout_ms for id; returns whether it was shown. */
bool mg_wsuser_got(mg_wsuser *u, const char *id, int timeout_ms);
/* Messages shown more than once (each repeat counted). */
int mg_wsuser_dups(mg_wsuser *u);
/* Connections dialed after the first, and whether one is open now. */
int mg_wsuser_reconnects(mg_wsuser *u);
bool mg_wsuser_connected(mg_wsuser *u);
/* Drops the connection from the client's side; the reader dials again (the
 * inbox is replayed on the new connection). */
void mg_wsuser_redial(mg_wsuser *u);
/* Stops the reader and closes the connection. NULL is a no-op. */
void mg_wsuser_free(mg_wsuser *u);

#endif
