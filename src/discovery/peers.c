/* peers.c: the peer table (see peers.h).
 *
 * Owns the current snapshot of known peers and one gRPC channel per peer.
 *
 * DESIGN: a snapshot (mg_peer_set) is an immutable, refcounted array of
 * pointers to refcounted peer nodes; a node holds a refcounted channel. The
 * updater (the Consul watcher thread, serialized by update_mu) builds a new
 * snapshot next to the current one, reusing the node of every peer that did
 * not change and the channel of every peer whose address did not change, and
 * then swaps the pointer under `mu`. Readers hold `mu` only to take a
 * reference on the current snapshot, so a reader never waits on Consul I/O
 * or on channel creation. The last release of a snapshot releases its
 * nodes; the last release of a channel destroys it, on whichever thread
 * released it (grpc_channel_destroy does not block).
 *
 * Metrics: meshgate_peers (count) and meshgate_peers_age_seconds (time since
 * the last successful Consul answer, -1 before the first) read the first
 * live mg_peers of the process.
 */
#include "discovery/peers.h"
#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"

#include <grpc/grpc_security.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

struct chan {
    atomic_int refs;
    grpc_channel *ch;
};

struct node {
    mg_peer peer; /* first member: &node->peer == (mg_peer *)node */
    atomic_int refs;
    struct chan *chan;
};

struct mg_peer_set {
    atomic_int refs;
    size_t n;
    struct node **nodes;
};

struct mg_peers {
    pthread_mutex_t mu;        /* guards cur: pointer swap and refcount only */
    pthread_mutex_t update_mu; /* serializes updaters */
    mg_peer_set *cur;
    char *self_id;
    char *authority;
    int max_message_bytes;
    grpc_channel_credentials *creds;
    mg_map *bad;              /* id -> address of skipped entries already logged (update_mu) */
    _Atomic int64_t fresh_ms; /* mg_mono_ms of the last update, -1 before */
    atomic_size_t count;
};

/* --- metrics ------------------------------------------------------------- */

static pthread_mutex_t owner_mu = PTHREAD_MUTEX_INITIALIZER;
static mg_peers *owner; /* the mg_peers the gauges read */

static double gauge_age(void *arg)
{
    (void)arg;
    double v = -1;
    pthread_mutex_lock(&owner_mu);
    if (owner) {
        int64_t ms = mg_peers_age_ms(owner);
        v = ms < 0 ? -1 : (double)ms / 1000.0;
    }
    pthread_mutex_unlock(&owner_mu);
    return v;
}

static double gauge_count(void *arg)
{
    (void)arg;
    double v = 0;
    pthread_mutex_lock(&owner_mu);
    if (owner)
        v = (double)atomic_load(&owner->count);
    pthread_mutex_unlock(&owner_mu);
    return v;
}

/* --- refcounted pieces --------------------------------------------------- */

static void chan_release(struct chan *c)
{
    if (c && atomic_fetch_sub(&c->refs, 1) == 1) {
        grpc_channel_destroy(c->ch);
        free(c);
    }
}

static void node_release(struct node *n)
{
    if (n && atomic_fetch_sub(&n->refs, 1) == 1) {
        chan_release(n->chan);
        free(n->peer.id);
        free(n->peer.address);
        free(n->peer.region);
        free(n->peer.version);
        free(n->peer.buses);
        free(n);
    }
}

static mg_peer_set *set_new(size_t cap)
{
    mg_peer_set *s = mg_new(mg_peer_set);
    atomic_init(&s->refs, 1);
    s->nodes = cap ? mg_xcalloc(cap, sizeof(*s->nodes)) : NULL;
    return s;
}

void mg_peer_set_release(mg_peer_set *s)
{
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1)
        return;
    for (size_t i = 0; i < s->n; i++)
        node_release(s->nodes[i]);
    free(s->nodes);
    free(s);
}

static struct chan *chan_new(mg_peers *p, const char *address)
{
    grpc_arg args[3];
    size_t nargs = 0;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_SEND_MESSAGE_LENGTH;
    args[nargs++].value.integer = p->max_message_bytes;
    args[nargs].type = GRPC_ARG_INTEGER;
    args[nargs].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[nargs++].value.integer = p->max_message_bytes;
    if (p->authority[0]) {
        args[nargs].type = GRPC_ARG_STRING;
        args[nargs].key = GRPC_ARG_DEFAULT_AUTHORITY;
        args[nargs++].value.string = p->authority;
    }
    grpc_channel_args ca = {.num_args = nargs, .args = args};
    struct chan *c = mg_new(struct chan);
    atomic_init(&c->refs, 1);
    c->ch = grpc_channel_create(address, p->creds, &ca);
    return c;
}

/* --- the table ----------------------------------------------------------- */

static void free_bad(mg_map *m)
{
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(m, &it, &k, &v);)
        free(v);
    mg_map_free(m);
}

