/* mgfanfloor.c: a yardstick for the fan-out (bench/README.md, mgfanfloor).
 *
 * Owns: the least a gateway can do for one SendBatch to N local WebSocket
 * users, so that `mgload fanout`'s time can be set against this machine's
 * floor: N loopback TCP writes of the gateway's message frame, one send()
 * each, plus their reads. No meshgate code: no gRPC call, router, presence
 * or per-recipient encoding; the frame is built once.
 * Shape: two processes, as the gateway and mgload are (and because 2 x N
 * sockets do not fit one process's RLIMIT_NOFILE in this container):
 *  - the writer side (the parent, the "gateway"): W writer threads
 *    (--writers, default 2, as the gateway's WebSocket loops on 2 cores),
 *    each owning every W-th accepted connection (non-blocking, TCP_NODELAY
 *    as the gateway's). A round: the main thread stamps t0 and wakes each
 *    writer through its eventfd (the hub wakes a loop by lws_cancel_service,
 *    a pipe write: the same one wake-up a loop); each writer sends the frame
 *    to each of its sockets with one send().
 *  - the reader side (the child, "mgload"): one thread, a level-triggered
 *    epoll over the N client sockets (1,024 events a wait, one recv per
 *    readable socket into a 256 KB buffer, as mgload does), counting
 *    frames. It blocks in epoll_wait, or with --busy polls (timeout 0)
 *    while a round is on.
 * A round's time runs from t0 to the reader's last frame (CLOCK_MONOTONIC
 * is one clock for both processes); a pause follows (--pause-ms, 500 as in
 * mgload fanout). CPU per round: the writer process (getrusage, its main
 * thread and writers; on loopback the receiving half of TCP runs in the
 * sender's softirq and is charged to the writer), the writer threads alone,
 * and the reader process.
 * Frame: an unmasked text frame holding a "message" of the gateway's fields
 * for mgload fanout's content ("mgb <ns> " and --size pad bytes, 64 as
 * mgload's default), so its length is the one the gateway writes.
 * Bounds: --rounds (20), --timeout a round (10 s), --seconds over all (120;
 * alarm() ends both processes 30 s past it), --conns at most MAX_CONNS and
 * what RLIMIT_NOFILE allows (checked before any socket is opened).
 * Output: one JSON line (stdout, and appended to --json FILE), scenario
 * "fanout" with mgload fanout's summary fields (bench/run.sh tables it with
 * them); a line per round on stderr.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS   100000
#define MAX_WRITERS 16
#define MAX_ROUNDS  1000
#define FD_SPARE    64 /* descriptors besides the sockets, per process */
#define EVENTS      1024
#define CTL_KEY     UINT32_MAX

static struct {
    long conns, rounds;
    int writers, size, pause_ms;
    double timeout, seconds;
    bool busy;
    const char *json, *label, *scenario;
} opt = {.conns = 10000,
         .rounds = 20,
         .writers = 2,
         .size = 64,
         .pause_ms = 500,
         .timeout = 10,
         .seconds = 120,
         .label = "fan-out floor",
         .scenario = "fanout"};

/* ---- clocks and CPU --------------------------------------------------------- */

static int64_t ts_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ns(void)
{
    return ts_ns(CLOCK_MONOTONIC);
}

static int64_t proc_cpu_ns(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ((int64_t)ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) * 1000000000 +
           ((int64_t)ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) * 1000;
}

/* The calling thread's time waiting runnable for a CPU (ns, schedstat's
 * second field; 0 without schedstats). */
