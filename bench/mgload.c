/* mgload.c: the meshgate load generator (bench/README.md, bench/run.sh).
 *
 * Owns: a raw epoll WebSocket client (one thread, "main") holding many
 * connections to one or two gateways, spread over source addresses
 * 127.0.0.2.. (bind before connect, IP_BIND_ADDRESS_NO_PORT) to pass the
 * ephemeral-port limit; in fanout mode one more thread makes the gRPC
 * SendBatch call (src/common/mg_grpc.h).
 * Modes:
 *   idle    hold N connections; gateway RSS per connection and idle CPU, the
 *           connections per WebSocket loop (/metrics); then optionally a
 *           broadcast to all of them (--broadcast: SendBatch, as fanout) and a
 *           clean close of all (--close: close frames, the server's echo)
 *   pairs   sender -> recipient pairs, flat out (closed loop, a window of
 *           messages in flight per pair) or at a fixed rate (open loop,
 *           latency stamped with the scheduled time: no coordinated omission)
 *   fanout  N connected users, SendBatch to all of them, time until all got it
 *   api     N connected users; gRPC SendMessage calls to them from one more
 *           thread (asynchronous calls on one completion queue: a window in
 *           flight, or a fixed rate), as a service calling the API would
 * Guarantees: every phase is bounded in count AND time; per connection only a
 * 40-byte struct (read/write buffers exist only while partial data waits);
 * latency is kept in a log-linear (HDR-style) histogram, <0.8% error.
 * Output: one JSON line (stdout, and appended to --json FILE).
 */
#include "common/mg_grpc.h"
#include "meshgate/v1/messaging.pb-c.h"

#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* ---- clocks ------------------------------------------------------------- */

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* CLOCK_REALTIME - CLOCK_MONOTONIC (the kernel stamps arrivals in real
 * time): the closest of a few bracketed readings. */
static int64_t realtime_offset(void)
{
    int64_t best = INT64_MAX, off = 0;
    for (int i = 0; i < 16; i++) {
        struct timespec rt;
        int64_t m0 = now_ns();
        clock_gettime(CLOCK_REALTIME, &rt);
        int64_t m1 = now_ns();
        if (m1 - m0 < best) {
            best = m1 - m0;
            off = (int64_t)rt.tv_sec * 1000000000 + rt.tv_nsec - (m0 + (m1 - m0) / 2);
        }
    }
    return off;
}

static double cpu_seconds_self(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
           (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* ---- log-linear histogram (ns) ----------------------------------------- */

#define H_SUB   7 /* 128 sub-buckets per power of two */
#define H_LIN   (2 << H_SUB)
#define H_SHIFT 40
#define H_N     (H_LIN + H_SHIFT * (1 << H_SUB))

typedef struct hist {
    uint64_t c[H_N];
    uint64_t n, max, min;
    double sum;
} hist;

static int h_index(uint64_t v)
{
    if (v < H_LIN)
        return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - H_SUB; /* >= 1 */
    if (shift > H_SHIFT)
        return H_N - 1;
    uint64_t sub = v >> shift; /* [128, 255] */
    return H_LIN + (shift - 1) * (1 << H_SUB) + (int)(sub - (1 << H_SUB));
}

static uint64_t h_value(int i) /* upper edge of bucket i */
{
    if (i < H_LIN)
        return (uint64_t)i;
    int shift = (i - H_LIN) / (1 << H_SUB) + 1;
    uint64_t sub = (uint64_t)((i - H_LIN) % (1 << H_SUB)) + (1 << H_SUB);
    return ((sub + 1) << shift) - 1;
}

static void h_add(hist *h, int64_t v)
{
    if (v < 0)
        v = 0;
    h->c[h_index((uint64_t)v)]++;
    h->n++;
    h->sum += (double)v;
    if ((uint64_t)v > h->max)
        h->max = (uint64_t)v;
    if (h->n == 1 || (uint64_t)v < h->min)
        h->min = (uint64_t)v;
}

static uint64_t h_pct(const hist *h, double p)
{
    if (!h->n)
        return 0;
    uint64_t want = (uint64_t)((double)h->n * p / 100.0 + 0.999999);
    if (want < 1)
        want = 1;
    uint64_t acc = 0;
    for (int i = 0; i < H_N; i++) {
        acc += h->c[i];
        if (acc >= want) {
            uint64_t v = h_value(i);
            return v > h->max ? h->max : v;
        }
    }
    return h->max;
}

/* ---- /proc of the gateway(s) ----------------------------------------------- */

#define MAX_GW 4
static int gw_pids[MAX_GW], n_gw;

static long proc_rss_kb(int pid)
{
    char path[64], line[256];
    snprintf(path, sizeof(path), "/proc/%d/status", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    long kb = -1;
    while (fgets(line, sizeof(line), f))
        if (strncmp(line, "VmRSS:", 6) == 0)
            kb = strtol(line + 6, NULL, 10);
    fclose(f);
    return kb;
}

static long proc_cpu_ticks(int pid) /* utime + stime */
{
    char path[64], buf[2048];
    snprintf(path, sizeof(path), "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    if (!p)
        return -1;
    p += 2; /* field 3 */
    unsigned long ut = 0, st = 0;
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    return (long)(ut + st);
}

static long gw_rss_kb(void)
{
    long s = 0;
    for (int i = 0; i < n_gw; i++) {
        long v = proc_rss_kb(gw_pids[i]);
        if (v < 0)
            return -1;
        s += v;
    }
    return n_gw ? s : -1;
}

/* The scheduler's view of a process (its threads summed, /proc/<pid>/task/<tid>/schedstat):
 * time on a CPU, time runnable but waiting for one (the run queue), and times it was
 * scheduled in. A thread that ends between two readings drops out of the second. */
typedef struct sched_use {
    uint64_t run_ns, wait_ns, slices;
} sched_use;

static bool proc_sched(int pid, sched_use *u)
{
    char path[64];
    snprintf(path, sizeof(path), "/proc/%d/task", pid);
    DIR *d = opendir(path);
    if (!d)
        return false;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char sp[300];
        snprintf(sp, sizeof(sp), "/proc/%d/task/%s/schedstat", pid, e->d_name);
        FILE *f = fopen(sp, "r");
        if (!f)
            continue;
        unsigned long long run = 0, wait = 0, sl = 0;
        if (fscanf(f, "%llu %llu %llu", &run, &wait, &sl) == 3) {
            u->run_ns += run;
            u->wait_ns += wait;
            u->slices += sl;
        }
        fclose(f);
    }
    closedir(d);
    return true;
}

/* The gateways' threads together, and this process's (pid 0: self). */
static bool gw_sched(sched_use *u)
{
    memset(u, 0, sizeof(*u));
    for (int i = 0; i < n_gw; i++)
        if (!proc_sched(gw_pids[i], u))
            return false;
    return n_gw > 0;
}

static long gw_ticks(void)
{
    long s = 0;
    for (int i = 0; i < n_gw; i++) {
        long v = proc_cpu_ticks(gw_pids[i]);
        if (v < 0)
            return -1;
        s += v;
    }
    return n_gw ? s : -1;
}

static double load1(void)
{
    double l = -1;
    FILE *f = fopen("/proc/loadavg", "r");
    if (f) {
        if (fscanf(f, "%lf", &l) != 1)
            l = -1;
        fclose(f);
    }
    return l;
}

/* ---- options ------------------------------------------------------------- */

static struct {
    const char *mode, *host, *prefix, *label, *json, *grpc, *scenario, *path;
    int port, send_port, port2, nsrc, parallel;
    long conns, pairs, count, rounds;
    double rate, seconds, warmup, hold, settle, connect_timeout, drain, timeout;
    int window, size, low, stream, broadcast, close;
} opt = {
    .host = "127.0.0.1",
    .label = "",
    .scenario = "",
    .path = "",
    .grpc = "127.0.0.1:50051",
    .parallel = 1000,
    .conns = 1000,
    .pairs = 64,
    .count = 1000000,
    .rounds = 5,
    .seconds = 10,
    .warmup = 1,
    .hold = 10,
    .settle = 1,
    .connect_timeout = 120,
    .drain = 5,
    .timeout = 30,
    .window = 16,
    .size = 64,
};

/* ---- connections --------------------------------------------------------- */

enum { C_NEW, C_CONNECTING, C_HANDSHAKE, C_OPEN, C_DEAD };

typedef struct conn {
    int fd;
    uint8_t state;
    uint8_t sender : 1, ready : 1; /* ready: the gateway's {"type":"ready"} came */
    uint8_t dirty, want_out;
    uint32_t peer;     /* pairs: the partner connection */
    uint32_t inflight; /* pairs (sender): sent and not yet received or failed */
    uint32_t rlen, wlen;
    uint8_t *rbuf, *wbuf; /* only while partial data waits */
} conn;

static conn *C;
static long nconns;
static int ep;
static uint32_t *dirty_list;
static long ndirty;

static struct {
    long connect_fail, handshake_fail, closed, error_frames, ack_failed, ack_other, backlog_drop;
    long path_local, path_grpc, path_kafka, path_pubsub, path_nats, path_other;
    long open, acks_ok, recv_msgs, recv_other, sent, recv_measured, stale;
    long ready;                 /* open connections whose ready frame came (presence has them) */
    long closing, closed_clean; /* --close: close frames sent, echoes received */
} st;

static hist H;
/* pairs and api: where the end-to-end latency (H) goes, per message: HS scheduled
 * send time -> frame built here (this process late: pacing, its own CPU);
 * HG built -> the kernel's arrival stamp on the recipient's socket
 * (SO_TIMESTAMPNS: the gateway's part, loopback included); HR arrival ->
 * read here (this process late on the receiving side). HG alone is what
 * the gateway costs; H stays the figure of record. */
static hist HS, HG, HR;
static int64_t rt_minus_mono; /* CLOCK_REALTIME - CLOCK_MONOTONIC, ns */
static int64_t measure_start = INT64_MAX, measure_stop,
               send_end_ns = INT64_MAX; /* ns; receipts in this window count */
static uint64_t rng = 88172645463325252ull;
static char hostbuf[512];
static size_t hostlen;

static uint32_t xrand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint32_t)rng;
}

static void conn_kill(conn *c)
{
    if (c->state == C_DEAD)
        return;
    if (c->state == C_OPEN) {
        st.open--;
        st.ready -= c->ready;
    }
    c->ready = 0;
    if (c->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
    }
    c->fd = -1;
    c->state = C_DEAD;
    free(c->rbuf);
    free(c->wbuf);
    c->rbuf = c->wbuf = NULL;
    c->rlen = c->wlen = 0;
}

static void set_events(conn *c, bool out)
{
    if (c->want_out == out)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0),
                             .data.u32 = (uint32_t)(c - C)};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

