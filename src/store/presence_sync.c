/* presence_sync.c: presence across regions (presence_sync.h).
 *
 * Threads: ops run on store pool workers (as the wrapped store's); the
 * producer's delivery reports are served by librdkafka's background thread
 * (a queue-less producer polled by "presence-sync"); the consumer runs on
 * "presence-sync", which applies records one at a time and may block on this
 * region's Redis (it waits for the bus and the store, never for a message).
 */
#include "store/presence_sync.h"

#include "common/mg_alloc.h"
#include "common/mg_log.h"
#include "common/mg_map.h"
#include "common/mg_metrics.h"
#include "common/mg_time.h"

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <librdkafka/rdkafka.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define PS_MAX_GATEWAYS   64    /* per region and user, in a record or a view entry */
#define PS_MAX_RECORD     16384 /* bytes: longer records are skipped */
#define PS_RETRY_MAX_MS   2000  /* backoff cap when this region's Redis refuses a record */
#define PS_DEFAULT_TOPIC  "meshgate.presence"
#define PS_CREATE_WAIT_MS 5000
#define PS_CHECK_MS       1000 /* idle: how often the broker is asked whether we are caught up */
#define PS_POLL_MS        200

/* Snapshot: bump this region's version of the user, read its entries here,
 * store the view entry, return it. KEYS: presence hash, view hash.
 * ARGV: region, now_ms. Entries are "<gw>|<region>|<at>". */
static const char SNAPSHOT_LUA[] =
    "local last = tonumber(redis.call('HGET', KEYS[2], '#' .. ARGV[1]) or '0') "
    "local v = math.max(last + 1, tonumber(ARGV[2]) * 1000) "
    "redis.call('HSET', KEYS[2], '#' .. ARGV[1], string.format('%.0f', v)) "
    "local seen, gws = {}, {} "
    "for _, e in ipairs(redis.call('HVALS', KEYS[1])) do "
    "  local g, r = string.match(e, '^([^|]*)|([^|]*)|') "
    "  if g and r == ARGV[1] and not seen[g] then seen[g] = true; gws[#gws + 1] = g end "
    "end "
    "table.sort(gws) "
    "local val = string.format('%.0f', v) .. '|' .. ARGV[2] .. '|' .. table.concat(gws, ',') "
    "redis.call('HSET', KEYS[2], ARGV[1], val) "
    "return val";

/* Apply: compare-and-set of one region's entry. KEYS: view hash.
 * ARGV: region, version, value. Returns 1 applied, 0 older or equal. */
static const char APPLY_LUA[] = "local cur = redis.call('HGET', KEYS[1], ARGV[1]) "
                                "if cur then "
                                "  local cv = tonumber(string.match(cur, '^(%d+)|')) "
                                "  if cv and cv >= tonumber(ARGV[2]) then return 0 end "
                                "end "
                                "redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) "
                                "return 1";

typedef struct presence_sync {
    mg_presence base;
    mg_presence *inner;
    mg_redis_cluster *rc;
    char *region, *gateway_id, *topic, *brokers, *group;
    rd_kafka_t *producer;
    rd_kafka_t *consumer;
    pthread_t thread;
    bool started;
    atomic_bool stop;
    pthread_mutex_t mu; /* local */
    mg_map *local;      /* user -> live local connections (intptr_t) */
    atomic_llong lag_ms;
    mg_presence_online_fn online;
    void *online_arg;
    mg_metric *published, *publish_errors, *applied, *stale, *bad, *apply_errors, *lag_hist;
} presence_sync;

static double lag_seconds(void *arg)
{
    presence_sync *s = arg;
    return (double)atomic_load(&s->lag_ms) / 1000.0;
}

static void view_key(char *buf, size_t len, const char *user)
{
    snprintf(buf, len, "mg:v:{%s}", user);
}

/* ---- publishing ---------------------------------------------------------------- */

static void dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
    (void)rk;
    presence_sync *s = opaque;
    if (m->err) {
        mg_metric_add(s->publish_errors, 1);
        mg_log_warn("presence-sync", "record not replicated key=%.*s err=%s", (int)m->key_len,
                    (const char *)m->key, rd_kafka_err2str(m->err));
    } else {
        mg_metric_add(s->published, 1);
    }
}