static int64_t rq_wait_ns(void)
{
    unsigned long long run = 0, wait = 0;
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    if (f) {
        if (fscanf(f, "%llu %llu", &run, &wait) != 2)
            wait = 0;
        fclose(f);
    }
    return (int64_t)wait;
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

/* ---- the frame ------------------------------------------------------------------ */

static uint8_t frame[512];
static size_t frame_len;

/* The gateway's "message" frame for mgload fanout's SendBatch (ws_proto.c's
 * fields in its order; the id a UUIDv7 of 36 characters). */
static void frame_build(void)
{
    char pad[129], payload[400];
    memset(pad, 'x', sizeof(pad) - 1);
    pad[opt.size] = 0;
    int n = snprintf(payload, sizeof(payload),
                     "{\"type\":\"message\",\"id\":\"0193a7c2-5e1f-7a3b-8c4d-%012" PRIx64
                     "\",\"from\":\"bench-fanout\",\"content\":\"mgb %" PRId64
                     " %s\",\"sent_at_ms\":%" PRId64 ",\"inbox\":false}",
                     (uint64_t)now_ns() & (uint64_t)0xffffffffffff, now_ns(), pad,
                     ts_ns(CLOCK_REALTIME) / 1000000);
    size_t h = 0;
    frame[h++] = 0x81;
    if (n < 126) {
        frame[h++] = (uint8_t)n;
    } else {
        frame[h++] = 126;
        frame[h++] = (uint8_t)(n >> 8);
        frame[h++] = (uint8_t)n;
    }
    memcpy(frame + h, payload, (size_t)n);
    frame_len = h + (size_t)n;
}

/* ---- control: the writer process <-> the reader process (SOCK_SEQPACKET) -------- */

enum { CTL_READY = 1, CTL_ARM, CTL_ARMED, CTL_RESULT, CTL_STOP };

typedef struct ctl_msg {
    int type;
    int ok;       /* RESULT: all N frames arrived */
    long round;   /* ARM, RESULT; READY: connections open */
    long frames;  /* RESULT: frames counted this round */
    long bad;     /* RESULT: bytes not at a frame boundary, frames outside a round */
    long recvs;   /* RESULT: recv calls */
    long waits;   /* RESULT: epoll_wait calls */
    int64_t last; /* RESULT: the last frame's read (monotonic ns) */
    int64_t cpu;  /* RESULT: the reader process's CPU from ARM to the last frame */
    int64_t rq;   /* RESULT: the reader's wait for a CPU meanwhile (schedstat) */
} ctl_msg;

static int ctl_send(int fd, const ctl_msg *m)
{
    return send(fd, m, sizeof(*m), MSG_NOSIGNAL) == (ssize_t)sizeof(*m) ? 0 : -1;
}

/* Waits at most timeout_ms for a message; 0 or -1 (timeout, peer gone). */
static int ctl_recv(int fd, ctl_msg *m, int timeout_ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r;
    while ((r = poll(&p, 1, timeout_ms)) < 0 && errno == EINTR)
        ;
    if (r <= 0)
        return -1;
    return recv(fd, m, sizeof(*m), 0) == (ssize_t)sizeof(*m) ? 0 : -1;
}

/* ---- the reader process ("mgload") ------------------------------------------------ */

static uint8_t rdbuf[1 << 18];

static int reader_main(int ctl, int port)
{
    uint16_t *carry = calloc((size_t)opt.conns, sizeof(*carry)); /* partial frame's bytes */
    int *fds = calloc((size_t)opt.conns, sizeof(*fds));
    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (!carry || !fds || ep < 0) {
        perror("mgfanfloor: reader");
        return 1;
    }
    int nsrc = (int)((opt.conns + 19999) / 20000), one = 1;
    long open = 0;
    for (long i = 0; i < opt.conns; i++) { /* blocking connects; the writer side accepts */
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0) {
            perror("mgfanfloor: socket");
            break;
        }
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof(one));
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        struct sockaddr_in src = {.sin_family = AF_INET,
                                  .sin_addr.s_addr = htonl(0x7f000002u + (uint32_t)(i % nsrc))};
        struct sockaddr_in dst = {.sin_family = AF_INET,
                                  .sin_port = htons((uint16_t)port),
                                  .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(fd, (struct sockaddr *)&src, sizeof(src)) != 0 ||
            connect(fd, (struct sockaddr *)&dst, sizeof(dst)) != 0) {
            perror("mgfanfloor: connect");
            close(fd);
            break;
        }
        if (fcntl(fd, F_SETFL, O_NONBLOCK) != 0) {
            perror("mgfanfloor: fcntl");
            close(fd);
            break;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
        fds[i] = fd;
        open++;
    }
    ctl_msg m = {.type = CTL_READY, .round = open};
    if (ctl_send(ctl, &m) != 0 || open < opt.conns)
        return 1;
    struct epoll_event cev = {.events = EPOLLIN, .data.u32 = CTL_KEY};
    epoll_ctl(ep, EPOLL_CTL_ADD, ctl, &cev);

    static struct epoll_event evs[EVENTS];
    bool armed = false, stop = false;
    ctl_msg res = {0};
    int64_t arm_ns = 0, cpu0 = 0, rq0 = 0, last = 0;
    long stray = 0;
    while (!stop) {
        int n = epoll_wait(ep, evs, EVENTS, armed && opt.busy ? 0 : 100);
        if (armed)
            res.waits++;
        for (int k = 0; k < n; k++) {
            uint32_t key = evs[k].data.u32;
            if (key == CTL_KEY) {
                ctl_msg c;
                if (recv(ctl, &c, sizeof(c), 0) != (ssize_t)sizeof(c) || c.type == CTL_STOP) {
                    stop = true;
                    break;
                }
                if (c.type == CTL_ARM) {
                    memset(&res, 0, sizeof(res));
                    res.type = CTL_RESULT;
                    res.round = c.round;
                    res.bad = stray;
                    stray = 0;
                    armed = true;
                    cpu0 = proc_cpu_ns();
                    rq0 = rq_wait_ns();
                    arm_ns = now_ns();
                    ctl_msg a = {.type = CTL_ARMED, .round = c.round};
                    ctl_send(ctl, &a);
                }
                continue;
            }
            int fd = fds[key];
            for (;;) { /* one recv, another only when the buffer was filled */
                ssize_t r = recv(fd, rdbuf, sizeof(rdbuf), 0);
                if (armed)
                    res.recvs++;
                if (r <= 0) {
                    if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                        fprintf(stderr, "mgfanfloor: connection %u closed\n", key);
                        epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
                    }
                    break;
                }
                size_t len = (size_t)r, off = 0;
                long got = 0;
                if (carry[key]) { /* the rest of a frame begun by the last read */
                    size_t need = frame_len - carry[key];
                    if (len < need) {
                        carry[key] = (uint16_t)(carry[key] + len);
                        off = len;
                    } else {
                        off = need;
                        carry[key] = 0;
                        got++;
                    }
                }
                for (; off < len && !carry[key]; off += frame_len) {
                    if (rdbuf[off] != 0x81)
                        res.bad++;
                    if (len - off < frame_len)
                        carry[key] = (uint16_t)(len - off);
                    else
                        got++;
                }
                if (armed) {
                    res.frames += got;
                    if (got)
                        last = now_ns();
                } else {
                    stray += got;
                }
                if (len < sizeof(rdbuf))
                    break;
            }
        }
        if (armed &&
            (res.frames >= opt.conns || now_ns() - arm_ns > (int64_t)(opt.timeout * 1e9))) {
            res.ok = res.frames >= opt.conns;
            res.last = last;
            res.cpu = proc_cpu_ns() - cpu0;
            res.rq = rq_wait_ns() - rq0;
            armed = false;
            if (ctl_send(ctl, &res) != 0)
                stop = true;
        }
    }
    for (long i = 0; i < opt.conns; i++)
        close(fds[i]);
    close(ep);
    free(fds);
    free(carry);
    return 0;
}

