/*
 * meshgate-client: the WebSocket client of a meshgate gateway, for browsers and Node.
 *
 * What it does for the application (the protocol is in the gateway's README):
 *  - send() resolves with the gateway's ack; a send without an ack by its timeout is sent
 *    again with the same id (the gateway drops repeated ids), a bounded number of times;
 *  - reconnects with exponential backoff and full jitter, at once (jittered) on 1012 drain,
 *    and not at all after an authentication failure until a new token is available;
 *  - drops messages seen before (bounded LRU of ids), acks inbox messages only after the
 *    `message` handlers returned or resolved;
 *  - asks getToken() again on every connect and shortly before the token expires;
 *  - holds sends made while disconnected in a bounded queue, sent in order on reconnect;
 *  - counts a connection as connected (ready(), state 'connected') once the gateway's `ready`
 *    frame says presence has it, not when the socket opens: a send to this user made after
 *    ready() resolved is delivered to it, not stored for later.
 *
 * No runtime dependency in the browser; in Node the global WebSocket is used where it exists,
 * else the `ws` package.
 */

export type ConnectionState = 'connecting' | 'connected' | 'disconnected' | 'closed';

export interface StateChange {
  state: ConnectionState;
  /** WebSocket close code of the connection that ended (disconnected). */
  code?: number;
  /** Why: the close reason, 'unauthorized', 'drain', 'closed by client', ... */
  reason?: string;
  /** Reconnect attempt number (connecting) and the delay before it (disconnected). */
  attempt?: number;
  retryInMs?: number;
  /** connected: the gateway's id of this connection (absent after a readyTimeoutMs fallback). */
  connId?: string;
  /**
   * connected: the gateway could not record this connection in presence or replay its inbox (a
   * store failed). Sends work, but messages to this user may wait in the inbox until a later
   * connection: reconnect() (later) to try again.
   */
  degraded?: boolean;
}

export type AckStatus = 'delivered' | 'queued' | 'stored' | 'accepted' | 'rejected' | 'failed';
export type AckPath =
  | 'local'
  | 'grpc'
  | 'kafka'
  | 'inbox'
  | 'redis-pubsub'
  | 'nats'
  | 'none'
  | string;

export interface Ack {
  id: string;
  status: AckStatus;
  path: AckPath;
  reason?: string;
  /** How many times the send frame was written (1 = no retry). */
  attempts: number;
}

export interface Message {
  id: string;
  from: string;
  /** UTF-8 content; absent when the content was not valid UTF-8 (see contentB64). */
  content?: string;
  contentB64?: string;
  sentAtMs: number;
  /** An offline-inbox message: acked to the gateway after the handlers succeed. */
  inbox: boolean;
  /** The message's trace (32 hex digits) when it was traced: quote it in a client report. */
  traceId?: string;
  /** W3C traceparent of the write to this device; the SDK echoes it on the inbox ack. */
  traceparent?: string;
}

export interface SendOptions {
  /** Message id; a retry of the same logical message must reuse it. Default: random. */
  id?: string;
  priority?: 'high' | 'low';
  /** How long to wait for an ack before sending again. Default: options.sendTimeoutMs. */
  timeoutMs?: number;
  /** W3C traceparent ("00-<trace id>-<span id>-<flags>"): the gateway continues this trace. */
  traceparent?: string;
}

export interface ReconnectOptions {
  /** First backoff ceiling (ms). Default 250. */
  initialDelayMs?: number;
  /** Largest backoff ceiling (ms). Default 30000. */
  maxDelayMs?: number;
  /** Growth of the ceiling per failed attempt. Default 2. */
  factor?: number;
  /** Upper bound of the random delay before reconnecting after a 1012 drain. Default 1000. */
  drainJitterMs?: number;
}

export type TokenSource = () => string | Promise<string>;

