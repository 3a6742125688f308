/* mgrelay.c: a yardstick for the local user -> user latency (bench/README.md).
 *
 * Owns: the least a WebSocket relay of meshgate's shape can do, so that
 * mgload's figures against it show the floor of this machine and this load
 * generator (what no gateway running on the same cores can beat). Not a
 * gateway: no limits, no presence, no router, no pings; the relay answers
 * mgload's pairs mode only.
 * Shape, as meshgate's local path: N threads (--threads), each its own
 * SO_REUSEPORT listener and epoll loop owning the connections it accepted.
 * A "send" frame is answered on the sender's loop: a "message" frame of
 * the gateway's fields to the recipient's connection and an "ack" frame to
 * the sender. A recipient on another loop is reached through that loop's
 * inbox (a mutex and a list) and an eventfd written when the inbox was
 * empty, as the hub wakes a loop. Each loop turn writes every connection
 * with output once (one send() per connection per turn), as meshgate does.
 * Bounds: --seconds of running (default 120), at most MAX_CONNS connections,
 * frames of at most RBUF_MAX bytes; output buffers grow as needed (mgload
 * bounds what it sends).
 */
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 4096
#define MAX_LOOPS 16
#define RBUF_MAX  (64 * 1024)
#define USER_MAX  64
#define EVENTS    256
#define EV_LISTEN UINT32_MAX
#define EV_WAKEUP (UINT32_MAX - 1)

typedef struct rconn {
    int fd, loop;
    bool open, dirty;
    char user[USER_MAX];
    uint8_t rbuf[RBUF_MAX];
    size_t rlen;
    uint8_t *wbuf;
    size_t wlen, wcap;
    struct rconn *last_to; /* the recipient of this sender's last send */
} rconn;

typedef struct pending { /* a frame for a connection of another loop */
    struct pending *next;
    rconn *to;
    size_t len;
    uint8_t data[];
} pending;

typedef struct rloop {
    int idx, ep, lfd, efd;
    pthread_t thread;
    pthread_mutex_t mu; /* inbox */
    pending *inbox, **inbox_tail;
    rconn *dirty[MAX_CONNS];
    size_t ndirty;
} rloop;

static rloop loops[MAX_LOOPS];
static int nloops = 2, port;
static double seconds = 120;
static rconn *conns[MAX_CONNS]; /* by slot; users are looked up under users_mu */
static int nconns_total;
static pthread_mutex_t users_mu = PTHREAD_MUTEX_INITIALIZER;

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static rconn *find_user(const char *user, size_t len)
{
    rconn *r = NULL;
    pthread_mutex_lock(&users_mu);
    for (int i = 0; i < nconns_total && !r; i++)
        if (conns[i] && conns[i]->open && strlen(conns[i]->user) == len &&
            memcmp(conns[i]->user, user, len) == 0)
            r = conns[i];
    pthread_mutex_unlock(&users_mu);
    return r;
}

static void out_append(rloop *L, rconn *c, const void *p, size_t len)
{
    if (c->wlen + len > c->wcap) {
        c->wcap = (c->wlen + len) * 2;
        c->wbuf = realloc(c->wbuf, c->wcap);
        if (!c->wbuf)
            abort();
    }
    memcpy(c->wbuf + c->wlen, p, len);
    c->wlen += len;
    if (!c->dirty) {
        c->dirty = true;
        L->dirty[L->ndirty++] = c;
    }
}

/* An unmasked text frame (header + payload) into out; returns its length. */
static size_t text_frame(uint8_t *out, const char *payload, size_t len)
{
    size_t h = 0;
    out[h++] = 0x81;
    if (len < 126) {
        out[h++] = (uint8_t)len;
    } else {
        out[h++] = 126;
        out[h++] = (uint8_t)(len >> 8);
        out[h++] = (uint8_t)len;
    }
    memcpy(out + h, payload, len);
    return h + len;
}

/* The value of "key":"..." in a frame (no escapes in mgload's frames). */
static const char *field(const char *p, size_t len, const char *key, size_t *vlen)
{
    char k[32];
    int kl = snprintf(k, sizeof(k), "\"%s\":\"", key);
    const char *s = memmem(p, len, k, (size_t)kl);
    if (!s)
        return NULL;
    s += kl;
    const char *e = memchr(s, '"', len - (size_t)(s - p));
    if (!e)
        return NULL;
    *vlen = (size_t)(e - s);
    return s;
}

