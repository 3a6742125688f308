/* test_grpc_server.c: the gRPC front end in-process.
 *
 * Validation and status mapping reach the statics of grpc_services.c (the
 * engine, grpc_server.c, is included with it); the rest
 * runs a real server on a free loopback port in front of a real router
 * (memory presence and inbox) whose local sink is this file's recorder, and
 * calls it with the real client of grpc_util.c.
 */
#include "gateway/grpc_server.c"
#include "gateway/grpc_services.c"
#include "support/grpc_client.h"

#include <criterion/criterion.h>

/* ---- validation and mapping (statics) ----------------------------------------------- */

static const struct limits test_lim = {.max_content_bytes = 8, .max_user_bytes = 5, .max_batch = 3};

static mg_msg *try_msg(Meshgate__V1__Message *m, char *err)
{
    return mg_grpc_msg_from_pb(&test_lim, m, true, err, 256);
}

Test(grpc_validate, message_rules)
{
    char err[256];
    cr_assert_null(mg_grpc_msg_from_pb(&test_lim, NULL, true, err, sizeof(err)));
    cr_assert(strstr(err, "message is required"));

    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.to = "";
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.to is required"), "%s", err);
    m.to = "toolong";
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "longer than the limit of 5"), "%s", err);
    m.to = "bob";
    m.content.data = (uint8_t *)"123456789";
    m.content.len = 9;
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.content is 9 bytes"), "%s", err);
    m.content.len = 8;
    char longid[200];
    memset(longid, 'x', sizeof(longid) - 1);
    longid[sizeof(longid) - 1] = '\0';
    m.id = longid;
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.id"), "%s", err);
    m.id = "";
    m.priority = 7;
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "priority"), "%s", err);

    m.priority = MESHGATE__V1__PRIORITY__PRIORITY_UNSPECIFIED;
    int64_t before = mg_now_ms();
    mg_msg *ok = try_msg(&m, err);
    cr_assert_not_null(ok, "%s", err);
    cr_assert_eq(strlen(ok->id), MG_ID_LEN); /* generated */
    cr_assert_eq(ok->priority, MG_PRIO_HIGH);
    cr_assert_geq(ok->sent_at_ms, before);
    cr_assert_eq(ok->content_len, 8);
    mg_msg_free(ok);

    m.id = "client-id";
    m.sent_at_ms = 42;
    m.priority = MESHGATE__V1__PRIORITY__PRIORITY_LOW;
    ok = try_msg(&m, err);
    cr_assert_str_eq(ok->id, "client-id");
    cr_assert_eq(ok->sent_at_ms, 42);
    cr_assert_eq(ok->priority, MG_PRIO_LOW);
    mg_msg_free(ok);
}

Test(grpc_validate, from_and_id_refuse_control_characters)
{
    char err[256];
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.to = "bob";
    m.from = "a\r\nX";
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.from is not valid UTF-8 or holds control characters"), "%s",
              err);
    m.from = "\xff\xfe";
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.from"), "%s", err);
    m.from = "al";
    m.id = "id\x1b[2J";
    cr_assert_null(try_msg(&m, err));
    cr_assert(strstr(err, "message.id is not valid UTF-8 or holds control characters"), "%s", err);
    m.id = "id-\xc3\xa9"; /* UTF-8 is fine */
    mg_msg *ok = try_msg(&m, err);
    cr_assert_not_null(ok, "%s", err);
    mg_msg_free(ok);
}

