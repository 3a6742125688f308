/* hub.h: the registry of this gateway's WebSocket connections.
 *
 * Maps connection id ("<gateway_id>-<seq>") -> connection and user -> its
 * connections, and holds each connection's bounded outbound queue. It is the
 * one way into the WebSocket service loops: other threads (router workers,
 * gRPC, Kafka, the other loops) render a frame on their own thread, append
 * it to a queue here, and the hub wakes the loop that owns the connection
 * (cfg.wake with its shard, i.e. lws_cancel_service of that loop's
 * context), which takes its ready connections and writes their frames.
 *
 * Shards: one per service loop (cfg.shards). A connection lives in the shard
 * of the loop that accepted it, from register to unregister; its id names
 * the shard. A user's connections may live in several shards; a delivery to
 * the user visits each.
 *
 * Bounds: a connection whose queue would exceed max_frames or max_bytes is a
 * slow consumer: its queue is dropped, it is marked for close with 4008
 * "slow consumer", and the frame is not counted as delivered to it.
 *
 * Lifetimes: connections are created (register) and destroyed (unregister)
 * only on the loop that owns them; unregister removes the connection from
 * every index under its shard's mutex before freeing it, and other threads
 * only touch connections under that mutex, found by id or user. So a handle
 * returned by register is valid on its loop until its unregister.
 *
 * Thread-safety: functions marked [ws] are for the loop owning the shard or
 * connection only (tests: the owning thread); the rest may be called from
 * any thread.
 */
#ifndef MG_HUB_H
#define MG_HUB_H

#include "common/mg_metrics.h"
#include "router/msg.h"
#include "router/transport.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define MG_WS_CLOSE_SLOW_CONSUMER 4008

typedef struct mg_hub mg_hub;
typedef struct mg_hub_conn mg_hub_conn;

typedef struct mg_hub_config {
    const char *gateway_id; /* copied; conn ids are "<gateway_id>-<seq>" */
    size_t max_frames;      /* per connection outbound queue, frames (>= 1) */
    size_t max_bytes;       /* per connection outbound queue, bytes (>= 1) */
    size_t headroom;        /* bytes reserved before each frame's data (LWS_PRE) */
    unsigned shards;        /* service loops (0: 1) */
    /* Called when a shard's set of ready connections goes from empty to
     * non-empty, or its list of waiting deliveries (its loop then arms its
     * timer), by the thread that made the change, just after it released
     * that shard's mutex (never under it: the woken loop would wait for the
     * mutex first thing). Must be quick; holds no hub mutex, so it may call
     * the hub. It may come after the loop already took what it was called
     * for. May be NULL. */
    void (*wake)(void *arg, unsigned shard);
    void *wake_arg;
    /* How long a delivery (mg_hub_deliver with a written callback, not from
     * the inbox, not on a service loop) waits for its frames to be
     * written to the sockets before it is reported; 0: do not wait. */
    int write_wait_ms;
    /* Counted when a connection is marked slow (its close may come later, or
     * by timeout when its socket never drains). May be NULL. */
    mg_metric *slow_counter;
} mg_hub_config;

typedef enum { MG_FRAME_MESSAGE = 1, MG_FRAME_CONTROL = 2 } mg_frame_kind;

typedef struct mg_hub_receipt mg_hub_receipt;

/* One queued text frame: data[headroom .. headroom+len) is the payload. */
typedef struct mg_hub_frame {
    struct mg_hub_frame *next;
    mg_hub_receipt *receipt; /* a delivery waiting for this write, or NULL */
    mg_span *span;           /* "ws write" of a traced message to this connection, or NULL */
    size_t len;
    mg_frame_kind kind;
    uint32_t slot; /* the recipient's slot in receipt */
    unsigned char data[];
} mg_hub_frame;

mg_hub *mg_hub_create(const mg_hub_config *cfg);
/* Replaces the wake callback (NULL disables it: used while the service
 * loops stop); returns once no call of the old one is running. */
