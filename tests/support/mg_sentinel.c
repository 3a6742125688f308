/* mg_sentinel.c: the Sentinel setup helpers of the tests (mg_sentinel.h). */
#include "support/mg_sentinel.h"

#include "common/mg_time.h"

#include <criterion/criterion.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

static int lock_fd = -1;
static char killed_port[16]; /* a data node killed and not restarted yet */

void mg_sentinel_lock(int exclusive)
{
    const char *run = getenv("MESHGATE_RUN");
    char path[512];
    snprintf(path, sizeof(path), "%s/sentinel-chaos.lock", run && *run ? run : "/tmp/meshgate-run");
    lock_fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    cr_assert(lock_fd >= 0, "cannot open %s", path);
    cr_assert_eq(flock(lock_fd, exclusive ? LOCK_EX : LOCK_SH), 0);
}

void mg_sentinel_unlock(void)
{
    if (killed_port[0]) {
        char args[64];
        snprintf(args, sizeof(args), "start-node %s", killed_port);
        cr_expect_eq(mg_sentinel_infra(args, NULL, 0), 0, "restart %s", killed_port);
        cr_expect_eq(mg_sentinel_infra("wait", NULL, 0), 0, "Sentinel setup not healthy again");
        killed_port[0] = '\0';
    }
    if (lock_fd >= 0)
        close(lock_fd);
    lock_fd = -1;
}

int mg_sentinel_infra(const char *args, char *out, size_t outlen)
{
    char cmd[1024];
    snprintf(cmd, sizeof(cmd), "%s/tests/infra/redis-sentinel.sh %s", MG_SOURCE_DIR, args);
    FILE *f = popen(cmd, "r");
    cr_assert_not_null(f, "popen %s", cmd);
    char line[256] = "";
    if (!fgets(line, sizeof(line), f))
        line[0] = '\0';
    while (fgetc(f) != EOF)
        ;
    line[strcspn(line, "\r\n")] = '\0';
    if (out)
        snprintf(out, outlen, "%s", line);
    return pclose(f);
}

void mg_sentinel_kill_primary(char *old, size_t len)
{
    cr_assert_eq(mg_sentinel_infra("wait", NULL, 0), 0, "Sentinel setup not healthy before");
    cr_assert_eq(mg_sentinel_infra("primary", old, len), 0);
    const char *colon = strrchr(old, ':');
    cr_assert_not_null(colon, "no primary: '%s'", old);
    snprintf(killed_port, sizeof(killed_port), "%s", colon + 1);
    char args[64];
    snprintf(args, sizeof(args), "kill-node %s", killed_port);
    cr_assert_eq(mg_sentinel_infra(args, NULL, 0), 0);
}

void mg_sentinel_new_primary(const char *old, char *now, size_t len)
{
    int64_t end = mg_mono_ms() + 10000;
    do {
        cr_assert_eq(mg_sentinel_infra("primary", now, len), 0);
        if (strcmp(now, old) != 0)
            return;
        usleep(100 * 1000);
    } while (mg_mono_ms() < end);
}
