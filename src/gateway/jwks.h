/* jwks.h: the RS256 keys of a JWKS document (--jwks-url), fetched and kept
 * fresh by a thread of their own.
 *
 * The document is fetched with libcurl on the thread "jwks": once at create
 * (so a gateway starts with keys when the issuer is up), then every
 * refresh_s seconds, and early when a lookup misses a kid, at most once per
 * min_refetch_s seconds (a burst of tokens with made-up kids costs one fetch
 * per interval, never one per token). Keys are RSA ("kty":"RSA", "n", "e",
 * a "kid"; "use" absent or "sig", "alg" absent or RS256), turned into PEM
 * public keys for libjwt. A fetch that fails or yields no key keeps the keys
 * there were.
 *
 * Thread-safety: create/free on one thread; mg_jwks_find from any thread. It
 * never waits for a fetch: the key set is swapped under a mutex held only for
 * the lookup or the swap.
 */
#ifndef MG_JWKS_H
#define MG_JWKS_H

#include <stddef.h>

typedef struct mg_jwks mg_jwks;

/* Starts the thread after a first fetch (its failure is logged, not fatal:
 * the thread retries at the early-fetch pace). Returns NULL with err when the
 * URL is not http(s) or an interval is below 1 s. url is copied. */
mg_jwks *mg_jwks_create(const char *url, int refresh_s, int min_refetch_s, char *err,
                        size_t errlen);
/* Stops the thread (an in-flight fetch ends within its 5 s timeout) and
 * frees. NULL is a no-op. */
void mg_jwks_free(mg_jwks *k);

/* The PEM public key of kid: 0 with a malloc'd NUL-terminated copy in *pem
 * (the caller frees) and its length in *len, or -ENOENT, having asked the
 * thread for an early fetch (rate limited, see above). */
int mg_jwks_find(mg_jwks *k, const char *kid, char **pem, size_t *len);

/* The "kid" of a compact JWT's header into kid (kidlen bytes, NUL-terminated).
 * Returns 0, or -EINVAL when the header is not base64url JSON with a string
 * kid that fits. Pure; any thread. */
int mg_jwks_token_kid(const char *token, char *kid, size_t kidlen);

/* Parses a JWKS document into a key set (the fetch thread's step; also for
 * tests and fuzzing). Returns the number of usable keys (0..) or -EINVAL when
 * doc is not a JWKS; the set is freed with mg_jwks_keys_free. */
typedef struct mg_jwks_keys mg_jwks_keys;
int mg_jwks_parse(const char *doc, size_t len, mg_jwks_keys **out);
const char *mg_jwks_keys_find(const mg_jwks_keys *ks, const char *kid);
void mg_jwks_keys_free(mg_jwks_keys *ks);

#endif
