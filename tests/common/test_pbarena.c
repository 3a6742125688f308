/* Tests of mg_pbarena.c: a request decoded into the stack arena reads as
 * protobuf-c decoded it, one larger than the arena goes on with malloc for
 * the rest, and freeing returns what was malloc'd (ASan: no leak). */
#include "common/mg_pbarena.h"
#include "meshgate/v1/messaging.pb-c.h"

#include <criterion/criterion.h>
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
