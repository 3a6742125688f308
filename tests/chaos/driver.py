#!/usr/bin/python3
"""driver.py: the fault schedule of tests/chaos, and the history it writes.

Starts four gateways (regions eu and us, two each) against the chaos run's own Redis Cluster,
Kafka and Consul (tests/chaos/run.sh starts those), connects one WebSocket device per user,
sends messages at a fixed rate over WebSocket and through the gRPC API while a schedule injects
faults, then settles (every gateway back, every device reconnected, inboxes drained by acking)
and writes one JSON object per line to the history file:

  {"ev":"send","t":..,"id":..,"from":..,"to":..,"via":"ws"|"grpc","sconn":..,"seq":..}
  {"ev":"answer","t":..,"id":..,"status":"delivered"|..|"none","path":..,"reason":..}
  {"ev":"conn","t":..,"user":..,"conn":..,"gw":..}      a device's connection opened
  {"ev":"recv","t":..,"user":..,"conn":..,"id":..,"from":..,"content":..,"inbox":bool}
  {"ev":"fault","t":..,"what":..}                        a fault injected or healed
  {"ev":"gateway","t":..,"name":..,"id":..,"region":..}  a gateway process started
  {"ev":"phase","t":..,"name":..}                        load, settle, reconnect, end

check.py reads it; this file asserts nothing. Python 3 standard library, plus Debian's
python3-grpcio and python3-grpc-tools (installed by tests/infra/install-deps.sh) for the gRPC
senders. Every loop is bounded in count and time.

Latency and loss on one gateway's traffic: the kernel here has no sch_netem ("Specified qdisc
kind is unknown"), so they are injected by a user-space TCP relay (Relay below) on 127.0.0.2,
through which that gateway's peers and Consul's health check (it advertises 127.0.0.2 with
--advertise-addr) and its WebSocket clients reach it: each chunk is held for a delay, and a share of chunks for a retransmission timeout.
"""
import argparse
import asyncio
import base64
import concurrent.futures
import importlib
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

WINDOW = 8  # WebSocket sends in flight per connection (the gateway chains them)
GW_NAMES = ["eu1", "eu2", "us1", "us2"]
GW_REGION = {"eu1": "eu", "eu2": "eu", "us1": "us", "us2": "us"}
IMPAIRED = "us2"  # the gateway behind the latency/loss relay
RELAY_HOST = "127.0.0.2"  # the relay listens here on IMPAIRED's ports; it advertises this host


class History:
    def __init__(self, path):
        self.f = open(path, "w")
        self.t0 = time.monotonic()

    def now(self):
        return round(time.monotonic() - self.t0, 4)

    def write(self, ev, **kw):
        kw = {"ev": ev, "t": self.now(), **kw}
        self.f.write(json.dumps(kw, separators=(",", ":")) + "\n")

    def close(self):
        self.f.close()


# --- the latency/loss relay -----------------------------------------------------------------
class Relay:
    """RELAY_HOST:port -> 127.0.0.1:port; while impaired, each chunk is held delay_ms
    (+ jitter) and a loss share of chunks an extra rto_ms, order kept per direction."""

    def __init__(self, host, port):
        self.host, self.port = host, port
        self.impaired = False
        self.delay_ms, self.jitter_ms, self.loss, self.rto_ms = 80, 20, 0.05, 300
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._accept, self.host, self.port)

    async def _accept(self, r, w):
        try:
            tr, tw = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            w.close()
            return
        await asyncio.gather(self._pipe(r, tw), self._pipe(tr, w), return_exceptions=True)

    async def _pipe(self, r, w):
        release = 0.0
        try:
            while True:
                data = await r.read(65536)
                if not data:
                    break
                if self.impaired:
                    hold = (self.delay_ms + random.uniform(-self.jitter_ms, self.jitter_ms)) / 1000
                    if random.random() < self.loss:
                        hold += self.rto_ms / 1000
                    release = max(release, time.monotonic() + hold)
                    await asyncio.sleep(max(0.0, release - time.monotonic()))
                w.write(data)
                await w.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            try:
                w.close()
            except OSError:
                pass