Test(grpc_validate, status_mapping)
{
    cr_assert_eq(status_of_errno(-EINVAL), GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert_eq(status_of_errno(-EIO), GRPC_STATUS_UNAVAILABLE);
    cr_assert_eq(status_of_errno(-ECONNREFUSED), GRPC_STATUS_UNAVAILABLE);
    cr_assert_eq(status_of_errno(-ETIMEDOUT), GRPC_STATUS_DEADLINE_EXCEEDED);
    cr_assert_eq(status_of_errno(-EAGAIN), GRPC_STATUS_RESOURCE_EXHAUSTED);
    cr_assert_eq(status_of_errno(-12345), GRPC_STATUS_INTERNAL);
    cr_assert_str_eq(mg_grpc_code_name(GRPC_STATUS_RESOURCE_EXHAUSTED), "RESOURCE_EXHAUSTED");
    cr_assert_eq(mg_grpc_code_parse("unimplemented"), GRPC_STATUS_UNIMPLEMENTED);
    cr_assert_eq(mg_grpc_code_parse("nope"), -1);
    cr_assert_eq(method_of(grpc_slice_from_static_string("/meshgate.v1.Messaging/SendBatch")),
                 M_SEND_BATCH);
    cr_assert_eq(method_of(grpc_slice_from_static_string("/meshgate.v1.Messaging/SendBatc")),
                 M_UNKNOWN);
}

Test(grpc_validate, result_paths)
{
    mg_send_result r = {.status = MG_STATUS_DELIVERED,
                        .path = MG_PATH_LOCAL,
                        .paths = (1u << MG_PATH_LOCAL) | (1u << MG_PATH_KAFKA),
                        .connections = 2};
    Meshgate__V1__RecipientResult rr;
    Meshgate__V1__Path paths[MG_PATH_COUNT];
    mg_grpc_result_to_pb("bob", &r, &rr, paths);
    cr_assert_eq(rr.status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    cr_assert_eq(rr.n_paths, 2);
    cr_assert_eq(rr.paths[0], MESHGATE__V1__PATH__PATH_LOCAL);
    cr_assert_eq(rr.paths[1], MESHGATE__V1__PATH__PATH_KAFKA);
    cr_assert_eq(rr.connections, 2);
}

/* ---- a real server -------------------------------------------------------------------- */

/* The local sink: records deliveries; "bob" has one connection here. */
static struct {
    pthread_mutex_t mu;
    int delivered, disconnected;
    char last_content[64];
    int slow_ms; /* deliver sleeps this long (concurrency test) */
    int inflight, max_inflight;
} rec = {.mu = PTHREAD_MUTEX_INITIALIZER};

static int sink_deliver(void *arg, const mg_msg *msg, const char *conn_id, bool from_inbox,
                        mg_written_fn written, void *written_arg)
{
    pthread_mutex_lock(&rec.mu);
    rec.inflight++;
    if (rec.inflight > rec.max_inflight)
        rec.max_inflight = rec.inflight;
    int slow = rec.slow_ms;
    pthread_mutex_unlock(&rec.mu);
    if (slow)
        usleep((useconds_t)slow * 1000);
    pthread_mutex_lock(&rec.mu);
    rec.inflight--;
    rec.delivered++;
    snprintf(rec.last_content, sizeof(rec.last_content), "%.*s", (int)msg->content_len,
             (const char *)msg->content);
    pthread_mutex_unlock(&rec.mu);
    int n = strcmp(msg->to, "bob") == 0 || strncmp(msg->to, "c", 1) == 0 ? 1 : 0;
    if (n && written)
        written(written_arg, (uint32_t)n);
    return n;
}

static int sink_disconnect(void *arg, const char *user, const char *conn_id, int code,
                           const char *reason)
{
    pthread_mutex_lock(&rec.mu);
    rec.disconnected++;
    pthread_mutex_unlock(&rec.mu);
    return strcmp(user, "bob") == 0 ? 1 : 0;
}

static mg_router *router;
static mg_pool *pool;
static mg_grpc_server *server;
static mg_grpc_client *client;

static void start_server(int threads, int pool_threads, size_t pool_queue, size_t max_inflight)
{
    mg_router_config rc = {.gateway_id = "gw-test",
                           .region = "local",
                           .hot_window_seconds = 10,
                           .hot_threshold = 20,
                           .hot_capacity = 64,
                           .dedupe_window = 1024,
                           .max_inflight = max_inflight};
    mg_local_sink sink = {.deliver = sink_deliver, .disconnect = sink_disconnect, .arg = NULL};
    pool = mg_pool_create("work", pool_threads, pool_queue);
    router = mg_router_create(&rc, mg_presence_memory_create("gw-test", "local"),
                              mg_inbox_memory_create(100, 3600), &sink, pool);
    cr_assert_not_null(router);
    cr_assert_eq(mg_router_user_connected(router, "bob", "gw-test-1", mg_now_ms()), 0);
    mg_grpc_server_config cfg = {.listen = "127.0.0.1:0",
                                 .threads = threads,
                                 .max_message_bytes = 4096,
                                 .max_content_bytes = 1024,
                                 .max_user_bytes = 32,
                                 .max_batch = 4,
                                 .max_deadline_ms = 30000,
                                 .low_deadline_ms = 10000,
                                 .gateway_id = "gw-test",
                                 .region = "local"};
    char err[256];
    server = mg_grpc_server_create(&cfg, router, pool, err, sizeof(err));
    cr_assert_not_null(server, "%s", err);
    cr_assert_eq(mg_grpc_server_start(server, err, sizeof(err)), 0, "%s", err);
    cr_assert_gt(mg_grpc_server_port(server), 0);
    char target[64];
    snprintf(target, sizeof(target), "127.0.0.1:%d", mg_grpc_server_port(server));
    client = mg_grpc_client_create(target, NULL);
}

static void setup(void)
{
    start_server(4, 2, 64, 0);
}

static void teardown(void)
{
    mg_grpc_client_free(client);
    mg_grpc_server_free(server);
    mg_pool_free(pool);
    mg_router_free(router);
    client = NULL;
    server = NULL;
    pool = NULL;
    router = NULL;
}

TestSuite(grpc_server, .init = setup, .fini = teardown, .timeout = 60);

Test(grpc_server, health)
{
    int st = -1;
    char *d = NULL;
    cr_assert_eq(mg_tc_health(client, "", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING);
    cr_assert_eq(mg_tc_health(client, "meshgate.v1.Messaging", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(mg_tc_health(client, "meshgate.v1.GatewayPeer", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(mg_tc_health(client, "no.such.Service", 5000, &st, &d), GRPC_STATUS_NOT_FOUND);
    cr_assert(strstr(d, "no.such.Service"), "%s", d);
    free(d);
    mg_grpc_server_set_serving(server, false);
    cr_assert_eq(mg_tc_health(client, "meshgate.v1.Messaging", 5000, &st, NULL), GRPC_STATUS_OK);
    cr_assert_eq(st, GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING);
}

Test(grpc_server, send_offline_is_stored_online_is_delivered)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    char *d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "carol-off", NULL, "hi", 1, 5000, &r, &d),
                 GRPC_STATUS_OK, "%s", d);
    free(d);
    /* "carol-off" is not in presence: the inbox */
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED);
    cr_assert_eq(r->result->path, MESHGATE__V1__PATH__PATH_INBOX);
    cr_assert_eq(strlen(r->id), MG_ID_LEN);
    protobuf_c_message_free_unpacked(&r->base, NULL);

    cr_assert_eq(mg_tc_send(client, "alice", "bob", "m-1", "hello bob", 0, 5000, &r, NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    cr_assert_eq(r->result->path, MESHGATE__V1__PATH__PATH_LOCAL);
    cr_assert_eq(r->result->connections, 1);
    cr_assert_str_eq(r->id, "m-1");
    cr_assert_str_eq(rec.last_content, "hello bob");
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

Test(grpc_server, bad_inputs)
{
    char *d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "", NULL, "x", 1, 5000, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "message.to is required"), "%s", d);
    free(d);

    char big[1100];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, big, 1, 5000, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "message.content is 1099 bytes"), "%s", d);
    free(d);

    /* Larger than max_message_bytes (4096): gRPC core refuses it. */
    uint8_t *huge = calloc(1, 8192);
    cr_assert_eq(mg_grpc_call_raw(client, MG_RPC_SEND_MESSAGE, huge, 8192, 5000, NULL, NULL, &d),
                 GRPC_STATUS_RESOURCE_EXHAUSTED, "%s", d);
    free(d);
    free(huge);

    /* 0xff is not a valid protobuf tag/wire type. */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0x01, 0x02};
    cr_assert_eq(
        mg_grpc_call_raw(client, MG_RPC_SEND_MESSAGE, junk, sizeof(junk), 5000, NULL, NULL, &d),
        GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "does not decode"), "%s", d);
    free(d);

    cr_assert_eq(
        mg_grpc_call_raw(client, "/meshgate.v1.Messaging/Nope", "", 0, 5000, NULL, NULL, &d),
        GRPC_STATUS_UNIMPLEMENTED);
    cr_assert(strstr(d, "/meshgate.v1.Messaging/Nope"), "%s", d);
    free(d);

    /* A deadline of 1 ms against a sink that takes 200 ms. */
    rec.slow_ms = 200;
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, "late", 1, 1, NULL, NULL),
                 GRPC_STATUS_DEADLINE_EXCEEDED);
    rec.slow_ms = 0;

    /* The server still answers after all that. */
    int st;
    cr_assert_eq(mg_tc_health(client, "", 5000, &st, NULL), GRPC_STATUS_OK);
}

