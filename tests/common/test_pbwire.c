/* Tests of mg_pbwire.c: counting a field in protobuf wire format agrees
 * with protobuf-c, stops at the bound, and refuses malformed input. */
#include "common/mg_pbwire.h"
#include "meshgate/v1/messaging.pb-c.h"

#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>

Test(pbwire, counts_what_protobuf_c_encoded)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.from = "alice";
    m.content.data = (uint8_t *)"hello";
    m.content.len = 5;
    m.sent_at_ms = 1234567890123;
    m.priority = MESHGATE__V1__PRIORITY__PRIORITY_LOW;
    char *to[] = {"bob", "carol", "", "dave"};
    Meshgate__V1__SendBatchRequest rq = MESHGATE__V1__SEND_BATCH_REQUEST__INIT;
    rq.message = &m;
    rq.n_to = 4;
    rq.to = to;
    size_t len = protobuf_c_message_get_packed_size(&rq.base);
    uint8_t *buf = malloc(len);
    protobuf_c_message_pack(&rq.base, buf);
    size_t n = 99;
    cr_assert_eq(mg_pb_count_field(buf, len, 2, 100, &n), 0);
    cr_assert_eq(n, 4);
    cr_assert_eq(mg_pb_count_field(buf, len, 1, 100, &n), 0);
    cr_assert_eq(n, 1);
    cr_assert_eq(mg_pb_count_field(buf, len, 2, 2, &n), 0); /* stops at the bound */
    cr_assert_eq(n, 2);
    for (size_t cut = 1; cut < len; cut++) /* truncated: never reads past the end */
        mg_pb_count_field(buf, cut, 2, 100, &n);
    free(buf);
    cr_assert_eq(mg_pb_count_field(NULL, 0, 2, 10, &n), 0);
    cr_assert_eq(n, 0);
}

Test(pbwire, malformed_input_is_refused)
{
    size_t n;
    const uint8_t group[] = {0x13}; /* field 2, start group */
    cr_assert_eq(mg_pb_count_field(group, sizeof(group), 2, 10, &n), -EBADMSG);
    const uint8_t overlong[] = {0x12, 0x05, 'a'}; /* length past the end */
    cr_assert_eq(mg_pb_count_field(overlong, sizeof(overlong), 2, 10, &n), -EBADMSG);
    const uint8_t varint[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    cr_assert_eq(mg_pb_count_field(varint, sizeof(varint), 2, 10, &n), -EBADMSG);
    const uint8_t field0[] = {0x02, 0x00};
    cr_assert_eq(mg_pb_count_field(field0, sizeof(field0), 2, 10, &n), -EBADMSG);
    const uint8_t fixed[] = {0x09, 1, 2, 3}; /* 64-bit, short */
    cr_assert_eq(mg_pb_count_field(fixed, sizeof(fixed), 2, 10, &n), -EBADMSG);
}