export interface ClientOptions {
  /** ws://host:port/ws or wss://... */
  url: string;
  /** A JWT (HS256/RS256, `sub` = user id), sent as ?token=. */
  token?: string;
  /** Called on every connect and before the current token expires. */
  getToken?: TokenSource;
  /** Development only: ?user=NAME, accepted by a gateway without auth on loopback. */
  user?: string;
  /** Ack timeout per attempt (ms). Default 5000. */
  sendTimeoutMs?: number;
  /** Attempts per send (first write + retries with the same id). Default 3. */
  maxSendAttempts?: number;
  /** Reconnect policy, or false for none. */
  reconnect?: ReconnectOptions | false;
  /** Received ids remembered to drop duplicates. Default 10000. */
  dedupeSize?: number;
  /** Sends held while disconnected (and unacked in flight); beyond it send() rejects. Default 1000. */
  maxQueue?: number;
  /** getToken() is called this long before the token's `exp`. Default 30000. */
  tokenRefreshMarginMs?: number;
  /**
   * Largest content in UTF-8 bytes; a larger send is rejected locally (SendRejectedError with
   * serverCode 'too_large'), as the gateway would. Set it to the gateway's --max-content-bytes.
   * Default 65536 (the gateway's default).
   */
  maxContentBytes?: number;
  /** WebSocket implementation (a constructor like the browser's). Default: global, else `ws`. */
  WebSocket?: WebSocketCtor;
  /**
   * How long after the socket opened to wait for the gateway's `ready` frame before counting the
   * connection as connected anyway (state reason 'no ready frame'): a gateway older than the
   * frame (a rolling upgrade) never sends it. Sends wait meanwhile. 0: wait for the frame however
   * long it takes. Default 5000.
   */
  readyTimeoutMs?: number;
}

/* ---- errors ------------------------------------------------------------------------------ */

export type MeshgateErrorCode =
  | 'timeout'
  | 'rejected'
  | 'queue_full'
  | 'closed'
  | 'unauthorized'
  | 'server_error'
  | 'handler_failed'
  | 'transport';

export class MeshgateError extends Error {
  readonly code: MeshgateErrorCode;
  constructor(code: MeshgateErrorCode, message: string) {
    super(message);
    this.name = 'MeshgateError';
    this.code = code;
  }
}

/** No ack after every attempt. The message may still have been delivered (retry with the same id). */
export class SendTimeoutError extends MeshgateError {
  readonly id: string;
  readonly attempts: number;
  constructor(id: string, attempts: number) {
    super('timeout', `no ack for ${id} after ${attempts} attempt(s)`);
    this.name = 'SendTimeoutError';
    this.id = id;
    this.attempts = attempts;
  }
}

/** The gateway answered the send with `rejected`/`failed`, or an error frame naming its id. */
export class SendRejectedError extends MeshgateError {
  readonly id: string;
  readonly status: string;
  readonly serverCode?: string;
  readonly ack?: Ack;
  constructor(id: string, status: string, reason: string, serverCode?: string, ack?: Ack) {
    super('rejected', `send ${id} ${status}: ${reason}`);
    this.name = 'SendRejectedError';
    this.id = id;
    this.status = status;
    this.serverCode = serverCode;
    this.ack = ack;
  }
}

export class QueueFullError extends MeshgateError {
  constructor(limit: number) {
    super('queue_full', `offline send queue full (${limit})`);
    this.name = 'QueueFullError';
  }
}

export class ClosedError extends MeshgateError {
  constructor() {
    super('closed', 'client closed');
    this.name = 'ClosedError';
  }
}

export class AuthError extends MeshgateError {
  constructor(message: string) {
    super('unauthorized', message);
    this.name = 'AuthError';
  }
}

/** A frame of type `error` from the gateway (bad_json, too_large, overloaded, ...). */
export class ServerError extends MeshgateError {
  readonly serverCode: string;
  readonly id?: string;
  constructor(serverCode: string, reason: string, id?: string) {
    super('server_error', `${serverCode}: ${reason}`);
    this.name = 'ServerError';
    this.serverCode = serverCode;
    this.id = id;
  }
}

/* ---- transport ----------------------------------------------------------------------------- */

export interface WebSocketLike {
  readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onclose: ((ev: any) => void) | null;
  onerror: ((ev: any) => void) | null;
  onmessage: ((ev: any) => void) | null;
}
export type WebSocketCtor = new (url: string) => WebSocketLike;

let wsCtorPromise: Promise<WebSocketCtor> | null = null;
function defaultWebSocket(): Promise<WebSocketCtor> {
  const g = globalThis as any;
  if (typeof g.WebSocket === 'function') return Promise.resolve(g.WebSocket as WebSocketCtor);
  if (!wsCtorPromise) {
    // Node without a global WebSocket: the optional `ws` package. The specifier is a variable
    // so that bundlers for the browser leave it alone.
    const name = 'ws';
    wsCtorPromise = import(/* webpackIgnore: true */ /* @vite-ignore */ name).then(
      (m: any) => (m.WebSocket ?? m.default) as WebSocketCtor,
      () => {
        throw new MeshgateError('transport', 'no global WebSocket: install the "ws" package');
      },
    );
  }
  return wsCtorPromise;
}