/* Parses "<version>|<at_ms>|<gw>,<gw>..." */
static bool parse_entry(const char *v, uint64_t *version, int64_t *at_ms, const char **gws)
{
    char *end;
    unsigned long long ver = strtoull(v, &end, 10);
    if (end == v || *end != '|')
        return false;
    const char *p = end + 1;
    long long at = strtoll(p, &end, 10);
    if (end == p || *end != '|')
        return false;
    *version = ver;
    *at_ms = at;
    *gws = end + 1;
    return true;
}

static char *record_json(const char *user, const char *region, const char *entry)
{
    uint64_t version;
    int64_t at;
    const char *gws;
    if (!parse_entry(entry, &version, &at, &gws))
        return NULL;
    json_t *arr = json_array();
    char *copy = mg_xstrdup(gws), *save = NULL;
    for (char *g = strtok_r(copy, ",", &save); g; g = strtok_r(NULL, ",", &save))
        json_array_append_new(arr, json_string(g));
    free(copy);
    json_t *o = json_pack("{s:s, s:s, s:I, s:I, s:o}", "user", user, "region", region, "version",
                          (json_int_t)version, "at_ms", (json_int_t)at, "gateways", arr);
    char *out = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return out;
}

/* Snapshots the user's state in this region into the view and produces it. */
static int publish(presence_sync *s, const char *user)
{
    char pkey[4200], vkey[4200], now[24];
    snprintf(pkey, sizeof(pkey), "mg:p:{%s}", user);
    view_key(vkey, sizeof(vkey), user);
    snprintf(now, sizeof(now), "%" PRId64, mg_now_ms());
    const char *argv[] = {"EVAL", SNAPSHOT_LUA, "2", pkey, vkey, s->region, now};
    redisReply *r = NULL;
    int rc = mg_redis_cluster_command_argv(s->rc, &r, vkey, 7, argv, NULL);
    if (rc != 0 || r->type != REDIS_REPLY_STRING) {
        mg_log_warn("presence-sync", "snapshot failed user=%s err=%s", user,
                    rc ? strerror(-rc) : (r && r->type == REDIS_REPLY_ERROR ? r->str : "reply"));
        freeReplyObject(r);
        mg_metric_add(s->publish_errors, 1);
        return rc ? rc : -EIO;
    }
    char *json = record_json(user, s->region, r->str);
    freeReplyObject(r);
    if (!json)
        return -EIO;
    char key[4200];
    int klen = snprintf(key, sizeof(key), "%s/%s", s->region, user);
    rd_kafka_resp_err_t err =
        rd_kafka_producev(s->producer, RD_KAFKA_V_TOPIC(s->topic),
                          RD_KAFKA_V_KEY(key, (size_t)klen), RD_KAFKA_V_VALUE(json, strlen(json)),
                          RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_FREE), RD_KAFKA_V_END);
    if (err) {
        free(json);
        mg_metric_add(s->publish_errors, 1);
        mg_log_warn("presence-sync", "cannot queue record user=%s err=%s", user,
                    rd_kafka_err2str(err));
        return -EAGAIN;
    }
    return 0;
}

static void local_count(presence_sync *s, const char *user, int delta)
{
    pthread_mutex_lock(&s->mu);
    intptr_t n = (intptr_t)mg_map_get(s->local, user) + delta;
    if (n > 0)
        mg_map_put(s->local, user, (void *)n);
    else
        mg_map_del(s->local, user);
    pthread_mutex_unlock(&s->mu);
}

/* ---- the store ops --------------------------------------------------------------- */

static int ps_connect(mg_presence *p, const char *user, const char *conn_id, int64_t now_ms)
{
    presence_sync *s = (presence_sync *)p;
    int rc = s->inner->ops->connect(s->inner, user, conn_id, now_ms);
    if (rc == 0) {
        local_count(s, user, +1);
        publish(s, user); /* a failure is logged and counted; presence here holds */
    }
    return rc;
}

static int ps_disconnect(mg_presence *p, const char *user, const char *conn_id)
{
    presence_sync *s = (presence_sync *)p;
    int rc = s->inner->ops->disconnect(s->inner, user, conn_id);
    if (rc == 0) {
        local_count(s, user, -1);
        publish(s, user);
    }
    return rc;
}

/* Adds the other regions' gateways of a view hash reply to out, and sets
 * out->home_region when the newest entry is another region's. */
