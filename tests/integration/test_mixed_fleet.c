/* A mixed fleet moving between buses under traffic (issue 12): four
 * gateways with Redis Cluster presence and Consul discovery, half of the
 * fleet on Redis Pub/Sub and half on Kafka, as during the migration of
 * docs/scaling.md (one region already moved):
 *
 *   region <tag>-p: p1, p2 consume redis-pubsub
 *   region <tag>-k: k1, k2 consume kafka
 *   every gateway: --near-route redis-pubsub,kafka,grpc,inbox
 *                  --far-route kafka,redis-pubsub,grpc,inbox
 *
 * A sender takes redis-pubsub only to a gateway that consumes it (and only
 * when it is on the bus itself: receipts come back on its own channel), and
 * Kafka only to a region whose every known gateway consumes it (and only
 * when it has a producer); the rest goes by gRPC direct (expected_path()
 * models the rule). Every ordered pair of the four gateways (12 lanes) sends
 * HIGH messages from a gRPC client of the sending gateway to a user on the
 * receiving one while p2 is restarted onto Kafka (the canary step: the
 * region becomes mixed, so Kafka is not yet its bus, but p2's own sends to
 * region k now take Kafka) and then back onto Redis Pub/Sub (the rollback).
 * Each restart keeps p2's id and ports; its user reconnects to it.
 *
 * Checked: every message accepted (DELIVERED, QUEUED or STORED; a send the
 * stopped gateway could not take is retried with the same id, as a client
 * does) reaches its user, live or from the inbox on a reconnect: 0 lost.
 * While the fleet is settled (before, between and after the moves) each
 * lane's messages take the bus the rule names and never a bus the target
 * does not consume. A message shown twice is reported; outside the
 * lanes into p2 during its restarts none is allowed (DESIGN.md: a repeat
 * needs a gateway stop or a lost Pub/Sub receipt, always with the same id).
 *
 * Isolation: Consul service, Kafka topic prefix, regions (so Kafka groups),
 * gateway and user names carry the pid.
 */
#include "common/mg_time.h"
#include "support/grpc_client.h"
#include "support/mg_test.h"
#include "support/ws_client.h"
#include "support/ws_user.h"

#include <criterion/criterion.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ST_DELIVERED MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_DELIVERED
#define ST_QUEUED    MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_QUEUED
#define ST_STORED    MESHGATE__V1__DELIVERY_STATUS__DELIVERY_STATUS_STORED
#define P_GRPC       MESHGATE__V1__PATH__PATH_GRPC
#define P_KAFKA      MESHGATE__V1__PATH__PATH_KAFKA
#define P_PUBSUB     MESHGATE__V1__PATH__PATH_REDIS_PUBSUB
#define P_INBOX      MESHGATE__V1__PATH__PATH_INBOX
#define P_MAX        8

#define NGW 4
enum { P1, P2, K1, K2 };
static const char *const gw_short[NGW] = {"p1", "p2", "k1", "k2"};

#define NLANE     (NGW * (NGW - 1))
#define LANE_MSGS 420 /* 12 lanes: 5,040 messages */
#define SETTLED   60  /* messages per lane in each settled phase */
#define MOVING    120 /* per lane while p2 moves, paced to span the restart */

/* Phases: even = settled, odd = p2 moving. */
enum { PH_BEFORE, PH_TO_KAFKA, PH_ON_KAFKA, PH_BACK, PH_AFTER, PH_N };
static const char *const phase_name[PH_N] = {"before", "p2 to kafka", "p2 on kafka",
                                             "p2 back to pubsub", "after"};
/* Where each phase's gate ends (messages per lane sent once it is open). */
static const int phase_gate[PH_N] = {SETTLED, SETTLED + MOVING, 2 * SETTLED + MOVING,
                                     2 * SETTLED + 2 * MOVING, LANE_MSGS};

/* ---- the fleet ------------------------------------------------------------------- */

typedef struct fleet {
    mg_gw *gw[NGW];
    bool on_kafka[NGW]; /* else on redis-pubsub */
    char id[NGW][64], ws_listen[NGW][32], grpc_listen[NGW][32], region[2][48];
    char svc[64], topic[64], tag[32];
} fleet;

static fleet F;

static const char *region_of(int g)
{
    return F.region[g >= K1];
}

