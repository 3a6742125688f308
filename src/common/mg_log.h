/* mg_log.h: leveled, structured logging.
 *
 * One line per event on stderr, either text
 *     2026-11-26T07:00:00.123Z info ws: connection open conn=gw1-7 user=alice
 * or a JSON object per line ({"ts":..,"level":..,"mod":..,"msg":..}) with
 * --log-format json. The message carries key=value fields (conn=, user=,
 * peer=, msg_id=) so each line names its client and request.
 *
 * Thread-safety: every function may be called from any thread; a line is
 * written with one write(2) so lines never interleave.
 * mg_log_debug() compiles to nothing unless MG_DEBUG is defined.
 */
#ifndef MG_LOG_H
#define MG_LOG_H

enum mg_log_level { MG_LOG_DEBUG = 0, MG_LOG_INFO, MG_LOG_WARN, MG_LOG_ERROR, MG_LOG_OFF };

/* Returns 0, or -EINVAL for an unknown level or format name. */
int mg_log_configure(const char *level, const char *format);
void mg_log_set_level(enum mg_log_level level);
int mg_log_enabled(enum mg_log_level level);
void mg_log_write(enum mg_log_level level, const char *mod, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define mg_log(level, mod, ...)                                                                    \
    do {                                                                                           \
        if (mg_log_enabled(level))                                                                 \
            mg_log_write(level, mod, __VA_ARGS__);                                                 \
    } while (0)
#define mg_log_info(mod, ...)  mg_log(MG_LOG_INFO, mod, __VA_ARGS__)
#define mg_log_warn(mod, ...)  mg_log(MG_LOG_WARN, mod, __VA_ARGS__)
#define mg_log_error(mod, ...) mg_log(MG_LOG_ERROR, mod, __VA_ARGS__)
#ifdef MG_DEBUG
#define mg_log_debug(mod, ...) mg_log(MG_LOG_DEBUG, mod, __VA_ARGS__)
#else
#define mg_log_debug(mod, ...)                                                                     \
    do {                                                                                           \
    } while (0)
#endif

#endif
