/* mg_wait.h: blocking wrappers over the asynchronous router and transports,
 * for tests that drive one operation and check its answer. Production code
 * never waits like this (see router.h). */
#ifndef MG_TEST_WAIT_H
#define MG_TEST_WAIT_H

#include "router/router.h"
#include "router/transport.h"

/* mg_router_send, waiting for the answer in *res. Returns its return code. */
int mg_wait_send(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res);
/* mg_router_send_batch, waiting; res holds n results. */
int mg_wait_send_batch(mg_router *r, const mg_msg *msg, const char *const *to, size_t n,
                       int64_t deadline_ms, mg_send_result *res);
/* mg_router_deliver_from_queue, waiting. Returns its return code, or
 * -EAGAIN when the answer is FAILED (the consumer's retry condition). */
int mg_wait_from_queue(mg_router *r, const mg_msg *msg, int64_t deadline_ms, mg_send_result *res);
/* mg_router_deliver_local, waiting; returns the connections written (the
 * outcome in *out when not NULL). */
int mg_wait_deliver_local(mg_router *r, const mg_msg *msg, mg_deliver_outcome *out);
/* t->ops->deliver, waiting. Returns its return code. */
int mg_wait_deliver(mg_transport *t, const mg_route_target *target, const mg_msg *msg,
                    int64_t deadline_ms, mg_deliver_outcome *out);

#endif
