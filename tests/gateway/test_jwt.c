/* Unit tests of JWT client authentication (gateway/jwt_auth.c). */
#include "gateway/jwt_auth.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <jwt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SECRET "test-secret-0123456789"

static char *make_token(jwt_alg_t alg, const unsigned char *key, size_t keylen, const char *sub,
                        long exp)
{
    jwt_t *j = NULL;
    cr_assert_eq(jwt_new(&j), 0);
    cr_assert_eq(jwt_set_alg(j, alg, key, (int)keylen), 0);
    if (sub)
        jwt_add_grant(j, "sub", sub);
    if (exp)
        jwt_add_grant_int(j, "exp", exp);
    char *t = jwt_encode_str(j);
    jwt_free(j);
    cr_assert_not_null(t);
    return t;
}

static char *hs(const char *secret, const char *sub, long exp)
{
    return make_token(JWT_ALG_HS256, (const unsigned char *)secret, strlen(secret), sub, exp);
}

static int verify(mg_jwt_auth *a, const char *tok, char **user)
{
    char reason[160];
    return mg_jwt_auth_verify(a, tok, time(NULL), 64, user, NULL, reason, sizeof(reason));
}

Test(jwt, hs256_good)
{
    char err[200];
    mg_jwt_auth *a = mg_jwt_auth_create(SECRET, "", err, sizeof(err));
    cr_assert_not_null(a, "%s", err);
    char *t = hs(SECRET, "alice", time(NULL) + 300);
    char *user = NULL;
    cr_assert_eq(verify(a, t, &user), 0);
    cr_assert_str_eq(user, "alice");
    free(user);
    free(t);
    mg_jwt_auth_free(a);
}

Test(jwt, hs256_rejections)
{
    char err[200];
    mg_jwt_auth *a = mg_jwt_auth_create(SECRET, NULL, err, sizeof(err));
    char *user = NULL;
    long later = time(NULL) + 300;

    char *t = hs("another-secret-0123456789", "alice", later);
    cr_assert_eq(verify(a, t, &user), -EACCES, "bad signature accepted");
    free(t);

    t = hs(SECRET, "alice", time(NULL) - 10);
    cr_assert_eq(verify(a, t, &user), -EACCES, "expired accepted");
    free(t);

    t = hs(SECRET, NULL, later);
    cr_assert_eq(verify(a, t, &user), -EACCES, "missing sub accepted");
    free(t);

    t = hs(SECRET, "", later);
    cr_assert_eq(verify(a, t, &user), -EACCES, "empty sub accepted");
    free(t);

    t = hs(SECRET, "alice", 0);
    cr_assert_eq(verify(a, t, &user), -EACCES, "missing exp accepted");
    free(t);

    /* tampered payload: swap a character of the signature */
    t = hs(SECRET, "alice", later);
    t[strlen(t) - 2] = t[strlen(t) - 2] == 'A' ? 'B' : 'A';
    cr_assert_eq(verify(a, t, &user), -EACCES, "tampered accepted");
    free(t);

    /* alg none */
    jwt_t *j = NULL;
    jwt_new(&j);
    jwt_add_grant(j, "sub", "alice");
    jwt_add_grant_int(j, "exp", later);
    t = jwt_encode_str(j);
    jwt_free(j);
    cr_assert_eq(verify(a, t, &user), -EACCES, "alg none accepted");
    free(t);

    cr_assert_eq(verify(a, "", &user), -EACCES);
    cr_assert_eq(verify(a, "garbage", &user), -EACCES);
    cr_assert_eq(verify(a, "a.b.c", &user), -EACCES);
    cr_assert_null(user);
    mg_jwt_auth_free(a);
}

Test(jwt, create_errors)
{
    char err[200];
    cr_assert_null(mg_jwt_auth_create("", "", err, sizeof(err)));
    cr_assert_null(mg_jwt_auth_create("x", "/nonexistent.pem", err, sizeof(err)));
    cr_assert_null(mg_jwt_auth_create(NULL, "/nonexistent.pem", err, sizeof(err)));
    mg_jwt_auth_free(NULL);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    cr_assert_not_null(f, "%s", path);
    char *b = calloc(1, 16384);
    *len = fread(b, 1, 16383, f);
    fclose(f);
    return b;
}