static void merge_view(presence_sync *s, const redisReply *r, mg_presence_list *out)
{
    if (!r || r->type != REDIS_REPLY_ARRAY)
        return;
    int64_t newest = -1;
    const char *home = NULL;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        const redisReply *f = r->element[i], *v = r->element[i + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING || f->str[0] == '#')
            continue;
        uint64_t version;
        int64_t at;
        const char *gws;
        if (!parse_entry(v->str, &version, &at, &gws))
            continue;
        if (at > newest) {
            newest = at;
            home = f->str;
        }
        if (!strcmp(f->str, s->region))
            continue; /* this region's connections come from the wrapped store */
        char *copy = mg_xstrdup(gws), *save = NULL;
        size_t n = 0;
        for (char *g = strtok_r(copy, ",", &save); g && n < PS_MAX_GATEWAYS;
             g = strtok_r(NULL, ",", &save), n++)
            mg_presence_list_add(out, "", g, f->str, at);
        free(copy);
    }
    free(out->home_region);
    out->home_region = home && strcmp(home, s->region) ? mg_xstrdup(home) : NULL;
}

static int ps_lookup_batch(mg_presence *p, const char *const *users, size_t n,
                           mg_presence_list *outs)
{
    presence_sync *s = (presence_sync *)p;
    int rc = n == 1 ? s->inner->ops->lookup(s->inner, users[0], &outs[0])
                    : s->inner->ops->lookup_batch(s->inner, users, n, outs);
    if (rc != 0)
        return rc;
    mg_redis_batch *b = mg_redis_batch_new();
    for (size_t i = 0; i < n; i++) {
        char vkey[4200];
        view_key(vkey, sizeof(vkey), users[i]);
        mg_redis_batch_add(b, vkey, "HGETALL %s", vkey);
    }
    rc = mg_redis_cluster_exec(s->rc, b);
    for (size_t i = 0; i < n; i++)
        merge_view(s, mg_redis_batch_reply(b, i), &outs[i]);
    mg_redis_batch_free(b);
    if (rc != 0) /* the view is a hint: local presence stands without it */
        mg_log_debug("presence-sync", "view read failed err=%s", strerror(-rc));
    return 0;
}

static int ps_lookup(mg_presence *p, const char *user, mg_presence_list *out)
{
    return ps_lookup_batch(p, &user, 1, out);
}

static int ps_renew(mg_presence *p)
{
    presence_sync *s = (presence_sync *)p;
    return s->inner->ops->renew(s->inner);
}

static int ps_remove_gateway(mg_presence *p)
{
    presence_sync *s = (presence_sync *)p;
    int rc = s->inner->ops->remove_gateway(s->inner);
    pthread_mutex_lock(&s->mu);
    size_t n = 0;
    char **users = mg_xcalloc(mg_map_size(s->local) + 1, sizeof(*users));
    const char *k;
    void *v;
    for (size_t it = 0; mg_map_next(s->local, &it, &k, &v);)
        users[n++] = mg_xstrdup(k);
    for (size_t i = 0; i < n; i++)
        mg_map_del(s->local, users[i]);
    pthread_mutex_unlock(&s->mu);
    for (size_t i = 0; i < n; i++) {
        if (rc == 0)
            publish(s, users[i]); /* the other regions see them leave now */
        free(users[i]);
    }
    free(users);
    if (s->producer)
        rd_kafka_flush(s->producer, 2000);
    return rc;
}

/* ---- consuming ------------------------------------------------------------------- */

/* Applies one record; returns 0 (applied, stale or skipped) or a negative
 * errno when this region's store failed (the record is tried again). */
