/* grpc_client.c: typed test calls over common/mg_grpc.h (see grpc_client.h).
 * Runs on the calling test thread; blocking, bounded by the timeout. */
#include "support/grpc_client.h"

#include <string.h>

grpc_status_code mg_tc_send(mg_grpc_client *c, const char *from, const char *to, const char *id,
                            const char *text, int priority, int timeout_ms,
                            Meshgate__V1__SendMessageResponse **resp, char **details)
{
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.id = (char *)(id ? id : "");
    m.from = (char *)(from ? from : "");
    m.to = (char *)(to ? to : "");
    m.content.data = (uint8_t *)text;
    m.content.len = text ? strlen(text) : 0;
    m.content_type = "text/plain";
    m.priority = (Meshgate__V1__Priority)priority;
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