Test(jwt, rs256_good_and_bad)
{
    char dir[] = "/tmp/mg-jwt-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char cmd[1200], priv[64], pub[64], pub2[64];
    snprintf(priv, sizeof(priv), "%s/priv.pem", dir);
    snprintf(pub, sizeof(pub), "%s/pub.pem", dir);
    snprintf(pub2, sizeof(pub2), "%s/pub2.pem", dir);
    snprintf(cmd, sizeof(cmd),
             "openssl genrsa -out %s 2048 2>/dev/null && openssl rsa -in %s -pubout -out %s "
             "2>/dev/null && openssl genrsa 2048 2>/dev/null | openssl rsa -pubout -out %s "
             "2>/dev/null",
             priv, priv, pub, pub2);
    cr_assert_eq(system(cmd), 0, "openssl failed");
    size_t klen;
    char *key = slurp(priv, &klen);
    char err[200];
    mg_jwt_auth *a = mg_jwt_auth_create(NULL, pub, err, sizeof(err));
    cr_assert_not_null(a, "%s", err);
    mg_jwt_auth *other = mg_jwt_auth_create("", pub2, err, sizeof(err));
    cr_assert_not_null(other, "%s", err);

    char *t = make_token(JWT_ALG_RS256, (unsigned char *)key, klen, "bob", time(NULL) + 60);
    char *user = NULL;
    cr_assert_eq(verify(a, t, &user), 0);
    cr_assert_str_eq(user, "bob");
    free(user);
    user = NULL;
    cr_assert_eq(verify(other, t, &user), -EACCES, "wrong key accepted");
    free(t);

    t = make_token(JWT_ALG_RS256, (unsigned char *)key, klen, "bob", time(NULL) - 1);
    cr_assert_eq(verify(a, t, &user), -EACCES, "expired accepted");
    free(t);

    /* HS256 signed with the public key as secret (alg confusion) */
    size_t plen;
    char *pubpem = slurp(pub, &plen);
    t = make_token(JWT_ALG_HS256, (unsigned char *)pubpem, plen, "bob", time(NULL) + 60);
    cr_assert_eq(verify(a, t, &user), -EACCES, "HS256 with public key accepted");
    free(t);
    free(pubpem);

    free(key);
    mg_jwt_auth_free(a);
    mg_jwt_auth_free(other);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}

static char *hs_claims(const char *iss, const char *aud, const char *aud_json)
{
    jwt_t *j = NULL;
    cr_assert_eq(jwt_new(&j), 0);
    cr_assert_eq(jwt_set_alg(j, JWT_ALG_HS256, (const unsigned char *)SECRET, strlen(SECRET)), 0);
    jwt_add_grant(j, "sub", "alice");
    jwt_add_grant_int(j, "exp", time(NULL) + 600);
    if (iss)
        jwt_add_grant(j, "iss", iss);
    if (aud)
        jwt_add_grant(j, "aud", aud);
    if (aud_json)
        cr_assert_eq(jwt_add_grants_json(j, aud_json), 0);
    char *t = jwt_encode_str(j);
    jwt_free(j);
    return t;
}

static void expect_claims(mg_jwt_auth *a, char *tok, int want, const char *why)
{
    char reason[160] = "", *user = NULL;
    int rc = mg_jwt_auth_verify(a, tok, time(NULL), 64, &user, NULL, reason, sizeof(reason));
    cr_assert_eq(rc, want, "rc %d reason '%s'", rc, reason);
    if (want == 0)
        cr_assert_str_eq(user, "alice");
    else
        cr_assert(strstr(reason, why), "reason '%s', want '%s'", reason, why);
    free(user);
    free(tok);
}

Test(jwt, audience_and_issuer_are_checked_when_required)
{
    char err[160];
    mg_jwt_auth *a = mg_jwt_auth_create(SECRET, NULL, err, sizeof(err));
    /* not required: anything goes */
    expect_claims(a, hs_claims("other", "other", NULL), 0, NULL);
    mg_jwt_auth_require(a, "meshgate", "https://id.example");
    expect_claims(a, hs_claims("https://id.example", "meshgate", NULL), 0, NULL);
    expect_claims(a, hs_claims("https://id.example", NULL, "{\"aud\":[\"x\",\"meshgate\"]}"), 0,
                  NULL);
    expect_claims(a, hs_claims("https://evil.example", "meshgate", NULL), -EACCES,
                  "issuer not accepted");
    expect_claims(a, hs_claims(NULL, "meshgate", NULL), -EACCES, "no iss");
    expect_claims(a, hs_claims("https://id.example", "billing", NULL), -EACCES,
                  "audience not accepted");
    expect_claims(a, hs_claims("https://id.example", NULL, "{\"aud\":[\"x\",\"y\"]}"), -EACCES,
                  "audience not accepted");
    expect_claims(a, hs_claims("https://id.example", NULL, "{\"aud\":[1,{}]}"), -EACCES,
                  "audience not accepted");
    expect_claims(a, hs_claims("https://id.example", NULL, NULL), -EACCES, "audience not accepted");
    /* off again */
    mg_jwt_auth_require(a, "", NULL);
    expect_claims(a, hs_claims(NULL, NULL, NULL), 0, NULL);
    mg_jwt_auth_free(a);
}

/* ---- JWKS documents (jwks.c) ---------------------------------------------- */

