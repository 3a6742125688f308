/* fuzz_grpc.c: gRPC request bodies through the decoders and validators the
 * handlers use (grpc_server.c and grpc_services.c are included to reach their statics, as their
 * unit test does). The first byte picks the method: Messaging (SendMessage, SendBatch with the
 * pre-decode recipient count, GetPresence, Disconnect), GatewayPeer (DeliverMessage, DeliverMany;
 * DisconnectLocal shares DisconnectRequest) or Health. */
#include "gateway/grpc_server.c"
#include "gateway/grpc_services.c"

static const struct limits fuzz_lim = {
    .max_content_bytes = 65536, .max_user_bytes = 256, .max_batch = 1000};

static void check_users(char **users, size_t n)
{
    char err[256];
    for (size_t i = 0; i < n; i++)
        valid_user(&fuzz_lim, users[i], "user", err, sizeof(err));
}

static void check_msg(const Meshgate__V1__Message *m, bool need_to)
{
    char err[256];
    mg_msg *msg = mg_grpc_msg_from_pb(&fuzz_lim, m, need_to, err, sizeof(err));
    if (msg) {
        size_t len = 0;
        uint8_t *env = mg_msg_pack(msg, &len);
        mg_msg *back = NULL;
        if (mg_msg_unpack(env, len, &back) == 0)
            mg_msg_free(back);
        free(env);
        mg_msg_free(msg);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    unsigned which = data[0] % 7;
    const uint8_t *req = data + 1;
    size_t len = size - 1;
    ProtobufCMessage *m = NULL;
    switch (which) {
    case 0: {
        Meshgate__V1__SendMessageRequest *r =
            meshgate__v1__send_message_request__unpack(NULL, len, req);
        if (r)
            check_msg(r->message, true);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    case 1: {
        size_t n = 0;
        if (mg_pb_count_field(req, len, MG_GRPC_BATCH_TO_FIELD, fuzz_lim.max_batch + 1, &n) != 0 ||
            n > fuzz_lim.max_batch)
            return 0; /* refused before decoding, as h_send_batch does */
        Meshgate__V1__SendBatchRequest *r =
            meshgate__v1__send_batch_request__unpack(NULL, len, req);
        if (r) {
            if (r->n_to > fuzz_lim.max_batch)
                __builtin_trap(); /* the scan let an oversized batch through */
            check_msg(r->message, false);
            check_users(r->to, r->n_to);
        }
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    case 2: {
        Meshgate__V1__GetPresenceRequest *r =
            meshgate__v1__get_presence_request__unpack(NULL, len, req);
        if (r)
            check_users(r->users, r->n_users);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    case 3: {
        Meshgate__V1__DisconnectRequest *r =
            meshgate__v1__disconnect_request__unpack(NULL, len, req);
        if (r)
            check_users(&r->user, 1);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    case 4: {
        Meshgate__V1__DeliverMessageRequest *r =
            meshgate__v1__deliver_message_request__unpack(NULL, len, req);
        if (r)
            check_msg(r->message, true);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    case 6: {
        Meshgate__V1__DeliverManyRequest *r =
            meshgate__v1__deliver_many_request__unpack(NULL, len, req);
        for (size_t i = 0; r && i < r->n_deliveries; i++)
            check_msg(r->deliveries[i]->message, true);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    default: {
        Grpc__Health__V1__HealthCheckRequest *r =
            grpc__health__v1__health_check_request__unpack(NULL, len, req);
        m = (ProtobufCMessage *)r; /* base is the first member; r may be NULL */
        break;
    }
    }
    if (m)
        protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
