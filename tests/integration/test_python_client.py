#!/usr/bin/python3
"""test_python_client.py: meshgate's gRPC API from Python (grpcio), end to end.

Compiles proto/ with grpc_tools into a temporary directory, then calls
Messaging.SendMessage / SendBatch / GetPresence and grpc.health.v1 on a
gateway while a WebSocket client receives the message.

Run with Debian's interpreter (python3-grpcio, python3-grpc-tools,
python3-protobuf; python3-websocket is used when installed, else a minimal
built-in client):

    /usr/bin/python3 tests/integration/test_python_client.py              # spawns build/meshgate
    /usr/bin/python3 tests/integration/test_python_client.py --binary B   # spawns B
    /usr/bin/python3 tests/integration/test_python_client.py \
        --grpc 127.0.0.1:50051 --ws ws://127.0.0.1:8080/ws               # a running gateway
    (env: MESHGATE_GRPC_ADDR, MESHGATE_WS_URL, MESHGATE_BINARY)

Prints `python: N passed, M failed`; exits 0 only when nothing failed.
"""
import argparse
import base64
import importlib
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


# --- a minimal WebSocket client (RFC 6455), used when websocket-client is absent ---
class RawWS:
    def __init__(self, url, timeout=5.0):
        assert url.startswith("ws://"), url
        hostport, _, path = url[5:].partition("/")
        host, _, port = hostport.rpartition(":")
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET /{path} HTTP/1.1\r\nHost: {hostport}\r\nUpgrade: websocket\r\n"
               f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
               "Sec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed during the handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n")[0]
        if b" 101 " not in status + b" ":
            raise ConnectionError(f"handshake refused: {status!r}")

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _send(self, opcode, payload):
        mask = os.urandom(4)
        n = len(payload)
        if n < 126:
            hdr = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            hdr = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            hdr = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(hdr + mask + body)

    def settimeout(self, t):
        self.sock.settimeout(t)

    def recv(self):
        """The next text message (str); answers pings on the way."""
        while True:
            b0, b1 = self._read(2)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            if opcode == 0x9:
                self._send(0xA, payload)
            elif opcode == 0x8:
                raise ConnectionError("closed by the server")
            elif opcode == 0x1:
                return payload.decode()

    def close(self):
        try:
            self._send(0x8, struct.pack("!H", 1000))
        except OSError:
            pass
        self.sock.close()


def ws_connect(url):
    try:
        import websocket  # python3-websocket (websocket-client)

        ws = websocket.create_connection(url, timeout=5)
        return ws
    except ImportError:
        return RawWS(url)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def compile_protos(outdir):
    from grpc_tools import protoc

    proto_dir = os.path.join(ROOT, "proto")
    files = ["meshgate/v1/message.proto", "meshgate/v1/messaging.proto", "meshgate/v1/peer.proto"]
    # health.proto's Python package would be "grpc.health.v1", which would
    # shadow grpcio's own "grpc" package: compile a copy as mg_health/ (the
    # proto package, hence the service name on the wire, is unchanged).
    health_src = os.path.join(outdir, "src")
    os.makedirs(os.path.join(health_src, "mg_health"))
    with open(os.path.join(proto_dir, "grpc/health/v1/health.proto")) as f_in, \
            open(os.path.join(health_src, "mg_health", "health.proto"), "w") as f_out:
        f_out.write(f_in.read())
    for inc, srcs in ((proto_dir, files), (health_src, ["mg_health/health.proto"])):
        rc = protoc.main(["protoc", "-I" + inc, "--python_out=" + outdir,
                          "--grpc_python_out=" + outdir] + [os.path.join(inc, f) for f in srcs])
        if rc != 0:
            raise RuntimeError(f"grpc_tools.protoc failed ({rc})")
    for d in ("mg_health", "meshgate", "meshgate/v1"):
        open(os.path.join(outdir, d, "__init__.py"), "a").close()
    sys.path.insert(0, outdir)


