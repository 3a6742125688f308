/* grpc_auth.c: gRPC caller authentication (see grpc_auth.h).
 *
 * Owns the tokens of --api-token-file and --peer-token-file, the PEM files
 * of the TLS options, and the meshgate_grpc_auth_total counters (one set per
 * token name, made at create so a check allocates nothing).
 *
 * Threads: create/free on main; mg_grpc_auth_check runs on the "grpc-<i>"
 * threads for every call before its handler, reading only immutable state.
 * Tokens are compared in constant time against every configured token (no
 * early exit), so the time taken does not tell how much of a guess matched
 * or which token it was close to.
 */
#include "gateway/grpc_auth.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define MAX_FILE_BYTES  (1u << 20)
#define MAX_NAME_BYTES  64
#define MIN_TOKEN_BYTES 16
#define MAX_TOKENS      1024

enum role { ROLE_SERVICE, ROLE_PEER };
enum result { R_OK, R_UNAUTHENTICATED, R_DENIED, R_COUNT };
static const char *const result_label[R_COUNT] = {"ok", "unauthenticated", "permission_denied"};

/* A client as counted and logged: a token's name or a fixed kind. */
struct client {
    char *name;
    mg_metric *count[R_COUNT];
};

struct token {
    struct client who;
    char *secret;
    size_t len;
    enum role role;
};

struct mg_grpc_auth {
    bool enforce; /* a token file or a client CA is configured */
    char *cert_pem, *key_pem, *ca_pem;
    char *peer_identity;
    struct token *tokens;
    size_t ntokens;
    const char *peer_token; /* the first peer token (borrowed from tokens) */
    struct client none, unknown, mtls_peer, mtls_service;
};

static void client_init(struct client *c, const char *name)
{
    c->name = mg_xstrdup(name);
    for (int r = 0; r < R_COUNT; r++) {
        char labels[160];
        snprintf(labels, sizeof(labels), "client=\"%s\",result=\"%s\"", name, result_label[r]);
        c->count[r] = mg_counter("meshgate_grpc_auth_total",
                                 "gRPC caller checks by client and result", labels);
    }
}

/* The whole of a small file as a string (the caller frees), or NULL with err. */
static char *read_file(const char *path, const char *what, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, errlen, "cannot read %s %s: %s", what, path, strerror(errno));
        return NULL;
    }
    char *buf = mg_xmalloc(MAX_FILE_BYTES + 1);
    size_t n = fread(buf, 1, MAX_FILE_BYTES + 1, f);
    bool bad = ferror(f) || n > MAX_FILE_BYTES;
    fclose(f);
    if (bad || n == 0) {
        snprintf(err, errlen, "%s %s is %s", what, path,
                 n == 0               ? "empty"
                 : n > MAX_FILE_BYTES ? "larger than 1 MiB"
                                      : "unreadable");
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static bool valid_name(const char *s, size_t n)
{
    if (n == 0 || n > MAX_NAME_BYTES)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("._-", s[i]))
            return false;
    return true;
}