/* ---- small helpers ------------------------------------------------------------------------- */

type Listener<T> = (arg: T) => unknown;

interface Events {
  message: Message;
  state: StateChange;
  error: MeshgateError;
}

function randomId(): string {
  const c = (globalThis as any).crypto;
  if (c && typeof c.randomUUID === 'function') return c.randomUUID();
  let s = '';
  for (let i = 0; i < 32; i++) s += Math.floor(Math.random() * 16).toString(16);
  return s;
}

function utf8Length(s: string): number {
  let n = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x80) n += 1;
    else if (c < 0x800) n += 2;
    else if (c >= 0xd800 && c < 0xdc00 && i + 1 < s.length) {
      n += 4;
      i++;
    } else n += 3;
  }
  return n;
}

function b64urlDecode(s: string): string {
  s = s.replace(/-/g, '+').replace(/_/g, '/');
  while (s.length % 4) s += '=';
  const g = globalThis as any;
  if (typeof g.atob === 'function') {
    const bin = g.atob(s);
    try {
      return decodeURIComponent(
        Array.from(bin as string, (ch) => '%' + ch.charCodeAt(0).toString(16).padStart(2, '0')).join(''),
      );
    } catch {
      return bin;
    }
  }
  return g.Buffer.from(s, 'base64').toString('utf8');
}

/** `exp` of a JWT in ms, or undefined when the token is not a JWT with an exp. */
export function tokenExpiryMs(token: string): number | undefined {
  const parts = token.split('.');
  if (parts.length !== 3) return undefined;
  try {
    const payload = JSON.parse(b64urlDecode(parts[1]));
    return typeof payload.exp === 'number' ? payload.exp * 1000 : undefined;
  } catch {
    return undefined;
  }
}

/** Bounded set of ids, least recently seen evicted first. */
export class LruSet {
  private m = new Map<string, true>();
  constructor(readonly capacity: number) {}
  has(id: string): boolean {
    if (!this.m.has(id)) return false;
    this.m.delete(id);
    this.m.set(id, true);
    return true;
  }
  add(id: string): void {
    this.m.delete(id);
    this.m.set(id, true);
    while (this.m.size > this.capacity) {
      const oldest = this.m.keys().next().value as string;
      this.m.delete(oldest);
    }
  }
  delete(id: string): void {
    this.m.delete(id);
  }
  get size(): number {
    return this.m.size;
  }
}

/** A delay drawn uniformly from [0, min(max, initial * factor^attempt)] (full jitter). */
export function backoffDelay(attempt: number, initial: number, max: number, factor: number, rnd = Math.random): number {
  const ceiling = Math.min(max, initial * Math.pow(factor, attempt));
  return Math.floor(rnd() * ceiling);
}

interface PendingSend {
  id: string;
  to: string;
  content: string;
  priority?: 'high' | 'low';
  traceparent?: string;
  timeoutMs: number;
  attempts: number;
  written: boolean; // written on the current connection and waiting for its ack
  timer: ReturnType<typeof setTimeout> | null;
  resolve: (a: Ack) => void;
  reject: (e: Error) => void;
}

const OPEN = 1;

/* ---- the client ---------------------------------------------------------------------------- */

export class MeshgateClient {
  private readonly opts: Required<
    Pick<
      ClientOptions,
      | 'sendTimeoutMs'
      | 'maxSendAttempts'
      | 'dedupeSize'
      | 'maxQueue'
      | 'tokenRefreshMarginMs'
      | 'maxContentBytes'
      | 'readyTimeoutMs'
    >
  > &
    ClientOptions;
  private readonly rc: Required<ReconnectOptions> | null;
  private listeners: { [K in keyof Events]: Set<Listener<Events[K]>> } = {
    message: new Set(),
    state: new Set(),
    error: new Set(),
  };
  private ws: WebSocketLike | null = null;
  private _state: ConnectionState = 'disconnected';
  private closed = false;
  private attempt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private readyTimer: ReturnType<typeof setTimeout> | null = null; // open, waiting for `ready`
  private token: string | undefined;
  private tokenPinned = false; // set by setToken(): used for the next connect as is
  private starting = false;
  private opening = false;
  private openAgain = false;
  private failedToken: string | undefined;
  private authBlocked = false;
  private openedAt = 0;
  private pending = new Map<string, PendingSend>();
  private seen: LruSet;
  private connectWaiters: Array<{ resolve: () => void; reject: (e: Error) => void }> = [];