void mg_hub_set_wake(mg_hub *h, void (*wake)(void *arg, unsigned shard), void *arg);
unsigned mg_hub_shards(const mg_hub *h);
/* Frees every remaining connection and frame. NULL is a no-op. */
void mg_hub_free(mg_hub *h);

/* The local sink for mg_transport_local_create (deliver -> mg_hub_deliver,
 * disconnect -> mg_hub_disconnect). */
mg_local_sink mg_hub_sink(mg_hub *h);

/* [ws] Registers a connection of user (copied) with an opaque handle (the
 * lws wsi) in shard (the calling loop's). Returns the connection; its id is
 * mg_hub_conn_id(). */
mg_hub_conn *mg_hub_register(mg_hub *h, unsigned shard, const char *user, void *handle);
/* [ws] As mg_hub_register, for a connection that is opening: a message
 * queued to it waits, unwritten, until mg_hub_open, except its inbox page
 * (mg_hub_deliver with its conn_id and from_inbox), which is queued as
 * usual. So messages that raced its presence record and inbox fetch come
 * after that page, in the order they were queued. Control frames
 * (mg_hub_post) are not held. */
mg_hub_conn *mg_hub_register_opening(mg_hub *h, unsigned shard, const char *user, void *handle);
/* [ws] Removes and frees c with its queue. */
void mg_hub_unregister(mg_hub *h, mg_hub_conn *c);
const char *mg_hub_conn_id(const mg_hub_conn *c);   /* [ws] valid until unregister */
const char *mg_hub_conn_user(const mg_hub_conn *c); /* [ws] valid until unregister */
void *mg_hub_conn_handle(const mg_hub_conn *c);     /* [ws] the handle given to register */

/* [ws] Takes the next frame of c (the caller hands it back with
 * mg_hub_frame_done once written or abandoned), or NULL
 * when none is queued; then *close_code is the pending close code (0: none)
 * and reason (reasonlen bytes) its reason. *more tells whether more frames
 * remain after the one returned. */
mg_hub_frame *mg_hub_pop(mg_hub *h, mg_hub_conn *c, bool *more, int *close_code, char *reason,
                         size_t reasonlen);

/* [ws] Settles a popped frame: written tells whether lws_write took all of
 * it; a delivery waiting on it learns the outcome (its callback may run
 * here), and its write span ends. Frees f. */
void mg_hub_frame_done(mg_hub *h, mg_hub_frame *f, bool written);

/* [ws] Marks the calling thread as a service loop: deliveries made on it
 * report their writes at once (the thread that writes cannot wait for itself). */
void mg_hub_mark_service_thread(void);
/* The service loops stop: every delivery waiting for writes is reported
 * now (queued frames count), and later ones do not wait. */
void mg_hub_stop_waits(mg_hub *h);
/* Whether a delivery homed in shard is waiting for its writes (its loop
 * then keeps a timer for mg_hub_expire_waits). */
bool mg_hub_waiting(mg_hub *h, unsigned shard);
/* [ws] Reports the deliveries homed in shard whose write wait ended by now_ms
 * (monotonic). Returns whether others still wait there. */
bool mg_hub_expire_waits(mg_hub *h, unsigned shard, int64_t now_ms);
/* [ws] Calls fn(handle, close_code, arg) for at most max connections of
 * shard with queued frames or a pending close (close_code != 0), taking
 * them out of its ready set. Returns whether others are still ready (take
 * them with another call: the wake callback fires only when the set was
 * empty). fn runs under the shard's mutex: it must not call the hub
 * (lws_callback_on_writable is fine). */
bool mg_hub_take_ready(mg_hub *h, unsigned shard, size_t max,
                       void (*fn)(void *handle, int close_code, void *arg), void *arg);

