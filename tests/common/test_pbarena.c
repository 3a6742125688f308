/* Tests of mg_pbarena.c: a request decoded into the stack arena reads as
 * protobuf-c decoded it, one larger than the arena goes on with malloc for
 * the rest, and freeing returns what was malloc'd (ASan: no leak); a large
 * request decodes into the thread's kept block, a nested one into its own. */
#include "common/mg_pbarena.h"
#include "meshgate/v1/messaging.pb-c.h"
#include "meshgate/v1/peer.pb-c.h"

#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Packs a SendMessageRequest whose content is clen bytes of 'c'. */
static uint8_t *pack_request(size_t clen, size_t *len, uint8_t **content)
{
    *content = malloc(clen + 1);
    memset(*content, 'c', clen);
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.id = "m-1";
    m.from = "alice";
    m.to = "bob";
    m.content.data = *content;
    m.content.len = clen;
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    *len = protobuf_c_message_get_packed_size(&rq.base);
    uint8_t *buf = malloc(*len);
    protobuf_c_message_pack(&rq.base, buf);
    return buf;
}

static void decode_and_check(size_t clen)
{
    size_t len;
    uint8_t *content;
    uint8_t *buf = pack_request(clen, &len, &content);
    mg_pb_arena ar;
    ProtobufCAllocator *pa = mg_pb_arena_init(&ar);
    Meshgate__V1__SendMessageRequest *rq = meshgate__v1__send_message_request__unpack(pa, len, buf);
    cr_assert_not_null(rq);
    cr_assert_not_null(rq->message);
    cr_assert_str_eq(rq->message->id, "m-1");
    cr_assert_str_eq(rq->message->from, "alice");
    cr_assert_str_eq(rq->message->to, "bob");
    cr_assert_eq(rq->message->content.len, clen);
    cr_assert_eq(memcmp(rq->message->content.data, content, clen), 0);
    cr_assert(ar.used <= sizeof(ar.buf));
    protobuf_c_message_free_unpacked(&rq->base, pa);
    free(buf);
    free(content);
}

Test(pbarena, small_request_decodes_in_the_arena)
{
    decode_and_check(16);
}

Test(pbarena, request_larger_than_the_arena_goes_on_with_malloc)
{
    decode_and_check(3 * MG_PB_ARENA_BYTES);
}

Test(pbarena, garbage_is_refused)
{
    mg_pb_arena ar;
    ProtobufCAllocator *pa = mg_pb_arena_init(&ar);
    const uint8_t junk[] = {0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01};
    cr_assert_null(meshgate__v1__send_message_request__unpack(pa, sizeof(junk), junk));
}

/* ---- the thread's block ---------------------------------------------------- */

/* Packs a DeliverManyRequest of n messages (peer.proto), each with content
 * "content-<i>". */

static uint8_t *pack_many(size_t n, size_t *len)
{
    Meshgate__V1__DeliverManyRequest rq = MESHGATE__V1__DELIVER_MANY_REQUEST__INIT;
    rq.n_deliveries = n;
    rq.deliveries = calloc(n, sizeof(*rq.deliveries));
    Meshgate__V1__DeliverMessageRequest *d = calloc(n, sizeof(*d));
    Meshgate__V1__Message *m = calloc(n, sizeof(*m));
    char(*text)[32] = calloc(n, sizeof(*text));
    for (size_t i = 0; i < n; i++) {
        meshgate__v1__deliver_message_request__init(&d[i]);
        meshgate__v1__message__init(&m[i]);
        snprintf(text[i], sizeof(text[i]), "content-%zu", i);
        m[i].id = "m";
        m[i].to = "bob";
        m[i].content.data = (uint8_t *)text[i];
        m[i].content.len = strlen(text[i]);
        d[i].message = &m[i];
        d[i].origin_gateway = "gw-a";
        rq.deliveries[i] = &d[i];
    }
    *len = protobuf_c_message_get_packed_size(&rq.base);
    uint8_t *buf = malloc(*len);
    protobuf_c_message_pack(&rq.base, buf);
    free(rq.deliveries);
    free(d);
    free(m);
    free(text);
    return buf;
}

static void check_many(const Meshgate__V1__DeliverManyRequest *rq, size_t n)
{
    cr_assert_not_null(rq);
    cr_assert_eq(rq->n_deliveries, n);
    for (size_t i = 0; i < n; i++) {
        char want[32];
        snprintf(want, sizeof(want), "content-%zu", i);
        const Meshgate__V1__Message *m = rq->deliveries[i]->message;
        cr_assert_str_eq(rq->deliveries[i]->origin_gateway, "gw-a");
        cr_assert_eq(m->content.len, strlen(want));
        cr_assert_eq(memcmp(m->content.data, want, m->content.len), 0);
    }
}

Test(pbarena, a_large_request_decodes_in_the_threads_block_and_a_nested_one_in_its_own)
{
    size_t len, len2;
    uint8_t *buf = pack_many(500, &len), *buf2 = pack_many(3, &len2);
    mg_pb_block blk, nested;
    ProtobufCAllocator *pa = mg_pb_block_init(&blk, len);
    Meshgate__V1__DeliverManyRequest *rq = meshgate__v1__deliver_many_request__unpack(pa, len, buf);
    check_many(rq, 500);
    cr_expect_not(blk.own, "the thread's kept block");
    cr_expect(blk.used > 0 && blk.used <= blk.cap, "decoded into the block: %zu of %zu", blk.used,
              blk.cap);
    ProtobufCAllocator *pn = mg_pb_block_init(&nested, len2); /* while blk is in use */
    Meshgate__V1__DeliverManyRequest *rq2 =
        meshgate__v1__deliver_many_request__unpack(pn, len2, buf2);
    check_many(rq2, 3);
    cr_expect(nested.own, "a nested decode gets a block of its own");
    protobuf_c_message_free_unpacked(&rq2->base, pn);
    mg_pb_block_done(&nested);
    protobuf_c_message_free_unpacked(&rq->base, pa);
    mg_pb_block_done(&blk);

    pa = mg_pb_block_init(&blk, len2);
    unsigned char *kept = blk.buf;
    rq = meshgate__v1__deliver_many_request__unpack(pa, len2, buf2);
    check_many(rq, 3);
    protobuf_c_message_free_unpacked(&rq->base, pa);
    mg_pb_block_done(&blk);
    pa = mg_pb_block_init(&blk, len);
    cr_expect_eq(blk.buf, kept, "the next decode on the thread reuses its block");
    mg_pb_block_done(&blk);
    free(buf);
    free(buf2);
}

Test(pbarena, garbage_in_a_block_is_refused)
{
    mg_pb_block blk;
    ProtobufCAllocator *pa = mg_pb_block_init(&blk, 6);
    const uint8_t junk[] = {0x0a, 0xff, 0xff, 0xff, 0x0f, 0x01};
    cr_assert_null(meshgate__v1__deliver_many_request__unpack(pa, sizeof(junk), junk));
    mg_pb_block_done(&blk);
}
