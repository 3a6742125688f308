/* fuzz_ws_proto.c: client WebSocket text frames through mg_ws_proto_parse,
 * the entry point ws_server.c calls for every frame. */
#include "gateway/ws_proto.h"

#include <stdint.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const mg_ws_limits lim = {.max_content_bytes = 65536, .max_user_bytes = 256};
    mg_ws_in in;
    const char *code = NULL;
    char reason[160];
    if (mg_ws_proto_parse((const char *)data, size, &lim, &in, &code, reason, sizeof(reason)) == 0)
        mg_ws_in_clear(&in);
    return 0;
}
