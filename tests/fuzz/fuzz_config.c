/* fuzz_config.c: configuration values through mg_config_load and
 * mg_config_validate: the input is split at NUL bytes into argv (flags and
 * values); a leading "E" byte sends the first value through the
 * environment instead (MESHGATE_INBOX_MAX_MESSAGES, an INT). */
#include "gateway/config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > 4096)
        return 0;
    char *buf = malloc(size + 1);
    memcpy(buf, data, size);
    buf[size] = '\0';
    char *argv[66] = {"meshgate"};
    int argc = 1;
    for (size_t i = 0; i <= size && argc < 65;) {
        argv[argc++] = buf + i;
        i += strlen(buf + i) + 1;
    }
    bool env = argc > 1 && argv[1][0] == 'E';
    if (env) {
        setenv("MESHGATE_INBOX_MAX_MESSAGES", argv[1] + 1, 1);
        argv[1] = argv[0];
    }
    static FILE *devnull;
    if (!devnull)
        devnull = fopen("/dev/null", "w");
    mg_config cfg;
    char err[256];
    int rc = mg_config_load(&cfg, argc - env, argv + env, devnull, err, sizeof(err));
    if (rc == 0)
        mg_config_validate(&cfg, err, sizeof(err));
    mg_config_clear(&cfg); /* the caller owns cfg whatever load returned */
    if (env)
        unsetenv("MESHGATE_INBOX_MAX_MESSAGES");
    free(buf);
    return 0;
}