  constructor(options: ClientOptions) {
    if (!options || !options.url) throw new TypeError('url is required');
    this.opts = {
      sendTimeoutMs: 5000,
      maxSendAttempts: 3,
      dedupeSize: 10000,
      maxQueue: 1000,
      tokenRefreshMarginMs: 30000,
      maxContentBytes: 65536,
      readyTimeoutMs: 5000,
      ...options,
    };
    this.rc =
      options.reconnect === false
        ? null
        : { initialDelayMs: 250, maxDelayMs: 30000, factor: 2, drainJitterMs: 1000, ...(options.reconnect || {}) };
    this.seen = new LruSet(this.opts.dedupeSize);
    this.token = options.token;
  }

  /** Current connection state. */
  get state(): ConnectionState {
    return this._state;
  }

  /** Sends waiting for an ack or for a connection. */
  get pendingCount(): number {
    return this.pending.size;
  }

  on<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this {
    this.listeners[event].add(fn as any);
    return this;
  }

  off<K extends keyof Events>(event: K, fn: Listener<Events[K]>): this {
    this.listeners[event].delete(fn as any);
    return this;
  }

  /**
   * Resolves when connected (now or next): the socket is open and the gateway's `ready` frame
   * came, so presence has this connection. Rejects on close() or an auth failure.
   */
  ready(): Promise<void> {
    if (this._state === 'connected') return Promise.resolve();
    if (this.closed) return Promise.reject(new ClosedError());
    return new Promise((resolve, reject) => this.connectWaiters.push({ resolve, reject }));
  }

  /** Starts connecting (connect() calls it). */
  start(): this {
    // Deferred so that listeners added right after connect() see 'connecting'.
    if (!this.closed && !this.ws && !this.reconnectTimer && !this.starting) {
      this.starting = true;
      Promise.resolve().then(() => {
        this.starting = false;
        if (!this.closed && !this.ws && !this.reconnectTimer) void this.open();
      });
    }
    return this;
  }

  /** Replaces the token and, after an auth failure, connects again. */
  setToken(token: string): void {
    this.token = token;
    this.tokenPinned = true;
    this.scheduleRefresh();
    if (this.authBlocked && !this.closed) {
      this.authBlocked = false;
      this.failedToken = undefined;
      this.attempt = 0;
      void this.open();
    }
  }

  /** Tries to connect now (e.g. after an auth failure once getToken has a new token). */
  reconnect(): void {
    if (this.closed) return;
    this.authBlocked = false;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    if (this.ws) {
      this.ws.close(1000, 'reconnect');
      return;
    }
    void this.open();
  }

  /**
   * Sends `content` to user `to`; resolves with the gateway's ack (delivered, queued, stored,
   * accepted) or rejects with a SendTimeoutError, SendRejectedError, QueueFullError or ClosedError.
   */
  send(to: string, content: string, options: SendOptions = {}): Promise<Ack> {
    if (this.closed) return Promise.reject(new ClosedError());
    const id = options.id ?? randomId();
    const existing = this.pending.get(id);
    if (existing) {
      // Same id still in flight: the caller retried; share the outcome.
      return new Promise((resolve, reject) => {
        const r = existing.resolve;
        const j = existing.reject;
        existing.resolve = (a) => (r(a), resolve(a));
        existing.reject = (e) => (j(e), reject(e));
      });
    }
    const bytes = utf8Length(content);
    if (bytes > this.opts.maxContentBytes)
      return Promise.reject(
        new SendRejectedError(id, 'rejected', `content is ${bytes} bytes, the limit is ${this.opts.maxContentBytes}`, 'too_large'),
      );
    if (this._state !== 'connected' && this.pending.size >= this.opts.maxQueue)
      return Promise.reject(new QueueFullError(this.opts.maxQueue));
    return new Promise<Ack>((resolve, reject) => {
      const p: PendingSend = {
        id,
        to,
        content,
        priority: options.priority,
        traceparent: options.traceparent,
        timeoutMs: options.timeoutMs ?? this.opts.sendTimeoutMs,
        attempts: 0,
        written: false,
        timer: null,
        resolve,
        reject,
      };
      this.pending.set(id, p);
      if (this._state === 'connected') this.write(p);
    });
  }

