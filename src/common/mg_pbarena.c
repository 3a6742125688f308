/* mg_pbarena.c: a stack arena for protobuf-c decodes (see mg_pbarena.h). */
#include "common/mg_pbarena.h"
#include "common/mg_alloc.h"

#include <pthread.h>
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

/* ---- the thread's block ---------------------------------------------------- */

#define KEEP_MAX (4u << 20) /* a thread keeps a block up to this size between decodes */

struct kept {
    unsigned char *buf;
    size_t cap;
    bool busy;
};

static pthread_key_t kept_key;
static pthread_once_t kept_once = PTHREAD_ONCE_INIT;

static void kept_free(void *p)
{
    struct kept *k = p;
    free(k->buf);
    free(k);
}

static void kept_key_make(void)
{
    if (pthread_key_create(&kept_key, kept_free) != 0)
        abort();
}

/* The calling thread's kept block (freed when the thread exits). */
static struct kept *kept_get(void)
{
    pthread_once(&kept_once, kept_key_make);
    struct kept *k = pthread_getspecific(kept_key);
    if (!k) {
        k = mg_new(struct kept);
        pthread_setspecific(kept_key, k);
    }
    return k;
}

static void *block_alloc(void *data, size_t size)
{
    mg_pb_block *blk = data;
    size_t need = (size + 15) & ~(size_t)15;
    if (need >= size && need <= blk->cap - blk->used) {
        void *p = blk->buf + blk->used;
        blk->used += need;
        return p;
    }
    return mg_xmalloc(size ? size : 1);
}

static void block_free(void *data, void *p)
{
    mg_pb_block *blk = data;
    uintptr_t u = (uintptr_t)p, b = (uintptr_t)blk->buf;
    if (u >= b && u < b + blk->cap)
        return;
    free(p);
}

ProtobufCAllocator *mg_pb_block_init(mg_pb_block *blk, size_t len)
{
    size_t cap = 2 * len + 4096;
    blk->a.alloc = block_alloc;
    blk->a.free = block_free;
    blk->a.allocator_data = blk;
    blk->used = 0;
    struct kept *k = kept_get();
    blk->own = k->busy || cap > KEEP_MAX;
    if (blk->own) {
        blk->buf = mg_xmalloc(cap);
        blk->cap = cap;
        return &blk->a;
    }
    if (k->cap < cap) {
        free(k->buf);
        k->buf = mg_xmalloc(cap);
        k->cap = cap;
    }
    k->busy = true;
    blk->buf = k->buf;
    blk->cap = k->cap;
    return &blk->a;
}

void mg_pb_block_done(mg_pb_block *blk)
{
    if (blk->own)
        free(blk->buf);
    else
        kept_get()->busy = false;
    blk->buf = NULL;
}

ProtobufCAllocator *mg_pb_arena_init(mg_pb_arena *ar)
{
    ar->a.alloc = arena_alloc;
    ar->a.free = arena_free;
    ar->a.allocator_data = ar;
    ar->used = 0;
    return &ar->a;
}
