/* jwks.c: the keys of --jwks-url (see jwks.h).
 *
 * Owns the thread "jwks", its curl handle and the current key set. The
 * thread sleeps on a condition variable until the periodic refresh is due or
 * a lookup missed a kid (and the last fetch is at least min_refetch_s old),
 * fetches the document (5 s timeout, 1 MB at most, http or https only),
 * converts its RSA keys to PEM with OpenSSL and swaps the set in under the
 * mutex. mg_jwks_find (the WebSocket thread, at upgrade and on refresh
 * frames) only looks up and copies under that mutex: it never waits for
 * the network. Fetches are counted in meshgate_jwks_fetches_total{result}.
 */
#include "gateway/jwks.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define FETCH_TIMEOUT_MS 5000
#define MAX_DOC_BYTES    (1 << 20)
#define MAX_KEYS         64

typedef struct jwk {
    char *kid, *pem;
} jwk;

struct mg_jwks_keys {
    size_t n;
    jwk k[];
};

struct mg_jwks {
    char *url;
    int64_t refresh_ms, min_refetch_ms;
    pthread_t thread;
    pthread_mutex_t mu; /* guards everything below */
    pthread_cond_t cv;
    mg_jwks_keys *keys;
    bool want, stop;
    int64_t last_fetch_ms; /* monotonic */
    mg_metric *m_ok, *m_err, *m_keys;
};

/* ---- the document ------------------------------------------------------- */

/* base64url without padding (RFC 7515 2) into a malloc'd buffer. */
static unsigned char *b64url_decode(const char *s, size_t *outlen)
{
    size_t n = strlen(s);
    unsigned char *out = mg_xmalloc(n * 3 / 4 + 3);
    uint32_t acc = 0;
    int bits = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i], v;
        if (c >= 'A' && c <= 'Z')
            v = c - 'A';
        else if (c >= 'a' && c <= 'z')
            v = c - 'a' + 26;
        else if (c >= '0' && c <= '9')
            v = c - '0' + 52;
        else if (c == '-' || c == '+')
            v = 62;
        else if (c == '_' || c == '/')
            v = 63;
        else if (c == '=' && i + 2 >= n)
            break;
        else {
            free(out);
            return NULL;
        }
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    *outlen = o;
    return out;
}

static BIGNUM *bn_from_b64url(const char *s)
{
    size_t n = 0;
    unsigned char *b = s ? b64url_decode(s, &n) : NULL;
    BIGNUM *bn = b && n ? BN_bin2bn(b, (int)n, NULL) : NULL;
    free(b);
    return bn;
}

/* The PEM (SubjectPublicKeyInfo) of the RSA key (n, e), or NULL. */
static char *rsa_pem(const char *n64, const char *e64)
{
    char *pem = NULL;
    BIGNUM *n = bn_from_b64url(n64), *e = bn_from_b64url(e64);
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pkey = NULL;
    BIO *bio = NULL;
    if (!n || !e || BN_num_bits(n) < 2048 || BN_num_bits(n) > 8192)
        goto out;
    bld = OSSL_PARAM_BLD_new();
    if (!bld || !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) ||
        !OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e))
        goto out;
    params = OSSL_PARAM_BLD_to_param(bld);
    ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    if (!params || !ctx || EVP_PKEY_fromdata_init(ctx) <= 0 ||
        EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) <= 0)
        goto out;
    bio = BIO_new(BIO_s_mem());
    if (!bio || !PEM_write_bio_PUBKEY(bio, pkey))
        goto out;
    char *data;
    long len = BIO_get_mem_data(bio, &data);
    if (len > 0)
        pem = mg_xstrndup(data, (size_t)len);
out:
    BIO_free(bio);
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    return pem;
}