/* ---- the writer process ("gateway") ---------------------------------------------- */

typedef struct writer {
    pthread_t th;
    int efd; /* wakes the writer for a round (or to stop) */
    int *fds;
    long nfds;
    int64_t start, done, cpu, rq; /* this round's: first send, after the last, thread CPU,
                                     wait for a CPU (schedstat) */
    long short_writes, errors;
} writer;

static writer W[MAX_WRITERS];
static atomic_bool stopping;
static int done_efd; /* each writer adds 1 when its round is written */

/* The rest of a short write, waiting for room within --timeout (counted: the
 * socket buffers hold far more than one small frame, so this is an error case). */
static int write_rest(int fd, size_t off)
{
    int64_t deadline = now_ns() + (int64_t)(opt.timeout * 1e9);
    while (off < frame_len && now_ns() < deadline) {
        struct pollfd p = {.fd = fd, .events = POLLOUT};
        poll(&p, 1, 100);
        ssize_t n = send(fd, frame + off, frame_len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0)
            off += (size_t)n;
        else if (n < 0 && errno != EAGAIN && errno != EINTR)
            return -1;
    }
    return off == frame_len ? 0 : -1;
}

static void *writer_main(void *arg)
{
    writer *w = arg;
    for (;;) {
        uint64_t v;
        if (read(w->efd, &v, sizeof(v)) != (ssize_t)sizeof(v)) {
            if (errno == EINTR)
                continue;
            return NULL;
        }
        if (atomic_load(&stopping))
            return NULL;
        int64_t cpu0 = ts_ns(CLOCK_THREAD_CPUTIME_ID), rq0 = rq_wait_ns();
        w->start = now_ns();
        for (long i = 0; i < w->nfds; i++) {
            ssize_t n = send(w->fds[i], frame, frame_len, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (n != (ssize_t)frame_len) {
                w->short_writes++;
                if (write_rest(w->fds[i], n > 0 ? (size_t)n : 0) != 0)
                    w->errors++;
            }
        }
        w->done = now_ns();
        w->cpu = ts_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
        w->rq = rq_wait_ns() - rq0;
        uint64_t one = 1;
        if (write(done_efd, &one, sizeof(one)) != (ssize_t)sizeof(one))
            perror("mgfanfloor: eventfd");
    }
}

/* Accepts N connections (non-blocking, TCP_NODELAY), dealt to the writers in
 * turn, until the reader reports READY; 0 when all N are open on both sides. */
static int accept_all(int lfd, int ctl)
{
    long got = 0, ready = -1;
    int64_t deadline = now_ns() + (int64_t)((opt.timeout + opt.conns / 1000.0) * 1e9);
    while ((got < opt.conns || ready < 0) && now_ns() < deadline) {
        struct pollfd p[2] = {{.fd = lfd, .events = POLLIN}, {.fd = ctl, .events = POLLIN}};
        if (poll(p, 2, 100) < 0 && errno != EINTR)
            break;
        if (p[1].revents) {
            ctl_msg m;
            if (recv(ctl, &m, sizeof(m), 0) != (ssize_t)sizeof(m) || m.type != CTL_READY)
                break;
            ready = m.round;
            if (ready < opt.conns)
                break;
        }
        while (got < opt.conns && (p[0].revents & POLLIN)) {
            int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
            if (fd < 0)
                break;
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
            writer *w = &W[got % opt.writers];
            w->fds[w->nfds++] = fd;
            got++;
        }
    }
    if (got == opt.conns && ready == opt.conns)
        return 0;
    fprintf(stderr, "mgfanfloor: connections: %ld accepted, the reader reports %ld, of %ld\n", got,
            ready, opt.conns);
    return -1;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void usage(void)
{
    fprintf(stderr,
            "usage: mgfanfloor [--conns N (10000)] [--writers W (2)] [--rounds R (20)]\n"
            "  [--busy] [--size BYTES of content pad (64, at most 128)] [--pause-ms MS (500)]\n"
            "  [--timeout S a round (10)] [--seconds S over all (120)] [--json FILE]\n"
            "  [--label TEXT] [--scenario NAME (fanout)]\n");
}

static int parse_args(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--busy") == 0) {
            opt.busy = true;
            continue;
        }
        if (!v)
            return -1;
        i++;
        if (strcmp(a, "--conns") == 0)
            opt.conns = atol(v);
        else if (strcmp(a, "--writers") == 0)
            opt.writers = atoi(v);
        else if (strcmp(a, "--rounds") == 0)
            opt.rounds = atol(v);
        else if (strcmp(a, "--size") == 0)
            opt.size = atoi(v);
        else if (strcmp(a, "--pause-ms") == 0)
            opt.pause_ms = atoi(v);
        else if (strcmp(a, "--timeout") == 0)
            opt.timeout = atof(v);
        else if (strcmp(a, "--seconds") == 0)
            opt.seconds = atof(v);
        else if (strcmp(a, "--json") == 0)
            opt.json = v;
        else if (strcmp(a, "--label") == 0)
            opt.label = v;
        else if (strcmp(a, "--scenario") == 0)
            opt.scenario = v;
        else
            return -1;
    }
    if (opt.conns < 1 || opt.conns > MAX_CONNS || opt.writers < 1 || opt.writers > MAX_WRITERS ||
        opt.rounds < 1 || opt.rounds > MAX_ROUNDS || opt.size < 0 || opt.size > 128 ||
        opt.pause_ms < 0 || opt.pause_ms > 10000 || !(opt.timeout > 0) || !(opt.seconds > 0))
        return -1;
    return 0;
}

