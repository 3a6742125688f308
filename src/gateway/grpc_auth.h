/* grpc_auth.h: who may call the gRPC API, and the credentials that prove it.
 *
 * Callers are authenticated by one of:
 *   - a bearer token (`authorization: Bearer <token>` metadata) from
 *     --api-token-file (a *service*: may call Messaging) or from
 *     --peer-token-file (a *peer* gateway: may call GatewayPeer);
 *   - a client certificate verified against --grpc-client-ca (mTLS, the
 *     listener then requires one): a peer when its CN or one of its SANs
 *     starts with --grpc-peer-identity (when set), a service otherwise.
 * A token in the call is judged first: a token that matches nothing is
 * UNAUTHENTICATED even on a connection with a verified certificate.
 *
 * | caller                    | Messaging         | GatewayPeer       | Health |
 * |---------------------------|-------------------|-------------------|--------|
 * | none, or an unknown token | UNAUTHENTICATED   | UNAUTHENTICATED   | open   |
 * | service                   | OK                | PERMISSION_DENIED | open   |
 * | peer                      | PERMISSION_DENIED | OK                | open   |
 *
 * Enforcement is on as soon as a token file or --grpc-client-ca is given;
 * then both services require credentials. Without any (loopback, or
 * --grpc-mesh-mtls where the sidecar authenticates and AuthorizationPolicy
 * restricts GatewayPeer) every call is let through, as before. A listener off
 * loopback with no caller authentication and no --grpc-mesh-mtls refuses to
 * start (mg_grpc_auth_create fails).
 *
 * Each check counts meshgate_grpc_auth_total{client,result}: client is the
 * token's name from its file, "mtls-peer"/"mtls-service" for a certificate,
 * "none" or "unknown" (result ok, unauthenticated, permission_denied); the
 * reason of a refusal names it (the gRPC server logs refusals with it).
 *
 * Thread-safety: create/free on the main thread; every other function may be
 * called from any thread once created (the object is read-only).
 */
#ifndef MG_GRPC_AUTH_H
#define MG_GRPC_AUTH_H

#include "gateway/config.h"

#include <grpc/grpc.h>
#include <grpc/grpc_security.h>
#include <stddef.h>

typedef struct mg_grpc_auth mg_grpc_auth;

/* Reads the token files, certificates and keys named by cfg (--grpc-tls-*,
 * --grpc-client-ca, --grpc-peer-identity, --api-token-file,
 * --peer-token-file, --grpc-mesh-mtls) and checks them against
 * cfg->grpc_listen. Returns NULL with a message in err when a file cannot be
 * read or parsed, the TLS options are incomplete, a token repeats, or the
 * listener is off loopback without caller authentication. Free with
 * mg_grpc_auth_free (NULL is a no-op). */
mg_grpc_auth *mg_grpc_auth_create(const mg_config *cfg, char *err, size_t errlen);
void mg_grpc_auth_free(mg_grpc_auth *a);

/* Credentials for the listener: SSL when --grpc-tls-cert is set (requiring
 * and verifying a client certificate when --grpc-client-ca is), else
 * insecure. a may be NULL (insecure). The caller releases them. */
grpc_server_credentials *mg_grpc_auth_server_credentials(const mg_grpc_auth *a);

/* Credentials for peer channels: SSL verifying peers against
 * --grpc-client-ca (system roots without it) and presenting this gateway's
 * certificate when TLS is configured, else insecure. The caller releases. */
grpc_channel_credentials *mg_grpc_auth_channel_credentials(const mg_grpc_auth *a);

/* The token this gateway sends on its peer calls (the first of
 * --peer-token-file), or NULL. Lives as long as a. */
const char *mg_grpc_auth_peer_token(const mg_grpc_auth *a);

/* Whether the call to method (the :path, e.g. "/meshgate.v1.Messaging/SendMessage")
 * may run, judged by its received initial metadata md and, for
 * certificates, call's auth context. Returns GRPC_STATUS_OK,
 * GRPC_STATUS_UNAUTHENTICATED or GRPC_STATUS_PERMISSION_DENIED with a reason
 * in err (it never names a token). a NULL: always OK. */
grpc_status_code mg_grpc_auth_check(const mg_grpc_auth *a, grpc_call *call, grpc_slice method,
                                    const grpc_metadata_array *md, char *err, size_t errlen);

/* SSL channel credentials for a client (the CLI, tests): ca_file verifies
 * the server (NULL: system roots), cert_file + key_file (both or neither)
 * are presented as the client certificate. Returns NULL with err when a file
 * cannot be read. The caller releases them. */
grpc_channel_credentials *mg_grpc_tls_channel_credentials(const char *ca_file,
                                                          const char *cert_file,
                                                          const char *key_file, char *err,
                                                          size_t errlen);

#endif