mg_peers *mg_peers_create(const char *self_id, const char *authority, int max_message_bytes)
{
    grpc_init();
    mg_peers *p = mg_new(mg_peers);
    pthread_mutex_init(&p->mu, NULL);
    pthread_mutex_init(&p->update_mu, NULL);
    p->cur = set_new(0);
    p->self_id = mg_xstrdup(self_id ? self_id : "");
    p->authority = mg_xstrdup(authority ? authority : "");
    p->max_message_bytes = max_message_bytes > 0 ? max_message_bytes : 4 * 1024 * 1024;
    p->creds = grpc_insecure_credentials_create();
    p->bad = mg_map_create(8);
    atomic_init(&p->fresh_ms, -1);
    atomic_init(&p->count, 0);

    pthread_mutex_lock(&owner_mu);
    if (!owner)
        owner = p;
    pthread_mutex_unlock(&owner_mu);
    mg_gauge_fn_register("meshgate_peers", "peer gateways known through discovery", NULL,
                         gauge_count, NULL);
    mg_gauge_fn_register("meshgate_peers_age_seconds",
                         "seconds since discovery last confirmed the peer table (-1: never)", NULL,
                         gauge_age, NULL);
    return p;
}

void mg_peers_free(mg_peers *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&owner_mu);
    if (owner == p)
        owner = NULL;
    pthread_mutex_unlock(&owner_mu);
    mg_peer_set_release(p->cur);
    free_bad(p->bad);
    grpc_channel_credentials_release(p->creds);
    pthread_mutex_destroy(&p->mu);
    pthread_mutex_destroy(&p->update_mu);
    free(p->self_id);
    free(p->authority);
    free(p);
    grpc_shutdown();
}

void mg_peers_set_credentials(mg_peers *p, grpc_channel_credentials *creds)
{
    grpc_channel_credentials_release(p->creds);
    p->creds = creds;
}

mg_peer_set *mg_peers_acquire(mg_peers *p)
{
    pthread_mutex_lock(&p->mu);
    mg_peer_set *s = p->cur;
    atomic_fetch_add(&s->refs, 1);
    pthread_mutex_unlock(&p->mu);
    return s;
}

size_t mg_peer_set_count(const mg_peer_set *s)
{
    return s->n;
}

const mg_peer *mg_peer_set_at(const mg_peer_set *s, size_t i)
{
    return i < s->n ? &s->nodes[i]->peer : NULL;
}

const mg_peer *mg_peer_set_find(const mg_peer_set *s, const char *id)
{
    /* Sorted by id in update(): binary search. */
    size_t lo = 0, hi = s->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(s->nodes[mid]->peer.id, id);
        if (c == 0)
            return &s->nodes[mid]->peer;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static bool valid_hostname(const char *h, size_t len)
{
    if (len == 0 || len > 253)
        return false;
    for (size_t i = 0; i < len; i++) {
        char c = h[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '-' || c == '_'))
            return false;
    }
    return h[0] != '-' && h[0] != '.';
}

int mg_peers_valid_address(const char *addr)
{
    if (!addr || !addr[0])
        return 0;
    const char *colon;
    if (addr[0] == '[') {
        const char *end = strchr(addr, ']');
        if (!end || end == addr + 1 || end[1] != ':')
            return 0;
        for (const char *c = addr + 1; c < end; c++)
            if (!strchr("0123456789abcdefABCDEF:.%", *c))
                return 0;
        colon = end + 1;
    } else {
        colon = strrchr(addr, ':');
        if (!colon || !valid_hostname(addr, (size_t)(colon - addr)))
            return 0;
    }
    const char *port = colon + 1;
    size_t plen = strlen(port);
    if (plen == 0 || plen > 5)
        return 0;
    long v = 0;
    for (const char *c = port; *c; c++) {
        if (*c < '0' || *c > '9')
            return 0;
        v = v * 10 + (*c - '0');
    }
    return v >= 1 && v <= 65535;
}

static int cmp_node(const void *a, const void *b)
{
    const struct node *x = *(struct node *const *)a, *y = *(struct node *const *)b;
    return strcmp(x->peer.id, y->peer.id);
}

static bool streq(const char *a, const char *b)
{
    return strcmp(a ? a : "", b ? b : "") == 0;
}

