/* Unit tests of redis_cluster.c that need no server: CRC16 and key slots,
 * redirection parsing, error-reply matching, error mapping, create's
 * argument checks. Includes the .c to reach its statics. */
#include "store/redis_cluster.c"

#include <criterion/criterion.h>

Test(redis_crc16, known_vectors)
{
    cr_assert_eq(mg_redis_crc16("123456789", 9), 0x31C3);
    cr_assert_eq(mg_redis_crc16("", 0), 0);
    /* slots published in the Redis Cluster docs / CLUSTER KEYSLOT */
    cr_assert_eq(mg_redis_key_slot("foo", 3), 12182);
    cr_assert_eq(mg_redis_key_slot("bar", 3), 5061);
    cr_assert_eq(mg_redis_key_slot("somekey", 7), 11058);
}

Test(redis_crc16, hash_tags)
{
    const char *a = "{user1000}.following", *b = "{user1000}.followers";
    cr_assert_eq(mg_redis_key_slot(a, strlen(a)), mg_redis_key_slot(b, strlen(b)));
    cr_assert_eq(mg_redis_key_slot(a, strlen(a)), mg_redis_key_slot("user1000", 8));
    /* empty tag: the whole key is hashed */
    cr_assert_eq(mg_redis_key_slot("foo{}{bar}", 10), mg_redis_crc16("foo{}{bar}", 10) & 16383);
    /* only the first tag counts */
    cr_assert_eq(mg_redis_key_slot("foo{{bar}}zap", 13), mg_redis_crc16("{bar", 4) & 16383);
    cr_assert_eq(mg_redis_key_slot("foo{bar}{zap}", 13), mg_redis_key_slot("bar", 3));
    /* no closing brace: the whole key */
    cr_assert_eq(mg_redis_key_slot("{abc", 4), mg_redis_crc16("{abc", 4) & 16383);
    /* our presence and inbox keys of one user share a slot */
    cr_assert_eq(mg_redis_key_slot("mg:p:{alice}", 12), mg_redis_key_slot("mg:im:{alice}", 13));
}

Test(redis_reply, parse_redirect)
{
    unsigned slot;
    char host[64];
    int port;
    cr_assert_eq(parse_redirect("MOVED 3999 127.0.0.1:6381", &slot, host, sizeof(host), &port), 0);
    cr_assert_eq(slot, 3999);
    cr_assert_str_eq(host, "127.0.0.1");
    cr_assert_eq(port, 6381);
    cr_assert_eq(parse_redirect("ASK 16383 ::1:17002", &slot, host, sizeof(host), &port), 0);
    cr_assert_str_eq(host, "::1");
    cr_assert_eq(port, 17002);
    cr_assert_eq(slot, 16383);
    cr_assert_neq(parse_redirect("MOVED 16384 h:1", &slot, host, sizeof(host), &port), 0);
    cr_assert_neq(parse_redirect("MOVED x h:1", &slot, host, sizeof(host), &port), 0);
    cr_assert_neq(parse_redirect("MOVED 1 nohost", &slot, host, sizeof(host), &port), 0);
    cr_assert_neq(parse_redirect("MOVED 1 h:0", &slot, host, sizeof(host), &port), 0);
    cr_assert_neq(parse_redirect("MOVED", &slot, host, sizeof(host), &port), 0);
}

Test(redis_reply, error_prefixes)
{
    redisReply r = {.type = REDIS_REPLY_ERROR, .str = (char *)"MOVED 1 a:1", .len = 11};
    cr_assert(reply_is_err(&r, "MOVED"));
    cr_assert_not(reply_is_err(&r, "MOVE"));
    cr_assert_not(reply_is_err(&r, "ASK"));
    redisReply t = {.type = REDIS_REPLY_ERROR, .str = (char *)"TRYAGAIN", .len = 8};
    cr_assert(reply_is_err(&t, "TRYAGAIN"));
    redisReply s = {.type = REDIS_REPLY_STRING, .str = (char *)"MOVED 1 a:1", .len = 11};
    cr_assert_not(reply_is_err(&s, "MOVED"));
    cr_assert_not(reply_is_err(NULL, "MOVED"));
}