static mg_gw *spawn(int g)
{
    const char *args[24] = {"--near-route",
                            "redis-pubsub,kafka,grpc,inbox",
                            "--far-route",
                            "kafka,redis-pubsub,grpc,inbox",
                            "--hot-threshold", /* no hot pairs: far routes keep their list */
                            "1000000",
                            "--ws-listen",
                            F.ws_listen[g],
                            "--grpc-listen",
                            F.grpc_listen[g],
                            "--inbox-max-messages",
                            "5000",
                            "--outbound-queue",
                            "2048",
                            "--log-level",
                            "info",
                            NULL};
    size_t n = 0;
    while (args[n])
        n++;
    if (!F.on_kafka[g]) { /* else Kafka, with the fleet's topic prefix */
        args[n++] = "--redis-pubsub";
        args[n++] = "true";
    }
    mg_gw *gw =
        mg_gw_spawn_fleet_kafka(F.id[g], F.svc, region_of(g), F.on_kafka[g] ? F.topic : NULL, args);
    cr_assert_not_null(gw, "gateway %s did not become ready", F.id[g]);
    return gw;
}

static const char *buses_of(int g)
{
    return F.on_kafka[g] ? "grpc,kafka" : "grpc,redis-pubsub";
}

/* Whether gateway at lists peer g with the buses g consumes now. */
static bool peer_shows(int at, int g)
{
    return mg_gw_peer_has_buses(F.gw[at], F.id[g], buses_of(g));
}

/* Every gateway lists every other one with the buses it consumes now. */
static bool fleet_settled(void *arg)
{
    (void)arg;
    for (int at = 0; at < NGW; at++)
        for (int g = 0; g < NGW; g++)
            if (g != at && !peer_shows(at, g))
                return false;
    return true;
}

/* The path the bus rule picks from gateway `from` to a user on `to` (the
 * route lists above; kafka needs a producer at the sender and every gateway
 * of the target region on Kafka; redis-pubsub needs both ends on it). */
static int expected_path(int from, int to)
{
    bool same_region = (from >= K1) == (to >= K1);
    bool region_kafka = F.on_kafka[to >= K1 ? K1 : P1] && F.on_kafka[to >= K1 ? K2 : P2];
    bool pubsub = !F.on_kafka[from] && !F.on_kafka[to];
    bool kafka = F.on_kafka[from] && region_kafka;
    if (same_region)
        return pubsub ? P_PUBSUB : kafka ? P_KAFKA : P_GRPC;
    return kafka ? P_KAFKA : pubsub ? P_PUBSUB : P_GRPC;
}

/* A bus the target does not consume (the rule must never pick it). */
static bool forbidden_path(int from, int to, int path)
{
    (void)from;
    bool region_kafka = F.on_kafka[to >= K1 ? K1 : P1] && F.on_kafka[to >= K1 ? K2 : P2];
    return (path == P_PUBSUB && F.on_kafka[to]) || (path == P_KAFKA && !region_kafka);
}

/* ---- users: one WebSocket connection each, back on its gateway after a restart ---- */

typedef struct user {
    char name[64];
    int gw;
    mg_wsuser *rd;
} user;

static user *U[NGW];

static mg_wsc *user_dial(void *arg)
{
    const user *u = arg;
    char url[192];
    snprintf(url, sizeof(url), "ws://%s/ws?user=%s", F.ws_listen[u->gw], u->name);
    return mg_wsc_connect(url, NULL, 3000, NULL);
}

static user *user_new(int g)
{
    user *u = calloc(1, sizeof(*u));
    snprintf(u->name, sizeof(u->name), "%s-u%s", F.tag, gw_short[g]);
    u->gw = g;
    mg_wsc *ws = user_dial(u);
    cr_assert_not_null(ws, "%s connects to %s", u->name, F.id[g]);
    u->rd = mg_wsuser_start(ws, user_dial, u);
    return u;
}

static void user_free(user *u)
{
    mg_wsuser_free(u->rd);
    free(u);
}

static int user_count(user *u, const char *id)
{
    return mg_wsuser_count(u->rd, id);
}

/* ---- sending ------------------------------------------------------------------------ */

typedef struct sent {
    grpc_status_code code;
    int status, path;
    char reason[160];
} sent;

