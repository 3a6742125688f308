/* inbox.h: the offline inbox interface.
 *
 * Per user, ordered by arrival, capped in count and age (the oldest go
 * first). Messages are fetched on connect and removed only when the client
 * acks them, so unacked ones come again on the next connection.
 * Backends: inbox_memory.c (embedded default) and inbox_redis.c.
 *
 * Thread-safety and returns as in presence.h.
 */
#ifndef MG_INBOX_H
#define MG_INBOX_H

#include "router/msg.h"

#include <stddef.h>

typedef struct mg_inbox mg_inbox;

struct mg_inbox_ops {
    const char *name;
    /* Appends msg to msg->to's inbox. A message whose id is already there is
     * not added twice (returns 0). */
    int (*store)(mg_inbox *ib, const mg_msg *msg);
    /* Up to max of the user's messages, oldest first, in *out (an array of
     * *n messages the caller frees with mg_inbox_items_free). */
    int (*fetch)(mg_inbox *ib, const char *user, size_t max, mg_msg ***out, size_t *n);
    /* Removes one message. -ENOENT when it is not there. */
    int (*ack)(mg_inbox *ib, const char *user, const char *msg_id);
    void (*free)(mg_inbox *ib);
    bool nonblocking; /* as in presence.h */
};

struct mg_inbox {
    const struct mg_inbox_ops *ops;
};

/* The in-memory inbox: at most max_messages per user (the oldest dropped
 * beyond), none older than max_age_seconds, and in all at most max_bytes of
 * messages and bookkeeping and max_users users with messages (0: no such
 * bound); a store beyond the overall bounds fails with -ENOSPC and nothing
 * is evicted for it. Acks and expiry free room. The caller frees it with
 * mg_inbox_free. _create is _create_bounded without the overall bounds. */
mg_inbox *mg_inbox_memory_create(size_t max_messages, int64_t max_age_seconds);
mg_inbox *mg_inbox_memory_create_bounded(size_t max_messages, int64_t max_age_seconds,
                                         size_t max_bytes, size_t max_users);
void mg_inbox_items_free(mg_msg **items, size_t n);

static inline void mg_inbox_free(mg_inbox *ib)
{
    if (ib)
        ib->ops->free(ib);
}

#endif