Test(redis_reply, errno_mapping)
{
    redisContext c = {.err = REDIS_ERR_IO};
    snprintf(c.errstr, sizeof(c.errstr), "Resource temporarily unavailable");
    cr_assert_eq(ctx_errno(&c, EAGAIN), -ETIMEDOUT);
    cr_assert_eq(ctx_errno(&c, 0), -ETIMEDOUT);
    snprintf(c.errstr, sizeof(c.errstr), "Connection refused");
    cr_assert_eq(ctx_errno(&c, ECONNREFUSED), -EIO);
    c.err = REDIS_ERR_EOF;
    snprintf(c.errstr, sizeof(c.errstr), "Server closed the connection");
    cr_assert_eq(ctx_errno(&c, 0), -EIO);
}

Test(redis_create, bad_arguments)
{
    char err[256];
    cr_assert_null(mg_redis_cluster_create("", NULL, NULL, 100, err, sizeof(err)));
    cr_assert(strstr(err, "host:port"), "%s", err);
    cr_assert_null(mg_redis_cluster_create("127.0.0.1", NULL, NULL, 100, err, sizeof(err)));
    cr_assert(strstr(err, "bad node address \"127.0.0.1\""), "%s", err);
    cr_assert_null(mg_redis_cluster_create("127.0.0.1:99999", NULL, NULL, 100, err, sizeof(err)));
    cr_assert_null(mg_redis_cluster_create("127.0.0.1:1", NULL, NULL, 0, err, sizeof(err)));
    mg_redis_cluster_free(NULL);
    mg_redis_batch_free(NULL);
}

Test(redis_batch, formatting_without_server)
{
    mg_redis_batch *b = mg_redis_batch_new();
    cr_assert_eq(mg_redis_batch_add(b, "k", "SET %s %b", "k", "v\0x", (size_t)3), 0);
    const char *argv[] = {"GET", "k"};
    cr_assert_eq(mg_redis_batch_add_argv(b, "k", 2, argv, NULL), 1);
    cr_assert_eq(mg_redis_batch_count(b), 2);
    static const char want[] = "*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv\0x\r\n";
    cr_assert_eq(b->cmds[0].len, (int)sizeof(want) - 1);
    cr_assert_eq(memcmp(b->cmds[0].buf, want, sizeof(want) - 1), 0);
    cr_assert_eq(b->cmds[0].slot, mg_redis_key_slot("k", 1));
    cr_assert_eq(mg_redis_batch_status(b, 0), -EAGAIN); /* not run */
    cr_assert_null(mg_redis_batch_reply(b, 5));
    mg_redis_batch_free(b);
}

/* A reply array's declared size is bounded: a server claiming half a billion elements is a
 * protocol error on the connection, not a 4.4 GB allocation (found by fuzz_redis). */
Test(redis_reply, reader_refuses_a_huge_array_and_keeps_normal_ones)
{
    static const char *huge[] = {"*555555555\r\n", "*2\r\n*99999999\r\n", "*1048577\r\n"};
    for (size_t i = 0; i < sizeof(huge) / sizeof(huge[0]); i++) {
        redisReader *rd = redisReaderCreate();
        mg_redis_reader_bound(rd);
        redisReaderFeed(rd, huge[i], strlen(huge[i]));
        void *r = NULL;
        cr_expect_eq(redisReaderGetReply(rd, &r), REDIS_ERR, "%s refused", huge[i]);
        cr_expect_null(r);
        redisReaderFree(rd);
    }
    redisReader *rd = redisReaderCreate();
    mg_redis_reader_bound(rd);
    const char ok[] = "*2\r\n$3\r\nfoo\r\n:42\r\n";
    redisReaderFeed(rd, ok, strlen(ok));
    redisReply *r = NULL;
    cr_assert_eq(redisReaderGetReply(rd, (void **)&r), REDIS_OK);
    cr_assert_not_null(r);
    cr_expect_eq(r->type, REDIS_REPLY_ARRAY);
    cr_expect_eq(r->elements, 2);
    cr_expect_str_eq(r->element[0]->str, "foo");
    cr_expect_eq(r->element[1]->integer, 42);
    freeReplyObject(r);
    redisReaderFree(rd);
}