static sent send_one(mg_grpc_client *c, const char *from, const char *to, const char *id)
{
    sent s = {.code = GRPC_STATUS_UNKNOWN};
    Meshgate__V1__SendMessageResponse *r = NULL;
    char *details = NULL;
    s.code = mg_tc_send(c, from, to, id, "hello", 1, 5000, &r, &details);
    if (s.code == GRPC_STATUS_OK && r && r->result) {
        s.status = (int)r->result->status;
        s.path = (int)r->result->path;
        snprintf(s.reason, sizeof(s.reason), "%s", r->result->reason ? r->result->reason : "");
    } else {
        snprintf(s.reason, sizeof(s.reason), "grpc %d: %s", (int)s.code, details ? details : "");
    }
    free(details);
    if (r)
        protobuf_c_message_free_unpacked(&r->base, NULL);
    return s;
}

static bool accepted(const sent *s)
{
    return s->code == GRPC_STATUS_OK &&
           (s->status == ST_DELIVERED || s->status == ST_QUEUED || s->status == ST_STORED);
}

/* Waits until the user's presence landed: a send from its own gateway is
 * delivered locally (probe ids only). */
static bool user_present(int g)
{
    mg_grpc_client *c = mg_grpc_client_create(F.gw[g]->grpc_addr, NULL);
    bool ok = false;
    for (int i = 0; i < 100 && !ok; i++) {
        char id[96];
        snprintf(id, sizeof(id), "%s-probe-%d-%d", U[g]->name, mg_wsuser_reconnects(U[g]->rd), i);
        sent s = send_one(c, "probe", U[g]->name, id);
        ok = accepted(&s) && s.status == ST_DELIVERED;
        if (!ok)
            usleep(50 * 1000);
    }
    mg_grpc_client_free(c);
    return ok;
}

static atomic_int phase, gate;

typedef struct lane {
    int from, to;
    pthread_t th;
    atomic_int sent;
    int status[LANE_MSGS], path[LANE_MSGS], retries[LANE_MSGS];
    unsigned char phase[LANE_MSGS];
    char reason[LANE_MSGS][64];
} lane;

static lane L[NLANE];

static void lane_id(const lane *l, int i, char *out, size_t len)
{
    snprintf(out, len, "%s-%s%s-%d", F.tag, gw_short[l->from], gw_short[l->to], i);
}

/* Sends LANE_MSGS HIGH messages in order, each retried with its id until
 * accepted (a stopped gateway refuses; its client is made again); waits at
 * the gate between phases. Bounded in count and time. */
static void *lane_main(void *arg)
{
    lane *l = arg;
    char from[64];
    snprintf(from, sizeof(from), "%s-s%s", F.tag, gw_short[l->from]);
    mg_grpc_client *c = mg_grpc_client_create(F.grpc_listen[l->from], NULL);
    int64_t end = mg_mono_ms() + 150000;
    for (int i = 0; i < LANE_MSGS && mg_mono_ms() < end; i++) {
        while (i >= atomic_load(&gate) && mg_mono_ms() < end)
            usleep(2000);
        int ph = atomic_load(&phase);
        char id[96];
        lane_id(l, i, id, sizeof(id));
        sent s;
        for (int attempt = 0;; attempt++) {
            s = send_one(c, from, U[l->to]->name, id);
            if (accepted(&s) || mg_mono_ms() >= end)
                break;
            l->retries[i]++;
            if (s.code != GRPC_STATUS_OK) { /* skip the channel's reconnect backoff */
                mg_grpc_client_free(c);
                c = mg_grpc_client_create(F.grpc_listen[l->from], NULL);
            }
            usleep(50 * 1000);
        }
        l->status[i] = accepted(&s) ? s.status : -1;
        l->path[i] = s.path;
        l->phase[i] = (unsigned char)ph;
        snprintf(l->reason[i], sizeof(l->reason[i]), "%.63s", s.reason);
        atomic_store(&l->sent, i + 1);
        usleep(ph % 2 ? 15000 : 1000); /* moving phases: spread over the restart */
    }
    mg_grpc_client_free(c);
    return NULL;
}

static bool lanes_reached(int n)
{
    for (int i = 0; i < NLANE; i++)
        if (atomic_load(&L[i].sent) < n)
            return false;
    return true;
}

static bool lanes_reached_gate(void *arg)
{
    (void)arg;
    return lanes_reached(atomic_load(&gate));
}

static void open_phase(int ph)
{
    atomic_store(&phase, ph);
    atomic_store(&gate, phase_gate[ph]);
}