/* Adds the name:token lines of path with role. 0 or -EINVAL with err. */
static int load_tokens(mg_grpc_auth *a, const char *path, const char *flag, enum role role,
                       char *err, size_t errlen)
{
    char *text = read_file(path, flag, err, errlen);
    if (!text)
        return -EINVAL;
    int rc = 0, lineno = 0;
    size_t before = a->ntokens, textlen = strlen(text);
    for (char *line = text, *next; line && rc == 0; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        lineno++;
        size_t n = strlen(line);
        while (n && isspace((unsigned char)line[n - 1]))
            line[--n] = '\0';
        while (isspace((unsigned char)*line))
            line++, n--;
        if (n == 0 || line[0] == '#')
            continue;
        char *colon = strchr(line, ':');
        const char *secret = colon ? colon + 1 : "";
        size_t nlen = colon ? (size_t)(colon - line) : n, slen = strlen(secret);
        bool spaces = false;
        for (size_t i = 0; i < slen; i++)
            spaces |= isspace((unsigned char)secret[i]) != 0;
        if (!colon || !valid_name(line, nlen) || slen < MIN_TOKEN_BYTES || spaces) {
            snprintf(err, errlen,
                     "%s %s line %d: want name:token (name of letters, digits, '.', '_', '-'; "
                     "token of at least %d characters without spaces)",
                     flag, path, lineno, MIN_TOKEN_BYTES);
            rc = -EINVAL;
            break;
        }
        for (size_t i = 0; i < a->ntokens && rc == 0; i++) {
            bool same_name = strlen(a->tokens[i].who.name) == nlen &&
                             memcmp(a->tokens[i].who.name, line, nlen) == 0;
            if (same_name || strcmp(a->tokens[i].secret, secret) == 0) {
                snprintf(err, errlen, "%s %s line %d: the %s is already used", flag, path, lineno,
                         same_name ? "name" : "token");
                rc = -EINVAL;
            }
        }
        if (rc == 0 && a->ntokens == MAX_TOKENS) {
            snprintf(err, errlen, "%s %s: more than %d tokens", flag, path, MAX_TOKENS);
            rc = -EINVAL;
        }
        if (rc != 0)
            break;
        a->tokens = mg_xrealloc(a->tokens, (a->ntokens + 1) * sizeof(*a->tokens));
        struct token *t = &a->tokens[a->ntokens++];
        colon[0] = '\0';
        client_init(&t->who, line);
        t->secret = mg_xstrdup(secret);
        t->len = slen;
        t->role = role;
    }
    if (rc == 0 && a->ntokens == before) {
        snprintf(err, errlen, "%s %s holds no name:token line", flag, path);
        rc = -EINVAL;
    }
    /* The text held the secrets: clear it before it goes back to the heap. */
    explicit_bzero(text, textlen);
    free(text);
    return rc;
}

static int load_tls(mg_grpc_auth *a, const mg_config *cfg, char *err, size_t errlen)
{
    bool cert = cfg->grpc_tls_cert[0], key = cfg->grpc_tls_key[0], ca = cfg->grpc_client_ca[0];
    if (cert != key) {
        snprintf(err, errlen, "--grpc-tls-cert and --grpc-tls-key go together");
        return -EINVAL;
    }
    if (ca && !cert) {
        snprintf(err, errlen, "--grpc-client-ca needs --grpc-tls-cert and --grpc-tls-key");
        return -EINVAL;
    }
    if (cfg->grpc_peer_identity[0] && !ca) {
        snprintf(err, errlen, "--grpc-peer-identity needs --grpc-client-ca");
        return -EINVAL;
    }
    if (cert && !(a->cert_pem = read_file(cfg->grpc_tls_cert, "--grpc-tls-cert", err, errlen)))
        return -EINVAL;
    if (key && !(a->key_pem = read_file(cfg->grpc_tls_key, "--grpc-tls-key", err, errlen)))
        return -EINVAL;
    if (ca && !(a->ca_pem = read_file(cfg->grpc_client_ca, "--grpc-client-ca", err, errlen)))
        return -EINVAL;
    return 0;
}