/* Appends bytes to the connection's pending output; flushed by flush(). */
static void out_append(conn *c, const void *data, size_t len)
{
    if (c->wlen + len > (64u << 20)) { /* 64 MB backlog: the gateway is not reading */
        st.backlog_drop++;
        return;
    }
    c->wbuf = realloc(c->wbuf, c->wlen + len);
    if (!c->wbuf)
        abort();
    memcpy(c->wbuf + c->wlen, data, len);
    c->wlen += (uint32_t)len;
    if (!c->dirty) {
        c->dirty = 1;
        dirty_list[ndirty++] = (uint32_t)(c - C);
    }
}

static void flush_one(conn *c)
{
    if (c->state == C_DEAD || !c->wlen)
        return;
    ssize_t n = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) {
            set_events(c, true);
            return;
        }
        st.closed++;
        conn_kill(c);
        return;
    }
    if ((uint32_t)n == c->wlen) {
        free(c->wbuf);
        c->wbuf = NULL;
        c->wlen = 0;
        set_events(c, false);
        return;
    }
    memmove(c->wbuf, c->wbuf + n, c->wlen - (size_t)n);
    c->wlen -= (uint32_t)n;
    set_events(c, true);
}

static void flush_dirty(void)
{
    for (long i = 0; i < ndirty; i++) {
        conn *c = &C[dirty_list[i]];
        c->dirty = 0;
        flush_one(c);
    }
    ndirty = 0;
}

/* A masked client frame. */
static void send_frame(conn *c, int opcode, const void *payload, size_t len)
{
    uint8_t hdr[14];
    size_t h = 0;
    hdr[h++] = (uint8_t)(0x80 | opcode);
    if (len < 126) {
        hdr[h++] = (uint8_t)(0x80 | len);
    } else if (len < 65536) {
        hdr[h++] = 0x80 | 126;
        hdr[h++] = (uint8_t)(len >> 8);
        hdr[h++] = (uint8_t)len;
    } else {
        hdr[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            hdr[h++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    uint32_t m = xrand();
    uint8_t mk[4];
    memcpy(mk, &m, 4);
    memcpy(hdr + h, mk, 4);
    h += 4;
    uint8_t buf[16384];
    if (h + len > sizeof(buf))
        abort(); /* payloads are small (--size is capped) */
    memcpy(buf, hdr, h);
    const uint8_t *p = payload;
    for (size_t i = 0; i < len; i++)
        buf[h + i] = p[i] ^ mk[i & 3];
    out_append(c, buf, h + len);
}

static char pad[8192];

static void send_msg(conn *s, int64_t stamp)
{
    char user[128], body[12288];
    conn *r = &C[s->peer];
    snprintf(user, sizeof(user), "%sr%u", opt.prefix, (unsigned)(s - C) / 2);
    (void)r;
    int n = snprintf(body, sizeof(body),
                     "{\"type\":\"send\",\"to\":\"%s\",\"content\":\"mgb %" PRId64 " %" PRId64
                     " %.*s\"%s}",
                     user, stamp, now_ns(), opt.size, pad, opt.low ? ",\"priority\":\"low\"" : "");
    send_frame(s, 1, body, (size_t)n);
    s->inflight++;
    st.sent++;
}

/* ---- frame handling ------------------------------------------------------- */

static void on_delivered(conn *r, int64_t stamp, int64_t built, int64_t now);

static void on_text(conn *c, const char *p, size_t len, int64_t now)
{
    const char *e = p + len;
    const char *mk = memmem(p, len, "\"mgb ", 5);
    if (mk) {
        char *end;
        int64_t stamp = strtoll(mk + 5, &end, 10);
        int64_t built = *end == ' ' ? strtoll(end + 1, NULL, 10) : 0; /* pairs: "mgb DUE BUILT" */
        on_delivered(c, stamp, built, now);
        return;
    }
    if (memmem(p, len, "\"type\":\"ack\"", 12)) {
        if (memmem(p, len, "\"status\":\"delivered\"", 20) ||
            memmem(p, len, "\"status\":\"queued\"", 17) ||
            memmem(p, len, "\"status\":\"accepted\"", 19)) {
            st.acks_ok++;
            if (memmem(p, len, "\"path\":\"local\"", 14))
                st.path_local++;
            else if (memmem(p, len, "\"path\":\"grpc\"", 13))
                st.path_grpc++;
            else if (memmem(p, len, "\"path\":\"kafka\"", 14))
                st.path_kafka++;
            else if (memmem(p, len, "\"path\":\"redis-pubsub\"", 21))
                st.path_pubsub++;
            else if (memmem(p, len, "\"path\":\"nats\"", 13))
                st.path_nats++;
            else
                st.path_other++;
        } else {
            st.ack_failed++;
            if (st.ack_failed <= 3)
                fprintf(stderr, "mgload: ack not delivered: %.*s\n", (int)len, p);
            if (c->sender && c->inflight)
                c->inflight--;
        }
        return;
    }
    if (memmem(p, len, "\"type\":\"error\"", 14)) {
        st.error_frames++;
        if (st.error_frames <= 3)
            fprintf(stderr, "mgload: error frame: %.*s\n", (int)len, p);
        return;
    }
    if (memmem(p, len, "\"type\":\"ready\"", 14)) {
        st.ready += !c->ready;
        c->ready = 1;
        return;
    }
    (void)e;
    st.recv_other++;
}

/* Parses whole frames from buf; returns bytes consumed. */
static size_t parse_frames(conn *c, const uint8_t *buf, size_t len, int64_t now)
{
    size_t off = 0;
    while (len - off >= 2) {
        const uint8_t *f = buf + off;
        int op = f[0] & 0x0f;
        bool masked = f[1] & 0x80;
        uint64_t pl = f[1] & 0x7f;
        size_t h = 2;
        if (pl == 126) {
            if (len - off < 4)
                break;
            pl = ((uint64_t)f[2] << 8) | f[3];
            h = 4;
        } else if (pl == 127) {
            if (len - off < 10)
                break;
            pl = 0;
            for (int i = 0; i < 8; i++)
                pl = (pl << 8) | f[2 + i];
            h = 10;
        }
        if (masked)
            h += 4;
        if (len - off < h + pl)
            break;
        const uint8_t *payload = f + h;
        if (masked) /* servers never mask; tolerate it anyway (in place is fine: our buffer) */
            for (uint64_t i = 0; i < pl; i++)
                ((uint8_t *)payload)[i] ^= f[h - 4 + (i & 3)];
        switch (op) {
        case 0:
        case 1:
        case 2:
            on_text(c, (const char *)payload, (size_t)pl, now);
            break;
        case 8:
            if (st.closing) { /* the echo of our close (idle --close) */
                st.closed_clean++;
                conn_kill(c);
                return len;
            }
            st.closed++;
            if (st.closed <= 3)
                fprintf(stderr, "mgload: server closed a connection code=%d %.*s\n",
                        pl >= 2 ? (payload[0] << 8 | payload[1]) : 0, pl > 2 ? (int)pl - 2 : 0,
                        pl > 2 ? (const char *)payload + 2 : "");
            conn_kill(c);
            return len;
        case 9:
            send_frame(c, 10, payload, (size_t)pl);
            break;
        default:
            break;
        }
        off += h + (size_t)pl;
    }
    return off;
}

static const char *memfind(const uint8_t *b, size_t n, const char *s)
{
    return memmem(b, n, s, strlen(s));
}

static uint8_t rdbuf[1 << 18];
static int64_t rx_arrival; /* the last read's kernel arrival stamp (monotonic ns), 0: none */

/* recv, and the kernel's stamp of the read's last segment when the socket
 * asked for one (SO_TIMESTAMPNS: pairs and api recipients). */
static ssize_t read_stamped(int fd)
{
    struct iovec iov = {.iov_base = rdbuf, .iov_len = sizeof(rdbuf)};
    union {
        char b[CMSG_SPACE(sizeof(struct timespec))];
        struct cmsghdr align;
    } cb;
    struct msghdr mh = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = cb.b, .msg_controllen = sizeof(cb.b)};
    ssize_t n = recvmsg(fd, &mh, 0);
    rx_arrival = 0;
    for (struct cmsghdr *cm = n > 0 ? CMSG_FIRSTHDR(&mh) : NULL; cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_TIMESTAMPNS) {
            struct timespec ts;
            memcpy(&ts, CMSG_DATA(cm), sizeof(ts));
            rx_arrival = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec - rt_minus_mono;
        }
    }
    return n;
}

/* now: when the events were reported; each read takes its own time (data
 * may arrive while earlier connections are served: stamping it with the
 * batch's start would make it look earlier than it was read). */
static void on_readable(conn *c, int64_t now)
{
    for (int loops = 0; loops < 8 && c->state != C_DEAD; loops++) {
        ssize_t n = read_stamped(c->fd);
        now = now_ns();
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            if (c->state == C_HANDSHAKE)
                st.handshake_fail++;
            else
                st.closed++;
            conn_kill(c);
            return;
        }
        if (n < 0)
            return;
        const uint8_t *b = rdbuf;
        size_t len = (size_t)n;
        if (c->rlen) {
            c->rbuf = realloc(c->rbuf, c->rlen + len);
            memcpy(c->rbuf + c->rlen, rdbuf, len);
            len += c->rlen;
            b = c->rbuf;
        }
        size_t used = 0;
        if (c->state == C_HANDSHAKE) {
            const char *end = memfind(b, len, "\r\n\r\n");
            if (!end) {
                used = 0;
            } else {
                if (len < 12 || memcmp(b + 9, "101", 3) != 0) {
                    st.handshake_fail++;
                    if (st.handshake_fail <= 3)
                        fprintf(stderr, "mgload: upgrade refused: %.*s\n",
                                (int)((const uint8_t *)end - b), (const char *)b);
                    conn_kill(c);
                    return;
                }
                c->state = C_OPEN;
                st.open++;
                used = (size_t)((const uint8_t *)end - b) + 4;
            }
        }
        if (c->state == C_OPEN)
            used += parse_frames(c, b + used, len - used, now);
        if (c->state == C_DEAD)
            return;
        size_t left = len - used;
        if (left == 0) {
            free(c->rbuf);
            c->rbuf = NULL;
            c->rlen = 0;
        } else {
            uint8_t *nb = malloc(left);
            memcpy(nb, b + used, left);
            free(c->rbuf);
            c->rbuf = nb;
            c->rlen = (uint32_t)left;
        }
        if ((size_t)n < sizeof(rdbuf))
            return;
    }
}