# --- gateways --------------------------------------------------------------------------------
class Gateways:
    def __init__(self, args, hist):
        self.args, self.hist = args, hist
        self.env = {}
        with open(os.path.join(args.run, "services.env")) as f:
            for line in f:
                if line.startswith("export "):
                    k, _, v = line[7:].strip().partition("=")
                    self.env[k] = v
        base = args.port_base
        self.ws = {n: base + i for i, n in enumerate(GW_NAMES)}
        self.grpc = {n: base + 10 + i for i, n in enumerate(GW_NAMES)}
        self.proc, self.gen, self.ids = {}, {}, {}
        self.tag = f"chaos{os.getpid()}"

    def client_ws_host(self, name):
        return RELAY_HOST if name == IMPAIRED else "127.0.0.1"

    def spawn(self, name):
        g = self.gen.get(name, -1) + 1
        self.gen[name] = g
        gid = f"{self.tag}-{name}" + (f"-r{g}" if g else "")
        self.ids[name] = gid
        a = [self.args.binary, "--id", gid, "--region", GW_REGION[name],
             "--ws-listen", f"127.0.0.1:{self.ws[name]}",
             "--grpc-listen", f"127.0.0.1:{self.grpc[name]}",
             "--presence", "redis-cluster", "--redis-nodes", self.env["MESHGATE_TEST_REDIS_NODES"],
             "--discovery", "consul", "--consul-addr", self.env["MESHGATE_TEST_CONSUL"],
             "--consul-service", f"meshgate-{self.tag}", "--consul-check-interval-seconds", "1",
             "--kafka-brokers", self.env["MESHGATE_TEST_KAFKA"],
             "--kafka-topic-prefix", f"meshgate.{self.tag}.",
             "--hot-threshold", "5", "--presence-lease-seconds", "6",
             "--peer-deadline-ms", "1000", "--inbox-min-replicas", "1",
             "--kafka-retry-budget-ms", "10000", "--drain-seconds", "1", "--log-level", "info"]
        if name == IMPAIRED:
            a += ["--advertise-addr", RELAY_HOST]
        log = open(os.path.join(self.args.logs, f"{gid}.log"), "w")
        self.proc[name] = subprocess.Popen(a, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL)
        log.close()
        self.hist.write("gateway", name=name, id=gid, region=GW_REGION[name],
                        pid=self.proc[name].pid)

    def ready(self, name):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ws[name]}/readyz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def peers(self, name):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ws[name]}/peers", timeout=1) as r:
                return json.loads(r.read()).get("count", -1)
        except (OSError, ValueError):
            return -1

    async def wait_ready(self, names, timeout=40, mesh=True):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for n in names:
                if self.proc[n].poll() is not None:
                    raise RuntimeError(f"gateway {n} exited with {self.proc[n].returncode}")
            if all(self.ready(n) for n in names) and \
                    (not mesh or all(self.peers(n) == len(GW_NAMES) - 1 for n in GW_NAMES)):
                return True
            await asyncio.sleep(0.2)
        return False

    def signal(self, name, sig):
        p = self.proc.get(name)
        if p and p.poll() is None:
            os.kill(p.pid, sig)

    def stop_all(self):
        for n, p in self.proc.items():
            if p.poll() is None:
                os.kill(p.pid, 18)  # SIGCONT, in case
                p.terminate()
        rcs = {}
        for n, p in self.proc.items():
            try:
                rcs[n] = p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                rcs[n] = p.wait()
        return rcs