mg_grpc_auth *mg_grpc_auth_create(const mg_config *cfg, char *err, size_t errlen)
{
    mg_grpc_auth *a = mg_new(mg_grpc_auth);
    a->peer_identity = mg_xstrdup(cfg->grpc_peer_identity);
    client_init(&a->none, "none");
    client_init(&a->unknown, "unknown");
    client_init(&a->mtls_peer, "mtls-peer");
    client_init(&a->mtls_service, "mtls-service");
    if (load_tls(a, cfg, err, errlen) != 0)
        goto fail;
    if (cfg->api_token_file[0] &&
        load_tokens(a, cfg->api_token_file, "--api-token-file", ROLE_SERVICE, err, errlen) != 0)
        goto fail;
    if (cfg->peer_token_file[0] &&
        load_tokens(a, cfg->peer_token_file, "--peer-token-file", ROLE_PEER, err, errlen) != 0)
        goto fail;
    for (size_t i = 0; i < a->ntokens && !a->peer_token; i++)
        if (a->tokens[i].role == ROLE_PEER)
            a->peer_token = a->tokens[i].secret;
    a->enforce = a->ntokens > 0 || a->ca_pem;

    char *host = NULL;
    mg_parse_hostport(cfg->grpc_listen, &host, NULL);
    bool loopback = host && mg_host_is_loopback(host);
    free(host);
    if (!loopback && !a->enforce && !cfg->grpc_mesh_mtls) {
        snprintf(err, errlen,
                 "refusing to serve gRPC on %s without caller authentication: set "
                 "--api-token-file and --peer-token-file, or --grpc-client-ca with "
                 "--grpc-tls-cert and --grpc-tls-key, or --grpc-mesh-mtls when a mesh sidecar "
                 "provides mTLS; or listen on a loopback address",
                 cfg->grpc_listen);
        goto fail;
    }
    size_t napi = 0;
    for (size_t i = 0; i < a->ntokens; i++)
        napi += a->tokens[i].role == ROLE_SERVICE;
    mg_log_info("grpc",
                "caller auth=%s tls=%s client_ca=%s api_tokens=%zu peer_tokens=%zu "
                "mesh_mtls=%s",
                a->enforce ? "enforced" : "none", a->cert_pem ? "on" : "off",
                a->ca_pem ? "required" : "off", napi, a->ntokens - napi,
                cfg->grpc_mesh_mtls ? "true" : "false");
    if (!a->enforce && !loopback)
        mg_log_warn("grpc",
                    "no caller authentication in meshgate: trusting the mesh sidecar "
                    "(--grpc-mesh-mtls) to authenticate callers on %s",
                    cfg->grpc_listen);
    else if (a->ntokens && !a->cert_pem && !loopback && !cfg->grpc_mesh_mtls)
        mg_log_warn("grpc",
                    "bearer tokens cross the network in clear text on %s: set "
                    "--grpc-tls-cert/--grpc-tls-key or run in a mesh",
                    cfg->grpc_listen);
    return a;
fail:
    mg_grpc_auth_free(a);
    return NULL;
}

static void free_pem(char *pem)
{
    if (pem)
        explicit_bzero(pem, strlen(pem));
    free(pem);
}

void mg_grpc_auth_free(mg_grpc_auth *a)
{
    if (!a)
        return;
    for (size_t i = 0; i < a->ntokens; i++) {
        free(a->tokens[i].who.name);
        free_pem(a->tokens[i].secret);
    }
    free(a->tokens);
    free(a->none.name);
    free(a->unknown.name);
    free(a->mtls_peer.name);
    free(a->mtls_service.name);
    free(a->cert_pem);
    free_pem(a->key_pem);
    free(a->ca_pem);
    free(a->peer_identity);
    free(a);
}

grpc_server_credentials *mg_grpc_auth_server_credentials(const mg_grpc_auth *a)
{
    if (!a || !a->cert_pem)
        return grpc_insecure_server_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {.private_key = a->key_pem, .cert_chain = a->cert_pem};
    return grpc_ssl_server_credentials_create_ex(
        a->ca_pem, &pair, 1,
        a->ca_pem ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                  : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
        NULL);
}

grpc_channel_credentials *mg_grpc_auth_channel_credentials(const mg_grpc_auth *a)
{
    if (!a || !a->cert_pem)
        return grpc_insecure_credentials_create();
    grpc_ssl_pem_key_cert_pair pair = {.private_key = a->key_pem, .cert_chain = a->cert_pem};
    return grpc_ssl_credentials_create(a->ca_pem, &pair, NULL, NULL);
}

grpc_channel_credentials *mg_grpc_tls_channel_credentials(const char *ca_file,
                                                          const char *cert_file,
                                                          const char *key_file, char *err,
                                                          size_t errlen)
{
    char *ca = NULL, *cert = NULL, *key = NULL;
    grpc_channel_credentials *creds = NULL;
    if ((!cert_file) != (!key_file)) {
        snprintf(err, errlen, "a client certificate needs its key");
        goto out;
    }
    if (ca_file && !(ca = read_file(ca_file, "CA", err, errlen)))
        goto out;
    if (cert_file && (!(cert = read_file(cert_file, "certificate", err, errlen)) ||
                      !(key = read_file(key_file, "key", err, errlen))))
        goto out;
    grpc_ssl_pem_key_cert_pair pair = {.private_key = key, .cert_chain = cert};
    creds = grpc_ssl_credentials_create(ca, cert ? &pair : NULL, NULL, NULL);
out:
    free(ca);
    free(cert);
    free_pem(key);
    return creds;
}

const char *mg_grpc_auth_peer_token(const mg_grpc_auth *a)
{
    return a ? a->peer_token : NULL;
}

