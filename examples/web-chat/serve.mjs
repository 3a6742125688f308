// Serves the web-chat demo and the built SDK (clients/js/dist as /sdk/) on loopback, no deps.
// Usage: node examples/web-chat/serve.mjs [--port 8000]
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const sdk = path.resolve(here, '../../clients/js/dist');
const types = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.map': 'application/json', '.css': 'text/css' };

export function serve(port = 8000, host = '127.0.0.1') {
  const server = createServer(async (req, res) => {
    const p = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    let file;
    if (p === '/' || p === '/index.html') file = path.join(here, 'index.html');
    else if (p === '/app.js') file = path.join(here, 'app.js');
    else if (p.startsWith('/sdk/')) file = path.join(sdk, path.normalize(p.slice(5)).replace(/^(\.\.[/\\])+/, ''));
    if (!file || !file.startsWith(p.startsWith('/sdk/') ? sdk : here)) { res.writeHead(404).end('not found'); return; }
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream', 'cache-control': 'no-store' });
      res.end(body);
    } catch {
      res.writeHead(404).end(p.startsWith('/sdk/') ? 'SDK not built: npm --prefix clients/js run build' : 'not found');
    }
  });
  return new Promise((resolve) => server.listen(port, host, () => resolve(server)));
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const i = process.argv.indexOf('--port');
  const port = i > 0 ? Number(process.argv[i + 1]) : Number(process.env.PORT || 8000);
  const s = await serve(port);
  const { port: p } = s.address();
  console.log(`web-chat on http://127.0.0.1:${p}/?user=alice&peer=bob and http://127.0.0.1:${p}/?user=bob&peer=alice`);
  console.log('(gateway: ws://127.0.0.1:8080/ws, e.g. `make run`; another one with &gateway=ws://HOST:PORT/ws)');
}
