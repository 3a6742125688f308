/* bus_metrics.h: the metric families every bus exports, one name each with
 * the label bus="<path name>" (redis-pubsub, nats), so dashboards and alerts
 * read every bus alike. Each family's name, type and help text live in one
 * table (bus_metrics.c); a transport only picks the family and its labels.
 *
 * Threads: mg_bus_metric may be called from any thread (it creates or finds
 * the metric in the process registry, see mg_metrics.h); the metric it
 * returns lives until mg_metrics_shutdown.
 */
#ifndef MG_BUS_METRICS_H
#define MG_BUS_METRICS_H

#include "common/mg_metrics.h"

typedef enum mg_bus_family {
    MG_BUS_SENT,              /* counter: messages the bus took (its confirmation came) */
    MG_BUS_FAILED,            /* counter, by reason: a bus step that failed (next step runs) */
    MG_BUS_RECEIPT,           /* histogram: a HIGH send to the bus's confirmation */
    MG_BUS_RECEIVED,          /* counter: payloads received from the bus */
    MG_BUS_BAD,               /* counter, by reason: received payloads skipped */
    MG_BUS_CONSUMER_LAG,      /* gauge: messages waiting on the bus for this region */
    MG_BUS_CONSUMER_INFLIGHT, /* gauge: received messages being handled */
    MG_BUS_REDELIVERIES,      /* counter: messages received again */
    MG_BUS_RETRIES,           /* counter: handlings that failed and are redelivered later */
    MG_BUS_PARKED,            /* counter: put in the inbox after the delivery bound */
    MG_BUS_UNDELIVERABLE,     /* counter: neither delivered nor stored after the bound */
} mg_bus_family;

/* The family's metric for bus (e.g. "nats"); reason is the `reason` label of
 * MG_BUS_FAILED and MG_BUS_BAD (NULL for the others). */
mg_metric *mg_bus_metric(mg_bus_family f, const char *bus, const char *reason);

/* Registers (fn NULL: unregisters) bus's meshgate_bus_pending gauge: messages
 * the bus is carrying, awaiting a reply, a receipt or a PubAck. */
void mg_bus_pending_register(const char *bus, mg_gauge_fn fn, void *arg);

#endif