/* RLIMIT_NOFILE up to its hard limit; each process holds N sockets. */
static int raise_nofile(void)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return -1;
    rlim_t need = (rlim_t)opt.conns + FD_SPARE;
    if (rl.rlim_max != RLIM_INFINITY && rl.rlim_max < need) {
        fprintf(stderr,
                "mgfanfloor: RLIMIT_NOFILE hard limit %llu is below the %llu descriptors "
                "--conns %ld needs per process; use fewer connections\n",
                (unsigned long long)rl.rlim_max, (unsigned long long)need, opt.conns);
        return -1;
    }
    rl.rlim_cur = rl.rlim_max;
    return setrlimit(RLIMIT_NOFILE, &rl);
}

int main(int argc, char **argv)
{
    if (parse_args(argc, argv) != 0) {
        usage();
        return 2;
    }
    if (raise_nofile() != 0)
        return 2;
    signal(SIGPIPE, SIG_IGN);
    frame_build();

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in la = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t ll = sizeof(la);
    int ctl[2];
    if (bind(lfd, (struct sockaddr *)&la, sizeof(la)) != 0 || listen(lfd, 4096) != 0 ||
        getsockname(lfd, (struct sockaddr *)&la, &ll) != 0 ||
        socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, ctl) != 0) {
        perror("mgfanfloor: listen");
        return 1;
    }
    unsigned bound = (unsigned)(opt.seconds + 30);
    pid_t child = fork();
    if (child < 0) {
        perror("mgfanfloor: fork");
        return 1;
    }
    if (child == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        alarm(bound);
        close(lfd);
        close(ctl[0]);
        _exit(reader_main(ctl[1], ntohs(la.sin_port)));
    }
    alarm(bound);
    close(ctl[1]);
    int c = ctl[0], rc = 0;
    int64_t run_start = now_ns();

    done_efd = eventfd(0, EFD_CLOEXEC);
    for (int i = 0; i < opt.writers; i++) {
        W[i].fds = calloc((size_t)(opt.conns / opt.writers + 1), sizeof(int));
        W[i].efd = eventfd(0, EFD_CLOEXEC);
        if (!W[i].fds || W[i].efd < 0 || done_efd < 0) {
            perror("mgfanfloor: writers");
            return 1;
        }
    }
    if (accept_all(lfd, c) != 0) {
        kill(child, SIGKILL);
        waitpid(child, NULL, 0);
        return 1;
    }
    close(lfd);
    double connect_s = (double)(now_ns() - run_start) / 1e9;
    for (int i = 0; i < opt.writers; i++)
        pthread_create(&W[i].th, NULL, writer_main, &W[i]);

    static double all_ms[MAX_ROUNDS], sorted[MAX_ROUNDS];
    double writes_ms = 0, wake_ms = 0, wcpu_ms = 0, gcpu_ms = 0, rcpu_ms = 0, recvs = 0, waits = 0,
           wrq_ms = 0, rrq_ms = 0;
    long rounds = 0, ok = 0, bad = 0;
    int64_t run_end = now_ns() + (int64_t)(opt.seconds * 1e9);
    for (long r = 0; r < opt.rounds && now_ns() < run_end; r++, rounds++) {
        ctl_msg m = {.type = CTL_ARM, .round = r};
        if (ctl_send(c, &m) != 0 || ctl_recv(c, &m, 5000) != 0 || m.type != CTL_ARMED) {
            fprintf(stderr, "mgfanfloor: the reader did not answer\n");
            rc = 1;
            break;
        }
        int64_t cpu0 = proc_cpu_ns(), t0 = now_ns();
        uint64_t one64 = 1, n = 0, v;
        for (int i = 0; i < opt.writers; i++)
            if (write(W[i].efd, &one64, sizeof(one64)) != (ssize_t)sizeof(one64))
                perror("mgfanfloor: eventfd");
        while (n < (uint64_t)opt.writers && read(done_efd, &v, sizeof(v)) == (ssize_t)sizeof(v))
            n += v; /* the writers are bounded by --timeout per short write */
        if (ctl_recv(c, &m, (int)(opt.timeout * 1000) + 2000) != 0 || m.type != CTL_RESULT) {
            fprintf(stderr, "mgfanfloor: no result from the reader for round %ld\n", r);
            rc = 1;
            break;
        }
        int64_t gcpu = proc_cpu_ns() - cpu0, first = INT64_MAX, done = 0, wcpu = 0, wrq = 0;
        for (int i = 0; i < opt.writers; i++) {
            first = W[i].start < first ? W[i].start : first;
            done = W[i].done > done ? W[i].done : done;
            wcpu += W[i].cpu;
            wrq += W[i].rq;
        }
        double ms = (double)(m.last - t0) / 1e6;
        fprintf(stderr,
                "mgfanfloor: round %ld: received %ld/%ld in %.1f ms (writers woken %.2f ms, "
                "written %.1f ms; CPU ms: writers %.1f, writer process %.1f, reader %.1f; "
                "waiting for a CPU ms: writers %.1f, reader %.1f)\n",
                r, m.frames, opt.conns, ms, (double)(first - t0) / 1e6, (double)(done - t0) / 1e6,
                (double)wcpu / 1e6, (double)gcpu / 1e6, (double)m.cpu / 1e6, (double)wrq / 1e6,
                (double)m.rq / 1e6);
        bad += m.bad;
        if (m.ok) {
            all_ms[ok++] = ms;
            writes_ms += (double)(done - t0) / 1e6;
            wake_ms += (double)(first - t0) / 1e6;
            wcpu_ms += (double)wcpu / 1e6;
            gcpu_ms += (double)gcpu / 1e6;
            rcpu_ms += (double)m.cpu / 1e6;
            wrq_ms += (double)wrq / 1e6;
            rrq_ms += (double)m.rq / 1e6;
            recvs += (double)m.recvs;
            waits += (double)m.waits;
        } else {
            rc = 1;
        }
        struct timespec p = {.tv_sec = opt.pause_ms / 1000,
                             .tv_nsec = (long)(opt.pause_ms % 1000) * 1000000};
        nanosleep(&p, NULL);
    }

    atomic_store(&stopping, true);
    uint64_t one64 = 1;
    for (int i = 0; i < opt.writers; i++) {
        if (write(W[i].efd, &one64, sizeof(one64)) != (ssize_t)sizeof(one64))
            perror("mgfanfloor: eventfd");
        pthread_join(W[i].th, NULL);
    }
    ctl_msg stop = {.type = CTL_STOP};
    ctl_send(c, &stop);
    int status = 0;
    waitpid(child, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        rc = 1;
    long short_writes = 0, werr = 0;
    for (int i = 0; i < opt.writers; i++) {
        short_writes += W[i].short_writes;
        werr += W[i].errors;
        for (long k = 0; k < W[i].nfds; k++)
            close(W[i].fds[k]);
        free(W[i].fds);
        close(W[i].efd);
    }
    close(done_efd);
    close(c);

    double sum = 0, d = ok ? (double)ok : 1;
    for (long i = 0; i < ok; i++)
        sum += sorted[i] = all_ms[i];
    qsort(sorted, (size_t)ok, sizeof(double), cmp_double);
    double med = !ok ? -1 : ok % 2 ? sorted[ok / 2] : (sorted[ok / 2 - 1] + sorted[ok / 2]) / 2;
    char line[2048];
    snprintf(line, sizeof(line),
             "{\"scenario\":\"%s\",\"path\":\"floor\",\"label\":\"%s\",\"mode\":\"fanfloor\","
             "\"ts\":%ld,\"summary\":true,\"conns\":%ld,\"writers\":%d,\"reader\":\"%s\","
             "\"frame_bytes\":%zu,\"connect_seconds\":%.2f,\"rounds\":%ld,\"rounds_ok\":%ld,"
             "\"all_received_ms_best\":%.2f,\"all_received_ms_median\":%.2f,"
             "\"all_received_ms_mean\":%.2f,\"all_received_ms_worst\":%.2f,"
             "\"writes_done_ms_mean\":%.2f,\"writers_woken_ms_mean\":%.3f,\"msgs_per_s\":%.0f,"
             "\"gw_cpu_ms_per_round\":%.1f,\"writer_threads_cpu_ms_per_round\":%.1f,"
             "\"load_cpu_ms_per_round\":%.1f,\"writers_rq_wait_ms_per_round\":%.1f,"
             "\"reader_rq_wait_ms_per_round\":%.1f,\"reader_recvs_per_round\":%.0f,"
             "\"reader_waits_per_round\":%.0f,\"short_writes\":%ld,\"errors\":%ld,"
             "\"load1\":%.2f}\n",
             opt.scenario, opt.label, (long)time(NULL), opt.conns, opt.writers,
             opt.busy ? "busy" : "epoll", frame_len, connect_s, rounds, ok, ok ? sorted[0] : -1,
             med, ok ? sum / d : -1, ok ? sorted[ok - 1] : -1, writes_ms / d, wake_ms / d,
             ok ? (double)opt.conns / (sum / d / 1e3) : 0, gcpu_ms / d, wcpu_ms / d, rcpu_ms / d,
             wrq_ms / d, rrq_ms / d, recvs / d, waits / d, short_writes, (rounds - ok) + werr + bad,
             load1());
    fputs(line, stdout);
    if (opt.json) {
        FILE *f = fopen(opt.json, "a");
        if (f) {
            fputs(line, f);
            fclose(f);
        } else {
            perror("mgfanfloor: --json");
        }
    }
    return rc;
}