def spawn(binary, workdir):
    ws_port, grpc_port = free_port(), free_port()
    log = open(os.path.join(workdir, "gateway.log"), "w")
    proc = subprocess.Popen([binary, "--id", "py-gw", "--ws-listen", f"127.0.0.1:{ws_port}",
                             "--grpc-listen", f"127.0.0.1:{grpc_port}", "--drain-seconds", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 20
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ws_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return proc, f"127.0.0.1:{grpc_port}", f"ws://127.0.0.1:{ws_port}/ws"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("gateway not ready within 20 s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grpc", default=os.environ.get("MESHGATE_GRPC_ADDR"))
    ap.add_argument("--ws", default=os.environ.get("MESHGATE_WS_URL"))
    ap.add_argument("--binary", default=os.environ.get(
        "MESHGATE_BINARY", os.path.join(ROOT, "build", "meshgate")))
    args = ap.parse_args()

    import grpc

    work = tempfile.TemporaryDirectory(prefix="meshgate-py-")
    compile_protos(work.name)
    health_pb2 = importlib.import_module("mg_health.health_pb2")
    health_grpc = importlib.import_module("mg_health.health_pb2_grpc")
    message_pb2 = importlib.import_module("meshgate.v1.message_pb2")
    messaging_pb2 = importlib.import_module("meshgate.v1.messaging_pb2")
    messaging_grpc = importlib.import_module("meshgate.v1.messaging_pb2_grpc")

    proc = None
    if not args.grpc or not args.ws:
        proc, args.grpc, args.ws = spawn(args.binary, work.name)

    passed, failed = 0, 0

    def check(name, fn):
        nonlocal passed, failed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}")

    channel = grpc.insecure_channel(args.grpc)
    messaging = messaging_grpc.MessagingStub(channel)
    health = health_grpc.HealthStub(channel)
    M = message_pb2

    def t_health():
        r = health.Check(health_pb2.HealthCheckRequest(service="meshgate.v1.Messaging"), timeout=5)
        assert r.status == health_pb2.HealthCheckResponse.SERVING, r

    def t_offline():
        user = "py-off-" + uuid.uuid4().hex[:8]
        r = messaging.SendMessage(messaging_pb2.SendMessageRequest(
            message=M.Message(to=user, content=b"later", **{"from": "py"})), timeout=5)
        assert r.result.status == M.DELIVERY_STATUS_STORED, r
        assert r.result.path == M.PATH_INBOX, r
        assert r.id, r

    def t_online():
        user = "py-on-" + uuid.uuid4().hex[:8]
        ws = ws_connect(f"{args.ws}?user={user}")
        try:
            for _ in range(100):
                p = messaging.GetPresence(messaging_pb2.GetPresenceRequest(users=[user]),
                                          timeout=5)
                if p.users[0].online:
                    break
                time.sleep(0.02)
            else:
                raise AssertionError(f"{user} never online in GetPresence")
            mid = "py-" + uuid.uuid4().hex
            r = messaging.SendMessage(messaging_pb2.SendMessageRequest(
                message=M.Message(id=mid, to=user, content="héllo from python".encode(),
                                  priority=M.PRIORITY_HIGH, **{"from": "py"})), timeout=5)
            assert r.result.status == M.DELIVERY_STATUS_DELIVERED, r
            assert r.result.path == M.PATH_LOCAL, r
            assert r.id == mid, r
            ws.settimeout(5)
            for _ in range(10):
                frame = ws.recv()
                if mid in frame:
                    assert "héllo from python" in frame, frame
                    break
            else:
                raise AssertionError("message not received on the WebSocket")
        finally:
            ws.close()

    def t_invalid():
        try:
            messaging.SendMessage(messaging_pb2.SendMessageRequest(
                message=M.Message(to="", content=b"x")), timeout=5)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert "message.to" in e.details(), e.details()
        else:
            raise AssertionError("empty recipient accepted")

    def t_batch():
        r = messaging.SendBatch(messaging_pb2.SendBatchRequest(
            message=M.Message(content=b"group", **{"from": "py"}), to=["py-b1", "", "py-b2"]),
            timeout=5)
        got = [x.status for x in r.results]
        assert got == [M.DELIVERY_STATUS_STORED, M.DELIVERY_STATUS_REJECTED,
                       M.DELIVERY_STATUS_STORED], got

    try:
        check("health Check SERVING", t_health)
        check("SendMessage offline -> STORED/inbox", t_offline)
        check("SendMessage online -> DELIVERED/local, received on WebSocket", t_online)
        check("SendMessage empty recipient -> INVALID_ARGUMENT", t_invalid)
        check("SendBatch per-recipient results", t_batch)
    finally:
        channel.close()
        if proc:
            proc.terminate()
            try:
                rc = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            if rc != 0:
                failed += 1
                print(f"FAIL gateway exit status {rc}")
        work.cleanup()
    print(f"python: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