/* p2 stops (its users are closed with 1012 and dial again), starts on the
 * other bus with its id and ports, and the fleet settles on its new buses;
 * the lanes send all along. */
static void move_p2(int ph)
{
    int64_t t0 = mg_mono_ms();
    int before = mg_wsuser_reconnects(U[P2]->rd);
    open_phase(ph);
    cr_expect_eq(mg_gw_stop(F.gw[P2]), 0, "%s exits cleanly", F.id[P2]);
    mg_gw_free(F.gw[P2]);
    F.on_kafka[P2] = !F.on_kafka[P2];
    F.gw[P2] = spawn(P2);
    int64_t up = mg_mono_ms();
    cr_assert(mg_wait_until(fleet_settled, NULL, 30000), "the fleet sees %s on %s", F.id[P2],
              buses_of(P2));
    for (int64_t end = mg_mono_ms() + 30000;
         (mg_wsuser_reconnects(U[P2]->rd) == before || !mg_wsuser_connected(U[P2]->rd)) &&
         mg_mono_ms() < end;)
        usleep(20 * 1000);
    cr_assert(user_present(P2), "%s is back on %s", U[P2]->name, F.id[P2]);
    printf("mixed fleet: %s: p2 down and up in %lld ms, settled %lld ms later\n", phase_name[ph],
           (long long)(up - t0), (long long)(mg_mono_ms() - up));
    cr_assert(mg_wait_until(lanes_reached_gate, NULL, 60000), "the lanes ran through %s",
              phase_name[ph]);
}

/* ---- the check ------------------------------------------------------------------------ */

/* Accepted messages not (yet) shown to their user; prints the first few
 * when verbose. */
static int missing_ex(bool verbose, bool stored_too)
{
    int n = 0;
    for (int k = 0; k < NLANE; k++) {
        lane *l = &L[k];
        for (int i = 0; i < atomic_load(&l->sent); i++) {
            char id[96];
            lane_id(l, i, id, sizeof(id));
            if (l->status[i] < 0 || (!stored_too && l->status[i] == ST_STORED) ||
                user_count(U[l->to], id) > 0)
                continue;
            if (verbose && n < 20)
                printf("  missing %s: status %d path %d (%s) in %s after %d retries\n", id,
                       l->status[i], l->path[i], l->reason[i], phase_name[l->phase[i]],
                       l->retries[i]);
            n++;
        }
    }
    return n;
}

static int missing(bool verbose)
{
    return missing_ex(verbose, true);
}

static bool none_missing(void *arg)
{
    (void)arg;
    return missing(false) == 0;
}

/* Every message that was not STORED arrived (those may wait in the inbox). */
static bool none_missing_live(void *arg)
{
    (void)arg;
    return missing_ex(false, false) == 0;
}

/* Prints each lane's paths by phase; checks the settled phases against the
 * rule (on_kafka[P2] per phase). Returns the messages that broke it. */
static int check_paths(void)
{
    int bad = 0;
    for (int k = 0; k < NLANE; k++) {
        lane *l = &L[k];
        int count[PH_N][P_MAX] = {{0}};
        for (int i = 0; i < atomic_load(&l->sent); i++)
            if (l->path[i] >= 0 && l->path[i] < P_MAX)
                count[l->phase[i]][l->path[i]]++;
        printf("  %s->%s:", gw_short[l->from], gw_short[l->to]);
        for (int ph = 0; ph < PH_N; ph++) {
            F.on_kafka[P2] = ph == PH_ON_KAFKA;
            printf(" [%s] grpc %d kafka %d pubsub %d inbox %d", phase_name[ph], count[ph][P_GRPC],
                   count[ph][P_KAFKA], count[ph][P_PUBSUB], count[ph][P_INBOX]);
            if (ph % 2)
                continue;
            int want = expected_path(l->from, l->to);
            cr_expect_gt(count[ph][want], 0, "%s->%s %s: some by path %d", gw_short[l->from],
                         gw_short[l->to], phase_name[ph], want);
            for (int p = 0; p < P_MAX; p++)
                if (count[ph][p] && forbidden_path(l->from, l->to, p)) {
                    cr_expect(false, "%s->%s %s: %d by path %d, a bus the target lacks",
                              gw_short[l->from], gw_short[l->to], phase_name[ph], count[ph][p], p);
                    bad += count[ph][p];
                }
        }
        printf("\n");
    }
    F.on_kafka[P2] = false;
    return bad;
}

