/* inbox_memory.c: the in-memory offline inbox of the embedded gateway.
 *
 * user -> singly linked FIFO of (message, stored_at) under one mutex. Capped
 * per user in count (the oldest are dropped) and age (expired ones are
 * dropped when the inbox is touched), and overall in messages
 * (MG_INBOX_MEMORY_TOTAL), bytes (--inbox-memory-bytes: each message's
 * strings and content plus its bookkeeping, each user's box and name) and
 * users (--inbox-memory-users). A store that would go beyond any of them
 * fails with -ENOSPC (the router answers FAILED "offline inbox full") and is
 * counted in meshgate_inbox_full_total; nothing is evicted to make room, so
 * what was STORED stays until acked or aged out. Acks and expiry give the
 * room back. Memory stays bounded however many users are offline.
 * Thread-safety: all ops from any thread.
 */
#include "store/inbox.h"
#include "common/mg_alloc.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MG_INBOX_MEMORY_TOTAL 1000000
#define MG_IM_BOX_OVERHEAD    64 /* a map entry, roughly */

struct item {
    mg_msg *msg;
    int64_t stored_at_ms;
    size_t bytes; /* item_bytes(msg), counted in inbox_memory.bytes */
    struct item *next;
};

struct box {
    struct item *head, *tail;
    size_t n;
};

typedef struct inbox_memory {
    mg_inbox base;
    pthread_mutex_t mu;
    mg_map *boxes; /* user -> struct box */
    size_t max_messages, total;
    int64_t max_age_ms;
    size_t max_bytes, bytes; /* messages and boxes held */
    size_t max_users, users;
    mg_metric *m_full;
} inbox_memory;

static size_t item_bytes(const mg_msg *m)
{
    return sizeof(struct item) + sizeof(mg_msg) + strlen(m->id) + strlen(m->from) + strlen(m->to) +
           strlen(m->content_type) + m->content_len + 4;
}

static size_t box_bytes(const char *user)
{
    return sizeof(struct box) + MG_IM_BOX_OVERHEAD + strlen(user) + 1;
}

static void drop_head(inbox_memory *im, struct box *b)
{
    struct item *it = b->head;
    b->head = it->next;
    if (!b->head)
        b->tail = NULL;
    b->n--;
    im->total--;
    im->bytes -= it->bytes;
    mg_msg_free(it->msg);
    free(it);
}

static void expire(inbox_memory *im, struct box *b, int64_t now)
{
    while (b->head && now - b->head->stored_at_ms > im->max_age_ms)
        drop_head(im, b);
}

static void maybe_delete_box(inbox_memory *im, const char *user, struct box *b)
{
    if (b->n == 0) {
        mg_map_del(im->boxes, user);
        free(b);
        im->users--;
        im->bytes -= box_bytes(user);
    }
}

static int im_store(mg_inbox *ib, const mg_msg *msg)
{
    inbox_memory *im = (inbox_memory *)ib;
    int64_t now = mg_now_ms();
    int rc = 0;
    pthread_mutex_lock(&im->mu);
    struct box *b = mg_map_get(im->boxes, msg->to);
    if (!b) {
        if (im->users >= im->max_users) {
            rc = -ENOSPC;
            mg_metric_add(im->m_full, 1);
            pthread_mutex_unlock(&im->mu);
            return rc;
        }
        b = mg_new(struct box);
        mg_map_put(im->boxes, msg->to, b);
        im->users++;
        im->bytes += box_bytes(msg->to);
    }
    expire(im, b, now);
    for (struct item *it = b->head; it; it = it->next)
        if (!strcmp(it->msg->id, msg->id))
            goto out; /* idempotent */
    /* A full box drops its oldest to make room: that much comes back. */
    bool full_box = b->n >= im->max_messages;
    size_t need = item_bytes(msg), freed = full_box && b->head ? b->head->bytes : 0;
    if ((im->total >= MG_INBOX_MEMORY_TOTAL && !full_box) ||
        im->bytes - freed + need > im->max_bytes) {
        rc = -ENOSPC;
        mg_metric_add(im->m_full, 1);
        goto out;
    }
    if (full_box)
        drop_head(im, b);
    struct item *it = mg_new(struct item);
    it->msg = mg_msg_dup(msg);
    it->stored_at_ms = now;
    it->bytes = need;
    im->bytes += need;
    if (b->tail)
        b->tail->next = it;
    else
        b->head = it;
    b->tail = it;
    b->n++;
    im->total++;
out:
    maybe_delete_box(im, msg->to, b);
    pthread_mutex_unlock(&im->mu);
    return rc;
}

