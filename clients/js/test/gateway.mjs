// Test helpers: a real meshgate gateway of the build on free loopback ports, HS256 tokens,
// and small bounded waits. Every process started here is killed by stop()/the exit hook.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { createServer } from 'node:net';
import { mkdirSync, openSync, readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
export const repoRoot = path.resolve(here, '../../..');
export const binary = process.env.MESHGATE_BINARY || path.join(repoRoot, 'build/meshgate');
export const outDir = path.join(process.env.MESHGATE_RUN || '/tmp/meshgate-run', 'sdk');
mkdirSync(outDir, { recursive: true });

const live = new Set();
process.on('exit', () => {
  for (const c of live) try { process.kill(c.pid, 'SIGKILL'); } catch {}
});

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls fn until truthy or timeout; returns its value or throws with `what`. */
export async function waitFor(fn, what, timeoutMs = 10000, stepMs = 25) {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(stepMs);
  }
}

let seq = 0;
/** Starts build/meshgate; resolves once /healthz answers. */
export async function startGateway({ wsPort, grpcPort, args = [], name } = {}) {
  wsPort ??= await freePort();
  grpcPort ??= await freePort();
  const logName = `${name || 'gw'}-${process.pid}-${++seq}.log`;
  const log = openSync(path.join(outDir, logName), 'a');
  const child = spawn(
    binary,
    ['--ws-listen', `127.0.0.1:${wsPort}`, '--grpc-listen', `127.0.0.1:${grpcPort}`, '--drain-seconds', '1', ...args],
    { stdio: ['ignore', log, log] },
  );
  live.add(child);
  const exited = new Promise((r) => child.on('exit', (code, sig) => { live.delete(child); r({ code, sig }); }));
  const gw = {
    child, wsPort, grpcPort, exited, args, name,
    url: `ws://127.0.0.1:${wsPort}/ws`,
    http: `http://127.0.0.1:${wsPort}`,
    signal(sig) { try { process.kill(child.pid, sig); } catch {} },
    /** SIGSTOP, and wait until the kernel shows every thread stopped. */
    async pause() {
      gw.signal('SIGSTOP');
      await waitFor(() => {
        try {
          const tasks = readdirSync(`/proc/${child.pid}/task`);
          return tasks.every((t) => /^\d+ \(.*\) T/.test(readFileSync(`/proc/${child.pid}/task/${t}/stat`, 'utf8')));
        } catch { return false; }
      }, 'gateway stopped', 5000, 10);
    },
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      gw.signal('SIGCONT');
      gw.signal('SIGKILL');
      await exited;
    },
  };
  let early = null;
  exited.then((x) => { early = x; });
  await waitFor(async () => {
    if (early) throw new Error(`gateway exited early ${JSON.stringify(early)}; see ${logName}`);
    try {
      const r = await fetch(`${gw.http}/healthz`);
      return r.ok;
    } catch {
      return false;
    }
  }, 'gateway /healthz', 15000, 50);
  return gw;
}

const b64url = (b) => Buffer.from(b).toString('base64url');
/** An HS256 JWT for `sub`, expiring in `ttlS` seconds (negative: already expired). */
export function jwt(secret, sub, ttlS = 3600, extra = {}) {
  const now = Math.floor(Date.now() / 1000);
  const h = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const p = b64url(JSON.stringify({ sub, iat: now, exp: now + ttlS, ...extra }));
  const s = createHmac('sha256', secret).update(`${h}.${p}`).digest('base64url');
  return `${h}.${p}.${s}`;
}

/** Fast test reconnect policy. */
export const fastReconnect = { initialDelayMs: 50, maxDelayMs: 400, factor: 2, drainJitterMs: 100 };
