/* mg_pbarena.h: a protobuf-c allocator that decodes a request into a
 * buffer on the caller's stack.
 *
 * protobuf-c allocates every string and sub-message of a decoded request on
 * its own; a SendMessage request is half a dozen mallocs, freed again as
 * soon as the router has its copy. An arena hands out its buffer instead
 * and frees nothing it handed out; a request larger than the buffer goes on
 * with malloc for the rest. One decode per arena, on one thread; the decoded
 * message is freed with protobuf_c_message_free_unpacked(msg, &arena->a)
 * before the arena goes out of scope.
 */
#ifndef MG_PBARENA_H
#define MG_PBARENA_H

#include <protobuf-c/protobuf-c.h>

#include <stddef.h>

#define MG_PB_ARENA_BYTES 2048

typedef struct mg_pb_arena {
    ProtobufCAllocator a; /* pass &arena->a to unpack and free_unpacked */
    size_t used;
    _Alignas(16) unsigned char buf[MG_PB_ARENA_BYTES];
} mg_pb_arena;

/* Readies ar (no allocation); returns &ar->a. */
ProtobufCAllocator *mg_pb_arena_init(mg_pb_arena *ar);

#endif