/* Renders msg once and queues it to every connection of msg->to (or only
 * conn_id, when not NULL, if it belongs to msg->to; with from_inbox too,
 * it is that connection's inbox page, never held by its opening). Returns
 * how many connections took it (0: none here). Never blocks.
 * A traced message (msg->trace sampled) gets a "ws write" span per
 * connection, a child of msg->trace, from the queueing to the write (or the
 * drop, with its connection or as a slow consumer); each connection's frame
 * carries its own span's traceparent, so the device's ack is that span's
 * child. An untraced one costs a branch more. After mg_hub_stop_waits no
 * span is started, and mg_hub_free abandons the spans of frames never
 * settled (tracing may have stopped by then).
 * When written is not NULL and the return is > 0, written(arg, n) runs
 * exactly once, so that "delivered" means written: when the service loops
 * have written the frames to the sockets (or dropped them with their
 * connections), or write_wait_ms after the call, whichever comes first; n
 * counts the connections written or still queued on a live connection (a
 * slow reader) then. A gateway killed before the write answers nothing, so
 * the caller's caller fails and falls back instead of trusting a DELIVERED
 * it did not keep. It runs on the loop that settled the last frame (or
 * ended the wait), or before mg_hub_deliver returns when nothing waits
 * (from_inbox, called on a service loop, write_wait_ms 0, after
 * mg_hub_stop_waits, or every frame written before the call returned).
 * Never under a hub mutex. */
int mg_hub_deliver(mg_hub *h, const mg_msg *msg, const char *conn_id, bool from_inbox,
                   mg_written_fn written, void *arg);
/* One message to n users (a fan-out's local share; msg->to is ignored, an
 * empty or NULL to[i] is skipped), as n mg_hub_deliver calls would, but
 * rendered once and queued under one lock hold per shard for a chunk of
 * recipients: one wake-up of each loop per chunk, not one per recipient.
 * queued[i] (n of them, the caller's) gets how many connections of to[i]
 * took it; returns their sum. With written not NULL and a return > 0,
 * written(arg, counts, n) runs exactly once, as mg_hub_deliver's written
 * would, with counts[i] for to[i] (0: none of its connections was here or
 * got it); counts lives only for the call. Not for inbox messages. */
int mg_hub_deliver_many(mg_hub *h, const mg_msg *msg, const char *const *to, size_t n,
                        uint32_t *queued, mg_written_many_fn written, void *arg);
/* Queues a control frame (ack, error) to one connection. Returns 0, -ENOENT
 * when the connection is gone, or -ENOBUFS when it overflowed (then it is
 * being closed as a slow consumer). */
int mg_hub_post(mg_hub *h, const char *conn_id, const char *text, size_t len);

/* Ends an opening connection's opening (mg_hub_register_opening): queues
 * the control frame text (its ready frame), then the messages held
 * meanwhile behind it. Returns as mg_hub_post; a connection closing by
 * then keeps its held messages unwritten and drops them with its queue. */
int mg_hub_open(mg_hub *h, const char *conn_id, const char *text, size_t len);

/* Marks the user's connections (or the one conn_id; user may then be NULL)
 * for close with code and reason; queued frames are written first. Returns
 * how many were marked. */
int mg_hub_disconnect(mg_hub *h, const char *user, const char *conn_id, int code,
                      const char *reason);

size_t mg_hub_count(mg_hub *h);
/* A snapshot of every connection id (malloc'd array of malloc'd strings;
 * free with mg_hub_ids_free). */
size_t mg_hub_conn_ids(mg_hub *h, char ***ids);
void mg_hub_ids_free(char **ids, size_t n);

typedef struct mg_hub_stats {
    uint64_t delivered;   /* message frames queued */
    uint64_t slow_closes; /* connections closed as slow consumers */
} mg_hub_stats;
void mg_hub_get_stats(mg_hub *h, mg_hub_stats *st);
/* Whether conn_id is marked slow (tests and logs). */
bool mg_hub_is_slow(mg_hub *h, const char *conn_id);

#endif
