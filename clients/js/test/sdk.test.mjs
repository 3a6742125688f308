// meshgate-client against a real gateway of the build (build/meshgate), on loopback.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import {
  connect, LruSet, backoffDelay, tokenExpiryMs,
  SendTimeoutError, SendRejectedError, QueueFullError, ClosedError, AuthError,
} from '../dist/index.js';
import { startGateway, freePort, waitFor, sleep, jwt, fastReconnect, binary } from './gateway.mjs';

const gateways = [];
const clients = [];
after(async () => {
  for (const c of clients) c.close();
  for (const g of gateways) await g.stop();
});
async function gateway(opts) {
  const g = await startGateway(opts);
  gateways.push(g);
  return g;
}
/** A client that records what it sees. */
function client(opts) {
  const c = connect({ reconnect: fastReconnect, sendTimeoutMs: 2000, ...opts });
  c.got = [];
  c.states = [];
  c.errors = [];
  c.on('message', (m) => { c.got.push(m); });
  c.on('state', (s) => { c.states.push(s); });
  c.on('error', (e) => { c.errors.push(e); });
  clients.push(c);
  return c;
}
/** A raw WebSocket for a user: every frame the gateway sends it. */
async function raw(url, user) {
  const ws = new WebSocket(`${url}?user=${user}`);
  ws.frames = [];
  ws.on('message', (d) => ws.frames.push(JSON.parse(String(d))));
  await new Promise((res, rej) => { ws.once('open', res); ws.once('error', rej); });
  return ws;
}
const withTimeout = (p, ms, what) =>
  Promise.race([p, sleep(ms).then(() => { throw new Error(`timed out: ${what}`); })]);

test('the package is versioned with the gateway: package.json matches `meshgate --version`', () => {
  const pkg = JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8'));
  const out = execFileSync(binary, ['--version'], { encoding: 'utf8' }).trim();
  assert.equal(out, `meshgate ${pkg.version}`);
});

test('unit: full-jitter backoff stays within [0, min(max, initial*factor^n)]', () => {
  for (let n = 0; n < 12; n++) {
    const ceil = Math.min(30000, 250 * 2 ** n);
    assert.equal(backoffDelay(n, 250, 30000, 2, () => 0), 0);
    assert.ok(backoffDelay(n, 250, 30000, 2, () => 0.999999) <= ceil);
    const d = backoffDelay(n, 250, 30000, 2);
    assert.ok(d >= 0 && d <= ceil);
  }
});

test('unit: LRU dedupe set is bounded and evicts the least recently seen', () => {
  const s = new LruSet(3);
  s.add('a'); s.add('b'); s.add('c');
  assert.ok(s.has('a')); // a is now most recent
  s.add('d');
  assert.equal(s.size, 3);
  assert.ok(!s.has('b'));
  assert.ok(s.has('a') && s.has('c') && s.has('d'));
  assert.equal(tokenExpiryMs(jwt('k', 'u', 60)) > Date.now(), true);
  assert.equal(tokenExpiryMs('not-a-jwt'), undefined);
});

test('send/receive: ack delivered via local path, message shown with from and content', async () => {
  const gw = await gateway({ name: 'sendrecv' });
  const alice = client({ url: gw.url, user: 'alice' });
  const bob = client({ url: gw.url, user: 'bob' });
  await Promise.all([alice.ready(), bob.ready()]);
  assert.deepEqual(alice.states.map((s) => s.state), ['connecting', 'connected']);
  assert.match(alice.states[1].connId, /^.+-\d+$/, 'connected by the ready frame');
  assert.equal(alice.states[1].degraded, undefined);
  const ack = await alice.send('bob', 'hello bob', { id: 'm-1' });
  assert.equal(ack.id, 'm-1');
  assert.equal(ack.status, 'delivered');
  assert.equal(ack.path, 'local');
  assert.equal(ack.attempts, 1);
  await waitFor(() => bob.got.length === 1, 'bob receives');
  assert.equal(bob.got[0].from, 'alice');
  assert.equal(bob.got[0].content, 'hello bob');
  assert.equal(bob.got[0].inbox, false);
  // Low priority is answered "accepted" at once.
  const low = await alice.send('bob', 'fyi', { priority: 'low' });
  assert.equal(low.status, 'accepted');
  await gw.stop();
});

