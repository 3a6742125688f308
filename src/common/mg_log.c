/* mg_log.c: leveled, structured logging (see mg_log.h). */
#include "common/mg_log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int log_level = MG_LOG_INFO;
static atomic_int log_json = 0;

static const char *level_names[] = {"debug", "info", "warn", "error", "off"};

int mg_log_configure(const char *level, const char *format)
{
    int lv = -1;
    for (int i = 0; i <= MG_LOG_OFF; i++)
        if (level && strcmp(level, level_names[i]) == 0)
            lv = i;
    if (level && lv < 0)
        return -EINVAL;
    if (format && strcmp(format, "text") != 0 && strcmp(format, "json") != 0)
        return -EINVAL;
    if (level)
        atomic_store(&log_level, lv);
    if (format)
        atomic_store(&log_json, strcmp(format, "json") == 0);
    return 0;
}

void mg_log_set_level(enum mg_log_level level)
{
    atomic_store(&log_level, (int)level);
}

int mg_log_enabled(enum mg_log_level level)
{
    return (int)level >= atomic_load(&log_level);
}

/* Appends s to buf JSON-escaped; returns the new length (bounded by cap). */
static size_t json_escape(char *buf, size_t len, size_t cap, const char *s)
{
    for (; *s && len + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            buf[len++] = '\\';
            buf[len++] = (char)c;
        } else if (c < 0x20) {
            len += (size_t)snprintf(buf + len, cap - len, "\\u%04x", c);
        } else {
            buf[len++] = (char)c;
        }
    }
    return len;
}

void mg_log_write(enum mg_log_level level, const char *mod, const char *fmt, ...)
{
    char msg[2048], line[4608], ts[40];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);

    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm tm;
    gmtime_r(&now.tv_sec, &tm);
    size_t tl = strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(ts + tl, sizeof(ts) - tl, ".%03ldZ", now.tv_nsec / 1000000);

    size_t n;
    if (atomic_load(&log_json)) {
        n = (size_t)snprintf(line, sizeof(line),
                             "{\"ts\":\"%s\",\"level\":\"%s\",\"mod\":\"%s\",\"msg\":\"", ts,
                             level_names[level], mod);
        n = json_escape(line, n, sizeof(line) - 4, msg);
        n += (size_t)snprintf(line + n, sizeof(line) - n, "\"}\n");
    } else {
        n = (size_t)snprintf(line, sizeof(line), "%s %s %s: %s\n", ts, level_names[level], mod,
                             msg);
    }
    if (n >= sizeof(line))
        n = sizeof(line) - 1, line[n - 1] = '\n';
    ssize_t w = write(STDERR_FILENO, line, n);
    (void)w;
}