static void on_writable(conn *c)
{
    if (c->state == C_CONNECTING) {
        int err = 0;
        socklen_t el = sizeof(err);
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
        if (err) {
            st.connect_fail++;
            if (st.connect_fail <= 3)
                fprintf(stderr, "mgload: connect: %s\n", strerror(err));
            conn_kill(c);
            return;
        }
        c->state = C_HANDSHAKE;
        char req[1024];
        long i = c - C;
        char user[160];
        if (strcmp(opt.mode, "pairs") == 0)
            snprintf(user, sizeof(user), "%s%c%ld", opt.prefix, c->sender ? 's' : 'r', i / 2);
        else
            snprintf(user, sizeof(user), "%s%ld", opt.prefix, i);
        int n = snprintf(req, sizeof(req),
                         "GET /ws?user=%s HTTP/1.1\r\nHost: %.*s\r\nUpgrade: websocket\r\n"
                         "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         "Sec-WebSocket-Version: 13\r\n\r\n",
                         user, (int)hostlen, hostbuf);
        c->want_out = 1; /* registered with EPOLLOUT */
        out_append(c, req, (size_t)n);
        return;
    }
    flush_one(c);
}

static int conn_start(conn *c, long i)
{
    int port = (c->sender && opt.send_port) ? opt.send_port : opt.port;
    if (opt.port2 && (i & 1)) /* fanout over two gateways: odd users on the second */
        port = opt.port2;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        st.connect_fail++;
        if (st.connect_fail <= 3)
            fprintf(stderr, "mgload: socket: %s\n", strerror(errno));
        c->state = C_DEAD;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (!c->sender && (strcmp(opt.mode, "pairs") == 0 || strcmp(opt.mode, "api") == 0))
        /* arrival stamps: see HG */
        setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &one, sizeof(one));
    struct sockaddr_in src = {.sin_family = AF_INET};
    src.sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % opt.nsrc));
    if (bind(fd, (struct sockaddr *)&src, sizeof(src)) != 0) {
        fprintf(stderr, "mgload: bind: %s\n", strerror(errno));
        close(fd);
        st.connect_fail++;
        c->state = C_DEAD;
        return -1;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, opt.host, &dst.sin_addr);
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) != 0 && errno != EINPROGRESS) {
        st.connect_fail++;
        if (st.connect_fail <= 3)
            fprintf(stderr, "mgload: connect: %s\n", strerror(errno));
        close(fd);
        c->state = C_DEAD;
        return -1;
    }
    c->fd = fd;
    c->state = C_CONNECTING;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)i};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    c->want_out = 1;
    return 0;
}

/* One pass of the event loop, waiting at most timeout_ns. */
static void poll_once(int64_t timeout_ns)
{
    static struct epoll_event evs[1024];
    if (timeout_ns < 0)
        timeout_ns = 0;
    struct timespec ts = {.tv_sec = timeout_ns / 1000000000, .tv_nsec = timeout_ns % 1000000000};
    int n = epoll_pwait2(ep, evs, 1024, &ts, NULL);
    int64_t now = now_ns();
    for (int i = 0; i < n; i++) {
        conn *c = &C[evs[i].data.u32];
        if (c->state == C_DEAD)
            continue;
        if (evs[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            if (c->state == C_CONNECTING || c->wlen)
                on_writable(c);
            else if (c->want_out)
                set_events(c, false);
        }
        if (c->state != C_DEAD && c->state != C_CONNECTING &&
            (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)))
            on_readable(c, now);
    }
    flush_dirty();
}

/* Opens all connections with at most opt.parallel handshakes in flight. */
static double connect_all(void)
{
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(opt.connect_timeout * 1e9);
    long next = 0, last_report = 0;
    for (;;) {
        long pending = 0, done = 0;
        /* counting every pass is O(N); keep it cheap via st counters instead */
        done = st.open + st.connect_fail + st.handshake_fail + st.closed;
        pending = next - done;
        while (next < nconns && pending < opt.parallel) {
            conn_start(&C[next], next);
            next++;
            pending++;
            done = st.open + st.connect_fail + st.handshake_fail + st.closed;
            pending = next - done;
        }
        if (done >= nconns)
            break;
        if (now_ns() > deadline) {
            fprintf(stderr, "mgload: connect phase timed out: open=%ld of %ld\n", st.open, nconns);
            break;
        }
        if (st.open - last_report >= 20000) {
            last_report = st.open;
            fprintf(stderr, "mgload: open=%ld\n", st.open);
        }
        poll_once(10 * 1000000);
    }
    return (double)(now_ns() - t0) / 1e9;
}

static void run_for(double seconds)
{
    int64_t end = now_ns() + (int64_t)(seconds * 1e9);
    int64_t t;
    while ((t = now_ns()) < end)
        poll_once(end - t);
}

/* ---- results ------------------------------------------------------------------ */

static FILE *jf;
static char jline[8192];
static size_t jlen;

