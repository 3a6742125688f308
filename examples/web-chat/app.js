// The web-chat demo: one page per user, talking through a meshgate gateway with meshgate-client.
// URL parameters: user (or token), peer, gateway (default ws://<page host>:8080/ws).
import { connect } from './sdk/index.js';

const q = new URLSearchParams(location.search);
const user = q.get('user') || 'alice';
const peer = q.get('peer') || (user === 'alice' ? 'bob' : 'alice');
const gateway = q.get('gateway') || `ws://${location.hostname || '127.0.0.1'}:8080/ws`;
const token = q.get('token') || undefined;

const $ = (id) => document.getElementById(id);
$('me').textContent = user;
$('peer').textContent = peer;

const client = connect({ url: gateway, user: token ? undefined : user, token });
window.meshgate = client; // for the console (and the browser test)

client.on('state', (s) => {
  $('state').textContent = s.state;
  $('state').dataset.state = s.state;
  const bits = [];
  if (s.code) bits.push(`code ${s.code}`);
  if (s.reason) bits.push(s.reason);
  if (s.retryInMs !== undefined) bits.push(`retry in ${s.retryInMs} ms`);
  $('state-detail').textContent = bits.join(' · ');
});
client.on('error', (e) => console.warn('meshgate:', e.code, e.message));

function line(kind, text, meta) {
  const li = document.createElement('li');
  li.className = kind;
  li.append(document.createTextNode(text));
  const m = document.createElement('span');
  m.className = 'meta';
  m.textContent = meta;
  li.append(m);
  $('messages').append(li);
  li.scrollIntoView({ block: 'end' });
  return li;
}

client.on('message', (msg) => {
  const li = line('in', msg.content ?? `(binary ${msg.contentB64?.length ?? 0} b64 chars)`,
    `${msg.from} · ${new Date(msg.sentAtMs).toLocaleTimeString()}${msg.inbox ? ' · from inbox' : ''}`);
  li.dataset.id = msg.id;
  li.dataset.from = msg.from;
});

$('compose').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('text').value;
  $('text').value = '';
  const li = line('out', text, '');
  const status = document.createElement('span');
  status.className = 'status';
  status.dataset.status = 'sending';
  status.textContent = client.state === 'connected' ? 'sending…' : 'waiting for connection…';
  li.querySelector('.meta').append(status);
  try {
    const ack = await client.send(peer, text);
    li.dataset.id = ack.id;
    status.dataset.status = ack.status;
    status.dataset.path = ack.path;
    status.textContent = `${ack.status} via ${ack.path}${ack.attempts > 1 ? ` (${ack.attempts} attempts)` : ''}`;
  } catch (e) {
    status.dataset.status = 'failed';
    status.textContent = `failed: ${e.code || ''} ${e.message}`;
  }
});
