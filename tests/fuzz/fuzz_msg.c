/* fuzz_msg.c: Kafka records and inbox entries (the meshgate.v1.Message
 * envelope) through mg_msg_unpack, and what decodes back through pack. */
#include "router/msg.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mg_msg *m = NULL;
    if (mg_msg_unpack(data, size, &m) != 0)
        return 0;
    size_t len = 0;
    uint8_t *env = mg_msg_pack(m, &len);
    mg_msg *again = NULL;
    if (mg_msg_unpack(env, len, &again) != 0 || strcmp(again->id, m->id) ||
        strcmp(again->to, m->to) || again->content_len != m->content_len)
        __builtin_trap(); /* a decoded envelope must round-trip */
    mg_msg_free(again);
    free(env);
    mg_msg_free(m);
    return 0;
}
