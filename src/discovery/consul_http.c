/* consul_http.c: HTTP requests to the Consul agent (libcurl).
 *
 * Each thread that talks to Consul owns one mg_consul_http: a curl multi
 * handle driven with curl_multi_poll, so that another thread can abort a
 * request (a 30 s blocking query, a connect to a black-holed agent) by
 * setting the abort flag and calling mg_consul__http_wakeup; the request then
 * ends within one poll round. Only the wakeup may be called from another
 * thread. Answers are bounded by MG_CONSUL_MAX_BODY.
 */
#include "discovery/consul_internal.h"
#include "common/mg_alloc.h"
#include "common/mg_time.h"

#include <ctype.h>
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

char *mg_consul__base_url(const char *addr)
{
    if (!addr)
        return NULL;
    while (isspace((unsigned char)*addr))
        addr++;
    const char *scheme = "http";
    if (strncmp(addr, "http://", 7) == 0) {
        addr += 7;
    } else if (strncmp(addr, "https://", 8) == 0) {
        scheme = "https";
        addr += 8;
    } else if (strstr(addr, "://")) {
        return NULL; /* unix:// and others are not supported */
    }
    size_t len = strlen(addr);
    while (len > 0 && (addr[len - 1] == '/' || isspace((unsigned char)addr[len - 1])))
        len--;
    if (len == 0 || memchr(addr, '/', len) || memchr(addr, ' ', len))
        return NULL;
    return mg_xasprintf("%s://%.*s", scheme, (int)len, addr);
}

int mg_consul__http_init(mg_consul_http *h, const char *addr, const char *token,
                         atomic_bool *abort_flag)
{
    memset(h, 0, sizeof(*h));
    h->base = mg_consul__base_url(addr);
    if (!h->base)
        return -EINVAL;
    if (token && token[0]) {
        if (strpbrk(token, "\r\n")) {
            free(h->base);
            h->base = NULL;
            return -EINVAL;
        }
        h->token_header = mg_xasprintf("X-Consul-Token: %s", token);
    }
    h->multi = curl_multi_init();
    if (!h->multi)
        abort(); /* curl fails here only on OOM */
    h->abort = abort_flag;
    return 0;
}

void mg_consul__http_cleanup(mg_consul_http *h)
{
    if (h->multi)
        curl_multi_cleanup(h->multi);
    free(h->base);
    free(h->token_header);
    memset(h, 0, sizeof(*h));
}

void mg_consul__http_wakeup(mg_consul_http *h)
{
    if (h->multi)
        curl_multi_wakeup(h->multi);
}

static bool aborted(const mg_consul_http *h)
{
    return h->abort && atomic_load(h->abort);
}

int mg_consul__http_sleep(mg_consul_http *h, int64_t ms)
{
    int64_t end = mg_mono_ms() + ms;
    for (;;) {
        if (aborted(h))
            return -ECANCELED;
        int64_t left = end - mg_mono_ms();
        if (left <= 0)
            return 0;
        /* With no transfers, curl_multi_poll just waits for timeout or wakeup. */
        curl_multi_poll(h->multi, NULL, 0, (int)(left > 1000 ? 1000 : left), NULL);
    }
}

struct sink {
    mg_consul_resp *r;
    size_t cap;
    bool too_big;
};

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg)
{
    struct sink *s = arg;
    size_t n = size * nmemb;
    if (s->r->len + n > MG_CONSUL_MAX_BODY) {
        s->too_big = true;
        return 0; /* makes curl fail the transfer */
    }
    if (s->r->len + n + 1 > s->cap) {
        size_t cap = s->cap ? s->cap : 4096;
        while (cap < s->r->len + n + 1)
            cap *= 2;
        s->r->body = mg_xrealloc(s->r->body, cap);
        s->cap = cap;
    }
    memcpy(s->r->body + s->r->len, data, n);
    s->r->len += n;
    s->r->body[s->r->len] = '\0';
    return n;
}

static size_t on_header(char *data, size_t size, size_t nmemb, void *arg)
{
    mg_consul_resp *r = arg;
    size_t n = size * nmemb;
    static const char name[] = "x-consul-index:";
    if (n > sizeof(name) - 1 && strncasecmp(data, name, sizeof(name) - 1) == 0) {
        char buf[32];
        size_t vlen = n - (sizeof(name) - 1);
        if (vlen >= sizeof(buf))
            vlen = sizeof(buf) - 1;
        memcpy(buf, data + sizeof(name) - 1, vlen);
        buf[vlen] = '\0';
        char *p = buf, *end;
        while (*p == ' ' || *p == '\t')
            p++;
        errno = 0;
        long long v = strtoll(p, &end, 10);
        while (*end == '\r' || *end == '\n' || *end == ' ')
            end++;
        r->index = (errno || end == p || *end) ? -1 : (int64_t)v;
    }
    return n;
}