test('tracing: a send with a traceparent continues its trace; the message names it', async () => {
  const gw = await gateway({ name: 'trace', args: ['--trace-sample-ratio', '0'] });
  const alice = client({ url: gw.url, user: 'alice' });
  const bob = client({ url: gw.url, user: 'bob' });
  await Promise.all([alice.ready(), bob.ready()]);
  const traceId = '4bf92f3577b34da6a3ce929d0e0e4736';
  await alice.send('bob', 'traced', { traceparent: `00-${traceId}-00f067aa0ba902b7-01` });
  await alice.send('bob', 'plain');
  await waitFor(() => bob.got.length === 2, 'bob receives both');
  assert.equal(bob.got[0].traceId, traceId);
  assert.match(bob.got[0].traceparent, new RegExp(`^00-${traceId}-[0-9a-f]{16}-01$`));
  assert.equal(bob.got[1].traceId, undefined); // ratio 0: only callers' traces
  await gw.stop();
});

test('ack results: stored in the inbox for an offline user; too large content is a typed rejection', async () => {
  const gw = await gateway({ name: 'acks', args: ['--max-content-bytes', '16'] });
  const alice = client({ url: gw.url, user: 'alice', maxContentBytes: 16 });
  await alice.ready();
  const stored = await alice.send('nobody-here', 'for later');
  assert.equal(stored.status, 'stored');
  assert.equal(stored.path, 'inbox');
  await assert.rejects(alice.send('bob', 'x'.repeat(64), { id: 'big-1' }), (e) => {
    assert.ok(e instanceof SendRejectedError);
    assert.equal(e.code, 'rejected');
    assert.equal(e.serverCode, 'too_large');
    assert.equal(e.id, 'big-1');
    return true;
  });
  // A client that does not know the limit: the gateway's error frame (it names no id) comes as
  // an 'error' event, and the send ends in a timeout.
  const bert = client({ url: gw.url, user: 'bert', maxSendAttempts: 1 });
  await bert.ready();
  await assert.rejects(bert.send('bob', 'y'.repeat(64), { timeoutMs: 300 }), SendTimeoutError);
  assert.ok(bert.errors.some((e) => e.code === 'server_error' && e.serverCode === 'too_large'));
  await gw.stop();
});

test('inbox: delivered on connect, acked after the handler resolves, not delivered again', async () => {
  const gw = await gateway({ name: 'inbox' });
  const alice = client({ url: gw.url, user: 'alice' });
  await alice.ready();
  assert.equal((await alice.send('carol', 'one', { id: 'in-1' })).status, 'stored');
  assert.equal((await alice.send('carol', 'two', { id: 'in-2' })).status, 'stored');

  // First connection: the handler fails on in-2, so only in-1 is acked.
  const carol1 = client({ url: gw.url, user: 'carol' });
  const handled = [];
  carol1.on('message', async (m) => {
    await sleep(50);
    if (m.id === 'in-2') throw new Error('app crashed');
    handled.push(m.id);
  });
  await waitFor(() => carol1.got.length === 2 && carol1.errors.length === 1, 'carol1 gets both, one handler fails');
  assert.deepEqual(carol1.got.map((m) => [m.id, m.inbox]), [['in-1', true], ['in-2', true]]);
  assert.equal(carol1.errors[0].code, 'handler_failed');
  await sleep(200); // the ack of in-1 reaches the gateway
  carol1.close();

  // Second connection: in-2 comes again (not acked), in-1 does not.
  const carol2 = client({ url: gw.url, user: 'carol' });
  await waitFor(() => carol2.got.length >= 1, 'carol2 gets the unacked one');
  await sleep(300);
  assert.deepEqual(carol2.got.map((m) => m.id), ['in-2']);
  carol2.close();

  // Third connection: nothing left.
  const carol3 = client({ url: gw.url, user: 'carol' });
  await carol3.ready();
  await sleep(400);
  assert.equal(carol3.got.length, 0);
  await gw.stop();
});

