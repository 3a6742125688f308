/* bus_metrics.c: the bus metric families (see bus_metrics.h): one table of
 * name, type and help, shared by every bus transport. */
#include "router/bus_metrics.h"

#include <stdio.h>

enum { COUNTER, GAUGE, HISTOGRAM };

static const struct {
    const char *name;
    int type;
    const char *help;
} families[] = {
    [MG_BUS_SENT] = {"meshgate_bus_sent_total", COUNTER,
                     "Messages a bus took (redis-pubsub: SPUBLISH reached a subscriber; nats: the "
                     "stream's PubAck)"},
    [MG_BUS_FAILED] = {"meshgate_bus_failed_total", COUNTER,
                       "Messages a bus step failed, by reason (the route list's next step takes "
                       "them)"},
    [MG_BUS_RECEIPT] = {"meshgate_bus_receipt_seconds", HISTOGRAM,
                        "A HIGH send to the bus's confirmation (redis-pubsub: the target "
                        "gateway's receipt; nats: the stream's PubAck)"},
    [MG_BUS_RECEIVED] = {"meshgate_bus_received_total", COUNTER,
                         "Payloads received from a bus (redeliveries included)"},
    [MG_BUS_BAD] = {"meshgate_bus_bad_payloads_total", COUNTER,
                    "Payloads received on a bus that were skipped, by reason"},
    [MG_BUS_CONSUMER_LAG] = {"meshgate_bus_consumer_lag", GAUGE,
                             "Messages waiting on a bus for this gateway's region, not yet "
                             "delivered to a consumer"},
    [MG_BUS_CONSUMER_INFLIGHT] = {"meshgate_bus_consumer_inflight", GAUGE,
                                  "Messages received from a bus and being handled here"},
    [MG_BUS_REDELIVERIES] = {"meshgate_bus_redeliveries_total", COUNTER,
                             "Messages this gateway received from a bus more than once"},
    [MG_BUS_RETRIES] = {"meshgate_bus_retries_total", COUNTER,
                        "Received messages whose handling failed, redelivered after a backoff"},
    [MG_BUS_PARKED] = {"meshgate_bus_parked_total", COUNTER,
                       "Received messages put in the inbox after the bus's delivery bound"},
    [MG_BUS_UNDELIVERABLE] = {"meshgate_bus_undeliverable_total", COUNTER,
                              "Received messages neither delivered nor stored after the bound"},
};

mg_metric *mg_bus_metric(mg_bus_family f, const char *bus, const char *reason)
{
    char labels[128];
    if (reason)
        snprintf(labels, sizeof(labels), "bus=\"%s\",reason=\"%s\"", bus, reason);
    else
        snprintf(labels, sizeof(labels), "bus=\"%s\"", bus);
    switch (families[f].type) {
    case GAUGE:
        return mg_gauge(families[f].name, families[f].help, labels);
    case HISTOGRAM:
        return mg_histogram(families[f].name, families[f].help, labels);
    default:
        return mg_counter(families[f].name, families[f].help, labels);
    }
}

void mg_bus_pending_register(const char *bus, mg_gauge_fn fn, void *arg)
{
    char labels[64];
    snprintf(labels, sizeof(labels), "bus=\"%s\"", bus);
    mg_gauge_fn_register("meshgate_bus_pending",
                         "Messages a bus is carrying (awaiting a reply, a receipt or a PubAck)",
                         labels, fn, arg);
}
