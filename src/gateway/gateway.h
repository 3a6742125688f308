/* gateway.h: one gateway, wired from its configuration.
 *
 * mg_gateway_start builds every module in order (worker pool, WebSocket
 * hub, presence and inbox, router, transports, gRPC server, discovery),
 * starts the listeners and returns once the gateway is ready. Main thread
 * only.
 */
#ifndef MG_GATEWAY_H
#define MG_GATEWAY_H

#include "gateway/config.h"

#include <stddef.h>
#include <stdint.h>

typedef struct mg_gateway mg_gateway;

/* cfg must outlive the gateway. Returns 0, or a negative errno with err set
 * (nothing is left running on failure). */
int mg_gateway_start(const mg_config *cfg, mg_gateway **out, char *err, size_t errlen);
/* How often the main loop should call mg_gateway_tick (presence lease). */
int64_t mg_gateway_tick_interval_ms(mg_gateway *gw);
/* Periodic upkeep: renews the presence lease. */
void mg_gateway_tick(mg_gateway *gw);
/* The graceful shutdown of DESIGN.md (blocks for up to the drain window). */
void mg_gateway_stop(mg_gateway *gw);
void mg_gateway_free(mg_gateway *gw); /* NULL is a no-op; stops first if needed */

#endif