static void jadd(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void jadd(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    jlen += (size_t)vsnprintf(jline + jlen, sizeof(jline) - jlen, fmt, ap);
    va_end(ap);
}

static void j_begin(void)
{
    jlen = 0;
    jadd("{\"scenario\":\"%s\",\"path\":\"%s\",\"label\":\"%s\",\"mode\":\"%s\",\"ts\":%ld",
         opt.scenario, opt.path, opt.label, opt.mode, (long)time(NULL));
}

static void j_lat(const hist *h)
{
    jadd(",\"samples\":%" PRIu64
         ",\"p50_us\":%.1f,\"p90_us\":%.1f,\"p99_us\":%.1f,\"p999_us\":%.1f,"
         "\"max_us\":%.1f,\"mean_us\":%.1f",
         h->n, h_pct(h, 50) / 1e3, h_pct(h, 90) / 1e3, h_pct(h, 99) / 1e3, h_pct(h, 99.9) / 1e3,
         h->max / 1e3, h->n ? h->sum / (double)h->n / 1e3 : 0.0);
}

/* A stage of the pairs breakdown: "<name>_p50_us" ... */
static void j_stage(const char *name, const hist *h)
{
    if (!h->n)
        return;
    jadd(",\"%s_p50_us\":%.1f,\"%s_p90_us\":%.1f,\"%s_p99_us\":%.1f,\"%s_p999_us\":%.1f", name,
         h_pct(h, 50) / 1e3, name, h_pct(h, 90) / 1e3, name, h_pct(h, 99) / 1e3, name,
         h_pct(h, 99.9) / 1e3);
}

/* The scheduler's figures of the measured window, per message delivered in it: how
 * often the gateways' threads were woken (switches_per_msg) and how long they waited
 * runnable for a CPU (rq_wait_us_per_msg); the same wait for this process. A latency
 * tail with a large run-queue wait is the machine's CPUs being busy, not the path. */
static void j_sched(const sched_use *g0, const sched_use *g1, const sched_use *l0,
                    const sched_use *l1, long msgs)
{
    if (msgs <= 0)
        return;
    double m = (double)msgs;
    if (g0->slices && g1->slices >= g0->slices)
        jadd(",\"gw_switches_per_msg\":%.2f,\"gw_rq_wait_us_per_msg\":%.1f,"
             "\"gw_rq_wait_us_per_switch\":%.1f",
             (double)(g1->slices - g0->slices) / m, (double)(g1->wait_ns - g0->wait_ns) / 1e3 / m,
             g1->slices > g0->slices
                 ? (double)(g1->wait_ns - g0->wait_ns) / 1e3 / (double)(g1->slices - g0->slices)
                 : 0.0);
    if (l0->slices && l1->slices >= l0->slices)
        jadd(",\"load_rq_wait_us_per_msg\":%.1f", (double)(l1->wait_ns - l0->wait_ns) / 1e3 / m);
}

static void j_errors(void)
{
    jadd(",\"errors\":%ld,\"connect_fail\":%ld,\"handshake_fail\":%ld,\"closed\":%ld,"
         "\"error_frames\":%ld,\"ack_failed\":%ld,\"backlog_drop\":%ld",
         st.connect_fail + st.handshake_fail + st.closed + st.error_frames + st.ack_failed +
             st.backlog_drop,
         st.connect_fail, st.handshake_fail, st.closed, st.error_frames, st.ack_failed,
         st.backlog_drop);
}

static void j_end(void)
{
    jadd(",\"load1\":%.2f}\n", load1());
    fputs(jline, stdout);
    fflush(stdout);
    if (jf) {
        fputs(jline, jf);
        fflush(jf);
    }
}

/* ---- modes ---------------------------------------------------------------------- */

/* pairs and api: where a message's latency went (HS, HG, HR above) */
static void add_breakdown(int64_t stamp, int64_t built, int64_t now)
{
    if (!built)
        return;
    h_add(&HS, built - stamp);
    if (rx_arrival) {
        h_add(&HG, rx_arrival - built);
        h_add(&HR, now - rx_arrival);
    }
}

static void on_delivered(conn *r, int64_t stamp, int64_t built, int64_t now)
{
    st.recv_msgs++;
    if (strcmp(opt.mode, "pairs") == 0) {
        conn *s = &C[r->peer];
        if (s->inflight)
            s->inflight--;
        /* latency: every message sent in the measured window, whenever it arrives
         * (within --drain); rate: receipts inside the window */
        if (stamp >= measure_start && stamp <= send_end_ns) {
            h_add(&H, now - stamp);
            add_breakdown(stamp, built, now);
            if (measure_stop == 0 || now <= measure_stop)
                st.recv_measured++;
        } else {
            st.stale++;
        }
        return;
    }
    if (strcmp(opt.mode, "api") == 0) { /* as pairs: latency of every message sent in the
                                           window, rate from receipts inside it */
        if (stamp >= measure_start && stamp <= send_end_ns) {
            h_add(&H, now - stamp);
            add_breakdown(stamp, built, now);
            if (now <= send_end_ns)
                st.recv_measured++;
        } else {
            st.stale++;
        }
        return;
    }
    /* fanout: the stamp identifies the round (its send time) */
    if (stamp >= measure_start) {
        h_add(&H, now - stamp);
        st.recv_measured++;
        measure_stop = now; /* last receipt */
    } else {
        st.stale++;
    }
}

static int mode_pairs(void)
{
    /* even index: recipient r<i/2>; odd: its sender s<i/2> */
    for (long i = 0; i < nconns; i++) {
        C[i].sender = (uint8_t)(i & 1);
        C[i].peer = (uint32_t)(i ^ 1);
    }
    double ct = connect_all();
    if (st.open < nconns) {
        fprintf(stderr, "mgload: only %ld of %ld connections open\n", st.open, nconns);
    }
    run_for(opt.settle);
    long npairs = nconns / 2;
    bool flat = opt.rate <= 0;
    rt_minus_mono = realtime_offset();
    double cpu0 = -1;
    int64_t t0 = now_ns();
    measure_start = t0 + (int64_t)(opt.warmup * 1e9);
    int64_t send_end = t0 + (int64_t)((opt.warmup + opt.seconds) * 1e9);
    send_end_ns = send_end;
    long ticks0 = -1;
    sched_use gs0 = {0}, ls0 = {0};
    int64_t tick_t0 = 0;
    long sent_at_measure = -1;
    double period = flat ? 0 : 1e9 / opt.rate;
    long k = 0;
    int64_t now = t0;
    while (st.sent < opt.count && (now = now_ns()) < send_end) {
        if (ticks0 < 0 && now >= measure_start) {
            ticks0 = gw_ticks();
            gw_sched(&gs0);
            proc_sched(getpid(), &ls0);
            cpu0 = cpu_seconds_self();
            tick_t0 = now;
            sent_at_measure = st.sent;
        }
        if (flat) {
            for (long p = 0; p < npairs && st.sent < opt.count; p++) {
                conn *s = &C[2 * p + 1];
                if (s->state != C_OPEN || C[2 * p].state != C_OPEN)
                    continue;
                while (s->inflight < (uint32_t)opt.window && st.sent < opt.count)
                    send_msg(s, now_ns());
            }
            flush_dirty();
            poll_once(1000000);
        } else {
            int64_t due;
            int burst = 0;
            while ((due = t0 + (int64_t)((double)k * period)) <= now && st.sent < opt.count &&
                   burst < 4096) {
                conn *s = &C[2 * (k % npairs) + 1];
                k++;
                burst++;
                if (s->state != C_OPEN)
                    continue;
                send_msg(s, due);
            }
            flush_dirty();
            int64_t wait = t0 + (int64_t)((double)k * period) - now_ns();
            poll_once(wait > 1000000 ? 1000000 : wait);
        }
    }
    measure_stop = now_ns();
    long ticks1 = gw_ticks();
    sched_use gs1, ls1 = {0};
    gw_sched(&gs1);
    proc_sched(getpid(), &ls1);
    double cpu1 = cpu_seconds_self();
    long sent_measured = sent_at_measure >= 0 ? st.sent - sent_at_measure : 0;
    /* drain: what is in flight may still arrive (not counted in the rate) */
    int64_t drain_end = now_ns() + (int64_t)(opt.drain * 1e9);
    long inflight;
    do {
        inflight = 0;
        for (long p = 0; p < npairs; p++)
            inflight += C[2 * p + 1].inflight;
        if (!inflight)
            break;
        poll_once(10000000);
    } while (now_ns() < drain_end);
    double mwin = (double)(measure_stop - (tick_t0 ? tick_t0 : measure_start)) / 1e9;
    double hz = (double)sysconf(_SC_CLK_TCK);
    double cpu_s = ticks0 >= 0 && ticks1 >= 0 ? (double)(ticks1 - ticks0) / hz : -1;
    double rate = mwin > 0 ? (double)st.recv_measured / mwin : 0;
    j_begin();
    jadd(",\"priority\":\"%s\"", opt.low ? "low" : "high");
    jadd(",\"pairs\":%ld,\"open\":%ld,\"connect_seconds\":%.2f,\"target_rate\":%.0f,\"window\":%d,"
         "\"size\":%d",
         npairs, st.open, ct, opt.rate, flat ? opt.window : 0, opt.size);
    jadd(",\"seconds\":%.2f,\"sent\":%ld,\"sent_measured\":%ld,\"delivered\":%ld,\"delivered_"
         "measured\":%ld,"
         "\"lost\":%ld,\"msgs_per_s\":%.0f",
         mwin, st.sent, sent_measured, st.recv_msgs, st.recv_measured, inflight, rate);
    j_lat(&H);
    jadd(",\"gw_cpu_pct\":%.1f,\"gw_cpu_us_per_msg\":%.2f,\"gw_rss_kb\":%ld",
         cpu_s >= 0 && mwin > 0 ? cpu_s / mwin * 100 : -1.0,
         cpu_s >= 0 && st.recv_measured ? cpu_s * 1e6 / (double)st.recv_measured : -1.0,
         gw_rss_kb());
    /* the breakdown of the latency above, and this process's own CPU */
    j_stage("send_lag", &HS);
    j_stage("gw", &HG);
    j_stage("recv_lag", &HR);
    jadd(",\"load_cpu_pct\":%.1f", cpu0 >= 0 && mwin > 0 ? (cpu1 - cpu0) / mwin * 100 : -1.0);
    j_sched(&gs0, &gs1, &ls0, &ls1, st.recv_measured);
    j_errors();
    jadd(",\"acks_ok\":%ld,\"ack_path_local\":%ld,\"ack_path_grpc\":%ld,\"ack_path_kafka\":%ld,"
         "\"ack_path_redis_pubsub\":%ld,\"ack_path_nats\":%ld,\"ack_path_other\":%ld",
         st.acks_ok, st.path_local, st.path_grpc, st.path_kafka, st.path_pubsub, st.path_nats,
         st.path_other);
    j_end();
    return (st.open == nconns && inflight == 0 && st.ack_failed == 0 && st.closed == 0) ? 0 : 1;
}

/* fanout: the SendBatch call runs on its own thread */
typedef struct batch_call {
    mg_grpc_client *cli;
    Meshgate__V1__SendBatchRequest rq;
    Meshgate__V1__Message msg;
    char content[256];
    atomic_int done;
    int status;
    long delivered, other;
    double call_ms;
} batch_call;

static void *batch_thread(void *arg)
{
    batch_call *b = arg;
    ProtobufCMessage *out = NULL;
    char *details = NULL;
    int64_t t0 = now_ns();
    grpc_status_code code = mg_grpc_call(b->cli, "/meshgate.v1.Messaging/SendBatch", &b->rq.base,
                                         &meshgate__v1__send_batch_response__descriptor,
                                         (int)(opt.timeout * 1000), &out, &details);
    b->call_ms = (double)(now_ns() - t0) / 1e6;
    b->status = (int)code;
    b->delivered = b->other = 0;
    if (code == GRPC_STATUS_OK) {
        Meshgate__V1__SendBatchResponse *r = (Meshgate__V1__SendBatchResponse *)out;
        for (size_t i = 0; i < r->n_results; i++) {
            if (r->results[i]->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED)
                b->delivered++;
            else
                b->other++;
        }
        protobuf_c_message_free_unpacked(out, NULL);
    } else {
        fprintf(stderr, "mgload: SendBatch failed: %s %s\n", mg_grpc_code_name(code),
                details ? details : "");
    }
    free(details);
    atomic_store(&b->done, 1);
    return NULL;
}

/* The users of every connection (prefix + index), for SendBatch. */
static char **all_users(void)
{
    char **to = calloc((size_t)nconns, sizeof(char *));
    for (long i = 0; i < nconns; i++) {
        char u[160];
        snprintf(u, sizeof(u), "%s%ld", opt.prefix, i);
        to[i] = strdup(u);
    }
    return to;
}

static void users_free(char **to)
{
    for (long i = 0; i < nconns; i++)
        free(to[i]);
    free(to);
}

/* One SendBatch to every user; waits (within --timeout) until every open
 * connection got it and the call answered. *all_ms: until the last receipt
 * (-1: none). Returns whether all arrived and the call succeeded. */
static bool fanout_round(batch_call *b, char **to, double *all_ms)
{
    memset(&H, 0, sizeof(H));
    st.recv_measured = 0;
    measure_stop = 0;
    int64_t t0 = now_ns();
    measure_start = t0;
    meshgate__v1__send_batch_request__init(&b->rq);
    meshgate__v1__message__init(&b->msg);
    snprintf(b->content, sizeof(b->content), "mgb %" PRId64 " %.*s", t0,
             opt.size < 128 ? opt.size : 128, pad);
    b->msg.from = "bench-fanout";
    b->msg.content.data = (uint8_t *)b->content;
    b->msg.content.len = strlen(b->content);
    b->rq.message = &b->msg;
    b->rq.n_to = (size_t)nconns;
    b->rq.to = to;
    atomic_store(&b->done, 0);
    pthread_t th;
    pthread_create(&th, NULL, batch_thread, b);
    int64_t deadline = t0 + (int64_t)(opt.timeout * 1e9);
    while ((st.recv_measured < st.open || !atomic_load(&b->done)) && now_ns() < deadline)
        poll_once(2000000);
    pthread_join(th, NULL);
    *all_ms = measure_stop ? (double)(measure_stop - t0) / 1e6 : -1;
    return st.recv_measured >= st.open && b->status == 0;
}

/* How many of users[0..n) presence lists with a connection (GetPresence,
 * in calls of 1,000); -1 when a call failed. */
static long registered(mg_grpc_client *cli, char **users, long n)
{
    long got = 0;
    for (long off = 0; off < n; off += 1000) {
        Meshgate__V1__GetPresenceRequest rq = MESHGATE__V1__GET_PRESENCE_REQUEST__INIT;
        rq.users = users + off;
        rq.n_users = (size_t)(n - off < 1000 ? n - off : 1000);
        ProtobufCMessage *out = NULL;
        char *details = NULL;
        grpc_status_code code =
            mg_grpc_call(cli, "/meshgate.v1.Messaging/GetPresence", &rq.base,
                         &meshgate__v1__get_presence_response__descriptor, 10000, &out, &details);
        free(details);
        if (code != GRPC_STATUS_OK)
            return -1;
        Meshgate__V1__GetPresenceResponse *r = (Meshgate__V1__GetPresenceResponse *)out;
        for (size_t i = 0; i < r->n_users; i++)
            got += r->users[i]->n_connections > 0;
        protobuf_c_message_free_unpacked(out, NULL);
    }
    return got;
}

/* A user is reachable once the gateway registered its connection in
 * presence, which follows the handshake (a worker job; seconds behind it
 * on a loaded machine): a message sent before that is stored for the next
 * connection instead. Waits (within --timeout, serving the sockets) until
 * every open connection's user is registered: by the gateway's ready
 * frames, or by GetPresence while none came (a gateway older than them). */
static void wait_registered(mg_grpc_client *cli, char **users)
{
    int64_t deadline = now_ns() + (int64_t)(opt.timeout * 1e9);
    long got = 0;
    for (;;) {
        got = st.ready ? st.ready : registered(cli, users, nconns);
        if (got < 0 || got >= st.open || now_ns() >= deadline)
            break;
        run_for(st.ready ? 0.01 : 0.1);
    }
    if (got < st.open)
        fprintf(stderr, "mgload: %ld of %ld open users registered in presence\n", got, st.open);
}

static int mode_fanout(void)
{
    double ct = connect_all();
    run_for(opt.settle);
    char **to = all_users();
    batch_call *b = calloc(1, sizeof(*b));
    b->cli = mg_grpc_client_create(opt.grpc, NULL);
    wait_registered(b->cli, to);
    int rc = 0;
    hist all = {0};
    double best = 1e18, worst = 0, sum = 0;
    int rounds_ok = 0;
    long tick0 = gw_ticks();
    for (long r = 0; r < opt.rounds; r++) {
        double all_ms;
        bool ok = fanout_round(b, to, &all_ms);
        if (!ok)
            rc = 1;
        fprintf(stderr,
                "mgload: fanout round %ld: received %ld/%ld in %.1f ms (call %.1f ms, "
                "delivered %ld, other %ld)\n",
                r, st.recv_measured, st.open, all_ms, b->call_ms, b->delivered, b->other);
        if (ok) {
            rounds_ok++;
            sum += all_ms;
            if (all_ms < best)
                best = all_ms;
            if (all_ms > worst)
                worst = all_ms;
        }
        for (int i = 0; i < H_N; i++)
            all.c[i] += H.c[i];
        all.n += H.n;
        all.sum += H.sum;
        if (H.max > all.max)
            all.max = H.max;
        j_begin();
        jadd(",\"round\":%ld,\"conns\":%ld,\"open\":%ld,\"received\":%ld,\"all_received_ms\":%.2f,"
             "\"call_ms\":%.2f,\"grpc_status\":%d,\"result_delivered\":%ld,\"result_other\":%ld",
             r, nconns, st.open, st.recv_measured, all_ms, b->call_ms, b->status, b->delivered,
             b->other);
        j_lat(&H);
        j_errors();
        j_end();
        run_for(0.5);
    }
    long tick1 = gw_ticks();
    double hz = (double)sysconf(_SC_CLK_TCK);
    j_begin();
    jadd(",\"summary\":true,\"conns\":%ld,\"connect_seconds\":%.2f,\"rounds\":%ld,\"rounds_ok\":%d,"
         "\"all_received_ms_best\":%.2f,\"all_received_ms_mean\":%.2f,\"all_received_ms_worst\":%."
         "2f,"
         "\"msgs_per_s\":%.0f,\"gw_cpu_ms_per_round\":%.1f",
         nconns, ct, opt.rounds, rounds_ok, rounds_ok ? best : -1, rounds_ok ? sum / rounds_ok : -1,
         rounds_ok ? worst : -1, rounds_ok ? (double)nconns / (sum / rounds_ok / 1e3) : 0,
         tick0 >= 0 ? (double)(tick1 - tick0) / hz * 1e3 / (double)opt.rounds : -1.0);
    j_lat(&all);
    j_errors();
    j_end();
    mg_grpc_client_free(b->cli);
    free(b);
    users_free(to);
    return rc;
}

/* GET path from the gateway on --port (blocking, 5 s): the malloc'd body,
 * or NULL. */
static char *http_get(const char *path)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    struct timeval tv = {.tv_sec = 5};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons((uint16_t)opt.port)};
    inet_pton(AF_INET, opt.host, &dst.sin_addr);
    char req[256];
    int n = snprintf(req, sizeof(req), "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n",
                     path, hostbuf);
    if (connect(fd, (struct sockaddr *)&dst, sizeof(dst)) != 0 ||
        send(fd, req, (size_t)n, 0) != n) {
        close(fd);
        return NULL;
    }
    size_t len = 0, cap = 1 << 16;
    char *buf = malloc(cap);
    for (;;) {
        if (len + 4096 > cap)
            buf = realloc(buf, cap *= 2);
        ssize_t r = recv(fd, buf + len, cap - len - 1, 0);
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len > (8u << 20))
            break;
    }
    close(fd);
    buf[len] = 0;
    char *body = strstr(buf, "\r\n\r\n");
    if (!body) {
        free(buf);
        return NULL;
    }
    memmove(buf, body + 4, len - (size_t)(body + 4 - buf) + 1);
    return buf;
}