static const char *jstr(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

int mg_jwks_parse(const char *doc, size_t len, mg_jwks_keys **out)
{
    *out = NULL;
    json_t *root = json_loadb(doc, len, JSON_REJECT_DUPLICATES, NULL);
    json_t *arr = json_object_get(root, "keys");
    if (!json_is_array(arr)) {
        json_decref(root);
        return -EINVAL;
    }
    mg_jwks_keys *ks = mg_xcalloc(1, sizeof(*ks) + MAX_KEYS * sizeof(jwk));
    size_t i;
    json_t *k;
    json_array_foreach(arr, i, k)
    {
        const char *kty = jstr(k, "kty"), *kid = jstr(k, "kid"), *use = jstr(k, "use"),
                   *alg = jstr(k, "alg");
        if (ks->n == MAX_KEYS || !kty || strcmp(kty, "RSA") != 0 || !kid || !kid[0] ||
            strlen(kid) > 256 || (use && strcmp(use, "sig") != 0) ||
            (alg && strcmp(alg, "RS256") != 0) || mg_jwks_keys_find(ks, kid))
            continue;
        char *pem = rsa_pem(jstr(k, "n"), jstr(k, "e"));
        if (!pem)
            continue;
        ks->k[ks->n].kid = mg_xstrdup(kid);
        ks->k[ks->n++].pem = pem;
    }
    json_decref(root);
    *out = ks;
    return (int)ks->n;
}

int mg_jwks_token_kid(const char *token, char *kid, size_t kidlen)
{
    const char *dot = token ? strchr(token, '.') : NULL;
    if (!dot || dot == token || (size_t)(dot - token) > 4096)
        return -EINVAL;
    char *h64 = mg_xstrndup(token, (size_t)(dot - token));
    size_t n = 0;
    unsigned char *h = b64url_decode(h64, &n);
    free(h64);
    int rc = -EINVAL;
    json_t *hdr = h ? json_loadb((const char *)h, n, JSON_REJECT_DUPLICATES, NULL) : NULL;
    const char *v = jstr(hdr, "kid");
    if (v && v[0] && strlen(v) < kidlen) {
        memcpy(kid, v, strlen(v) + 1);
        rc = 0;
    }
    json_decref(hdr);
    free(h);
    return rc;
}

const char *mg_jwks_keys_find(const mg_jwks_keys *ks, const char *kid)
{
    for (size_t i = 0; ks && kid && i < ks->n; i++)
        if (strcmp(ks->k[i].kid, kid) == 0)
            return ks->k[i].pem;
    return NULL;
}

void mg_jwks_keys_free(mg_jwks_keys *ks)
{
    if (!ks)
        return;
    for (size_t i = 0; i < ks->n; i++) {
        free(ks->k[i].kid);
        free(ks->k[i].pem);
    }
    free(ks);
}

/* ---- the fetch thread ---------------------------------------------------- */

typedef struct buf {
    char *p;
    size_t n;
} buf;

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    buf *b = arg;
    size_t n = size * nmemb;
    if (b->n + n > MAX_DOC_BYTES)
        return 0; /* curl fails the transfer */
    b->p = mg_xrealloc(b->p, b->n + n + 1);
    memcpy(b->p + b->n, data, n);
    b->n += n;
    b->p[b->n] = 0;
    return n;
}

/* [jwks] One fetch; swaps the key set in when it has keys. Returns 0 or -1. */
static int fetch(mg_jwks *k)
{
    buf b = {0};
    char cerr[CURL_ERROR_SIZE] = "";
    long status = 0;
    int rc = -1;
    CURL *c = curl_easy_init();
    if (!c)
        goto out;
    curl_easy_setopt(c, CURLOPT_URL, k->url);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, (long)FETCH_TIMEOUT_MS);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, cerr);
    CURLcode cc = curl_easy_perform(c);
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (cc != CURLE_OK || status != 200) {
        mg_log_warn("jwks", "fetch failed url=%s status=%ld error=\"%s\"", k->url, status,
                    cc != CURLE_OK ? (cerr[0] ? cerr : curl_easy_strerror(cc)) : "HTTP status");
        goto out;
    }
    mg_jwks_keys *ks = NULL;
    int n = mg_jwks_parse(b.p ? b.p : "", b.n, &ks);
    if (n <= 0) {
        mg_log_warn("jwks", "fetch of url=%s gave %s; keeping the %s keys", k->url,
                    n < 0 ? "no JWKS document" : "no usable RS256 key", "current");
        mg_jwks_keys_free(ks);
        goto out;
    }
    pthread_mutex_lock(&k->mu);
    mg_jwks_keys *old = k->keys;
    k->keys = ks;
    pthread_mutex_unlock(&k->mu);
    mg_jwks_keys_free(old);
    mg_metric_set(k->m_keys, n);
    mg_log_info("jwks", "fetched url=%s keys=%d", k->url, n);
    rc = 0;