static int im_fetch(mg_inbox *ib, const char *user, size_t max, mg_msg ***out, size_t *n)
{
    inbox_memory *im = (inbox_memory *)ib;
    *out = NULL;
    *n = 0;
    pthread_mutex_lock(&im->mu);
    struct box *b = mg_map_get(im->boxes, user);
    if (b) {
        expire(im, b, mg_now_ms());
        size_t k = b->n < max ? b->n : max;
        if (k) {
            *out = mg_xcalloc(k, sizeof(mg_msg *));
            struct item *it = b->head;
            for (size_t i = 0; i < k; i++, it = it->next)
                (*out)[i] = mg_msg_dup(it->msg);
            *n = k;
        }
        maybe_delete_box(im, user, b);
    }
    pthread_mutex_unlock(&im->mu);
    return 0;
}

static int im_ack(mg_inbox *ib, const char *user, const char *msg_id)
{
    inbox_memory *im = (inbox_memory *)ib;
    int rc = -ENOENT;
    pthread_mutex_lock(&im->mu);
    struct box *b = mg_map_get(im->boxes, user);
    if (b) {
        struct item *prev = NULL;
        for (struct item *it = b->head; it; prev = it, it = it->next)
            if (!strcmp(it->msg->id, msg_id)) {
                if (prev)
                    prev->next = it->next;
                else
                    b->head = it->next;
                if (b->tail == it)
                    b->tail = prev;
                b->n--;
                im->total--;
                im->bytes -= it->bytes;
                mg_msg_free(it->msg);
                free(it);
                rc = 0;
                break;
            }
        maybe_delete_box(im, user, b);
    }
    pthread_mutex_unlock(&im->mu);
    return rc;
}

static void im_free(mg_inbox *ib)
{
    inbox_memory *im = (inbox_memory *)ib;
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(im->boxes, &it, &k, &v);) {
        struct box *b = v;
        while (b->head)
            drop_head(im, b);
        free(b);
    }
    mg_map_free(im->boxes);
    pthread_mutex_destroy(&im->mu);
    free(im);
}

static const struct mg_inbox_ops memory_ops = {
    .name = "memory",
    .nonblocking = true,
    .store = im_store,
    .fetch = im_fetch,
    .ack = im_ack,
    .free = im_free,
};

mg_inbox *mg_inbox_memory_create(size_t max_messages, int64_t max_age_seconds)
{
    return mg_inbox_memory_create_bounded(max_messages, max_age_seconds, 0, 0);
}

mg_inbox *mg_inbox_memory_create_bounded(size_t max_messages, int64_t max_age_seconds,
                                         size_t max_bytes, size_t max_users)
{
    inbox_memory *im = mg_new(inbox_memory);
    im->max_bytes = max_bytes ? max_bytes : SIZE_MAX;
    im->max_users = max_users ? max_users : SIZE_MAX;
    im->m_full = mg_counter("meshgate_inbox_full_total",
                            "inbox writes refused because the memory inbox was full "
                            "(--inbox-memory-bytes, --inbox-memory-users)",
                            "store=\"memory\"");
    im->base.ops = &memory_ops;
    pthread_mutex_init(&im->mu, NULL);
    im->boxes = mg_map_create(64);
    im->max_messages = max_messages ? max_messages : 1;
    im->max_age_ms = max_age_seconds * 1000;
    return &im->base;
}

void mg_inbox_items_free(mg_msg **items, size_t n)
{
    for (size_t i = 0; i < n; i++)
        mg_msg_free(items[i]);
    free(items);
}