/* A sample's value in a Prometheus text body (-1: absent). */
static double metric_value(const char *body, const char *name_labels)
{
    char key[256];
    snprintf(key, sizeof(key), "\n%s ", name_labels);
    const char *p = body ? strstr(body, key) : NULL;
    return p ? strtod(p + strlen(key), NULL) : -1;
}

/* Appends "loop_conns":[n0,n1,...] (meshgate_ws_loop_connections) to the
 * JSON line: how the kernel spread the connections over the loops. */
static void j_loops(void)
{
    char *m = http_get("/metrics");
    jadd(",\"loop_conns\":[");
    for (int l = 0; l < 64; l++) {
        char key[96];
        snprintf(key, sizeof(key), "meshgate_ws_loop_connections{loop=\"%d\"}", l);
        double v = metric_value(m, key);
        if (v < 0)
            break;
        jadd("%s%.0f", l ? "," : "", v);
    }
    jadd("]");
    free(m);
}

/* --close: a close frame (1000) on every open connection, then waits
 * (within --timeout) for their echoes and for the gateway to count none. */
static void close_all(double *close_s, double *gw_left)
{
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(opt.timeout * 1e9);
    static const uint8_t code[2] = {0x03, 0xe8};
    for (long i = 0; i < nconns; i++) {
        if (C[i].state == C_OPEN) {
            send_frame(&C[i], 8, code, 2);
            st.closing++;
        }
    }
    flush_dirty();
    while (st.open > 0 && now_ns() < deadline)
        poll_once(2000000);
    *close_s = (double)(now_ns() - t0) / 1e9;
    *gw_left = -1;
    while (now_ns() < deadline) {
        char *m = http_get("/metrics");
        *gw_left = metric_value(m, "meshgate_ws_connections");
        free(m);
        if (*gw_left == 0)
            break;
        run_for(0.05);
    }
}

