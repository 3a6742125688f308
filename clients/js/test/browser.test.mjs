// The web-chat demo in Debian's chromium (headless, driven by puppeteer-core; nothing downloads
// a browser): two pages as alice and bob chat through a real gateway of the build.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import path from 'node:path';
import puppeteer from 'puppeteer-core';
import { serve } from '../../../examples/web-chat/serve.mjs';
import { startGateway, freePort, outDir } from './gateway.mjs';

const chromium = process.env.CHROMIUM || ['/usr/bin/chromium', '/usr/bin/chromium-browser'].find((p) => existsSync(p));

let browser, server, gw;
after(async () => {
  if (browser) await browser.close().catch(() => {});
  if (server) server.close();
  if (gw) await gw.stop();
});

const text = (page, sel) => page.$eval(sel, (el) => el.textContent.trim());
async function say(page, msg) {
  await page.bringToFront(); // a background tab gets no animation frames: clicks would wait forever
  await page.type('#text', msg);
  await page.click('#send');
}
/** Waits for an outgoing bubble with `msg` whose status is final; returns [status, path, text]. */
async function outcome(page, msg) {
  await page.waitForFunction(
    (m) => [...document.querySelectorAll('#messages li.out')].some(
      (li) => li.firstChild.textContent === m && !['sending', undefined].includes(li.querySelector('.status')?.dataset.status)),
    { timeout: 10000, polling: 100 }, msg);
  return page.$$eval('#messages li.out', (lis, m) => {
    const li = lis.find((l) => l.firstChild.textContent === m);
    const s = li.querySelector('.status');
    return [s.dataset.status, s.dataset.path, s.textContent];
  }, msg);
}
async function shot(page, name) {
  await page.bringToFront(); // a background tab paints nothing: its screenshot would never come
  await page.screenshot({ path: path.join(outDir, name) });
}
/** Incoming bubbles: [from, text, meta]. */
const inbox = (page) => page.$$eval('#messages li.in', (lis) =>
  lis.map((li) => [li.dataset.from, li.firstChild.textContent, li.querySelector('.meta').textContent]));
const waitIn = (page, n) => page.waitForFunction((k) => document.querySelectorAll('#messages li.in').length >= k, { timeout: 10000, polling: 100 }, n);
const waitState = (page, s) => page.waitForFunction((x) => document.getElementById('state').dataset.state === x, { timeout: 15000, polling: 100 }, s);

test('web-chat: two users in chromium chat through a real gateway', { skip: !chromium && 'no chromium' }, async () => {
  gw = await startGateway({ name: 'browser' });
  server = await serve(await freePort());
  const base = `http://127.0.0.1:${server.address().port}/`;
  browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    protocolTimeout: 30000,
    args: ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--no-first-run'],
  });
  const open = async (user, peer) => {
    const page = await browser.newPage();
    await page.setViewport({ width: 640, height: 480 });
    const errors = [];
    page.on('pageerror', (e) => errors.push(String(e)));
    await page.goto(`${base}?user=${user}&peer=${peer}&gateway=${encodeURIComponent(gw.url)}`);
    page.errors = errors;
    return page;
  };
  const alice = await open('alice', 'bob');
  const bob = await open('bob', 'alice');
  await Promise.all([waitState(alice, 'connected'), waitState(bob, 'connected')]);
  assert.equal(await text(alice, '#state'), 'connected');
  assert.equal(await text(bob, '#me'), 'bob');

  // alice -> bob: delivered via the local path, shown once on bob's page.
  await say(alice, 'hello bob');
  assert.deepEqual((await outcome(alice, 'hello bob')).slice(0, 2), ['delivered', 'local']);
  await waitIn(bob, 1);
  // bob -> alice.
  await say(bob, 'hi alice');
  assert.deepEqual((await outcome(bob, 'hi alice')).slice(0, 2), ['delivered', 'local']);
  await waitIn(alice, 1);

  // bob leaves; alice's next message is stored in the inbox; bob comes back and gets it.
  await bob.close();
  await new Promise((r) => setTimeout(r, 200));
  await say(alice, 'are you there?');
  const [st, p, label] = await outcome(alice, 'are you there?');
  assert.deepEqual([st, p], ['stored', 'inbox']);
  assert.match(label, /stored via inbox/);
  const bob2 = await open('bob', 'alice');
  await waitState(bob2, 'connected');
  await waitIn(bob2, 1);
  await new Promise((r) => setTimeout(r, 300)); // anything shown twice would be here by now
  const got = await inbox(bob2);
  assert.equal(got.length, 1);
  assert.deepEqual(got[0].slice(0, 2), ['alice', 'are you there?']);
  assert.match(got[0][2], /from inbox/);
  assert.deepEqual((await inbox(alice)).map((m) => m.slice(0, 2)), [['bob', 'hi alice']]);

  await shot(alice, 'web-chat-alice.png');
  await shot(bob2, 'web-chat-bob.png');

  // The gateway drains (SIGTERM): the page shows the 1012 disconnect, then connected again
  // once a gateway is back on the same port.
  gw.signal('SIGTERM');
  // 'mutation': the 1012 is shown until the next reconnect attempt (refused while no gateway
  // listens) replaces it, which can be sooner than a 100 ms poll looks.
  await alice.waitForFunction(() => /1012/.test(document.getElementById('state-detail').textContent), { timeout: 10000, polling: 'mutation' });
  await gw.exited;
  gw = await startGateway({ name: 'browser-2', wsPort: gw.wsPort, grpcPort: gw.grpcPort });
  await Promise.all([waitState(alice, 'connected'), waitState(bob2, 'connected')]);
  await say(alice, 'back again');
  assert.deepEqual((await outcome(alice, 'back again')).slice(0, 2), ['delivered', 'local']);
  await waitIn(bob2, 2);
  await shot(bob2, 'web-chat-bob-after-drain.png');
  assert.deepEqual([alice.errors, bob2.errors], [[], []]);
});
