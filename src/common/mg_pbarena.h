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

#include <stdbool.h>
#include <stddef.h>

#define MG_PB_ARENA_BYTES 2048

typedef struct mg_pb_arena {
    ProtobufCAllocator a; /* pass &arena->a to unpack and free_unpacked */
    size_t used;
    _Alignas(16) unsigned char buf[MG_PB_ARENA_BYTES];
} mg_pb_arena;

/* Readies ar (no allocation); returns &ar->a. */
ProtobufCAllocator *mg_pb_arena_init(mg_pb_arena *ar);

/* The same for a request of any size (a DeliverMany of hundreds of
 * messages): one block of 2 * len + 4 KB, the thread's own kept between its
 * decodes (grown when too small; a decode nested in another gets a block of
 * its own), instead of a malloc per string and sub-message. Beyond the block,
 * malloc as above. mg_pb_block_done after free_unpacked gives it back. */
typedef struct mg_pb_block {
    ProtobufCAllocator a; /* pass &blk->a to unpack and free_unpacked */
    unsigned char *buf;
    size_t cap, used;
    bool own; /* buf is this decode's own (nested), freed by done */
} mg_pb_block;

ProtobufCAllocator *mg_pb_block_init(mg_pb_block *blk, size_t len);
void mg_pb_block_done(mg_pb_block *blk);

#endif