# --- a WebSocket device ----------------------------------------------------------------------
class Device:
    """One user's device: reconnects on loss, answers pings, acks inbox messages, records."""

    def __init__(self, drv, user, home):
        self.drv, self.user, self.home = drv, user, home
        self.conn, self.cid, self.w, self.r = 0, None, None, None
        self.pending = {}  # id -> send record, on the current connection
        self.online = False
        self.want = True  # keep connected
        self.task = None

    def order(self):
        region = GW_REGION[self.home]
        mates = [n for n in GW_NAMES if GW_REGION[n] == region and n != self.home]
        others = [n for n in GW_NAMES if GW_REGION[n] != region]
        return [self.home] + mates + others

    async def _open(self, gw):
        host, port = self.drv.gws.client_ws_host(gw), self.drv.gws.ws[gw]
        r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write((f"GET /ws?user={self.user} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                 f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        if b" 101 " not in head.split(b"\r\n")[0] + b" ":
            w.close()
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        return r, w

    def _frame(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        body = bytes(b ^ mask[i & 3] for i, b in enumerate(payload))
        return hdr + mask + body

    def send_json(self, obj):
        if self.w is None or self.w.is_closing():
            return False
        try:
            self.w.write(self._frame(0x1, json.dumps(obj).encode()))
            return True
        except (OSError, RuntimeError):
            return False

    async def run(self):
        attempt = 0
        while self.want and not self.drv.done:
            gw = self.order()[attempt % len(GW_NAMES)] if attempt else self.home
            try:
                self.r, self.w = await self._open(gw)
            except (OSError, asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError):
                attempt += 1
                await asyncio.sleep(0.3)
                continue
            attempt = 0
            self.conn += 1
            self.cid = f"{self.user}#{self.conn}"
            self.drv.hist.write("conn", user=self.user, conn=self.cid, gw=gw)
            self.online = True
            try:
                await self._read_loop()
            except (OSError, asyncio.IncompleteReadError, ConnectionError):
                pass
            except asyncio.CancelledError:
                self._lost()
                raise
            self._lost()
            attempt = 1  # the next try starts with the home gateway's region mate
            await asyncio.sleep(0.3)

    def _lost(self):
        self.online = False
        for mid in list(self.pending):
            self.drv.hist.write("answer", id=mid, status="none", path="none",
                                reason="connection lost")
        self.pending.clear()
        if self.w is not None:
            try:
                self.w.close()
            except (OSError, RuntimeError):
                pass
        self.w = self.r = None

    def drop(self):
        """Closes the current connection (the run loop reconnects unless want is False)."""
        if self.w is not None:
            try:
                self.w.transport.abort()
            except (OSError, RuntimeError, AttributeError):
                pass

    async def _read_loop(self):
        r = self.r
        while True:
            b0, b1 = await r.readexactly(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await r.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await r.readexactly(8))
            payload = await r.readexactly(n)
            if opcode == 0x9:
                if not self.w.is_closing():
                    self.w.write(self._frame(0xA, payload))
            elif opcode == 0x8:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                self.drv.hist.write("closed", user=self.user, conn=self.cid, code=code,
                                    reason=payload[2:].decode(errors="replace"))
                raise ConnectionError("closed by the server")
            elif opcode == 0x1:
                self._on_text(payload)

    def _on_text(self, payload):
        try:
            f = json.loads(payload)
        except ValueError:
            self.drv.hist.write("bad_frame", user=self.user, conn=self.cid,
                                raw=payload[:200].decode(errors="replace"))
            return
        t = f.get("type")
        if t == "message":
            self.drv.hist.write("recv", user=self.user, conn=self.cid, id=f.get("id"),
                                **{"from": f.get("from")}, content=f.get("content"),
                                inbox=bool(f.get("inbox")))
            self.drv.received.add((self.user, f.get("id")))
            self.drv.last_recv = time.monotonic()
            if f.get("inbox"):
                self.send_json({"type": "ack", "id": f.get("id")})
        elif t == "ack" and f.get("id") in self.pending:
            mid = f["id"]
            del self.pending[mid]
            self.drv.answer(mid, f.get("status"), f.get("path"), f.get("reason"))
        else:
            self.drv.hist.write("other_frame", user=self.user, conn=self.cid, frame=f)


# --- the run ---------------------------------------------------------------------------------
class Driver:
    def __init__(self, args):
        self.args = args
        self.hist = History(args.history)
        self.gws = Gateways(args, self.hist)
        self.done = False
        self.seq = {}
        self.promised = {}  # id -> to, for answers delivered/queued/stored
        self.received = set()
        self.last_recv = time.monotonic()
        self.counts = {"sent": 0, "max_behind": 0}
        self.answers = {}
        n_online = args.users
        self.users = [f"u{i:02d}" for i in range(n_online)]
        self.offline = [f"off{i}" for i in range(args.offline_users)]
        self.devices = {u: Device(self, u, GW_NAMES[i % 4]) for i, u in enumerate(self.users)}
        # cross-region pairs that send often enough to turn hot (gRPC direct)
        self.hot = [(self.users[i], self.users[(i + 2) % n_online]) for i in range(0, 8)]
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=4)

    def next_id(self, sender):
        s = self.seq.get(sender, 0) + 1
        self.seq[sender] = s
        return f"{self.gws.tag}-{sender}-{s}", s

    def answer(self, mid, status, path, reason=None):
        status = (status or "none").lower()
        self.hist.write("answer", id=mid, status=status, path=(path or "none").lower(),
                        reason=reason)
        self.answers[status] = self.answers.get(status, 0) + 1
        if status in ("delivered", "queued", "stored"):
            self.promised[mid] = self.to_of[mid]

    # WebSocket sends: every 10 ms, as many as keep the total (gRPC's included) on the rate
    async def ws_load(self, seconds):
        start = time.monotonic()
        end = start + seconds
        targets = self.users + self.offline
        while time.monotonic() < end and self.counts["sent"] < self.args.messages:
            due = min(self.args.messages, int(self.args.rate * (time.monotonic() - start)))
            behind = due - self.counts["sent"]
            self.counts["max_behind"] = max(self.counts["max_behind"], behind)
            for _ in range(max(0, min(2 * behind, 500))):  # picks may find a busy sender
                if self.counts["sent"] >= due:
                    break
                if random.random() < 0.3:
                    frm, to = random.choice(self.hot)
                else:
                    frm, to = random.choice(self.users), random.choice(targets)
                    if to == frm:
                        continue
                d = self.devices[frm]
                if not d.online or len(d.pending) >= WINDOW:
                    continue
                mid, s = self.next_id(frm)
                self.to_of[mid] = to
                self.hist.write("send", id=mid, **{"from": frm}, to=to, via="ws", sconn=d.cid,
                                seq=s)
                self.counts["sent"] += 1
                if d.send_json({"type": "send", "id": mid, "to": to,
                                "content": f"c:{mid}:{to}", "priority": "high"}):
                    d.pending[mid] = True
                else:
                    self.hist.write("answer", id=mid, status="none", path="none",
                                    reason="not written")
            await asyncio.sleep(0.01)

    # gRPC sends: one service per gateway, each waiting for every answer (its order)
    async def grpc_load(self, svc, gw, rate, seconds):
        loop = asyncio.get_running_loop()
        import grpc

        M = self.pb["message"]
        ms = self.pb["messaging"]
        stubs = {}
        end = time.monotonic() + seconds
        targets = self.users + self.offline
        gws = [gw] + [n for n in GW_NAMES if n != gw]
        k = 0
        while time.monotonic() < end and self.counts["sent"] < self.args.messages:
            t0 = time.monotonic()
            target_gw = gws[k % len(gws)]
            port = self.gws.grpc[target_gw]
            if port not in stubs:
                stubs[port] = self.pb["stub"](grpc.insecure_channel(f"127.0.0.1:{port}"))
            to = random.choice(targets)
            mid, s = self.next_id(svc)
            self.to_of[mid] = to
            self.hist.write("send", id=mid, **{"from": svc}, to=to, via="grpc",
                            sconn=f"{svc}@{target_gw}", seq=s, gw=target_gw)
            self.counts["sent"] += 1
            req = ms.SendMessageRequest(message=M.Message(
                id=mid, to=to, content=f"c:{mid}:{to}".encode(), priority=M.PRIORITY_HIGH,
                **{"from": svc}))

            def call(stub=stubs[port], req=req):
                try:
                    r = stub.SendMessage(req, timeout=10)
                    return (M.DeliveryStatus.Name(r.result.status)[len("DELIVERY_STATUS_"):],
                            M.Path.Name(r.result.path)[len("PATH_"):], r.result.reason)
                except grpc.RpcError as e:
                    return ("none", "none", f"grpc {e.code().name}: {e.details()}")

            st, path, reason = await loop.run_in_executor(self.pool, call)
            self.answer(mid, st, path, reason or None)
            if st == "none":
                k += 1  # this gateway did not answer: the next send goes to the next one
            await asyncio.sleep(max(0.0, 1.0 / rate - (time.monotonic() - t0)))

    async def fault(self, at, what, fn):
        await asyncio.sleep(max(0.0, at - (time.monotonic() - self.t_load)))
        self.hist.write("fault", what=what)
        print(f"chaos: t={time.monotonic() - self.t_load:5.1f}s {what}", flush=True)
        try:
            r = fn()
            if asyncio.iscoroutine(r):
                await r
                self.hist.write("fault", what=f"{what}: done")
        except Exception as e:  # noqa: BLE001 - a fault that fails is recorded, the run goes on
            self.hist.write("fault", what=f"{what} FAILED: {e}")
            print(f"chaos: fault {what} failed: {e}", flush=True)

    async def sh(self, *cmd):
        p = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(p.communicate(), 120)
        if p.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.decode(errors='replace')[-500:]}")
        return out.decode()

    async def redis_master(self):
        nodes = await self.sh("redis-cli", "-p", str(self.args.redis_base), "cluster", "nodes")
        for line in nodes.splitlines():
            f = line.split()
            if "master" in f[2] and "fail" not in f[2] and len(f) > 8:
                return f[1].split("@")[0].split(":")[1]
        raise RuntimeError("no master found")

    def schedule(self, T):
        """The faults, at fractions of the load time T (seconds)."""
        g, infra = self.gws, os.path.join(ROOT, "tests", "infra")
        state = {}

        async def kill_redis():
            state["redis"] = await self.redis_master()
            self.hist.write("fault", what=f"redis master {state['redis']} SIGKILL")
            await self.sh(os.path.join(infra, "redis-cluster.sh"), "kill-node", state["redis"])

        async def start_redis():
            await self.sh(os.path.join(infra, "redis-cluster.sh"), "start-node", state["redis"])

        def restart_gw(n):
            g.proc[n].wait()
            g.spawn(n)

        stop_len = max(4.0, 0.04 * T)  # well past --peer-deadline-ms 1000 and the 1 s check
        return [
            (0.07 * T, "SIGKILL gateway eu2", lambda: g.signal("eu2", 9)),
            (0.15 * T, "restart gateway eu2", lambda: restart_gw("eu2")),
            (0.22 * T, f"SIGSTOP gateway us1 for {stop_len:.0f}s", lambda: g.signal("us1", 19)),
            (0.22 * T + stop_len, "SIGCONT gateway us1", lambda: g.signal("us1", 18)),
            (0.32 * T, "kill a Redis master", kill_redis),
            (0.44 * T, "restart the killed Redis node", start_redis),
            (0.50 * T, "Kafka broker restart",
             lambda: self.sh(os.path.join(infra, "kafka.sh"), "restart-broker")),
            (0.72 * T, "Consul restart", lambda: self.sh(
                "bash", "-c", f"'{infra}/consul.sh' stop && '{infra}/consul.sh' start")),
            (0.80 * T, "latency 80+-20 ms and 5% loss (300 ms) on us2",
             lambda: setattr(self.relays[0], "impaired", True) or
             setattr(self.relays[1], "impaired", True)),
            (0.93 * T, "latency and loss on us2 healed",
             lambda: setattr(self.relays[0], "impaired", False) or
             setattr(self.relays[1], "impaired", False)),
        ]

    def load_pb(self):
        from test_python_client import compile_protos

        self.work = tempfile.TemporaryDirectory(prefix="meshgate-chaos-pb-")
        compile_protos(self.work.name)
        self.pb = {"message": importlib.import_module("meshgate.v1.message_pb2"),
                   "messaging": importlib.import_module("meshgate.v1.messaging_pb2"),
                   "stub": importlib.import_module("meshgate.v1.messaging_pb2_grpc").MessagingStub}

    def all_promised_received(self):
        return all((to, mid) in self.received for mid, to in self.promised.items())

    async def settle_until(self, seconds, quiet, quiet_is_enough=False):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            calm = time.monotonic() - self.last_recv > quiet
            if calm and (quiet_is_enough or self.all_promised_received()):
                return True
            await asyncio.sleep(0.2)
        return False

    async def main(self):
        a = self.args
        self.to_of = {}
        self.load_pb()
        g = self.gws
        self.relays = [Relay(RELAY_HOST, g.ws[IMPAIRED]), Relay(RELAY_HOST, g.grpc[IMPAIRED])]
        for r in self.relays:
            await r.start()
        for n in GW_NAMES:
            g.spawn(n)
        if not await g.wait_ready(GW_NAMES, 60):
            raise RuntimeError("the four gateways did not become ready and meshed within 60 s")
        tasks = [asyncio.ensure_future(d.run()) for d in self.devices.values()]
        end = time.monotonic() + 20
        while not all(d.online for d in self.devices.values()) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # presence written
        self.hist.write("phase", name="load", seconds=a.seconds, messages=a.messages)
        self.t_load = time.monotonic()
        grpc_rate = a.rate * 0.2 / 4
        load = [asyncio.ensure_future(self.ws_load(a.seconds))]
        load += [asyncio.ensure_future(self.grpc_load(f"svc{i}", n, grpc_rate, a.seconds))
                 for i, n in enumerate(GW_NAMES)]
        faults = [asyncio.ensure_future(self.fault(at, what, fn))
                  for at, what, fn in self.schedule(a.seconds)] if not a.no_faults else []
        await asyncio.gather(*load)
        load_s = time.monotonic() - self.t_load
        await asyncio.gather(*faults)
        # settle: every gateway up and meshed, no fault left, answers in
        for r in self.relays:
            r.impaired = False
        for n in GW_NAMES:
            g.signal(n, 18)
            if g.proc[n].poll() is not None:
                g.spawn(n)
        self.hist.write("phase", name="settle", load_seconds=round(load_s, 2))
        meshed = await g.wait_ready(GW_NAMES, 60)
        end = time.monotonic() + 15
        while any(d.pending for d in self.devices.values()) and time.monotonic() < end:
            await asyncio.sleep(0.2)
        await self.settle_until(20, 3.0, quiet_is_enough=True)
        # reconnect every device (inbox messages come on a new connection) and the offline users
        self.hist.write("phase", name="reconnect")
        for d in self.devices.values():
            d.drop()
        for u in self.offline:
            d = self.devices[u] = Device(self, u, GW_NAMES[len(self.devices) % 4])
            tasks.append(asyncio.ensure_future(d.run()))
        settled = await self.settle_until(a.settle_seconds, 3.0)
        self.done = True
        self.hist.write("phase", name="end", settled=settled, meshed=meshed,
                        sent=self.counts["sent"], max_behind_schedule=self.counts["max_behind"],
                        answers=self.answers)
        for d in self.devices.values():
            d.want = False
            d.drop()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        rcs = g.stop_all()
        self.hist.write("phase", name="stopped", exit_codes=rcs)
        self.hist.close()
        self.pool.shutdown(wait=False)
        print(f"chaos: {self.counts['sent']} sent in {load_s:.1f} s "
              f"({self.counts['sent'] / max(load_s, 0.001):.0f}/s), answers {self.answers}, "
              f"settled={settled} meshed={meshed}, exit codes {rcs}", flush=True)
        return 0 if all(rc == 0 for rc in rcs.values()) else 1


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", required=True)
    ap.add_argument("--run", required=True, help="the chaos services' MESHGATE_RUN")
    ap.add_argument("--history", required=True)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--rate", type=float, default=None, help="messages/s (default messages/seconds)")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--offline-users", type=int, default=8)
    ap.add_argument("--settle-seconds", type=float, default=60)
    ap.add_argument("--port-base", type=int, default=28600)
    ap.add_argument("--redis-base", type=int, default=22000)
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args()
    a.rate = a.rate or a.messages / a.seconds
    random.seed(a.seed)
    os.makedirs(a.logs, exist_ok=True)
    return asyncio.run(Driver(a).main())


if __name__ == "__main__":
    sys.exit(main())