/* A batch over the limit is refused from a scan of its bytes, before
 * protobuf-c copies a recipient (the reason says so: no count decoded). */
Test(grpc_server, oversized_batch_is_refused_before_decoding)
{
    uint8_t req[64];
    size_t n = 0;
    for (int i = 0; i < 5; i++) { /* max_batch is 4 */
        req[n++] = 0x12;          /* field 2 (to), length-delimited */
        req[n++] = 1;
        req[n++] = (uint8_t)('a' + i);
    }
    char *d = NULL;
    cr_assert_eq(mg_grpc_call_raw(client, MG_RPC_SEND_BATCH, req, n, 5000, NULL, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "to: more than the limit of 4 recipients"), "%s", d);
    free(d);
    /* four are decoded and checked as before (no message: refused after decoding) */
    cr_assert_eq(mg_grpc_call_raw(client, MG_RPC_SEND_BATCH, req, n - 3, 5000, NULL, NULL, &d),
                 GRPC_STATUS_INVALID_ARGUMENT);
    cr_assert(strstr(d, "message is required"), "%s", d);
    free(d);
}

Test(grpc_server, low_priority_is_accepted_then_routed)
{
    Meshgate__V1__SendMessageResponse *r = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "dave-off", "low-1", "later", 2, 5000, &r, NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(r->result->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_ACCEPTED);
    protobuf_c_message_free_unpacked(&r->base, NULL);
    /* The pool stores it in dave-off's inbox soon. */
    mg_inbox *ib = mg_router_inbox(router);
    size_t n = 0;
    for (int i = 0; i < 250 && n == 0; i++) {
        mg_msg **items = NULL;
        ib->ops->fetch(ib, "dave-off", 10, &items, &n);
        mg_inbox_items_free(items, n);
        if (n == 0)
            usleep(20000);
    }
    cr_assert_eq(n, 1);
}