static void on_send(rloop *L, rconn *c, const char *p, size_t len)
{
    static _Thread_local uint64_t seq;
    size_t tl = 0, cl = 0;
    const char *to = field(p, len, "to", &tl), *content = field(p, len, "content", &cl);
    if (!to || !content || cl > 8192)
        return;
    char id[40], msg[9000];
    uint8_t fr[9100];
    snprintf(id, sizeof(id), "01a22b1c-%04d-7000-8000-%012" PRIu64, L->idx, ++seq);
    int n = snprintf(msg, sizeof(msg),
                     "{\"type\":\"message\",\"id\":\"%s\",\"from\":\"%s\",\"content\":\"%.*s\","
                     "\"sent_at_ms\":%" PRId64 ",\"inbox\":false}",
                     id, c->user, (int)cl, content, now_ms());
    rconn *r = c->last_to;
    if (!r || r->fd < 0 || strlen(r->user) != tl || memcmp(r->user, to, tl) != 0)
        r = c->last_to = find_user(to, tl);
    const char *status = r ? "delivered" : "failed";
    if (r) {
        size_t fl = text_frame(fr, msg, (size_t)n);
        if (r->loop == L->idx) {
            out_append(L, r, fr, fl);
        } else {
            rloop *T = &loops[r->loop];
            pending *q = malloc(sizeof(*q) + fl);
            if (!q)
                abort();
            q->next = NULL;
            q->to = r;
            q->len = fl;
            memcpy(q->data, fr, fl);
            pthread_mutex_lock(&T->mu);
            bool was_empty = T->inbox == NULL;
            *T->inbox_tail = q;
            T->inbox_tail = &q->next;
            pthread_mutex_unlock(&T->mu);
            if (was_empty) {
                uint64_t one = 1;
                if (write(T->efd, &one, sizeof(one)) < 0 && errno != EAGAIN)
                    perror("mgrelay: eventfd");
            }
        }
    }
    n = snprintf(msg, sizeof(msg),
                 "{\"type\":\"ack\",\"id\":\"%s\",\"status\":\"%s\",\"path\":\"local\"}", id,
                 status);
    out_append(L, c, fr, text_frame(fr, msg, (size_t)n));
}

static void conn_close(rloop *L, rconn *c)
{
    epoll_ctl(L->ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    pthread_mutex_lock(&users_mu);
    c->open = false;
    c->fd = -1;
    pthread_mutex_unlock(&users_mu);
}

static void on_handshake(rloop *L, rconn *c)
{
    uint8_t *end = memmem(c->rbuf, c->rlen, "\r\n\r\n", 4);
    if (!end)
        return;
    const char *u = memmem(c->rbuf, c->rlen, "user=", 5);
    size_t ul = 0;
    if (u) {
        u += 5;
        while (u + ul < (const char *)end && u[ul] != ' ' && u[ul] != '&' && ul < USER_MAX - 1)
            ul++;
    }
    pthread_mutex_lock(&users_mu);
    memcpy(c->user, u ? u : "", ul);
    c->user[ul] = 0;
    c->open = true;
    pthread_mutex_unlock(&users_mu);
    static const char resp[] = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                               "Connection: Upgrade\r\n"
                               "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    out_append(L, c, resp, sizeof(resp) - 1);
    size_t used = (size_t)(end - c->rbuf) + 4;
    memmove(c->rbuf, c->rbuf + used, c->rlen - used);
    c->rlen -= used;
}

/* Whole client frames from rbuf. Returns -1 to close. */
static int on_frames(rloop *L, rconn *c)
{
    size_t off = 0;
    while (c->rlen - off >= 6) {
        uint8_t *f = c->rbuf + off;
        int op = f[0] & 0x0f;
        uint64_t pl = f[1] & 0x7f;
        size_t h = 2;
        if (pl == 126) {
            pl = ((uint64_t)f[2] << 8) | f[3];
            h = 4;
        } else if (pl == 127) {
            return -1; /* mgload's frames are small */
        }
        if (c->rlen - off < h + 4 + pl)
            break;
        uint8_t *mk = f + h, *p = f + h + 4;
        for (uint64_t i = 0; i < pl; i++)
            p[i] ^= mk[i & 3];
        if (op == 8)
            return -1;
        if (op == 1 && memmem(p, pl, "\"type\":\"send\"", 13))
            on_send(L, c, (const char *)p, (size_t)pl);
        off += h + 4 + (size_t)pl;
    }
    memmove(c->rbuf, c->rbuf + off, c->rlen - off);
    c->rlen -= off;
    return 0;
}

static void on_readable(rloop *L, rconn *c)
{
    for (;;) {
        if (c->rlen == RBUF_MAX) {
            conn_close(L, c);
            return;
        }
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, RBUF_MAX - c->rlen, 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
            conn_close(L, c);
            return;
        }
        if (n < 0)
            return;
        c->rlen += (size_t)n;
        if (!c->open)
            on_handshake(L, c);
        if (c->open && on_frames(L, c) < 0) {
            conn_close(L, c);
            return;
        }
        if (c->rlen < RBUF_MAX && (size_t)n < RBUF_MAX / 2)
            return;
    }
}

