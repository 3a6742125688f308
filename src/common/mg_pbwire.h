/* mg_pbwire.h: a look at protobuf wire format without decoding it.
 *
 * Lets a front end bound a request before protobuf-c allocates for it: a
 * SendBatch of a million recipients is refused after one pass over its
 * bytes, not after a million strings were copied. Pure functions, no
 * allocation, any thread.
 */
#ifndef MG_PBWIRE_H
#define MG_PBWIRE_H

#include <stddef.h>
#include <stdint.h>

/* Counts the top-level occurrences of field number `field` in the encoded
 * message buf[0..len) (a repeated field's elements, packed ones counted as
 * one). Stops counting at `stop` (returns as soon as *count reaches it, so a
 * huge request costs no more than `stop` fields). Returns 0, or -EBADMSG
 * when buf is not well-formed wire format up to where the scan stopped.
 * The caller must refuse the request on -EBADMSG rather than decode it:
 * protobuf-c accepts some encodings this scan does not (a non-minimal key of
 * field 0, for one), so decoding after a failed scan would let an unbounded
 * repeated field through. */
int mg_pb_count_field(const uint8_t *buf, size_t len, uint32_t field, size_t stop, size_t *count);

#endif