static int apply_record(presence_sync *s, const void *data, size_t len)
{
    if (len > PS_MAX_RECORD) {
        mg_metric_add(s->bad, 1);
        return 0;
    }
    json_error_t jerr;
    json_t *o = json_loadb(data, len, 0, &jerr);
    const char *user = NULL, *region = NULL;
    json_int_t version = 0, at = 0;
    json_t *gws = NULL;
    if (!o ||
        json_unpack(o, "{s:s, s:s, s:I, s:I, s:o}", "user", &user, "region", &region, "version",
                    &version, "at_ms", &at, "gateways", &gws) != 0 ||
        !json_is_array(gws) || !*user || !*region || strchr(region, '|') || version <= 0 ||
        json_array_size(gws) > PS_MAX_GATEWAYS || strlen(user) > 4096) {
        json_decref(o);
        mg_metric_add(s->bad, 1);
        return 0;
    }
    if (!strcmp(region, s->region)) { /* this region's own: written at publish */
        json_decref(o);
        return 0;
    }
    char val[PS_MAX_RECORD + 64];
    int off = snprintf(val, sizeof(val), "%lld|%lld|", (long long)version, (long long)at);
    size_t i;
    json_t *g;
    bool ok = true;
    json_array_foreach(gws, i, g)
    {
        const char *gs = json_string_value(g);
        if (!gs || !*gs || strpbrk(gs, ",|") || off + strlen(gs) + 2 >= sizeof(val)) {
            ok = false;
            break;
        }
        off += snprintf(val + off, sizeof(val) - (size_t)off, "%s%s", i ? "," : "", gs);
    }
    if (!ok) {
        json_decref(o);
        mg_metric_add(s->bad, 1);
        return 0;
    }
    char vkey[4200], ver[24];
    view_key(vkey, sizeof(vkey), user);
    snprintf(ver, sizeof(ver), "%lld", (long long)version);
    const char *argv[] = {"EVAL", APPLY_LUA, "1", vkey, region, ver, val};
    redisReply *r = NULL;
    int rc = mg_redis_cluster_command_argv(s->rc, &r, vkey, 7, argv, NULL);
    if (rc == 0 && r->type == REDIS_REPLY_INTEGER) {
        mg_metric_add(r->integer ? s->applied : s->stale, 1);
        if (r->integer && json_array_size(gws) > 0 && s->online)
            s->online(s->online_arg, user, region);
        int64_t lag = mg_now_ms() - (int64_t)at;
        atomic_store(&s->lag_ms, lag > 0 ? lag : 0);
        mg_histogram_observe_us(s->lag_hist, lag > 0 ? lag * 1000 : 0);
    } else {
        rc = rc ? rc : -EIO;
        mg_metric_add(s->apply_errors, 1);
    }
    freeReplyObject(r);
    json_decref(o);
    return rc;
}

/* True when every assigned partition's position is at its high watermark
 * (asks the broker: blocks up to timeout_ms, on the sync thread only). */
static bool caught_up(presence_sync *s, int timeout_ms)
{
    rd_kafka_topic_partition_list_t *parts = NULL;
    if (rd_kafka_assignment(s->consumer, &parts) != RD_KAFKA_RESP_ERR_NO_ERROR)
        return false;
    bool ok = parts->cnt > 0 && rd_kafka_position(s->consumer, parts) == 0;
    for (int i = 0; ok && i < parts->cnt; i++) {
        int64_t lo = 0, hi = 0;
        rd_kafka_topic_partition_t *tp = &parts->elems[i];
        if (rd_kafka_query_watermark_offsets(s->consumer, tp->topic, tp->partition, &lo, &hi,
                                             timeout_ms) != RD_KAFKA_RESP_ERR_NO_ERROR)
            ok = false;
        else
            ok = hi == lo || (tp->offset >= 0 && tp->offset >= hi);
    }
    rd_kafka_topic_partition_list_destroy(parts);
    return ok;
}

static void *consume_main(void *arg)
{
    presence_sync *s = arg;
    int64_t caught_up_at = mg_mono_ms(), next_check = 0;
    while (!atomic_load(&s->stop)) {
        rd_kafka_message_t *m = rd_kafka_consumer_poll(s->consumer, PS_POLL_MS);
        if (!m || m->err) {
            if (m && m->err != RD_KAFKA_RESP_ERR__PARTITION_EOF)
                mg_log_warn("presence-sync", "consumer err=%s", rd_kafka_message_errstr(m));
            if (m)
                rd_kafka_message_destroy(m);
            /* Idle: the lag is 0 once the broker confirms nothing is left,
             * else it grows from the last time it did (broker unreachable). */
            if (mg_mono_ms() >= next_check) {
                next_check = mg_mono_ms() + PS_CHECK_MS;
                if (caught_up(s, PS_CHECK_MS))
                    caught_up_at = mg_mono_ms();
                atomic_store(&s->lag_ms, mg_mono_ms() - caught_up_at);
            }
            continue;
        }
        int backoff = 50;
        while (apply_record(s, m->payload, m->len) != 0 && !atomic_load(&s->stop)) {
            usleep((useconds_t)backoff * 1000); /* this region's Redis is down: the view waits */
            backoff = backoff * 2 > PS_RETRY_MAX_MS ? PS_RETRY_MAX_MS : backoff * 2;
        }
        if (!atomic_load(&s->stop)) {
            /* committed by the auto-commit timer */
            rd_kafka_offset_store(m->rkt, m->partition, m->offset);
            /* up to date as of the record's publication */
            caught_up_at = mg_mono_ms() - atomic_load(&s->lag_ms);
        }
        rd_kafka_message_destroy(m);
    }
    return NULL;
}

