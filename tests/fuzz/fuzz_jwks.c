/* fuzz_jwks.c: JWKS documents through mg_jwks_parse (the RSA n/e to PEM
 * conversion included), as the jwks thread reads them from --jwks-url, and
 * the same bytes as a token header through mg_jwks_token_kid. */
#include "gateway/jwks.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mg_jwks_keys *ks = NULL;
    if (mg_jwks_parse((const char *)data, size, &ks) >= 0)
        (void)mg_jwks_keys_find(ks, "k1");
    mg_jwks_keys_free(ks);
    char *tok = malloc(size + 1), kid[64];
    memcpy(tok, data, size);
    tok[size] = '\0';
    (void)mg_jwks_token_kid(tok, kid, sizeof(kid));
    free(tok);
    return 0;
}
