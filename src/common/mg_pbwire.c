/* mg_pbwire.c: counting a field in protobuf wire format (mg_pbwire.h).
 *
 * Walks the top level only: each field is a varint key (field << 3 | wire
 * type) followed by a varint (0), 8 bytes (1), a length and that many bytes
 * (2) or 4 bytes (5). Groups (3, 4) are deprecated and not used by meshgate's
 * protos: they end the scan as malformed. Every read is bounds-checked.
 */
#include "common/mg_pbwire.h"

#include <errno.h>

/* Reads a varint at buf[*pos..len); returns 0 or -EBADMSG. */
static int read_varint(const uint8_t *buf, size_t len, size_t *pos, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (*pos >= len)
            return -EBADMSG;
        uint8_t b = buf[(*pos)++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -EBADMSG; /* more than 10 bytes */
}

int mg_pb_count_field(const uint8_t *buf, size_t len, uint32_t field, size_t stop, size_t *count)
{
    size_t pos = 0;
    *count = 0;
    while (pos < len && *count < stop) {
        uint64_t key, n;
        if (read_varint(buf, len, &pos, &key) != 0)
            return -EBADMSG;
        uint32_t wt = (uint32_t)(key & 7);
        uint64_t num = key >> 3;
        if (num == 0)
            return -EBADMSG;
        switch (wt) {
        case 0:
            if (read_varint(buf, len, &pos, &n) != 0)
                return -EBADMSG;
            break;
        case 1:
            if (len - pos < 8)
                return -EBADMSG;
            pos += 8;
            break;
        case 2:
            if (read_varint(buf, len, &pos, &n) != 0 || n > len - pos)
                return -EBADMSG;
            pos += (size_t)n;
            break;
        case 5:
            if (len - pos < 4)
                return -EBADMSG;
            pos += 4;
            break;
        default:
            return -EBADMSG;
        }
        if (num == field)
            (*count)++;
    }
    return 0;
}