static int mode_idle(void)
{
    sleep(1);
    long rss0 = gw_rss_kb();
    double ct = connect_all();
    run_for(opt.settle); /* presence jobs, lws buffers settle */
    long rss1 = gw_rss_kb();
    long t0 = gw_ticks();
    int64_t w0 = now_ns();
    run_for(opt.hold);
    double wall = (double)(now_ns() - w0) / 1e9;
    long t1 = gw_ticks();
    long rss2 = gw_rss_kb();
    double hz = (double)sysconf(_SC_CLK_TCK);
    double cpu_pct = t0 >= 0 ? (double)(t1 - t0) / hz / wall * 100.0 : -1;
    long opened = st.open;
    j_begin();
    jadd(",\"conns\":%ld,\"open\":%ld,\"connect_seconds\":%.2f,\"connects_per_s\":%.0f", nconns,
         st.open, ct, ct > 0 ? (double)st.open / ct : 0.0);
    jadd(",\"gw_rss_kb_before\":%ld,\"gw_rss_kb_after\":%ld,\"gw_rss_kb_end\":%ld,"
         "\"rss_per_conn_bytes\":%.0f",
         rss0, rss1, rss2, st.open ? (double)(rss1 - rss0) * 1024.0 / (double)st.open : 0.0);
    jadd(",\"idle_seconds\":%.1f,\"gw_cpu_pct\":%.2f,\"gw_cpu_us_per_conn_per_s\":%.3f", wall,
         cpu_pct, st.open && cpu_pct >= 0 ? cpu_pct / 100.0 * 1e6 / (double)st.open : -1.0);
    j_loops();
    bool ok = st.open == nconns;
    if (opt.broadcast) {
        batch_call *b = calloc(1, sizeof(*b));
        b->cli = mg_grpc_client_create(opt.grpc, NULL);
        char **to = all_users();
        double all_ms;
        bool got = fanout_round(b, to, &all_ms);
        jadd(",\"broadcast_received\":%ld,\"broadcast_all_ms\":%.1f,\"broadcast_delivered\":%ld",
             st.recv_measured, all_ms, b->delivered);
        ok = ok && got;
        users_free(to);
        mg_grpc_client_free(b->cli);
        free(b);
    }
    if (opt.close) {
        double close_s, left;
        close_all(&close_s, &left);
        jadd(",\"closed_clean\":%ld,\"close_seconds\":%.2f,\"gw_conns_after_close\":%.0f",
             st.closed_clean, close_s, left);
        ok = ok && st.closed_clean == opened && left == 0;
    }
    j_errors();
    j_end();
    return ok ? 0 : 1;
}

/* ---- main ------------------------------------------------------------------------- */

/* ---- api: SendMessage from a service -------------------------------------- */

typedef struct api_call {
    mg_grpc_unary u;
    grpc_byte_buffer *req;
} api_call;

static struct {
    atomic_long sent, ok, failed, delivered, other;
    atomic_int stop;
    grpc_channel *ch;
    int64_t t0;
} api;

static grpc_byte_buffer *api_request(long k, int64_t stamp)
{
    char user[160], content[256];
    snprintf(user, sizeof(user), "%s%ld", opt.prefix, k % nconns);
    /* "mgb DUE BUILT": the receiver splits the latency as pairs does */
    snprintf(content, sizeof(content), "mgb %" PRId64 " %" PRId64 " %.*s", stamp, now_ns(),
             opt.size < 128 ? opt.size : 128, pad);
    Meshgate__V1__Message m = MESHGATE__V1__MESSAGE__INIT;
    m.from = "bench-api";
    m.to = user;
    m.content.data = (uint8_t *)content;
    m.content.len = strlen(content);
    m.priority =
        opt.low ? MESHGATE__V1__PRIORITY__PRIORITY_LOW : MESHGATE__V1__PRIORITY__PRIORITY_HIGH;
    Meshgate__V1__SendMessageRequest rq = MESHGATE__V1__SEND_MESSAGE_REQUEST__INIT;
    rq.message = &m;
    return mg_grpc_pack(&rq.base);
}

static void api_start(grpc_completion_queue *cq, api_call *c, long k, int64_t stamp)
{
    c->req = api_request(k, stamp);
    if (mg_grpc_unary_start(&c->u, api.ch, cq, "/meshgate.v1.Messaging/SendMessage", c->req, NULL,
                            0, (int64_t)(opt.timeout * 1000), c) != 0) {
        grpc_byte_buffer_destroy(c->req);
        free(c);
        atomic_fetch_add(&api.failed, 1);
        return;
    }
    atomic_fetch_add(&api.sent, 1);
}

static void api_finish(api_call *c, bool okev)
{
    grpc_byte_buffer *resp = NULL;
    char details[128];
    grpc_status_code code = mg_grpc_unary_finish(&c->u, okev, &resp, details, sizeof(details));
    if (code == GRPC_STATUS_OK) {
        atomic_fetch_add(&api.ok, 1);
        Meshgate__V1__SendMessageResponse *r = (Meshgate__V1__SendMessageResponse *)mg_grpc_unpack(
            &meshgate__v1__send_message_response__descriptor, resp);
        if (r && r->result &&
            (r->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED ||
             r->result->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_ACCEPTED))
            atomic_fetch_add(&api.delivered, 1);
        else
            atomic_fetch_add(&api.other, 1);
        if (r)
            protobuf_c_message_free_unpacked(&r->base, NULL);
    } else {
        if (atomic_fetch_add(&api.failed, 1) < 3)
            fprintf(stderr, "mgload: SendMessage: %s %s\n", mg_grpc_code_name(code), details);
    }
    if (resp)
        grpc_byte_buffer_destroy(resp);
    grpc_byte_buffer_destroy(c->req);
    free(c);
}