static int xferinfo(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
    return aborted(arg) ? 1 : 0;
}

int mg_consul__request(mg_consul_http *h, const char *method, const char *path, const char *body,
                       long timeout_ms, mg_consul_resp *out)
{
    memset(out, 0, sizeof(*out));
    out->index = -1;
    out->body = mg_xstrdup("");
    struct sink sink = {.r = out, .cap = 1};
    int rc = 0;

    if (aborted(h)) {
        snprintf(out->err, sizeof(out->err), "aborted");
        return -ECANCELED;
    }
    CURL *e = curl_easy_init();
    if (!e)
        abort(); /* OOM */
    char *url = mg_xasprintf("%s%s", h->base, path);
    struct curl_slist *hdrs = NULL;
    if (h->token_header)
        hdrs = curl_slist_append(hdrs, h->token_header);
    if (body)
        hdrs = curl_slist_append(hdrs, "Content-Type: application/json");
    hdrs = curl_slist_append(hdrs, "Expect:");
    char errbuf[CURL_ERROR_SIZE] = "";

    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_CUSTOMREQUEST, method);
    if (body) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)strlen(body));
    } else if (strcmp(method, "PUT") == 0) {
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, "");
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, 0L);
    }
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, hdrs);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, &sink);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, on_header);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, out);
    curl_easy_setopt(e, CURLOPT_NOPROGRESS, 0L);
    curl_easy_setopt(e, CURLOPT_XFERINFOFUNCTION, xferinfo);
    curl_easy_setopt(e, CURLOPT_XFERINFODATA, h);
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, timeout_ms < 3000 ? timeout_ms : 3000L);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, errbuf);
    curl_easy_setopt(e, CURLOPT_USERAGENT, "meshgate/" MG_VERSION);
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");

    curl_multi_add_handle(h->multi, e);
    CURLcode res = CURLE_OK;
    bool done = false;
    while (!done) {
        int running = 0;
        CURLMcode mc = curl_multi_perform(h->multi, &running);
        if (mc != CURLM_OK) {
            res = CURLE_FAILED_INIT;
            snprintf(errbuf, sizeof(errbuf), "%s", curl_multi_strerror(mc));
            break;
        }
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(h->multi, &left))) {
            if (m->msg == CURLMSG_DONE && m->easy_handle == e) {
                res = m->data.result;
                done = true;
            }
        }
        if (done)
            break;
        if (aborted(h)) {
            res = CURLE_ABORTED_BY_CALLBACK;
            break;
        }
        curl_multi_poll(h->multi, NULL, 0, 1000, NULL);
    }
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &out->status);
    curl_multi_remove_handle(h->multi, e);

    if (res == CURLE_OK) {
        if (out->status >= 200 && out->status < 300) {
            rc = 0;
        } else {
            rc = out->status == 403 ? -EACCES : out->status == 404 ? -ENOENT : -EPROTO;
            size_t blen = out->len;
            while (blen > 0 && (out->body[blen - 1] == '\n' || out->body[blen - 1] == '\r'))
                blen--;
            snprintf(out->err, sizeof(out->err), "HTTP %ld: %.*s", out->status,
                     (int)(blen > 160 ? 160 : blen), out->body);
        }
    } else {
        switch (res) {
        case CURLE_COULDNT_CONNECT:
            rc = -ECONNREFUSED;
            break;
        case CURLE_COULDNT_RESOLVE_HOST:
            rc = -EHOSTUNREACH;
            break;
        case CURLE_OPERATION_TIMEDOUT:
            rc = -ETIMEDOUT;
            break;
        case CURLE_ABORTED_BY_CALLBACK:
            rc = -ECANCELED;
            break;
        case CURLE_WRITE_ERROR:
            rc = sink.too_big ? -EMSGSIZE : -EPROTO;
            break;
        default:
            rc = -EPROTO;
            break;
        }
        if (rc == -EMSGSIZE)
            snprintf(errbuf, sizeof(errbuf), "answer larger than %u bytes", MG_CONSUL_MAX_BODY);
        snprintf(out->err, sizeof(out->err), "%s", errbuf[0] ? errbuf : curl_easy_strerror(res));
        out->status = 0;
    }
    curl_easy_cleanup(e);
    curl_slist_free_all(hdrs);
    free(url);
    return rc;
}

void mg_consul__resp_free(mg_consul_resp *r)
{
    if (!r)
        return;
    free(r->body);
    r->body = NULL;
    r->len = 0;
}
