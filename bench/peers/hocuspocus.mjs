// @hocuspocus/server (pinned in package.json) on a loopback port, for bench/run-yjs.sh.
//
//   node hocuspocus.mjs --port 12346
//
// Default configuration, no extensions: no authentication hook (every token is accepted),
// and no persistence — Hocuspocus itself stores nothing without a Database/SQLite/S3 extension
// or an onStoreDocument hook; documents are unloaded when their last connection closes.
// Clients use the Hocuspocus protocol (document name in every frame) on any path.
import { Server } from '@hocuspocus/server'

const arg = (name, dflt) => {
  const i = process.argv.indexOf(name)
  return i >= 0 ? process.argv[i + 1] : dflt
}
const port = Number(arg('--port', '1235'))
const address = arg('--host', '127.0.0.1')
if (!['127.0.0.1', 'localhost', '::1'].includes(address)) throw new Error('loopback only')

const server = new Server({ port, address, quiet: true, stopOnSignals: true })
await server.listen()
console.log(`hocuspocus listening on ${address}:${port}`)