  /** Stops everything: closes the connection, cancels timers, rejects pending sends. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    if (this.reconnectTimer) clearTimeout(this.reconnectTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.reconnectTimer = this.refreshTimer = null;
    this.clearReadyTimer();
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onerror = null;
      ws.onclose = null;
      try {
        ws.close(1000, 'client closed');
      } catch {
        /* not open yet */
      }
    }
    const err = new ClosedError();
    for (const p of this.pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    for (const w of this.connectWaiters.splice(0)) w.reject(err);
    this.setState({ state: 'closed', code: 1000, reason: 'closed by client' });
  }

  /* ---- internals ---- */

  private emit<K extends keyof Events>(event: K, arg: Events[K]): unknown[] {
    const out: unknown[] = [];
    for (const fn of [...this.listeners[event]]) {
      try {
        out.push(fn(arg));
      } catch (e) {
        out.push(Promise.reject(e));
      }
    }
    return out;
  }

  private emitError(e: MeshgateError): void {
    const results = this.emit('error', e);
    for (const r of results) if (r && typeof (r as any).catch === 'function') (r as Promise<unknown>).catch(() => {});
  }

  private setState(s: StateChange): void {
    this._state = s.state;
    const results = this.emit('state', s);
    for (const r of results) if (r && typeof (r as any).catch === 'function') (r as Promise<unknown>).catch(() => {});
  }

  private async currentToken(): Promise<string | undefined> {
    if (this.tokenPinned) {
      this.tokenPinned = false;
      const exp = this.token ? tokenExpiryMs(this.token) : undefined;
      if (exp === undefined || exp - Date.now() > this.opts.tokenRefreshMarginMs) return this.token;
    }
    if (this.opts.getToken) {
      this.token = await this.opts.getToken();
      this.scheduleRefresh();
    }
    return this.token;
  }

  private scheduleRefresh(): void {
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.refreshTimer = null;
    if (!this.opts.getToken || !this.token || this.closed) return;
    const exp = tokenExpiryMs(this.token);
    if (exp === undefined) return;
    const delay = Math.max(1000, exp - this.opts.tokenRefreshMarginMs - Date.now());
    this.refreshTimer = setTimeout(() => {
      this.refreshTimer = null;
      Promise.resolve()
        .then(() => this.opts.getToken!())
        .then(
          (t) => {
            if (this.closed) return;
            this.token = t;
            this.scheduleRefresh();
            if (this.authBlocked && t !== this.failedToken) this.setToken(t);
          },
          (e) => this.emitError(new AuthError(`getToken failed: ${e?.message ?? e}`)),
        );
    }, Math.min(delay, 0x7fffffff));
    const t = this.refreshTimer as any;
    if (t && typeof t.unref === 'function') t.unref();
  }

  private buildUrl(token: string | undefined): string {
    const u = new URL(this.opts.url);
    if (token) u.searchParams.set('token', token);
    else if (this.opts.user) u.searchParams.set('user', this.opts.user);
    return u.toString();
  }

  /** One connect attempt at a time: a request during an attempt runs after it, if still needed. */
  private async open(): Promise<void> {
    if (this.closed) return;
    if (this.opening) {
      this.openAgain = true;
      return;
    }
    if (this.ws) return;
    this.opening = true;
    try {
      await this.attemptOpen();
    } finally {
      this.opening = false;
    }
    if (this.openAgain) {
      this.openAgain = false;
      if (!this.ws && !this.reconnectTimer && !this.closed) void this.open();
    }
  }

  private async attemptOpen(): Promise<void> {
    this.reconnectTimer = null;
    this.setState({ state: 'connecting', attempt: this.attempt });
    let token: string | undefined;
    let Ctor: WebSocketCtor;
    try {
      token = await this.currentToken();
      Ctor = this.opts.WebSocket ?? (await defaultWebSocket());
    } catch (e: any) {
      const err = e instanceof MeshgateError ? e : new AuthError(`getToken failed: ${e?.message ?? e}`);
      this.emitError(err);
      this.onClosed(1006, err.message, false);
      return;
    }
    if (this.closed) return;
    // A JWT already expired would be refused with 401: do not even try.
    const exp = token ? tokenExpiryMs(token) : undefined;
    if (exp !== undefined && exp <= Date.now()) {
      this.onClosed(1006, 'token expired', true, token);
      return;
    }
    let ws: WebSocketLike;
    try {
      ws = new Ctor(this.buildUrl(token));
    } catch (e: any) {
      this.emitError(new MeshgateError('transport', e?.message ?? String(e)));
      this.onClosed(1006, 'bad url', false);
      return;
    }
    this.ws = ws;
    let httpStatus = 0;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      this.openedAt = Date.now();
      // Open is not connected yet: the gateway registers us in presence after the 101 and
      // then says `ready` (a send to us before that would be stored, not delivered).
      const wait = this.opts.readyTimeoutMs;
      if (wait > 0)
        this.readyTimer = setTimeout(() => {
          this.readyTimer = null;
          if (this.ws === ws) this.onConnected({ state: 'connected', reason: 'no ready frame' });
        }, wait);
    };
    ws.onerror = (ev: any) => {
      // The `ws` package says why a handshake failed; browsers say nothing.
      const msg: string = ev?.message ?? ev?.error?.message ?? '';
      const m = /Unexpected server response: (\d+)/.exec(msg);
      if (m) httpStatus = Number(m[1]);
    };
    ws.onmessage = (ev: any) => {
      if (this.ws !== ws) return;
      this.onFrame(typeof ev.data === 'string' ? ev.data : String(ev.data));
    };
    ws.onclose = (ev: any) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.clearReadyTimer();
      const wasOpen = this.openedAt > 0;
      const stable = wasOpen && Date.now() - this.openedAt > 5000;
      this.openedAt = 0;
      if (stable) this.attempt = 0;
      const code: number = ev?.code ?? 1006;
      const reason: string = ev?.reason || (httpStatus ? `HTTP ${httpStatus}` : '');
      this.onClosed(code, reason, httpStatus === 401, token);
    };
  }

  private clearReadyTimer(): void {
    if (this.readyTimer) clearTimeout(this.readyTimer);
    this.readyTimer = null;
  }

  /** The connection counts as connected: by its `ready` frame, or the readyTimeoutMs fallback. */
  private onConnected(s: StateChange): void {
    this.clearReadyTimer();
    if (this._state === 'connected') return; // a ready frame after the fallback: nothing new
    this.setState(s);
    for (const w of this.connectWaiters.splice(0)) w.resolve();
    // Flush in order: queued sends and sends whose ack died with the previous connection.
    for (const p of this.pending.values()) if (!p.written) this.write(p);
  }

  private onClosed(code: number, reason: string, unauthorized: boolean, token?: string): void {
    for (const p of this.pending.values()) {
      if (p.timer) clearTimeout(p.timer);
      p.timer = null;
      p.written = false; // written again on the next connection, same id
    }
    if (this.closed) return;
    if (unauthorized) {
      this.failedToken = token;
      this.authBlocked = true;
      const err = new AuthError(`unauthorized (${reason || code})`);
      this.setState({ state: 'disconnected', code, reason: 'unauthorized' });
      this.emitError(err);
      for (const w of this.connectWaiters.splice(0)) w.reject(err);
      // Only a different token is worth a new attempt: ask getToken once now; after that the
      // refresh timer, setToken() or reconnect() bring it back.
      if (this.opts.getToken) {
        Promise.resolve()
          .then(() => this.opts.getToken!())
          .then(
            (t) => {
              if (!this.closed && this.authBlocked && t && t !== this.failedToken) {
                const e = tokenExpiryMs(t);
                if (e === undefined || e > Date.now()) this.setToken(t);
              }
            },
            () => {},
          );
      }
      return;
    }
    if (!this.rc) {
      this.setState({ state: 'disconnected', code, reason });
      return;
    }
    let delay: number;
    if (code === 1012) {
      delay = Math.floor(Math.random() * this.rc.drainJitterMs);
      this.attempt = 0;
    } else {
      delay = backoffDelay(this.attempt, this.rc.initialDelayMs, this.rc.maxDelayMs, this.rc.factor);
      this.attempt++;
    }
    this.setState({ state: 'disconnected', code, reason: code === 1012 && !reason ? 'drain' : reason, retryInMs: delay, attempt: this.attempt });
    if (this.closed || this.authBlocked) return;
    this.reconnectTimer = setTimeout(() => void this.open(), delay);
  }

  private write(p: PendingSend): void {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return;
    const frame: Record<string, unknown> = { type: 'send', id: p.id, to: p.to, content: p.content };
    if (p.priority) frame.priority = p.priority;
    if (p.traceparent) frame.traceparent = p.traceparent;
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      return; // the close handler will mark it for the next connection
    }
    p.attempts++;
    p.written = true;
    if (p.timer) clearTimeout(p.timer);
    p.timer = setTimeout(() => this.onSendTimeout(p), p.timeoutMs);
  }

  private onSendTimeout(p: PendingSend): void {
    p.timer = null;
    if (this.pending.get(p.id) !== p) return;
    if (p.attempts >= this.opts.maxSendAttempts) {
      this.pending.delete(p.id);
      p.reject(new SendTimeoutError(p.id, p.attempts));
      return;
    }
    p.written = false;
    if (this._state === 'connected') this.write(p); // same id: the gateway drops the repeat
  }

  private onFrame(text: string): void {
    let f: any;
    try {
      f = JSON.parse(text);
    } catch {
      return;
    }
    switch (f?.type) {
      case 'ready': {
        const s: StateChange = { state: 'connected' };
        if (typeof f.conn === 'string') s.connId = f.conn;
        if (f.degraded === true) s.degraded = true;
        return this.onConnected(s);
      }
      case 'ack':
        return this.onAck(f);
      case 'message':
        return void this.onMessage(f);
      case 'error': {
        const id: string | undefined = f.id;
        const p = id ? this.pending.get(id) : undefined;
        if (p && f.code !== 'overloaded') {
          if (p.timer) clearTimeout(p.timer);
          this.pending.delete(p.id);
          p.reject(new SendRejectedError(p.id, 'error', f.reason ?? f.code, f.code));
          return;
        }
        // overloaded: the send is retried when its timeout fires.
        this.emitError(new ServerError(String(f.code), String(f.reason ?? ''), id));
        return;
      }
    }
  }

  private onAck(f: any): void {
    const p = this.pending.get(f.id);
    if (!p) return; // the ack of a retry already answered
    if (p.timer) clearTimeout(p.timer);
    this.pending.delete(p.id);
    const ack: Ack = { id: f.id, status: f.status, path: f.path, attempts: p.attempts };
    if (f.reason !== undefined) ack.reason = f.reason;
    if (f.status === 'rejected' || f.status === 'failed')
      p.reject(new SendRejectedError(p.id, f.status, f.reason ?? f.status, undefined, ack));
    else p.resolve(ack);
  }

  private async onMessage(f: any): Promise<void> {
    const ws = this.ws;
    const id = String(f.id);
    const inbox = f.inbox === true;
    if (this.seen.has(id)) {
      // Shown before. An inbox copy means our ack was lost: ack it again so it goes away.
      if (inbox) this.sendAck(ws, id, f.traceparent);
      return;
    }
    this.seen.add(id);
    const msg: Message = {
      id,
      from: String(f.from ?? ''),
      sentAtMs: Number(f.sent_at_ms ?? 0),
      inbox,
    };
    if (typeof f.content === 'string') msg.content = f.content;
    if (typeof f.content_b64 === 'string') msg.contentB64 = f.content_b64;
    if (typeof f.trace_id === 'string') msg.traceId = f.trace_id;
    if (typeof f.traceparent === 'string') msg.traceparent = f.traceparent;
    try {
      await Promise.all(this.emit('message', msg));
    } catch (e: any) {
      // Not handled: forget it so that the next delivery (inbox: next connection) shows it.
      this.seen.delete(id);
      this.emitError(new MeshgateError('handler_failed', `message ${id}: ${e?.message ?? e}`));
      return;
    }
    if (inbox) this.sendAck(ws, id, msg.traceparent);
  }

  private sendAck(ws: WebSocketLike | null, id: string, traceparent?: unknown): void {
    // Only on the connection that delivered it; otherwise it comes again and is acked then.
    if (!ws || ws !== this.ws || ws.readyState !== OPEN) return;
    // The message's traceparent makes the ack a span of the message's trace.
    const frame: Record<string, unknown> = { type: 'ack', id };
    if (typeof traceparent === 'string') frame.traceparent = traceparent;
    try {
      ws.send(JSON.stringify(frame));
    } catch {
      /* closing */
    }
  }
}

/** Creates a client and starts connecting. */
export function connect(options: ClientOptions): MeshgateClient {
  return new MeshgateClient(options).start();
}