Test(mixed_fleet, moves_one_gateway_to_kafka_and_back_under_traffic_in_every_direction,
     .timeout = 240)
{
    int64_t t0 = mg_mono_ms();
    snprintf(F.tag, sizeof(F.tag), "mf%d", (int)getpid());
    snprintf(F.svc, sizeof(F.svc), "meshgate-%s", F.tag);
    snprintf(F.topic, sizeof(F.topic), "meshgate.%s.", F.tag);
    snprintf(F.region[0], sizeof(F.region[0]), "%s-p", F.tag);
    snprintf(F.region[1], sizeof(F.region[1]), "%s-k", F.tag);
    for (int g = 0; g < NGW; g++) {
        snprintf(F.id[g], sizeof(F.id[g]), "%s-%s", F.tag, gw_short[g]);
        snprintf(F.ws_listen[g], sizeof(F.ws_listen[g]), "127.0.0.1:%d", mg_test_free_port());
        snprintf(F.grpc_listen[g], sizeof(F.grpc_listen[g]), "127.0.0.1:%d", mg_test_free_port());
        F.on_kafka[g] = g >= K1;
        F.gw[g] = spawn(g);
    }
    cr_assert(mg_wait_until(fleet_settled, NULL, 30000), "every gateway lists the others' buses");
    for (int g = 0; g < NGW; g++)
        U[g] = user_new(g);
    for (int g = 0; g < NGW; g++)
        cr_assert(user_present(g), "presence of %s", U[g]->name);

    int k = 0;
    for (int from = 0; from < NGW; from++)
        for (int to = 0; to < NGW; to++)
            if (from != to)
                L[k++] = (lane){.from = from, .to = to};
    open_phase(PH_BEFORE);
    for (int i = 0; i < NLANE; i++)
        pthread_create(&L[i].th, NULL, lane_main, &L[i]);
    cr_assert(mg_wait_until(lanes_reached_gate, NULL, 60000), "the lanes ran through before");
    move_p2(PH_TO_KAFKA);
    open_phase(PH_ON_KAFKA);
    cr_assert(mg_wait_until(lanes_reached_gate, NULL, 60000), "the lanes ran on kafka");
    move_p2(PH_BACK);
    open_phase(PH_AFTER);
    for (int i = 0; i < NLANE; i++)
        pthread_join(L[i].th, NULL);

    int total = 0, not_accepted = 0, stored = 0, retried = 0;
    for (int i = 0; i < NLANE; i++)
        for (int m = 0; m < atomic_load(&L[i].sent); m++) {
            total++;
            not_accepted += L[i].status[m] < 0;
            stored += L[i].status[m] == ST_STORED;
            retried += L[i].retries[m] > 0;
        }
    cr_expect_eq(total, NLANE * LANE_MSGS, "every lane ran to its end");
    cr_expect_eq(not_accepted, 0, "every message accepted in the end");

    /* live deliveries and Kafka records land; what was STORED while its user
     * was online comes from the inbox on the next connection */
    mg_wait_until(none_missing_live, NULL, 20000);
    for (int g = 0; g < NGW; g++)
        mg_wsuser_redial(U[g]->rd);
    bool all = mg_wait_until(none_missing, NULL, 30000);
    int lost = missing(true), dups = 0, dups_outside = 0;
    for (int g = 0; g < NGW; g++) {
        dups += mg_wsuser_dups(U[g]->rd);
        dups_outside += g != P2 ? mg_wsuser_dups(U[g]->rd) : 0;
    }
    printf("mixed fleet: %d sent over %d lanes, %d stored, %d retried after a refusal, %d lost, "
           "%d shown twice (%d not to p2); paths:\n",
           total, NLANE, stored, retried, lost, dups, dups_outside);
    int bad = check_paths();
    cr_expect(all && lost == 0, "%d accepted messages never arrived", lost);
    cr_expect_eq(bad, 0);
    cr_expect_eq(dups_outside, 0, "no repeats away from the restarted gateway");

    for (int g = 0; g < NGW; g++)
        user_free(U[g]);
    for (int g = 0; g < NGW; g++) {
        cr_expect_eq(mg_gw_stop(F.gw[g]), 0, "%s exits cleanly", F.id[g]);
        mg_gw_free(F.gw[g]);
    }
    printf("mixed fleet: %lld ms\n", (long long)(mg_mono_ms() - t0));
}
