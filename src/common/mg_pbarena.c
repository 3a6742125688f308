/* mg_pbarena.c: a stack arena for protobuf-c decodes (see mg_pbarena.h). */
#include "common/mg_pbarena.h"
#include "common/mg_alloc.h"

#include <stdint.h>
#include <stdlib.h>

static void *arena_alloc(void *data, size_t size)
{
    mg_pb_arena *ar = data;
    size_t need = (size + 15) & ~(size_t)15;
    if (need >= size && need <= sizeof(ar->buf) - ar->used) {
        void *p = ar->buf + ar->used;
        ar->used += need;
        return p;
    }
    return mg_xmalloc(size ? size : 1);
}

static void arena_free(void *data, void *p)
{
    mg_pb_arena *ar = data;
    uintptr_t u = (uintptr_t)p, b = (uintptr_t)ar->buf;
    if (u >= b && u < b + sizeof(ar->buf))
        return; /* the arena's own: gone with it */
    free(p);
}

ProtobufCAllocator *mg_pb_arena_init(mg_pb_arena *ar)
{
    ar->a.alloc = arena_alloc;
    ar->a.free = arena_free;
    ar->a.allocator_data = ar;
    ar->used = 0;
    return &ar->a;
}
