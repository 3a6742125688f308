/* fake_http.h: a raw HTTP/1.1 server on a loopback port that serves canned
 * answers, for the fault tests of the Consul client (malformed, truncated,
 * refused, hanging answers). Header-only so that unit and integration tests
 * can both include it. One thread per connection; every connection gets one
 * answer and is closed. Not a Consul mock for integration tests of the happy
 * path: those use the real agent.
 */
#ifndef MG_TEST_FAKE_HTTP_H
#define MG_TEST_FAKE_HTTP_H

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

typedef struct fake_http fake_http;
/* Returns the full raw answer (malloc'd; status line, headers, body), or
 * NULL for "not yet": it is asked again every 50 ms until it answers, the
 * client goes away or the server stops (a blocking query, a hung agent). */
typedef char *(*fake_http_fn)(fake_http *f, const char *method, const char *path,
                              const char *headers, const char *body);

#define FAKE_MAX_CONNS 256
#define FAKE_MAX_LOG   256

struct fake_http {
    int port, lfd;
    fake_http_fn fn;
    void *arg;
    atomic_bool stop;
    pthread_t acceptor;
    pthread_mutex_t mu;
    pthread_t conns[FAKE_MAX_CONNS];
    int nconns;
    char log[FAKE_MAX_LOG][160]; /* "METHOD path" of each request */
    int nlog;
    char token[128]; /* last X-Consul-Token seen */
};

struct fake_conn {
    fake_http *f;
    int fd;
};

static inline char *fake_answer(int status, const char *extra_headers, const char *body)
{
    char *s = NULL;
    if (asprintf(&s,
                 "HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %zu\r\n"
                 "Connection: close\r\n%s\r\n%s",
                 status, strlen(body), extra_headers ? extra_headers : "", body) < 0)
        abort();
    return s;
}

static inline void *fake_conn_main(void *arg)
{
    struct fake_conn *c = arg;
    fake_http *f = c->f;
    char buf[65536];
    size_t len = 0;
    char *end = NULL;
    /* read the head, then the body by Content-Length */
    while (!atomic_load(&f->stop) && len < sizeof(buf) - 1) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0)
            continue;
        ssize_t n = read(c->fd, buf + len, sizeof(buf) - 1 - len);
        if (n <= 0)
            goto out;
        len += (size_t)n;
        buf[len] = '\0';
        if ((end = strstr(buf, "\r\n\r\n"))) {
            const char *cl = strcasestr(buf, "\r\ncontent-length:");
            size_t want = cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0;
            if (len >= (size_t)(end + 4 - buf) + want)
                break;
        }
    }
    if (!end)
        goto out;
    *end = '\0';
    char method[16] = "", path[1024] = "";
    sscanf(buf, "%15s %1023s", method, path);
    pthread_mutex_lock(&f->mu);
    if (f->nlog < FAKE_MAX_LOG)
        snprintf(f->log[f->nlog++], sizeof(f->log[0]), "%.15s %.140s", method, path);
    const char *tok = strcasestr(buf, "\r\nx-consul-token:");
    if (tok)
        sscanf(tok + 17, " %127[^\r\n]", f->token);
    pthread_mutex_unlock(&f->mu);
    char *ans = NULL;
    while (!atomic_load(&f->stop) && !(ans = f->fn(f, method, path, buf, end + 4))) {
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        char junk[256];
        if (poll(&p, 1, 50) > 0 && read(c->fd, junk, sizeof(junk)) <= 0)
            goto out; /* the client left */
    }
    if (ans) {
        size_t off = 0, alen = strlen(ans);
        while (off < alen) {
            ssize_t n = write(c->fd, ans + off, alen - off);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        free(ans);
        shutdown(c->fd, SHUT_WR);
        /* let the client read everything before the close */
        for (int i = 0; i < 20; i++) {
            struct pollfd p = {.fd = c->fd, .events = POLLIN};
            if (poll(&p, 1, 50) > 0 && read(c->fd, buf, sizeof(buf)) <= 0)
                break;
        }
    }
out:
    close(c->fd);
    free(c);
    return NULL;
}

static inline void *fake_accept_main(void *arg)
{
    fake_http *f = arg;
    while (!atomic_load(&f->stop)) {
        struct pollfd p = {.fd = f->lfd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0)
            continue;
        int fd = accept(f->lfd, NULL, NULL);
        if (fd < 0)
            continue;
        pthread_mutex_lock(&f->mu);
        if (f->nconns == FAKE_MAX_CONNS) {
            pthread_mutex_unlock(&f->mu);
            close(fd);
            continue;
        }
        struct fake_conn *c = calloc(1, sizeof(*c));
        c->f = f;
        c->fd = fd;
        pthread_create(&f->conns[f->nconns++], NULL, fake_conn_main, c);
        pthread_mutex_unlock(&f->mu);
    }
    return NULL;
}

/* Starts on 127.0.0.1 with an ephemeral port; NULL on failure. */
static inline fake_http *fake_http_start(fake_http_fn fn, void *arg)
{
    fake_http *f = calloc(1, sizeof(*f));
    f->fn = fn;
    f->arg = arg;
    pthread_mutex_init(&f->mu, NULL);
    f->lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(f->lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t alen = sizeof(a);
    if (bind(f->lfd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(f->lfd, 64) < 0 ||
        getsockname(f->lfd, (struct sockaddr *)&a, &alen) < 0) {
        close(f->lfd);
        free(f);
        return NULL;
    }
    f->port = ntohs(a.sin_port);
    pthread_create(&f->acceptor, NULL, fake_accept_main, f);
    return f;
}

static inline int fake_http_count(fake_http *f, const char *prefix)
{
    int n = 0;
    pthread_mutex_lock(&f->mu);
    for (int i = 0; i < f->nlog; i++)
        n += strncmp(f->log[i], prefix, strlen(prefix)) == 0;
    pthread_mutex_unlock(&f->mu);
    return n;
}

static inline void fake_http_stop(fake_http *f)
{
    if (!f)
        return;
    atomic_store(&f->stop, true);
    pthread_join(f->acceptor, NULL);
    for (int i = 0; i < f->nconns; i++)
        pthread_join(f->conns[i], NULL);
    close(f->lfd);
    pthread_mutex_destroy(&f->mu);
    free(f);
}

#endif
