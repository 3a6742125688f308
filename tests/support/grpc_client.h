/* grpc_client.h: typed Messaging / Health calls for tests, on top of the
 * blocking client of common/mg_grpc.h (which the CLI shares).
 *
 * Every function blocks for at most timeout_ms (0: 30 s; negative: expired) and returns the
 * gRPC status code; *details (when not NULL) gets the status message, which
 * the caller frees. Responses are freed with protobuf_c_message_free_unpacked.
 * Thread-safe: one client may serve many test threads at once. mg_tc_client
 * makes clients with credentials (grpc_auth.h).
 */
#ifndef MG_TEST_GRPC_CLIENT_H
#define MG_TEST_GRPC_CLIENT_H

#include "common/mg_grpc.h"
#include "grpc/health/v1/health.pb-c.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "meshgate/v1/peer.pb-c.h"

#define MG_RPC_SEND_MESSAGE "/meshgate.v1.Messaging/SendMessage"
#define MG_RPC_SEND_BATCH   "/meshgate.v1.Messaging/SendBatch"
#define MG_RPC_GET_PRESENCE "/meshgate.v1.Messaging/GetPresence"
#define MG_RPC_DISCONNECT   "/meshgate.v1.Messaging/Disconnect"
#define MG_RPC_DELIVER      "/meshgate.v1.GatewayPeer/DeliverMessage"
#define MG_RPC_HEALTH_CHECK "/grpc.health.v1.Health/Check"

/* A text message from -> to (priority: 0/1 HIGH, 2 LOW; id may be NULL), pointing into its
 * arguments. */
Meshgate__V1__Message mg_tc_text_message(const char *from, const char *to, const char *id,
                                         const char *text, int priority);

/* SendMessage of a text from -> to (priority: 0/1 HIGH, 2 LOW; id may be NULL). */
grpc_status_code mg_tc_send(mg_grpc_client *c, const char *from, const char *to, const char *id,
                            const char *text, int priority, int timeout_ms,
                            Meshgate__V1__SendMessageResponse **resp, char **details);

/* GatewayPeer/DeliverMessage of a text from -> to, as a peer gateway calls
 * it (id NULL: a fresh one); *status gets the DeliverStatus on OK (-1 otherwise). */
grpc_status_code mg_tc_deliver(mg_grpc_client *c, const char *from, const char *to, const char *id,
                               int timeout_ms, int *status, char **details);

/* A client of target with a bearer token (NULL: none) and, when ca_file is
 * set, TLS verifying the server against ca_file and presenting
 * cert_file/key_file (both NULL: no client certificate). Fails the test when
 * a file cannot be read. Free with mg_grpc_client_free. */
mg_grpc_client *mg_tc_client(const char *target, const char *token, const char *ca_file,
                             const char *cert_file, const char *key_file);

/* Waits up to timeout_ms, asking GetPresence every 20 ms, until it says user is
 * online (want true) or offline; returns whether it did. */
bool mg_tc_wait_presence(mg_grpc_client *c, const char *user, bool want, int timeout_ms);

/* Health/Check of service; *status gets the ServingStatus on OK. */
grpc_status_code mg_tc_health(mg_grpc_client *c, const char *service, int timeout_ms, int *status,
                              char **details);

#endif
