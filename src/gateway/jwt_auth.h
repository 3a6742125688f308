/* jwt_auth.h: client authentication by JWT (HS256 secret, RS256 public key,
 * or the RS256 keys of a JWKS document, picked by the header's "kid").
 *
 * A token is accepted when its signature verifies with the configured key,
 * its "alg" header is exactly the configured algorithm (no "none", no
 * HS/RS confusion), it has an integer "exp" in the future (required), an
 * optional "nbf" not in the future (60 s skew allowed), and a string "sub"
 * that is a valid user id (ws_proto.h mg_ws_proto_valid_user); and, when
 * required (mg_jwt_auth_require), the configured "aud" and "iss".
 *
 * Thread-safety: create/free on one thread; verify may be called from any
 * thread concurrently (the key is read-only after create).
 */
#ifndef MG_JWT_AUTH_H
#define MG_JWT_AUTH_H

#include <stddef.h>
#include <stdint.h>

#include "gateway/jwks.h"

typedef struct mg_jwt_auth mg_jwt_auth;

/* Exactly one of hs256_secret / rs256_pem_file must be non-empty. Returns
 * NULL with a message in err when the key file cannot be read or both or
 * neither are given. */
mg_jwt_auth *mg_jwt_auth_create(const char *hs256_secret, const char *rs256_pem_file, char *err,
                                size_t errlen);
/* RS256 with the keys of jwks (jwks.h), which the verifier owns from then on
 * (mg_jwt_auth_free frees it). A token whose kid is unknown is refused (the
 * JWKS thread is asked for an early fetch, so a rotated key is accepted
 * within --jwks-min-refetch-seconds). Never NULL. */
mg_jwt_auth *mg_jwt_auth_create_jwks(mg_jwks *jwks);
void mg_jwt_auth_free(mg_jwt_auth *a);

/* Requires claims from then on (create's thread, before any verify):
 * audience non-empty: "aud" must be that string or an array holding it;
 * issuer non-empty: "iss" must equal it. A token without the claim is
 * refused. NULL or "" leaves that check off. The strings are copied. */
void mg_jwt_auth_require(mg_jwt_auth *a, const char *audience, const char *issuer);

/* Verifies token at time now_s (Unix seconds). Returns 0 and the user id
 * (malloc'd, the caller frees) in *user and the token's "exp" (Unix seconds,
 * > now_s) in *exp (exp may be NULL), or -EACCES with a reason. */
int mg_jwt_auth_verify(const mg_jwt_auth *a, const char *token, int64_t now_s,
                       size_t max_user_bytes, char **user, int64_t *exp, char *reason,
                       size_t reasonlen);

#endif