void mg_peers_update(mg_peers *p, const mg_peer *peers, size_t n)
{
    pthread_mutex_lock(&p->update_mu);
    mg_peer_set *old = mg_peers_acquire(p);
    mg_peer_set *s = set_new(n);
    mg_map *bad = mg_map_create(8);
    for (size_t i = 0; i < n; i++) {
        const mg_peer *in = &peers[i];
        if (!in->id || !in->id[0] || strcmp(in->id, p->self_id) == 0)
            continue;
        if (!mg_peers_valid_address(in->address)) {
            /* Logged once per entry and address, not on every update. */
            const char *addr = in->address ? in->address : "";
            const char *seen = mg_map_get(p->bad, in->id);
            if (!seen || strcmp(seen, addr) != 0)
                mg_log_warn("peers", "peer skipped: bad address peer=%s address=\"%s\"", in->id,
                            addr);
            free(mg_map_put(bad, in->id, mg_xstrdup(addr)));
            continue;
        }
        bool dup = false;
        for (size_t j = 0; j < s->n && !dup; j++)
            dup = strcmp(s->nodes[j]->peer.id, in->id) == 0;
        if (dup) {
            mg_log_warn("peers", "peer skipped: duplicate id peer=%s", in->id);
            continue;
        }
        const mg_peer *prev = mg_peer_set_find(old, in->id);
        struct node *pn = (struct node *)prev;
        struct node *nd;
        if (prev && streq(prev->address, in->address) && streq(prev->region, in->region) &&
            streq(prev->version, in->version) && streq(prev->buses, in->buses) &&
            prev->ws_port == in->ws_port) {
            nd = pn; /* unchanged: share the node */
            atomic_fetch_add(&nd->refs, 1);
        } else {
            nd = mg_new(struct node);
            atomic_init(&nd->refs, 1);
            nd->peer.id = mg_xstrdup(in->id);
            nd->peer.address = mg_xstrdup(in->address);
            nd->peer.region = mg_xstrdup(in->region ? in->region : "");
            nd->peer.version = mg_xstrdup(in->version ? in->version : "");
            nd->peer.buses = mg_xstrdup(in->buses ? in->buses : "");
            nd->peer.ws_port = in->ws_port;
            if (prev && streq(prev->address, in->address)) {
                nd->chan = pn->chan; /* same address: keep the channel */
                atomic_fetch_add(&nd->chan->refs, 1);
            } else {
                nd->chan = chan_new(p, in->address);
                mg_log_info("peers", "peer %s peer=%s address=%s region=%s",
                            prev ? "moved" : "added", in->id, in->address, nd->peer.region);
            }
            nd->peer.channel = nd->chan->ch;
        }
        s->nodes[s->n++] = nd;
    }
    if (s->n > 1)
        qsort(s->nodes, s->n, sizeof(*s->nodes), cmp_node);
    for (size_t i = 0; i < old->n; i++) {
        if (!mg_peer_set_find(s, old->nodes[i]->peer.id)) {
            mg_log_info("peers", "peer removed peer=%s address=%s", old->nodes[i]->peer.id,
                        old->nodes[i]->peer.address);
        }
    }

    pthread_mutex_lock(&p->mu);
    mg_peer_set *replaced = p->cur;
    p->cur = s;
    pthread_mutex_unlock(&p->mu);
    atomic_store(&p->count, s->n);
    atomic_store(&p->fresh_ms, mg_mono_ms());
    free_bad(p->bad);
    p->bad = bad;
    pthread_mutex_unlock(&p->update_mu);

    mg_peer_set_release(old);
    mg_peer_set_release(replaced);
}

int64_t mg_peers_age_ms(mg_peers *p)
{
    int64_t t = atomic_load(&p->fresh_ms);
    return t < 0 ? -1 : mg_mono_ms() - t;
}

void mg_peers_mark_fresh(mg_peers *p)
{
    atomic_store(&p->fresh_ms, mg_mono_ms());
}

static const char *state_name(grpc_connectivity_state st)
{
    switch (st) {
    case GRPC_CHANNEL_IDLE:
        return "IDLE";
    case GRPC_CHANNEL_CONNECTING:
        return "CONNECTING";
    case GRPC_CHANNEL_READY:
        return "READY";
    case GRPC_CHANNEL_TRANSIENT_FAILURE:
        return "TRANSIENT_FAILURE";
    case GRPC_CHANNEL_SHUTDOWN:
        return "SHUTDOWN";
    }
    return "UNKNOWN";
}

bool mg_peer_consumes(const mg_peer *peer, const char *bus)
{
    const char *list = peer->buses && peer->buses[0] ? peer->buses : "grpc,kafka";
    size_t n = strlen(bus);
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        if (len == n && !strncmp(p, bus, n))
            return true;
        p += len + (p[len] == ',');
    }
    return false;
}

bool mg_peers_region_consumes(mg_peers *p, const char *region, const char *bus)
{
    mg_peer_set *s = mg_peers_acquire(p);
    bool all = true;
    for (size_t i = 0; i < s->n && all; i++) {
        const mg_peer *e = &s->nodes[i]->peer;
        if (region && !strcmp(e->region, region))
            all = mg_peer_consumes(e, bus);
    }
    mg_peer_set_release(s);
    return all;
}

char *mg_peers_render_json(mg_peers *p)
{
    mg_peer_set *s = mg_peers_acquire(p);
    json_t *arr = json_array();
    for (size_t i = 0; i < s->n; i++) {
        const mg_peer *e = &s->nodes[i]->peer;
        json_array_append_new(
            arr, json_pack("{s:s, s:s, s:s, s:i, s:s, s:s, s:s}", "id", e->id, "address",
                           e->address, "region", e->region, "ws_port", e->ws_port, "version",
                           e->version, "buses", e->buses[0] ? e->buses : "grpc,kafka", "channel",
                           state_name(grpc_channel_check_connectivity_state(e->channel, 0))));
    }
    json_t *root =
        json_pack("{s:s, s:I, s:I, s:o}", "self", p->self_id, "age_ms",
                  (json_int_t)mg_peers_age_ms(p), "count", (json_int_t)s->n, "peers", arr);
    mg_peer_set_release(s);
    char *out = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!out)
        abort(); /* jansson fails only on OOM */
    return out;
}