/* ---- life cycle ------------------------------------------------------------------ */

void mg_presence_sync_stop(mg_presence *p)
{
    presence_sync *s = (presence_sync *)p;
    if (s->started) {
        atomic_store(&s->stop, true);
        pthread_join(s->thread, NULL);
        s->started = false;
    }
    if (s->consumer) {
        rd_kafka_consumer_close(s->consumer); /* commits what was applied */
        rd_kafka_destroy(s->consumer);
        s->consumer = NULL;
    }
}

static void ps_free(mg_presence *p)
{
    presence_sync *s = (presence_sync *)p;
    mg_presence_sync_stop(p);
    if (s->producer) {
        rd_kafka_flush(s->producer, 2000);
        rd_kafka_destroy(s->producer);
    }
    mg_presence_free(s->inner);
    mg_map_free(s->local);
    pthread_mutex_destroy(&s->mu);
    free(s->region);
    free(s->gateway_id);
    free(s->topic);
    free(s->brokers);
    free(s->group);
    free(s);
}

static const struct mg_presence_ops ps_ops = {
    .name = "redis-cluster+sync",
    .connect = ps_connect,
    .disconnect = ps_disconnect,
    .lookup = ps_lookup,
    .lookup_batch = ps_lookup_batch,
    .renew = ps_renew,
    .remove_gateway = ps_remove_gateway,
    .free = ps_free,
    .nonblocking = false,
};

static bool set(rd_kafka_conf_t *conf, const char *k, const char *v, char *err, size_t errlen)
{
    char e[256];
    if (rd_kafka_conf_set(conf, k, v, e, sizeof(e)) == RD_KAFKA_CONF_OK)
        return true;
    snprintf(err, errlen, "presence sync: %s=%s: %s", k, v, e);
    return false;
}

static rd_kafka_t *make_client(presence_sync *s, rd_kafka_type_t type, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    char id[300];
    snprintf(id, sizeof(id), "%s-presence", s->gateway_id);
    bool ok = set(conf, "bootstrap.servers", s->brokers, err, errlen) &&
              set(conf, "client.id", id, err, errlen) &&
              set(conf, "reconnect.backoff.max.ms", "1000", err, errlen) &&
              set(conf, "log_level", "4", err, errlen);
    if (ok && type == RD_KAFKA_PRODUCER) {
        rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
        ok = set(conf, "enable.idempotence", "true", err, errlen) &&
             set(conf, "linger.ms", "5", err, errlen) &&
             set(conf, "message.timeout.ms", "60000", err, errlen);
    } else if (ok) {
        ok = set(conf, "group.id", s->group, err, errlen) &&
             set(conf, "auto.offset.reset", "earliest", err, errlen) &&
             set(conf, "enable.auto.offset.store", "false", err, errlen) &&
             set(conf, "auto.commit.interval.ms", "1000", err, errlen) &&
             set(conf, "fetch.wait.max.ms", "100", err, errlen);
    }
    if (!ok) {
        rd_kafka_conf_destroy(conf);
        return NULL;
    }
    rd_kafka_conf_set_opaque(conf, s);
    char e[256];
    rd_kafka_t *rk = rd_kafka_new(type, conf, e, sizeof(e)); /* owns conf on success */
    if (!rk) {
        rd_kafka_conf_destroy(conf);
        snprintf(err, errlen, "presence sync: %s", e);
    }
    return rk;
}

/* CreateTopics for the compacted topic; an existing topic is fine. */
static void create_topic(presence_sync *s, int partitions)
{
    char e[256];
    rd_kafka_NewTopic_t *nt = rd_kafka_NewTopic_new(s->topic, partitions, -1, e, sizeof(e));
    if (!nt)
        return;
    rd_kafka_NewTopic_set_config(nt, "cleanup.policy", "compact");
    rd_kafka_queue_t *q = rd_kafka_queue_new(s->producer);
    rd_kafka_AdminOptions_t *opt = rd_kafka_AdminOptions_new(s->producer, RD_KAFKA_ADMIN_OP_ANY);
    rd_kafka_AdminOptions_set_request_timeout(opt, PS_CREATE_WAIT_MS, e, sizeof(e));
    rd_kafka_CreateTopics(s->producer, &nt, 1, opt, q);
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, PS_CREATE_WAIT_MS + 1000);
    const char *why = "no answer";
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR__TIMED_OUT;
    if (ev && rd_kafka_event_type(ev) == RD_KAFKA_EVENT_CREATETOPICS_RESULT) {
        size_t n = 0;
        const rd_kafka_topic_result_t **t =
            rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
        err = n ? rd_kafka_topic_result_error(t[0]) : rd_kafka_event_error(ev);
        why = n ? rd_kafka_topic_result_error_string(t[0]) : rd_kafka_event_error_string(ev);
    }
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
        mg_log_info("presence-sync", "topic created topic=%s (compacted)", s->topic);
    else if (err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
        mg_log_warn("presence-sync", "topic create failed topic=%s err=%s reason=%s", s->topic,
                    rd_kafka_err2name(err), why ? why : "");
    if (ev)
        rd_kafka_event_destroy(ev);
    rd_kafka_AdminOptions_destroy(opt);
    rd_kafka_queue_destroy(q);
    rd_kafka_NewTopic_destroy(nt);
}