test('dedupe across a reconnect: an inbox message whose ack was lost is shown once and acked again', async () => {
  const gw = await gateway({ name: 'dedupe' });
  const alice = client({ url: gw.url, user: 'alice' });
  await alice.ready();
  assert.equal((await alice.send('dave', 'once only', { id: 'dup-1' })).status, 'stored');

  const dave = client({ url: gw.url, user: 'dave' });
  let release;
  const gate = new Promise((r) => { release = r; });
  let calls = 0;
  dave.on('message', async () => { calls++; await gate; });
  await waitFor(() => calls === 1, 'dave handler running');
  // The connection drops while the handler runs: the ack cannot go out on it.
  dave.reconnect();
  await waitFor(() => dave.states.filter((s) => s.state === 'connected').length === 2, 'dave reconnected');
  release();
  await sleep(400); // the gateway redelivers dup-1 on the new connection; the SDK drops and acks it
  assert.equal(calls, 1);
  assert.deepEqual(dave.got.map((m) => m.id), ['dup-1']);
  dave.close();

  const dave2 = client({ url: gw.url, user: 'dave' });
  await dave2.ready();
  await sleep(400);
  assert.equal(dave2.got.length, 0, 'acked by the dedupe path: not in the inbox any more');
  await gw.stop();
});

test('idempotent retry: gateway paused (SIGSTOP) so the ack is late, resent with the same id, shown once', async () => {
  const gw = await gateway({ name: 'retry' });
  const alice = client({ url: gw.url, user: 'alice', maxSendAttempts: 10 });
  const bob = client({ url: gw.url, user: 'bob' });
  await Promise.all([alice.ready(), bob.ready()]);
  const bobRaw = await raw(gw.url, 'bob');
  await gw.pause();
  const p = alice.send('bob', 'exactly once', { id: 'retry-1', timeoutMs: 300 });
  await sleep(1100); // at least 3 writes of the same frame
  gw.signal('SIGCONT');
  const ack = await withTimeout(p, 10000, 'ack after SIGCONT');
  assert.equal(ack.status, 'delivered');
  assert.ok(ack.attempts >= 3, `attempts ${ack.attempts}`);
  await waitFor(() => bob.got.length >= 1, 'bob receives');
  await sleep(500);
  assert.deepEqual(bob.got.map((m) => m.id), ['retry-1']);
  // The gateway itself dropped the repeats: the raw socket saw it once too.
  assert.equal(bobRaw.frames.filter((f) => f.type === 'message' && f.id === 'retry-1').length, 1);
  bobRaw.close();
  await gw.stop();
});

test('ready: connected on the gateway ready frame (inbox page first); without one, after readyTimeoutMs', async () => {
  const gw = await gateway({ name: 'ready' });
  const alice = client({ url: gw.url, user: 'alice' });
  await alice.ready();
  assert.equal((await alice.send('gina', 'kept', { id: 'rd-1' })).status, 'stored');
  // The inbox page comes before the ready frame: gina has it by the time she is connected.
  const gina = client({ url: gw.url, user: 'gina' });
  await gina.ready();
  assert.deepEqual(gina.got.map((m) => [m.id, m.inbox]), [['rd-1', true]]);
  assert.equal(gina.states.at(-1).reason, undefined);
  gina.close();
  // A server that opens the socket and never says ready (a gateway older than the frame): sends
  // wait, then the client counts itself connected after readyTimeoutMs and sends them.
  const { WebSocketServer } = await import('ws');
  const port = await freePort();
  const wss = new WebSocketServer({ host: '127.0.0.1', port });
  const seen = [];
  wss.on('connection', (s) => s.on('message', (d) => {
    const f = JSON.parse(String(d));
    seen.push(f.id);
    s.send(JSON.stringify({ type: 'ack', id: f.id, status: 'delivered', path: 'local' }));
  }));
  try {
    const old = client({ url: `ws://127.0.0.1:${port}/ws`, user: 'olga', readyTimeoutMs: 300 });
    const t0 = Date.now();
    const ack = await withTimeout(old.send('bob', 'waits for connected', { id: 'old-1' }), 5000, 'fallback');
    assert.ok(Date.now() - t0 >= 250, `sent after ${Date.now() - t0} ms`);
    assert.equal(ack.status, 'delivered');
    assert.deepEqual(seen, ['old-1']);
    assert.equal(old.states.at(-1).state, 'connected');
    assert.equal(old.states.at(-1).reason, 'no ready frame');
    old.close();
  } finally {
    await new Promise((r) => wss.close(r));
  }
  await gw.stop();
});