static void take_inbox(rloop *L)
{
    uint64_t v;
    if (read(L->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
        perror("mgrelay: eventfd");
    pthread_mutex_lock(&L->mu);
    pending *q = L->inbox;
    L->inbox = NULL;
    L->inbox_tail = &L->inbox;
    pthread_mutex_unlock(&L->mu);
    while (q) {
        pending *n = q->next;
        if (q->to->fd >= 0)
            out_append(L, q->to, q->data, q->len);
        free(q);
        q = n;
    }
}

/* One send() per connection with output (blocking sockets would stall the
 * loop: a short write keeps the rest for the next turn). */
static void flush_all(rloop *L)
{
    size_t keep = 0;
    for (size_t i = 0; i < L->ndirty; i++) {
        rconn *c = L->dirty[i];
        if (c->fd < 0 || !c->wlen) {
            c->dirty = false;
            continue;
        }
        ssize_t n = send(c->fd, c->wbuf, c->wlen, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            memmove(c->wbuf, c->wbuf + n, c->wlen - (size_t)n);
            c->wlen -= (size_t)n;
        }
        if (c->wlen)
            L->dirty[keep++] = c; /* written again next turn */
        else
            c->dirty = false;
    }
    L->ndirty = keep;
}

static void on_accept(rloop *L)
{
    for (;;) {
        int fd = accept4(L->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        rconn *c = calloc(1, sizeof(*c));
        if (!c)
            abort();
        c->fd = fd;
        c->loop = L->idx;
        pthread_mutex_lock(&users_mu);
        int slot = nconns_total < MAX_CONNS ? nconns_total++ : -1;
        if (slot >= 0)
            conns[slot] = c;
        pthread_mutex_unlock(&users_mu);
        if (slot < 0) {
            close(fd);
            free(c);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)slot};
        epoll_ctl(L->ep, EPOLL_CTL_ADD, fd, &ev);
    }
}

static void *loop_main(void *arg)
{
    rloop *L = arg;
    struct epoll_event evs[EVENTS];
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        int n = epoll_wait(L->ep, evs, EVENTS, L->ndirty ? 0 : 100);
        for (int i = 0; i < n; i++) {
            uint32_t k = evs[i].data.u32;
            if (k == EV_LISTEN)
                on_accept(L);
            else if (k == EV_WAKEUP)
                take_inbox(L);
            else if (conns[k]->fd >= 0)
                on_readable(L, conns[k]);
        }
        flush_all(L);
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((double)(t.tv_sec - t0.tv_sec) > seconds)
            return NULL;
    }
}

int main(int argc, char **argv)
{
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--port") == 0)
            port = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--threads") == 0)
            nloops = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--seconds") == 0)
            seconds = atof(argv[i + 1]);
        else {
            fprintf(stderr, "usage: mgrelay --port P [--threads N (2)] [--seconds S (120)]\n");
            return 2;
        }
    }
    if (port <= 0 || nloops < 1 || nloops > MAX_LOOPS) {
        fprintf(stderr, "usage: mgrelay --port P [--threads N (2)] [--seconds S (120)]\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    for (int i = 0; i < nloops; i++) {
        rloop *L = &loops[i];
        L->idx = i;
        L->inbox_tail = &L->inbox;
        pthread_mutex_init(&L->mu, NULL);
        L->ep = epoll_create1(EPOLL_CLOEXEC);
        L->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        L->lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        setsockopt(L->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        setsockopt(L->lfd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        if (bind(L->lfd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(L->lfd, 4096) != 0) {
            perror("mgrelay: listen");
            return 1;
        }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = EV_LISTEN};
        epoll_ctl(L->ep, EPOLL_CTL_ADD, L->lfd, &ev);
        ev.data.u32 = EV_WAKEUP;
        epoll_ctl(L->ep, EPOLL_CTL_ADD, L->efd, &ev);
    }
    for (int i = 0; i < nloops; i++)
        pthread_create(&loops[i].thread, NULL, loop_main, &loops[i]);
    for (int i = 0; i < nloops; i++)
        pthread_join(loops[i].thread, NULL);
    for (int i = 0; i < nloops; i++) {
        take_inbox(&loops[i]);
        close(loops[i].ep);
        close(loops[i].efd);
        close(loops[i].lfd);
    }
    for (int i = 0; i < nconns_total; i++) {
        if (conns[i]->fd >= 0)
            close(conns[i]->fd);
        free(conns[i]->wbuf);
        free(conns[i]);
    }
    return 0;
}