/* The next completion on cq, waiting at most 1 ms, or until due_ns when paced
 * (the next message of the --rate schedule). gRPC core rounds a completion
 * queue's deadline up to whole milliseconds, which made every paced send up
 * to 1 ms late (0.6 ms at the median at 2,000/s, counted as gateway latency
 * since the stamp is the scheduled time): when paced, completions are taken
 * without waiting and the wait for the next send is a clock_nanosleep. A
 * completion waits at most that long; only sends are timed. */
static grpc_event api_next_event(grpc_completion_queue *cq, bool paced, int64_t due_ns)
{
    if (!paced)
        return grpc_completion_queue_next(
            cq, gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC), gpr_time_from_millis(1, GPR_TIMESPAN)),
            NULL);
    grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
    if (ev.type == GRPC_OP_COMPLETE)
        return ev;
    int64_t wait_ns = due_ns - now_ns();
    if (wait_ns > 1000000)
        wait_ns = 1000000;
    if (wait_ns > 0) {
        struct timespec ts = {.tv_sec = 0, .tv_nsec = wait_ns};
        clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL);
    }
    return ev;
}

/* The sender thread: keeps --window calls in flight (flat out) or starts
 * them on the --rate schedule, until --count, the send end or stop. */
static void *api_thread(void *arg)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    bool flat = opt.rate <= 0;
    double period = flat ? 0 : 1e9 / opt.rate;
    long k = 0, inflight = 0;
    int64_t t0 = api.t0;
    for (;;) {
        int64_t now = now_ns();
        bool sending = !atomic_load(&api.stop) && now < send_end_ns && k < opt.count;
        if (sending && flat) {
            while (inflight < opt.window && k < opt.count) {
                api_start(cq, calloc(1, sizeof(api_call)), k++, now_ns());
                inflight++;
            }
        } else if (sending) {
            int64_t due;
            while ((due = t0 + (int64_t)((double)k * period)) <= now && k < opt.count) {
                api_start(cq, calloc(1, sizeof(api_call)), k++, due);
                inflight++;
            }
        }
        if (!sending && inflight == 0)
            break;
        grpc_event ev = api_next_event(cq, sending && !flat, t0 + (int64_t)((double)k * period));
        while (ev.type == GRPC_OP_COMPLETE) {
            api_finish(ev.tag, ev.success != 0);
            inflight--;
            ev = grpc_completion_queue_next(cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        }
    }
    mg_grpc_cq_destroy(cq);
    return NULL;
}

/* The --stream sender: one SendStream call; one message on the wire at a
 * time (gRPC's rule), --window results outstanding (flat out) or messages
 * started on the --rate schedule; then half-close and the status. */
enum { ST_SEND = 1, ST_RECV, ST_STATUS };

static int stream_results(grpc_byte_buffer *bb)
{
    Meshgate__V1__SendStreamResponse *r = (Meshgate__V1__SendStreamResponse *)mg_grpc_unpack(
        &meshgate__v1__send_stream_response__descriptor, bb);
    if (!r)
        return 0;
    int n = (int)r->n_results;
    for (size_t i = 0; i < r->n_results; i++) {
        Meshgate__V1__RecipientResult *rr = r->results[i]->result;
        atomic_fetch_add(&api.ok, 1);
        if (rr && (rr->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED ||
                   rr->status == MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_ACCEPTED))
            atomic_fetch_add(&api.delivered, 1);
        else
            atomic_fetch_add(&api.other, 1);
    }
    protobuf_c_message_free_unpacked(&r->base, NULL);
    return n;
}

static void *stream_thread(void *arg)
{
    (void)arg;
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    mg_grpc_stream s;
    int64_t life_ms = (int64_t)((opt.warmup + opt.seconds + opt.drain + opt.timeout) * 1000);
    int outstanding = mg_grpc_stream_open(&s, api.ch, cq, "/meshgate.v1.Messaging/SendStream", NULL,
                                          0, life_ms, (void *)(intptr_t)ST_STATUS,
                                          (void *)(intptr_t)ST_RECV, (void *)(intptr_t)ST_SEND);
    bool send_out = outstanding == 3, flat = opt.rate <= 0, closed = false, done = !send_out;
    bool status_came = false;
    double period = flat ? 0 : 1e9 / opt.rate;
    long k = 0, unanswered = 0;
    int64_t t0 = api.t0;
    while (outstanding > 0) {
        int64_t now = now_ns();
        bool sending = !closed && !atomic_load(&api.stop) && now < send_end_ns && k < opt.count;
        if (!send_out && !done) {
            int64_t due = flat ? now : t0 + (int64_t)((double)k * period);
            bool more = sending && (flat ? unanswered < opt.window : due <= now);
            bool end = !sending && !closed && (unanswered == 0 || atomic_load(&api.stop));
            if (more || end) {
                grpc_byte_buffer *bb = NULL;
                if (more) {
                    bb = api_request(k++, due);
                    unanswered++;
                    atomic_fetch_add(&api.sent, 1);
                } else {
                    closed = true;
                }
                send_out = mg_grpc_stream_send(&s, bb, (void *)(intptr_t)ST_SEND);
                outstanding += send_out;
                done = !send_out;
                continue;
            }
        }
        grpc_event ev =
            api_next_event(cq, sending && !flat && !send_out, t0 + (int64_t)((double)k * period));
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        outstanding--;
        switch ((int)(intptr_t)ev.tag) {
        case ST_SEND:
            send_out = false;
            mg_grpc_stream_send_done(&s);
            done = done || !ev.success;
            break;
        case ST_RECV:
            if (!ev.success || !s.recv) {
                done = true;
                break;
            }
            unanswered -= stream_results(s.recv);
            grpc_byte_buffer_destroy(s.recv);
            s.recv = NULL;
            outstanding += mg_grpc_stream_recv(&s, (void *)(intptr_t)ST_RECV);
            break;
        case ST_STATUS:
            done = status_came = true;
            if (s.status != GRPC_STATUS_OK)
                fprintf(stderr, "mgload: SendStream ended %s %.*s\n", mg_grpc_code_name(s.status),
                        (int)GRPC_SLICE_LENGTH(s.details),
                        (const char *)GRPC_SLICE_START_PTR(s.details));
            break;
        }
    }
    if (unanswered > 0)
        atomic_fetch_add(&api.failed, unanswered);
    mg_grpc_stream_release(&s, status_came);
    mg_grpc_cq_destroy(cq);
    return NULL;
}

static int mode_api(void)
{
    double ct = connect_all();
    run_for(opt.settle);
    grpc_init();
    grpc_channel_credentials *creds = grpc_insecure_credentials_create();
    api.ch = grpc_channel_create(opt.grpc, creds, NULL);
    grpc_channel_credentials_release(creds);
    rt_minus_mono = realtime_offset();
    int64_t t0 = now_ns();
    api.t0 = t0;
    measure_start = t0 + (int64_t)(opt.warmup * 1e9);
    send_end_ns = t0 + (int64_t)((opt.warmup + opt.seconds) * 1e9);
    pthread_t th;
    pthread_create(&th, NULL, opt.stream ? stream_thread : api_thread, NULL);
    long ticks0 = -1, sent0 = 0;
    double cpu0 = -1;
    sched_use gs0 = {0}, ls0 = {0}, gs1 = {0}, ls1 = {0};
    int64_t tick_t0 = 0, now;
    while ((now = now_ns()) < send_end_ns) {
        if (ticks0 < 0 && now >= measure_start) {
            ticks0 = gw_ticks();
            cpu0 = cpu_seconds_self();
            gw_sched(&gs0);
            proc_sched(getpid(), &ls0);
            tick_t0 = now;
            sent0 = atomic_load(&api.sent);
        }
        poll_once(1000000);
    }
    measure_stop = now_ns();
    long ticks1 = gw_ticks(), sent1 = atomic_load(&api.sent);
    double cpu1 = cpu_seconds_self();
    gw_sched(&gs1);
    proc_sched(getpid(), &ls1);
    int64_t drain_end = now_ns() + (int64_t)(opt.drain * 1e9);
    while (st.recv_msgs < atomic_load(&api.sent) - atomic_load(&api.failed) && now_ns() < drain_end)
        poll_once(10000000);
    atomic_store(&api.stop, 1);
    pthread_join(th, NULL);
    while (now_ns() < drain_end && st.recv_msgs < atomic_load(&api.ok))
        poll_once(10000000);
    grpc_channel_destroy(api.ch);
    grpc_shutdown();
    double mwin = (double)(send_end_ns - (tick_t0 ? tick_t0 : measure_start)) / 1e9;
    double hz = (double)sysconf(_SC_CLK_TCK);
    double cpu_s = ticks0 >= 0 && ticks1 >= 0 ? (double)(ticks1 - ticks0) / hz : -1;
    double rate = mwin > 0 ? (double)st.recv_measured / mwin : 0;
    long lost = atomic_load(&api.ok) - st.recv_msgs;
    j_begin();
    jadd(",\"priority\":\"%s\",\"conns\":%ld,\"open\":%ld,\"connect_seconds\":%.2f,"
         "\"target_rate\":%.0f,\"window\":%d,\"size\":%d,\"api\":\"%s\"",
         opt.low ? "low" : "high", nconns, st.open, ct, opt.rate, opt.rate > 0 ? 0 : opt.window,
         opt.size, opt.stream ? "SendStream" : "SendMessage");
    jadd(",\"seconds\":%.2f,\"sent\":%ld,\"sent_measured\":%ld,\"calls_ok\":%ld,"
         "\"calls_failed\":%ld,\"result_delivered\":%ld,\"result_other\":%ld,\"delivered\":%ld,"
         "\"delivered_measured\":%ld,\"lost\":%ld,\"msgs_per_s\":%.0f",
         mwin, atomic_load(&api.sent), sent1 - sent0, atomic_load(&api.ok),
         atomic_load(&api.failed), atomic_load(&api.delivered), atomic_load(&api.other),
         st.recv_msgs, st.recv_measured, lost > 0 ? lost : 0, rate);
    j_lat(&H);
    jadd(",\"gw_cpu_pct\":%.1f,\"gw_cpu_us_per_msg\":%.2f,\"gw_rss_kb\":%ld",
         cpu_s >= 0 && mwin > 0 ? cpu_s / mwin * 100 : -1.0,
         cpu_s >= 0 && st.recv_measured ? cpu_s * 1e6 / (double)st.recv_measured : -1.0,
         gw_rss_kb());
    j_stage("send_lag", &HS); /* scheduled -> request built (this process late) */
    j_stage("gw", &HG);       /* built -> the recipient's socket: gRPC client, both gateways */
    j_stage("recv_lag", &HR);
    jadd(",\"load_cpu_pct\":%.1f", cpu0 >= 0 && mwin > 0 ? (cpu1 - cpu0) / mwin * 100 : -1.0);
    j_sched(&gs0, &gs1, &ls0, &ls1, st.recv_measured);
    j_errors();
    j_end();
    return (st.open == nconns && atomic_load(&api.failed) == 0 && lost <= 0) ? 0 : 1;
}