test('send timeout: no ack after the bounded attempts rejects with SendTimeoutError', async () => {
  const gw = await gateway({ name: 'timeout' });
  const alice = client({ url: gw.url, user: 'alice', maxSendAttempts: 2 });
  await alice.ready();
  await gw.pause();
  const t0 = Date.now();
  await assert.rejects(alice.send('bob', 'lost', { id: 'to-1', timeoutMs: 200 }), (e) => {
    assert.ok(e instanceof SendTimeoutError);
    assert.equal(e.code, 'timeout');
    assert.equal(e.attempts, 2);
    return true;
  });
  assert.ok(Date.now() - t0 >= 380);
  gw.signal('SIGCONT');
  await gw.stop();
});

test('reconnect after SIGTERM drain: close 1012, jittered immediate reconnect to the restarted gateway', async () => {
  const gw = await gateway({ name: 'drain-a' });
  const alice = client({ url: gw.url, user: 'alice', reconnect: { ...fastReconnect, drainJitterMs: 200 } });
  await alice.ready();
  gw.signal('SIGTERM');
  await waitFor(() => alice.states.find((s) => s.state === 'disconnected'), 'drain close', 10000);
  const d = alice.states.find((s) => s.state === 'disconnected');
  assert.equal(d.code, 1012);
  assert.ok(d.retryInMs >= 0 && d.retryInMs < 200, `retryInMs ${d.retryInMs}`);
  const ex = await gw.exited;
  assert.equal(ex.code, 0);
  const gw2 = await gateway({ name: 'drain-b', wsPort: gw.wsPort, grpcPort: gw.grpcPort });
  await waitFor(() => alice.state === 'connected', 'reconnected', 10000);
  const bob = client({ url: gw2.url, user: 'bob' });
  await bob.ready(); // the gateway's ready frame: presence has bob
  assert.equal((await alice.send('bob', 'after drain')).status, 'delivered');
  await waitFor(() => bob.got.length === 1, 'bob gets it');
  await gw2.stop();
});

test('reconnect after SIGKILL + restart; sends made while down are flushed in order', async () => {
  const gw = await gateway({ name: 'kill-a' });
  const alice = client({ url: gw.url, user: 'alice' });
  const bob = client({ url: gw.url, user: 'bob' });
  await Promise.all([alice.ready(), bob.ready()]);
  gw.signal('SIGKILL');
  await gw.exited;
  await waitFor(() => alice.state !== 'connected', 'alice sees the loss');
  const sends = ['k1', 'k2', 'k3'].map((id) => alice.send('bob', `while down ${id}`, { id }));
  await sleep(300); // a few failed reconnect attempts with backoff
  const gw2 = await gateway({ name: 'kill-b', wsPort: gw.wsPort, grpcPort: gw.grpcPort });
  const acks = await withTimeout(Promise.all(sends), 15000, 'acks after restart');
  for (const a of acks) assert.ok(['delivered', 'stored'].includes(a.status), a.status);
  await waitFor(() => bob.got.length === 3, 'bob gets all three', 15000);
  assert.deepEqual(bob.got.map((m) => m.id), ['k1', 'k2', 'k3']);
  assert.ok(alice.states.some((s) => s.state === 'disconnected' && s.code === 1006));
  await gw2.stop();
});

test('bounded offline queue: beyond maxQueue send() rejects at once; the rest flush in order', async () => {
  const wsPort = await freePort();
  const grpcPort = await freePort();
  const url = `ws://127.0.0.1:${wsPort}/ws`;
  const alice = client({ url, user: 'alice', maxQueue: 3 });
  const sends = ['q1', 'q2', 'q3'].map((id) => alice.send('bob', id, { id }));
  await assert.rejects(alice.send('bob', 'q4', { id: 'q4' }), (e) => e instanceof QueueFullError && e.code === 'queue_full');
  assert.equal(alice.pendingCount, 3);
  const gw = await gateway({ name: 'queue', wsPort, grpcPort });
  const bob = client({ url, user: 'bob' });
  await withTimeout(Promise.all(sends), 15000, 'queued sends acked');
  await waitFor(() => bob.got.length === 3, 'bob gets the queue', 10000);
  assert.deepEqual(bob.got.map((m) => m.content), ['q1', 'q2', 'q3']);
  await gw.stop();
});