Test(grpc_server, batch_presence_disconnect_deliver)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.from = "alice";
    m.content.data = (uint8_t *)"group";
    m.content.len = 5;
    Meshgate__V1__SendBatchRequest brq = MESHGATE__V1__SEND_BATCH_REQUEST__INIT;
    char *to[] = {"bob", "", "erin-off"};
    brq.message = &m;
    brq.n_to = 3;
    brq.to = to;
    ProtobufCMessage *out = NULL;
    char *d = NULL;
    cr_assert_eq(mg_grpc_call(client, MG_RPC_SEND_BATCH, &brq.base,
                              &meshgate__v1__send_batch_response__descriptor, 5000, &out, &d),
                 GRPC_STATUS_OK, "%s", d);
    free(d);
    Meshgate__V1__SendBatchResponse *br = (Meshgate__V1__SendBatchResponse *)out;
    cr_assert_eq(br->n_results, 3);
    cr_assert_eq(br->results[0]->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED);
    cr_assert_eq(br->results[1]->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_REJECTED);
    cr_assert(strstr(br->results[1]->reason, "required"));
    cr_assert_eq(br->results[2]->status, MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED);
    protobuf_c_message_free_unpacked(out, NULL);

    char *five[] = {"a", "b", "c", "d", "e"}; /* max_batch is 4 */
    brq.n_to = 5;
    brq.to = five;
    cr_assert_eq(mg_grpc_call(client, MG_RPC_SEND_BATCH, &brq.base,
                              &meshgate__v1__send_batch_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_INVALID_ARGUMENT);

    Meshgate__V1__GetPresenceRequest prq = MESHGATE__V1__GET_PRESENCE_REQUEST__INIT;
    char *users[] = {"bob", "nobody"};
    prq.n_users = 2;
    prq.users = users;
    cr_assert_eq(mg_grpc_call(client, MG_RPC_GET_PRESENCE, &prq.base,
                              &meshgate__v1__get_presence_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_OK);
    Meshgate__V1__GetPresenceResponse *pr = (Meshgate__V1__GetPresenceResponse *)out;
    cr_assert_eq(pr->n_users, 2);
    cr_assert(pr->users[0]->online);
    cr_assert_eq(pr->users[0]->n_connections, 1);
    cr_assert_str_eq(pr->users[0]->connections[0]->conn_id, "gw-test-1");
    cr_assert_str_eq(pr->users[0]->connections[0]->gateway_id, "gw-test");
    cr_assert_not(pr->users[1]->online);
    protobuf_c_message_free_unpacked(out, NULL);

    Meshgate__V1__DisconnectRequest drq = MESHGATE__V1__DISCONNECT_REQUEST__INIT;
    drq.user = "bob";
    cr_assert_eq(mg_grpc_call(client, MG_RPC_DISCONNECT, &drq.base,
                              &meshgate__v1__disconnect_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(((Meshgate__V1__DisconnectResponse *)out)->disconnected, 1);
    protobuf_c_message_free_unpacked(out, NULL);
    drq.code = 999;
    cr_assert_eq(mg_grpc_call(client, MG_RPC_DISCONNECT, &drq.base,
                              &meshgate__v1__disconnect_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_INVALID_ARGUMENT);
    drq.code = 0;
    cr_assert_eq(mg_grpc_call(client, "/meshgate.v1.GatewayPeer/DisconnectLocal", &drq.base,
                              &meshgate__v1__disconnect_response__descriptor, 5000, &out, NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(((Meshgate__V1__DisconnectResponse *)out)->disconnected, 1);
    protobuf_c_message_free_unpacked(out, NULL);

    /* GatewayPeer/DeliverMessage: delivered, then the same id is a duplicate. */
    Meshgate__V1__Message pm = MESHGATE__V1__MESSAGE__INIT;
    pm.id = "peer-1";
    pm.from = "alice";
    pm.to = "carl"; /* the sink takes users starting with 'c' */
    pm.content.data = (uint8_t *)"p";
    pm.content.len = 1;
    Meshgate__V1__DeliverMessageRequest dm = MESHGATE__V1__DELIVER_MESSAGE_REQUEST__INIT;
    dm.message = &pm;
    dm.origin_gateway = "gw-other";
    for (int i = 0; i < 2; i++) {
        cr_assert_eq(mg_grpc_call(client, MG_RPC_DELIVER, &dm.base,
                                  &meshgate__v1__deliver_message_response__descriptor, 5000, &out,
                                  NULL),
                     GRPC_STATUS_OK);
        Meshgate__V1__DeliverMessageResponse *dr = (Meshgate__V1__DeliverMessageResponse *)out;
        cr_assert_eq(dr->status, MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_DELIVERED);
        cr_assert_eq(dr->duplicate, i == 1);
        protobuf_c_message_free_unpacked(out, NULL);
    }
    pm.id = "peer-2";
    pm.to = "zed";
    cr_assert_eq(mg_grpc_call(client, MG_RPC_DELIVER, &dm.base,
                              &meshgate__v1__deliver_message_response__descriptor, 5000, &out,
                              NULL),
                 GRPC_STATUS_OK);
    cr_assert_eq(((Meshgate__V1__DeliverMessageResponse *)out)->status,
                 MESHGATE__V1__DELIVER_STATUS__DELIVER_STATUS_NOT_CONNECTED);
    protobuf_c_message_free_unpacked(out, NULL);
}

#define NCONC 32

static void *conc_send(void *arg)
{
    char id[32];
    snprintf(id, sizeof(id), "conc-%d", (int)(intptr_t)arg);
    return (void *)(intptr_t)mg_tc_send(client, "alice", "bob", id, "c", 1, 20000, NULL, NULL);
}

Test(grpc_server, concurrent_calls_run_in_parallel)
{
    rec.slow_ms = 50;
    rec.max_inflight = 0;
    pthread_t th[NCONC];
    for (int i = 0; i < NCONC; i++)
        pthread_create(&th[i], NULL, conc_send, (void *)(intptr_t)i);
    int ok = 0;
    for (int i = 0; i < NCONC; i++) {
        void *rv;
        pthread_join(th[i], &rv);
        ok += (intptr_t)rv == GRPC_STATUS_OK;
    }
    rec.slow_ms = 0;
    cr_assert_eq(ok, NCONC);
    /* 4 gRPC threads: more than one delivery was in flight at once. */
    cr_assert_gt(rec.max_inflight, 1, "max in flight %d", rec.max_inflight);
    cr_assert_leq(rec.max_inflight, 4);
}

Test(grpc_server, port_in_use_is_reported)
{
    char listen[64], err[256];
    snprintf(listen, sizeof(listen), "127.0.0.1:%d", mg_grpc_server_port(server));
    mg_grpc_server_config cfg = {.listen = listen,
                                 .threads = 1,
                                 .max_message_bytes = 4096,
                                 .max_content_bytes = 1024,
                                 .max_user_bytes = 32,
                                 .max_batch = 4,
                                 .max_deadline_ms = 30000,
                                 .low_deadline_ms = 10000};
    mg_grpc_server *s2 = mg_grpc_server_create(&cfg, router, pool, err, sizeof(err));
    cr_assert_not_null(s2);
    cr_assert_eq(mg_grpc_server_start(s2, err, sizeof(err)), -EADDRINUSE, "%s", err);
    cr_assert(strstr(err, listen), "%s", err);
    mg_grpc_server_free(s2);
}

static void setup_small_router(void)
{
    start_server(2, 1, 1, 1);
}

static void *slow_high_send(void *arg)
{
    return (void *)(intptr_t)mg_tc_send(client, "alice", "bob", NULL, "slow", 1, 5000, NULL, NULL);
}

Test(grpc_overload, sends_refused_beyond_the_router_bound, .init = setup_small_router,
     .fini = teardown, .timeout = 60)
{
    /* One HIGH send holds the only slot of the router (the sink is slow). */
    rec.slow_ms = 500;
    pthread_t th;
    pthread_create(&th, NULL, slow_high_send, NULL);
    for (int i = 0; i < 500; i++) {
        pthread_mutex_lock(&rec.mu);
        int busy = rec.inflight;
        pthread_mutex_unlock(&rec.mu);
        if (busy)
            break;
        usleep(2000);
    }
    int64_t before =
        mg_metric_value(mg_counter("meshgate_dropped_total", "", "reason=\"overload\""));
    char *d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "x2", NULL, "2", 2, 5000, NULL, &d),
                 GRPC_STATUS_RESOURCE_EXHAUSTED, "LOW beyond the bound is dropped");
    cr_assert(strstr(d, "overloaded"), "%s", d);
    free(d);
    d = NULL;
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, "3", 1, 5000, NULL, &d),
                 GRPC_STATUS_RESOURCE_EXHAUSTED, "HIGH beyond the bound is refused");
    free(d);
    cr_assert_geq(mg_metric_value(mg_counter("meshgate_dropped_total", "", "reason=\"overload\"")) -
                      before,
                  1);
    void *rv;
    pthread_join(th, &rv);
    rec.slow_ms = 0;
    cr_assert_eq((intptr_t)rv, GRPC_STATUS_OK, "the send in flight was answered");
    /* The slot is free again: served. */
    cr_assert_eq(mg_tc_send(client, "alice", "bob", NULL, "4", 1, 5000, NULL, NULL),
                 GRPC_STATUS_OK);
}
