/* fuzz_redis.c: bytes from a Redis node as the cluster client reads them:
 * hiredis's RESP reader, then each reply the way redis_cluster.c looks at
 * it (bounded by mg_redis_reader_bound; MOVED/ASK redirections through parse_redirect, the error
 * prefixes). The CLUSTER SLOTS walk is inline in refresh_from, which needs a live connection, so it
 * is not reached here (see tests/fuzz/README.md). redis_cluster.c is included to reach its statics.
 */
#include "store/redis_cluster.c"

static void look(const redisReply *r, int depth)
{
    if (!r || depth > 8)
        return;
    if (r->type == REDIS_REPLY_ERROR) {
        char host[MG_RC_HOST_MAX];
        unsigned slot;
        int port;
        if (reply_is_err(r, "MOVED") || reply_is_err(r, "ASK"))
            parse_redirect(r->str, &slot, host, sizeof(host), &port);
        reply_is_err(r, "TRYAGAIN");
    }
    if (r->type == REDIS_REPLY_ARRAY)
        for (size_t i = 0; i < r->elements; i++)
            look(r->element[i], depth + 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    redisReader *rd = redisReaderCreate();
    mg_redis_reader_bound(rd);
    redisReaderFeed(rd, (const char *)data, size);
    for (int i = 0; i < 64; i++) {
        void *r = NULL;
        if (redisReaderGetReply(rd, &r) != REDIS_OK || !r)
            break;
        look(r, 0);
        freeReplyObject(r);
    }
    redisReaderFree(rd);
    /* the error text alone, as parse_redirect sees it */
    char *s = malloc(size + 1);
    memcpy(s, data, size);
    s[size] = '\0';
    char host[MG_RC_HOST_MAX];
    unsigned slot;
    int port;
    parse_redirect(s, &slot, host, sizeof(host), &port);
    free(s);
    return 0;
}