test('token refresh: getToken before expiry and on reconnect; the expired first token is never reused', async () => {
  const secret = 'sdk-test-secret-0123456789abcdef';
  const gw = await gateway({ name: 'jwt-a', args: ['--jwt-secret', secret] });
  const tokens = [];
  const getToken = () => {
    const t = jwt(secret, 'erin', 3);
    tokens.push(t);
    return t;
  };
  const erin = client({ url: gw.url, getToken, tokenRefreshMarginMs: 1500 });
  await erin.ready();
  assert.equal(tokens.length, 1);
  await waitFor(() => tokens.length >= 2, 'refresh before expiry', 4000);
  await sleep(2600); // the first token has expired by now
  gw.signal('SIGKILL');
  await gw.exited;
  const before = tokens.length;
  const gw2 = await gateway({ name: 'jwt-b', wsPort: gw.wsPort, grpcPort: gw.grpcPort, args: ['--jwt-secret', secret] });
  await waitFor(() => erin.state === 'connected' && erin.states.filter((s) => s.state === 'connected').length === 2,
    'reconnected with a fresh token', 10000);
  assert.ok(tokens.length > before, 'getToken called on reconnect');
  assert.equal(erin.errors.filter((e) => e instanceof AuthError).length, 0);
  const frank = client({ url: gw2.url, token: jwt(secret, 'frank', 60) });
  await frank.ready();
  assert.equal((await erin.send('frank', 'signed')).status, 'delivered');
  await waitFor(() => frank.got.length === 1, 'frank receives');
  assert.equal(frank.got[0].from, 'erin');
  await gw2.stop();
});

test('bad token: 401 on upgrade, no reconnect loop; a new token (setToken) connects', async () => {
  const secret = 'sdk-test-secret-0123456789abcdef';
  const gw = await gateway({ name: 'badtoken', args: ['--jwt-secret', secret] });
  let opened = 0;
  class CountingWS extends WebSocket {
    constructor(url) { super(url); opened++; }
  }
  let calls = 0;
  const bad = jwt('wrong-secret-wrong-secret-wrong!', 'mallory', 600);
  const m = client({ url: gw.url, getToken: () => { calls++; return bad; }, WebSocket: CountingWS });
  await assert.rejects(m.ready(), (e) => e instanceof AuthError && e.code === 'unauthorized');
  await sleep(1500); // with fastReconnect a loop would have made many attempts by now
  assert.equal(opened, 1, 'one upgrade attempt only');
  assert.ok(calls <= 2, `getToken calls ${calls}`);
  const last = m.states.at(-1);
  assert.equal(last.state, 'disconnected');
  assert.equal(last.reason, 'unauthorized');
  assert.ok(m.errors.some((e) => e instanceof AuthError));
  // An expired token is not even tried.
  const expired = client({ url: gw.url, token: jwt(secret, 'mallory', -10), WebSocket: CountingWS });
  await assert.rejects(expired.ready(), AuthError);
  assert.equal(opened, 1);
  // A good token brings it back.
  m.setToken(jwt(secret, 'mallory', 600));
  await withTimeout(m.ready(), 5000, 'connect with the new token');
  assert.equal(opened, 2);
  await gw.stop();
});

test('close(): stops reconnecting and rejects pending sends with ClosedError', async () => {
  const gw = await gateway({ name: 'close' });
  const alice = client({ url: gw.url, user: 'alice' });
  await alice.ready();
  await gw.pause();
  const p = alice.send('bob', 'never acked', { timeoutMs: 5000 });
  alice.close();
  await assert.rejects(p, ClosedError);
  assert.equal(alice.state, 'closed');
  await assert.rejects(alice.send('bob', 'after close'), ClosedError);
  gw.signal('SIGCONT');
  const n = alice.states.length;
  await sleep(300);
  assert.equal(alice.states.length, n, 'no state change after close');
  await gw.stop();
});

test('one connect attempt at a time: reconnect() right after connect() opens a single socket', async () => {
  const gw = await gateway({ name: 'single' });
  let opened = 0;
  class CountingWS extends WebSocket {
    constructor(url) { super(url); opened++; }
  }
  const c = client({ url: gw.url, user: 'solo', WebSocket: CountingWS });
  c.reconnect();
  c.reconnect();
  await c.ready();
  await sleep(300);
  assert.equal(opened, 1);
  assert.equal(c.state, 'connected');
  await gw.stop();
});
