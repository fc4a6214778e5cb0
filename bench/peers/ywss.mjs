// @y/websocket-server (pinned in package.json) on a loopback port, for bench/run-yjs.sh.
//
//   node ywss.mjs --port 12345
//
// Runs the package's own server (src/server.js, with its own nested `ws@6`) unchanged; this
// launcher only translates --host/--port into the HOST/PORT variables it reads.
// Persistence: none — without YPERSISTENCE=<dir> (not set by the bench) documents live in
// memory only and are never evicted; with it, every update is appended to LevelDB (y-leveldb,
// an optional dependency; `npm ci --ignore-scripts` skips its native build, so enabling it
// needs a plain `npm ci`).
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name)
  return i >= 0 ? process.argv[i + 1] : dflt
}
process.env.HOST = arg('--host', '127.0.0.1')
process.env.PORT = arg('--port', '1234')
if (!['127.0.0.1', 'localhost', '::1'].includes(process.env.HOST)) throw new Error('loopback only')
process.on('SIGTERM', () => process.exit(0))
process.on('SIGINT', () => process.exit(0))
await import(new URL('./node_modules/@y/websocket-server/src/server.js', import.meta.url))