out:
    mg_metric_add(rc == 0 ? k->m_ok : k->m_err, 1);
    if (c)
        curl_easy_cleanup(c);
    free(b.p);
    return rc;
}

static void *thread_main(void *arg)
{
    mg_jwks *k = arg;
    pthread_mutex_lock(&k->mu);
    while (!k->stop) {
        int64_t now = mg_mono_ms();
        int64_t due = k->last_fetch_ms + k->refresh_ms;
        if (k->want && k->last_fetch_ms + k->min_refetch_ms < due)
            due = k->last_fetch_ms + k->min_refetch_ms;
        if (now >= due) {
            k->want = false;
            k->last_fetch_ms = now;
            pthread_mutex_unlock(&k->mu);
            int rc = fetch(k);
            pthread_mutex_lock(&k->mu);
            if (rc != 0)
                k->want = true; /* retry at the early-fetch pace */
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        int64_t wait_ms = due - now;
        ts.tv_sec += wait_ms / 1000;
        ts.tv_nsec += (wait_ms % 1000) * 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&k->cv, &k->mu, &ts);
    }
    pthread_mutex_unlock(&k->mu);
    return NULL;
}

mg_jwks *mg_jwks_create(const char *url, int refresh_s, int min_refetch_s, char *err, size_t errlen)
{
    if (!url || (strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0)) {
        snprintf(err, errlen, "--jwks-url must be an http:// or https:// URL");
        return NULL;
    }
    if (refresh_s < 1 || min_refetch_s < 1) {
        snprintf(err, errlen, "--jwks-refresh-seconds and --jwks-min-refetch-seconds must be >= 1");
        return NULL;
    }
    curl_global_init(CURL_GLOBAL_DEFAULT);
    mg_jwks *k = mg_new(mg_jwks);
    k->url = mg_xstrdup(url);
    k->refresh_ms = (int64_t)refresh_s * 1000;
    k->min_refetch_ms = (int64_t)min_refetch_s * 1000;
    pthread_mutex_init(&k->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&k->cv, &ca);
    pthread_condattr_destroy(&ca);
    k->m_ok = mg_counter("meshgate_jwks_fetches_total", "JWKS document fetches, by result",
                         "result=\"ok\"");
    k->m_err = mg_counter("meshgate_jwks_fetches_total", "JWKS document fetches, by result",
                          "result=\"error\"");
    k->m_keys = mg_gauge("meshgate_jwks_keys", "RS256 keys held from --jwks-url", NULL);
    k->last_fetch_ms = mg_mono_ms();
    if (fetch(k) != 0)
        k->want = true;
    pthread_create(&k->thread, NULL, thread_main, k);
    pthread_setname_np(k->thread, "jwks");
    return k;
}

void mg_jwks_free(mg_jwks *k)
{
    if (!k)
        return;
    pthread_mutex_lock(&k->mu);
    k->stop = true;
    pthread_cond_signal(&k->cv);
    pthread_mutex_unlock(&k->mu);
    pthread_join(k->thread, NULL);
    pthread_cond_destroy(&k->cv);
    pthread_mutex_destroy(&k->mu);
    mg_jwks_keys_free(k->keys);
    free(k->url);
    free(k);
}

int mg_jwks_find(mg_jwks *k, const char *kid, char **pem, size_t *len)
{
    *pem = NULL;
    pthread_mutex_lock(&k->mu);
    const char *p = mg_jwks_keys_find(k->keys, kid);
    if (p) {
        *len = strlen(p);
        *pem = mg_xstrndup(p, *len);
    } else if (!k->want) {
        k->want = true;
        pthread_cond_signal(&k->cv);
    }
    pthread_mutex_unlock(&k->mu);
    return p ? 0 : -ENOENT;
}
