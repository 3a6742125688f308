/* jwt_auth.c: JWT verification for WebSocket clients (see jwt_auth.h).
 *
 * Owns the key bytes (secret or PEM). Runs on the WebSocket service loops
 * during the upgrade, several at once (read-only after setup; verification
 * is CPU only, no I/O). Guarantees: a token
 * is accepted only with the configured algorithm, a valid signature, a future
 * exp and a valid sub; libjwt 1.10 does the signature check (jwt_decode).
 */
#include "gateway/jwt_auth.h"
#include "common/mg_alloc.h"
#include "gateway/ws_proto.h"

#include <errno.h>
#include <jansson.h>
#include <jwt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct mg_jwt_auth {
    jwt_alg_t alg;
    unsigned char *key;
    size_t keylen;
    char *audience, *issuer; /* NULL: not checked */
    mg_jwks *jwks;           /* key by kid; then key is NULL */
};

mg_jwt_auth *mg_jwt_auth_create_jwks(mg_jwks *jwks)
{
    mg_jwt_auth *a = mg_new(mg_jwt_auth);
    a->alg = JWT_ALG_RS256;
    a->jwks = jwks;
    return a;
}

void mg_jwt_auth_require(mg_jwt_auth *a, const char *audience, const char *issuer)
{
    free(a->audience);
    free(a->issuer);
    a->audience = audience && *audience ? mg_xstrdup(audience) : NULL;
    a->issuer = issuer && *issuer ? mg_xstrdup(issuer) : NULL;
}

/* "aud" is want, or an array of strings holding it (RFC 7519 4.1.3). */
static bool audience_ok(jwt_t *jwt, const char *want)
{
    const char *aud = jwt_get_grant(jwt, "aud");
    if (aud)
        return strcmp(aud, want) == 0;
    char *js = jwt_get_grants_json(jwt, "aud");
    if (!js)
        return false;
    bool ok = false;
    json_t *arr = json_loads(js, JSON_DECODE_ANY, NULL);
    size_t i;
    json_t *v;
    if (json_is_array(arr)) {
        json_array_foreach(arr, i, v)
        {
            if (json_is_string(v) && !strcmp(json_string_value(v), want))
                ok = true;
        }
    }
    json_decref(arr);
    free(js);
    return ok;
}

mg_jwt_auth *mg_jwt_auth_create(const char *hs256_secret, const char *rs256_pem_file, char *err,
                                size_t errlen)
{
    bool hs = hs256_secret && hs256_secret[0], rs = rs256_pem_file && rs256_pem_file[0];
    if (hs == rs) {
        snprintf(err, errlen, "set exactly one of --jwt-secret and --jwt-public-key-file");
        return NULL;
    }
    mg_jwt_auth *a = mg_new(mg_jwt_auth);
    if (hs) {
        a->alg = JWT_ALG_HS256;
        a->keylen = strlen(hs256_secret);
        a->key = (unsigned char *)mg_xstrdup(hs256_secret);
        return a;
    }
    a->alg = JWT_ALG_RS256;
    FILE *f = fopen(rs256_pem_file, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot read --jwt-public-key-file %s: %s", rs256_pem_file,
                 strerror(errno));
        free(a);
        return NULL;
    }
    size_t cap = 4096, n = 0;
    a->key = mg_xmalloc(cap);
    for (;;) {
        if (n + 1 == cap)
            a->key = mg_xrealloc(a->key, cap *= 2);
        size_t r = fread(a->key + n, 1, cap - n - 1, f);
        if (r == 0)
            break;
        n += r;
        if (n > (1u << 20))
            break;
    }
    fclose(f);
    a->key[n] = 0;
    a->keylen = n;
    if (n == 0 || n > (1u << 20) || !strstr((char *)a->key, "-----BEGIN")) {
        snprintf(err, errlen, "--jwt-public-key-file %s is not a PEM public key", rs256_pem_file);
        mg_jwt_auth_free(a);
        return NULL;
    }
    return a;
}

void mg_jwt_auth_free(mg_jwt_auth *a)
{
    if (!a)
        return;
    free(a->key);
    mg_jwks_free(a->jwks);
    free(a->audience);
    free(a->issuer);
    free(a);
}

int mg_jwt_auth_verify(const mg_jwt_auth *a, const char *token, int64_t now_s,
                       size_t max_user_bytes, char **user, int64_t *exp_out, char *reason,
                       size_t reasonlen)
{
    *user = NULL;
    if (!token || !token[0] || strlen(token) > 16384) {
        snprintf(reason, reasonlen, "missing token");
        return -EACCES;
    }
    const unsigned char *key = a->key;
    size_t keylen = a->keylen;
    char *pem = NULL;
    if (a->jwks) {
        char kid[257];
        if (mg_jwks_token_kid(token, kid, sizeof(kid)) != 0) {
            snprintf(reason, reasonlen, "token has no kid");
            return -EACCES;
        }
        if (mg_jwks_find(a->jwks, kid, &pem, &keylen) != 0) {
            snprintf(reason, reasonlen, "token kid %.64s unknown", kid);
            return -EACCES;
        }
        key = (const unsigned char *)pem;
    }
    jwt_t *jwt = NULL;
    int drc = jwt_decode(&jwt, token, key, (int)keylen);
    free(pem);
    if (drc != 0 || !jwt) {
        snprintf(reason, reasonlen, "invalid token (signature or format)");
        return -EACCES;
    }
    int rc = -EACCES;
    if (jwt_get_alg(jwt) != a->alg) {
        snprintf(reason, reasonlen, "token algorithm %s not accepted",
                 jwt_alg_str(jwt_get_alg(jwt)));
        goto out;
    }
    errno = 0;
    long exp = jwt_get_grant_int(jwt, "exp");
    if (errno != 0 || exp <= 0) {
        snprintf(reason, reasonlen, "token has no integer exp");
        goto out;
    }
    if ((int64_t)exp <= now_s) {
        snprintf(reason, reasonlen, "token expired");
        goto out;
    }
    errno = 0;
    long nbf = jwt_get_grant_int(jwt, "nbf");
    if (errno == 0 && (int64_t)nbf > now_s + 60) {
        snprintf(reason, reasonlen, "token not yet valid");
        goto out;
    }
    const char *sub = jwt_get_grant(jwt, "sub");
    if (!sub || !mg_ws_proto_valid_user(sub, max_user_bytes)) {
        snprintf(reason, reasonlen, "token has no valid sub");
        goto out;
    }
    if (a->issuer) {
        const char *iss = jwt_get_grant(jwt, "iss");
        if (!iss || strcmp(iss, a->issuer) != 0) {
            snprintf(reason, reasonlen, iss ? "token issuer not accepted" : "token has no iss");
            goto out;
        }
    }
    if (a->audience && !audience_ok(jwt, a->audience)) {
        snprintf(reason, reasonlen, "token audience not accepted");
        goto out;
    }
    *user = mg_xstrdup(sub);
    if (exp_out)
        *exp_out = (int64_t)exp;
    rc = 0;
out:
    jwt_free(jwt);
    return rc;
}