/* Whether s (not NUL-terminated) starts with prefix. */
static bool slice_starts(grpc_slice s, const char *prefix)
{
    size_t n = strlen(prefix);
    return GRPC_SLICE_LENGTH(s) >= n && memcmp(GRPC_SLICE_START_PTR(s), prefix, n) == 0;
}

/* Compares the presented p[0..plen) with every token in constant time for
 * a given token set; the matching token or NULL. */
static const struct token *match_token(const mg_grpc_auth *a, const uint8_t *p, size_t plen)
{
    const struct token *found = NULL;
    for (size_t i = 0; i < a->ntokens; i++) {
        const struct token *t = &a->tokens[i];
        unsigned char diff = plen != t->len;
        for (size_t k = 0; k < t->len; k++)
            diff |= (unsigned char)t->secret[k] ^ (k < plen ? p[k] : 0u);
        if (diff == 0)
            found = t;
    }
    return found;
}

/* The role of a verified client certificate on this call; false when the
 * connection has none. */
static bool cert_role(const mg_grpc_auth *a, grpc_call *call, enum role *role)
{
    if (!a->ca_pem || !call)
        return false;
    grpc_auth_context *ctx = grpc_call_auth_context(call);
    if (!ctx)
        return false;
    bool verified = grpc_auth_context_peer_is_authenticated(ctx) != 0;
    bool peer = false;
    static const char *const props[] = {GRPC_X509_CN_PROPERTY_NAME, GRPC_X509_SAN_PROPERTY_NAME};
    for (size_t k = 0; verified && a->peer_identity[0] && k < 2; k++) {
        grpc_auth_property_iterator it = grpc_auth_context_find_properties_by_name(ctx, props[k]);
        for (const grpc_auth_property *p; (p = grpc_auth_property_iterator_next(&it));) {
            size_t n = strlen(a->peer_identity);
            peer |= p->value_length >= n && memcmp(p->value, a->peer_identity, n) == 0;
        }
    }
    grpc_auth_context_release(ctx);
    *role = peer ? ROLE_PEER : ROLE_SERVICE;
    return verified;
}

grpc_status_code mg_grpc_auth_check(const mg_grpc_auth *a, grpc_call *call, grpc_slice method,
                                    const grpc_metadata_array *md, char *err, size_t errlen)
{
    if (!a || !a->enforce || slice_starts(method, "/grpc.health.v1.Health/"))
        return GRPC_STATUS_OK;
    enum role want = slice_starts(method, "/meshgate.v1.GatewayPeer/") ? ROLE_PEER : ROLE_SERVICE;
    const grpc_slice *bearer = NULL;
    for (size_t i = 0; md && i < md->count && !bearer; i++)
        if (grpc_slice_str_cmp(md->metadata[i].key, "authorization") == 0)
            bearer = &md->metadata[i].value;

    const struct client *who;
    enum role role = ROLE_SERVICE;
    enum result res = R_OK;
    if (bearer) {
        const uint8_t *v = GRPC_SLICE_START_PTR(*bearer);
        size_t n = GRPC_SLICE_LENGTH(*bearer);
        const struct token *t = NULL;
        if (n > 7 && strncasecmp((const char *)v, "Bearer ", 7) == 0)
            t = match_token(a, v + 7, n - 7);
        who = t ? &t->who : &a->unknown;
        if (t)
            role = t->role;
        else {
            res = R_UNAUTHENTICATED;
            snprintf(err, errlen, "invalid bearer token");
        }
    } else if (cert_role(a, call, &role)) {
        who = role == ROLE_PEER ? &a->mtls_peer : &a->mtls_service;
    } else {
        who = &a->none;
        res = R_UNAUTHENTICATED;
        snprintf(err, errlen,
                 "no credentials: send 'authorization: Bearer <token>' or a client certificate");
    }
    if (res == R_OK && role != want) {
        res = R_DENIED;
        snprintf(err, errlen, "client %s is a %s and may not call %s", who->name,
                 role == ROLE_PEER ? "peer" : "service",
                 want == ROLE_PEER ? "GatewayPeer (peers only)" : "Messaging (services only)");
    }
    mg_metric_add(who->count[res], 1);
    if (res != R_OK)
        return res == R_DENIED ? GRPC_STATUS_PERMISSION_DENIED : GRPC_STATUS_UNAUTHENTICATED;
    return GRPC_STATUS_OK;
}