mg_presence *mg_presence_sync_create(mg_presence *inner, mg_redis_cluster *rc,
                                     const mg_presence_sync_config *cfg, char *err, size_t errlen)
{
    if (!cfg->brokers || !*cfg->brokers) {
        snprintf(err, errlen, "presence sync needs --kafka-brokers");
        mg_presence_free(inner);
        return NULL;
    }
    presence_sync *s = mg_new(presence_sync);
    s->base.ops = &ps_ops;
    s->inner = inner;
    s->rc = rc;
    s->region = mg_xstrdup(cfg->region);
    s->gateway_id = mg_xstrdup(cfg->gateway_id);
    s->topic = mg_xstrdup(cfg->topic && *cfg->topic ? cfg->topic : PS_DEFAULT_TOPIC);
    s->brokers = mg_xstrdup(cfg->brokers);
    size_t glen = strlen(s->region) + 32;
    s->group = mg_xmalloc(glen);
    snprintf(s->group, glen, "meshgate-presence-%s", s->region);
    pthread_mutex_init(&s->mu, NULL);
    s->local = mg_map_create(64);
    s->published = mg_counter("meshgate_presence_sync_records_total",
                              "Presence replication records", "kind=\"published\"");
    s->publish_errors = mg_counter("meshgate_presence_sync_records_total",
                                   "Presence replication records", "kind=\"publish_failed\"");
    s->applied = mg_counter("meshgate_presence_sync_records_total", "Presence replication records",
                            "kind=\"applied\"");
    s->stale = mg_counter("meshgate_presence_sync_records_total", "Presence replication records",
                          "kind=\"stale\"");
    s->bad = mg_counter("meshgate_presence_sync_records_total", "Presence replication records",
                        "kind=\"undecodable\"");
    s->apply_errors = mg_counter("meshgate_presence_sync_records_total",
                                 "Presence replication records", "kind=\"apply_failed\"");
    s->lag_hist = mg_histogram("meshgate_presence_sync_apply_seconds",
                               "From a presence change in another region to its view here", NULL);
    mg_gauge_fn_register("meshgate_presence_sync_lag_seconds",
                         "How far this region's view of the others is behind (0: caught up)", NULL,
                         lag_seconds, s);
    s->producer = make_client(s, RD_KAFKA_PRODUCER, err, errlen);
    if (!s->producer) {
        ps_free(&s->base);
        return NULL;
    }
    create_topic(s, cfg->partitions > 0 ? cfg->partitions : 6);
    return &s->base;
}

int mg_presence_sync_start(mg_presence *p, mg_presence_online_fn online, void *arg)
{
    presence_sync *s = (presence_sync *)p;
    if (s->started || s->consumer)
        return -EALREADY;
    s->online = online;
    s->online_arg = arg;
    char err[300];
    s->consumer = make_client(s, RD_KAFKA_CONSUMER, err, sizeof(err));
    if (!s->consumer) {
        mg_log_error("presence-sync", "%s", err);
        return -EINVAL;
    }
    rd_kafka_poll_set_consumer(s->consumer);
    rd_kafka_topic_partition_list_t *t = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(t, s->topic, RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t e = rd_kafka_subscribe(s->consumer, t);
    rd_kafka_topic_partition_list_destroy(t);
    if (e) {
        mg_log_error("presence-sync", "subscribe topic=%s err=%s", s->topic, rd_kafka_err2str(e));
        return -EINVAL;
    }
    atomic_store(&s->stop, false);
    if (pthread_create(&s->thread, NULL, consume_main, s) != 0)
        return -EAGAIN;
    pthread_setname_np(s->thread, "presence-sync");
    s->started = true;
    return 0;
}