static void usage(FILE *o)
{
    fprintf(o,
            "usage: mgload idle|pairs|fanout|api [options]\n"
            "  --host H (127.0.0.1) --port P (recipients' gateway) --send-port P (senders', "
            "default --port)\n"
            "  --src N            source addresses 127.0.0.2..; default ceil(conns/20000)\n"
            "  --parallel N       handshakes in flight (1000)  --connect-timeout S (120)\n"
            "  --prefix S         user name prefix (b<pid>-)\n"
            "  --gw-pid P[,P]     gateway pid(s): RSS from /proc/P/status, CPU from /proc/P/stat\n"
            "  --scenario S --path S --label S  tags in the JSON line  --json FILE (append)\n"
            "  idle:   --conns N --settle S (1) --hold S (10) [--broadcast --grpc HOST:PORT] "
            "[--close]\n"
            "  pairs:  --pairs N (64) --rate R msg/s (0 = flat out) --window W (16 per pair)\n"
            "          --count N (1000000) --seconds S (10) --warmup S (1) --size B (64) --drain S "
            "(5)\n"
            "          --low (priority low: the gateway acks without waiting for delivery)\n"
            "  fanout: --conns N --grpc HOST:PORT --rounds R (5) --timeout S (30)\n"
            "          [--port2 P: every second user connects to a second gateway on P]\n"
            "  api: --conns N --grpc HOST:PORT [--window W | --rate R] --seconds S --count N "
            "[--low]\n"
            "       [--stream: one SendStream call, W messages unanswered, instead of SendMessage "
            "calls]\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    opt.mode = argv[1];
    if (strcmp(opt.mode, "-h") == 0 || strcmp(opt.mode, "--help") == 0) {
        usage(stdout);
        return 0;
    }
    char defprefix[32];
    snprintf(defprefix, sizeof(defprefix), "b%d-", (int)getpid());
    opt.prefix = defprefix;
    const char *pids = NULL;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define S(name, field)                                                                             \
    if (strcmp(a, name) == 0 && v) {                                                               \
        field = v;                                                                                 \
        i++;                                                                                       \
        continue;                                                                                  \
    }
#define L(name, field)                                                                             \
    if (strcmp(a, name) == 0 && v) {                                                               \
        field = strtol(v, NULL, 10);                                                               \
        i++;                                                                                       \
        continue;                                                                                  \
    }
#define D(name, field)                                                                             \
    if (strcmp(a, name) == 0 && v) {                                                               \
        field = strtod(v, NULL);                                                                   \
        i++;                                                                                       \
        continue;                                                                                  \
    }
        S("--host", opt.host)
        S("--prefix", opt.prefix)
        S("--label", opt.label)
        S("--scenario", opt.scenario)
        S("--path", opt.path)
        S("--json", opt.json)
        S("--grpc", opt.grpc)
        S("--gw-pid", pids)
        L("--port", opt.port)
        L("--send-port", opt.send_port)
        L("--port2", opt.port2)
        L("--src", opt.nsrc)
        L("--parallel", opt.parallel)
        L("--conns", opt.conns)
        L("--pairs", opt.pairs)
        L("--count", opt.count)
        L("--rounds", opt.rounds)
        L("--window", opt.window)
        L("--size", opt.size)
        if (strcmp(a, "--low") == 0) {
            opt.low = 1;
            continue;
        }
        if (strcmp(a, "--stream") == 0) {
            opt.stream = 1;
            continue;
        }
        if (strcmp(a, "--broadcast") == 0) {
            opt.broadcast = 1;
            continue;
        }
        if (strcmp(a, "--close") == 0) {
            opt.close = 1;
            continue;
        }
        D("--rate", opt.rate)
        D("--seconds", opt.seconds)
        D("--warmup", opt.warmup)
        D("--hold", opt.hold)
        D("--settle", opt.settle)
        D("--connect-timeout", opt.connect_timeout)
        D("--drain", opt.drain)
        D("--timeout", opt.timeout)
        fprintf(stderr, "mgload: unknown or incomplete option %s\n", a);
        usage(stderr);
        return 2;
    }
    if (!opt.port) {
        fprintf(stderr, "mgload: --port is required\n");
        return 2;
    }
    if (opt.size < 0 || opt.size > 8000)
        opt.size = 64;
    memset(pad, 'x', sizeof(pad));
    for (const char *p = pids; p && *p;) {
        if (n_gw < MAX_GW)
            gw_pids[n_gw++] = atoi(p);
        p = strchr(p, ',');
        if (p)
            p++;
    }
    if (strcmp(opt.mode, "pairs") == 0)
        nconns = 2 * opt.pairs;
    else if (strcmp(opt.mode, "idle") == 0 || strcmp(opt.mode, "fanout") == 0 ||
             strcmp(opt.mode, "api") == 0)
        nconns = opt.conns;
    else {
        usage(stderr);
        return 2;
    }
    if (nconns <= 0 || nconns > 4000000) {
        fprintf(stderr, "mgload: bad connection count %ld\n", nconns);
        return 2;
    }
    if (opt.nsrc <= 0)
        opt.nsrc = (int)((nconns + 19999) / 20000);
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if ((rlim_t)nconns + 64 > rl.rlim_cur) {
        fprintf(stderr,
                "mgload: %ld connections need %ld file descriptors; the hard limit is %lu "
                "(raise it, or run several mgload processes)\n",
                nconns, nconns + 64, (unsigned long)rl.rlim_cur);
        return 2;
    }
    hostlen = (size_t)snprintf(hostbuf, sizeof(hostbuf), "%s:%d", opt.host, opt.port);
    signal(SIGPIPE, SIG_IGN);
    /* The --rate schedule waits in epoll_pwait2 for the next send: with the
     * default 50 us timer slack every such wait ended up to 50 us late, and
     * the stamp (the scheduled time) counted that as gateway latency. */
    prctl(PR_SET_TIMERSLACK, 1000UL);
    if (opt.json) {
        jf = fopen(opt.json, "a");
        if (!jf) {
            fprintf(stderr, "mgload: %s: %s\n", opt.json, strerror(errno));
            return 2;
        }
    }
    C = calloc((size_t)nconns, sizeof(conn));
    dirty_list = calloc((size_t)nconns, sizeof(uint32_t));
    for (long i = 0; i < nconns; i++)
        C[i].fd = -1;
    ep = epoll_create1(EPOLL_CLOEXEC);
    rng ^= (uint64_t)now_ns();
    int rc;
    if (strcmp(opt.mode, "idle") == 0)
        rc = mode_idle();
    else if (strcmp(opt.mode, "pairs") == 0)
        rc = mode_pairs();
    else if (strcmp(opt.mode, "api") == 0)
        rc = mode_api();
    else
        rc = mode_fanout();
    for (long i = 0; i < nconns; i++)
        conn_kill(&C[i]);
    free(C);
    free(dirty_list);
    close(ep);
    if (jf)
        fclose(jf);
    return rc;
}
