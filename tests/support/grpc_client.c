/* grpc_client.c: typed test calls over common/mg_grpc.h (see grpc_client.h).
 * Runs on the calling test thread; blocking, bounded by the timeout. */
#include "support/grpc_client.h"
#include "gateway/grpc_auth.h"

#include <criterion/criterion.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

Meshgate__V1__Message mg_tc_text_message(const char *from, const char *to, const char *id,
                                         const char *text, int priority)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.id = (char *)(id ? id : "");
    m.from = (char *)(from ? from : "");
    m.to = (char *)(to ? to : "");
    m.content.data = (uint8_t *)text;
    m.content.len = text ? strlen(text) : 0;
    m.content_type = "text/plain";
    m.priority = (Meshgate__V1__Priority)priority;
    return m;
}

grpc_status_code mg_tc_send(mg_grpc_client *c, const char *from, const char *to, const char *id,
                            const char *text, int priority, int timeout_ms,
                            Meshgate__V1__SendMessageResponse **resp, char **details)
{
    Meshgate__V1__Message m = mg_tc_text_message(from, to, id, text, priority);
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    ProtobufCMessage *out = NULL;
    grpc_status_code st =
        mg_grpc_call(c, MG_RPC_SEND_MESSAGE, &rq.base,
                     &meshgate__v1__send_message_response__descriptor, timeout_ms, &out, details);
    if (resp)
        *resp = (Meshgate__V1__SendMessageResponse *)out;
    else if (out)
        protobuf_c_message_free_unpacked(out, NULL);
    return st;
}

grpc_status_code mg_tc_health(mg_grpc_client *c, const char *service, int timeout_ms, int *status,
                              char **details)
{
    Grpc__Health__V1__HealthCheckRequest rq = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    rq.service = (char *)(service ? service : "");
    ProtobufCMessage *out = NULL;
    grpc_status_code st = mg_grpc_call(c, MG_RPC_HEALTH_CHECK, &rq.base,
                                       &grpc__health__v1__health_check_response__descriptor,
                                       timeout_ms, &out, details);
    if (status)
        *status = out ? (int)((Grpc__Health__V1__HealthCheckResponse *)out)->status : -1;
    if (out)
        protobuf_c_message_free_unpacked(out, NULL);
    return st;
}

bool mg_tc_wait_presence(mg_grpc_client *c, const char *user, bool want, int timeout_ms)
{
    for (int waited = 0;; waited += 20) {
        Meshgate__V1__GetPresenceRequest rq = MESHGATE__V1__GET_PRESENCE_REQUEST__INIT;
        char *users[] = {(char *)user};
        rq.n_users = 1;
        rq.users = users;
        ProtobufCMessage *out = NULL;
        bool online = false;
        if (mg_grpc_call(c, MG_RPC_GET_PRESENCE, &rq.base,
                         &meshgate__v1__get_presence_response__descriptor, 5000, &out,
                         NULL) == GRPC_STATUS_OK)
            online = ((Meshgate__V1__GetPresenceResponse *)out)->users[0]->online;
        if (out)
            protobuf_c_message_free_unpacked(out, NULL);
        if (online == want)
            return true;
        if (waited >= timeout_ms)
            return false;
        nanosleep(&(struct timespec){0, 20 * 1000 * 1000}, NULL);
    }
}

grpc_status_code mg_tc_deliver(mg_grpc_client *c, const char *from, const char *to, const char *id,
                               int timeout_ms, int *status, char **details)
{
    char auto_id[48];
    static atomic_int seq;
    if (!id) { /* the peer path requires one */
        snprintf(auto_id, sizeof(auto_id), "tc-deliver-%d-%d", (int)getpid(),
                 atomic_fetch_add(&seq, 1));
        id = auto_id;
    }
    Meshgate__V1__Message m = mg_tc_text_message(from, to, id, "delivered by a peer", 1);
    Meshgate__V1__DeliverMessageRequest rq = MESHGATE__V1__DELIVER_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    rq.origin_gateway = "test-peer";
    rq.origin_region = "local";
    ProtobufCMessage *out = NULL;
    grpc_status_code st = mg_grpc_call(c, MG_RPC_DELIVER, &rq.base,
                                       &meshgate__v1__deliver_message_response__descriptor,
                                       timeout_ms, &out, details);
    if (status)
        *status = out ? (int)((Meshgate__V1__DeliverMessageResponse *)out)->status : -1;
    if (out)
        protobuf_c_message_free_unpacked(out, NULL);
    return st;
}

mg_grpc_client *mg_tc_client(const char *target, const char *token, const char *ca_file,
                             const char *cert_file, const char *key_file)
{
    grpc_channel_credentials *creds = NULL;
    if (ca_file) {
        char err[256] = "";
        creds = mg_grpc_tls_channel_credentials(ca_file, cert_file, key_file, err, sizeof(err));
        cr_assert_not_null(creds, "TLS client credentials: %s", err);
    }
    mg_grpc_client *c = mg_grpc_client_create_with(target, NULL, creds, token);
    if (creds)
        grpc_channel_credentials_release(creds);
    return c;
}
