/* fuzz_consul.c: answers of Consul's /v1/health/service endpoint through
 * mg_consul__parse_health, as the watcher hands them over. */
#include "discovery/consul_internal.h"

#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    mg_peer *p = NULL;
    size_t n = 0;
    char err[256];
    if (mg_consul__parse_health((const char *)data, size, &p, &n, err, sizeof(err)) == 0)
        mg_consul__peers_free(p, n);
    return 0;
}
