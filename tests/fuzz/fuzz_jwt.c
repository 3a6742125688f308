/* fuzz_jwt.c: bearer tokens through mg_jwt_auth_verify (HS256, with the
 * aud/iss checks on), as the WebSocket upgrade presents them. */
#include "gateway/jwt_auth.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static mg_jwt_auth *a;
    if (!a) {
        char err[160];
        a = mg_jwt_auth_create("fuzz-secret-0123456789", NULL, err, sizeof(err));
        mg_jwt_auth_require(a, "meshgate", "https://id.example");
    }
    char *tok = malloc(size + 1);
    memcpy(tok, data, size);
    tok[size] = '\0';
    char *user = NULL, reason[160];
    mg_jwt_auth_verify(a, tok, 1700000000, 256, &user, NULL, reason, sizeof(reason));
    free(user);
    free(tok);
    return 0;
}