Test(jwks, parse_refuses_and_skips)
{
    mg_jwks_keys *ks = NULL;
    static const char *not_jwks[] = {"", "nope", "[]", "{\"keys\":{}}", "{\"k\":[]}"};
    for (size_t i = 0; i < sizeof(not_jwks) / sizeof(not_jwks[0]); i++) {
        cr_assert_eq(mg_jwks_parse(not_jwks[i], strlen(not_jwks[i]), &ks), -EINVAL, "%s",
                     not_jwks[i]);
        cr_assert_null(ks);
    }
    /* no usable key: EC, oct, wrong use/alg, no kid, a 512-bit modulus, bad base64 */
    const char *doc =
        "{\"keys\":[{\"kty\":\"EC\",\"kid\":\"a\",\"crv\":\"P-256\",\"x\":\"AA\",\"y\":\"AA\"},"
        "{\"kty\":\"oct\",\"kid\":\"b\",\"k\":\"c2VjcmV0\"},"
        "{\"kty\":\"RSA\",\"kid\":\"c\",\"use\":\"enc\",\"n\":\"AQAB\",\"e\":\"AQAB\"},"
        "{\"kty\":\"RSA\",\"kid\":\"d\",\"alg\":\"RS512\",\"n\":\"AQAB\",\"e\":\"AQAB\"},"
        "{\"kty\":\"RSA\",\"n\":\"AQAB\",\"e\":\"AQAB\"},"
        "{\"kty\":\"RSA\",\"kid\":\"f\",\"n\":\"x5kHtrl7jJeYp6e6CZWgOFK9R2RMFJF8Y7WRF0sHMCk"
        "tQOMRmzZlDeb2mZ0rOw2BrlD0bmWG8sXW2o8ZXGv9CQ\",\"e\":\"AQAB\"},"
        "{\"kty\":\"RSA\",\"kid\":\"g\",\"n\":\"!!!\",\"e\":\"AQAB\"}]}";
    cr_assert_eq(mg_jwks_parse(doc, strlen(doc), &ks), 0);
    cr_assert_null(mg_jwks_keys_find(ks, "f"));
    mg_jwks_keys_free(ks);
    mg_jwks_keys_free(NULL);
}

Test(jwks, token_kid)
{
    char kid[16];
    /* {"alg":"RS256","kid":"k1"} */
    cr_assert_eq(mg_jwks_token_kid("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.x", kid, sizeof(kid)),
                 0);
    cr_assert_str_eq(kid, "k1");
    /* {"alg":"RS256"} */
    cr_assert_lt(mg_jwks_token_kid("eyJhbGciOiJSUzI1NiJ9.e30.x", kid, sizeof(kid)), 0);
    cr_assert_lt(mg_jwks_token_kid("nodots", kid, sizeof(kid)), 0);
    cr_assert_lt(mg_jwks_token_kid(".e30.x", kid, sizeof(kid)), 0);
    cr_assert_lt(mg_jwks_token_kid("!!!.e30.x", kid, sizeof(kid)), 0);
    /* {"kid":"0123456789abcdefXYZ"}: does not fit */
    cr_assert_lt(
        mg_jwks_token_kid("eyJraWQiOiIwMTIzNDU2Nzg5YWJjZGVmWFlaIn0.e30.x", kid, sizeof(kid)), 0);
}

/* n and e of a generated key through the JWKS path give a PEM that verifies
 * the key's tokens (the OpenSSL conversion is right). */
Test(jwks, converted_key_verifies)
{
    char dir[] = "/tmp/mg-jwks-XXXXXX";
    cr_assert_not_null(mkdtemp(dir));
    char cmd[600], priv[64], mod[64];
    snprintf(priv, sizeof(priv), "%s/priv.pem", dir);
    snprintf(mod, sizeof(mod), "%s/mod", dir);
    snprintf(cmd, sizeof(cmd),
             "openssl genrsa -out %s 2048 2>/dev/null && openssl rsa -in %s -noout -modulus "
             "2>/dev/null | cut -d= -f2 | xxd -r -p | base64 -w0 | tr '+/' '-_' | tr -d '=' > %s",
             priv, priv, mod);
    cr_assert_eq(system(cmd), 0, "openssl failed");
    size_t klen, nlen;
    char *key = slurp(priv, &klen), *n = slurp(mod, &nlen);
    char *doc = malloc(nlen + 200);
    sprintf(doc, "{\"keys\":[{\"kty\":\"RSA\",\"kid\":\"k1\",\"n\":\"%s\",\"e\":\"AQAB\"}]}", n);
    mg_jwks_keys *ks = NULL;
    cr_assert_eq(mg_jwks_parse(doc, strlen(doc), &ks), 1);
    const char *pem = mg_jwks_keys_find(ks, "k1");
    cr_assert_not_null(pem);
    char *t = make_token(JWT_ALG_RS256, (unsigned char *)key, klen, "bob", time(NULL) + 60);
    jwt_t *j = NULL;
    cr_assert_eq(jwt_decode(&j, t, (const unsigned char *)pem, (int)strlen(pem)), 0);
    jwt_free(j);
    free(t);
    mg_jwks_keys_free(ks);
    free(doc);
    free(n);
    free(key);
    snprintf(cmd, sizeof(cmd), "rm -rf %s", dir);
    cr_assert_eq(system(cmd), 0);
}
