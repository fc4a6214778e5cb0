#!/usr/bin/env node
// Reference cojson sync server for moai's interop tests and benchmarks: what `jazz-run sync`
// 0.20.x does (its startSyncServer), rebuilt from the npm packages cojson / cojson-transport-ws
// 0.20.19, because no jazz-run >= 0.16 is on the registry (spec cojson.md §8).
//
//   node cojson-server.mjs [--host 127.0.0.1] [--port 4200] [--in-memory | --db PATH]
//                          [--crypto wasm|napi] [--ping-ms 1500]
//
// Prints `listening <port>` on stdout when ready (port 0 = pick a free one); logs on stderr.
// Accepts the WebSocket upgrade on any path except /health (jazz-run does the same), so
// ws://HOST:PORT/sync works. GET /health answers 200 "ok". SIGTERM/SIGINT: graceful shutdown.
//
// The recipe, as in jazz-run 0.20: one LocalNode with a throw-away random agent (no account),
// SQLite storage (cojson's own getSqliteStorage over better-sqlite3; the separate
// cojson-storage-sqlite package stopped at 0.15 on npm), the garbage collector on, and every
// socket a non-persistent "client" peer that is sent a ping every 1.5 s.

import { createServer } from 'node:http'
import { mkdirSync } from 'node:fs'
import { dirname } from 'node:path'
import { parseArgs } from 'node:util'
import { WebSocketServer } from 'ws'
import { LocalNode, getSqliteStorage } from 'cojson'
import { WasmCrypto } from 'cojson/crypto/WasmCrypto'
import { NapiCrypto } from 'cojson/crypto/NapiCrypto'
import { createWebSocketPeer } from 'cojson-transport-ws'

// stdout is for the `listening` line only; cojson's logger uses console.*
const log = (...args) => process.stderr.write('[cojson-server] ' + args.join(' ') + '\n')
console.log = console.info = console.debug = (...args) => console.error(...args)

const { values: opts } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', short: 'p', default: '4200' },
    'in-memory': { type: 'boolean', default: false },
    db: { type: 'string', default: 'sync-db/storage.db' },
    crypto: { type: 'string', default: 'wasm' },
    'ping-ms': { type: 'string', default: '1500' }
  }
})

// cojson's SQLiteDatabaseDriver over better-sqlite3 (synchronous, like jazz-run's).
// Prepared statements are cached per SQL text. Imported lazily so that --in-memory works without
// the native module (bench/run-yjs.sh installs this directory with `npm ci --ignore-scripts`,
// which leaves better-sqlite3 unbuilt).
const betterSqliteDriver = async (filename) => {
  let Database
  try {
    Database = (await import('better-sqlite3')).default
    new Database(':memory:').close() // loads the native binding now
  } catch (e) {
    log(`better-sqlite3 unusable (${e.message.split('\n')[0]}).`)
    log('Build it with `npm rebuild better-sqlite3` in bench/peers (npm ci --ignore-scripts skips it), or use --in-memory.')
    process.exit(2)
  }
  const db = new Database(filename)
  db.pragma('journal_mode = WAL')
  const stmts = new Map()
  const stmt = (sql) => {
    let s = stmts.get(sql)
    if (!s) { s = db.prepare(sql); stmts.set(sql, s) }
    return s
  }
  return {
    run: (sql, params) => { stmt(sql).run(...params) }, // also the migrations' DDL, one statement each
    get: (sql, params) => stmt(sql).get(...params),
    query: (sql, params) => stmt(sql).all(...params),
    transaction: (callback) => { db.transaction(callback)() },
    closeDb: () => db.close(),
    getMigrationVersion: () => db.pragma('user_version', { simple: true }),
    saveMigrationVersion: (version) => { db.pragma(`user_version = ${Number(version)}`) }
  }
}

const crypto = opts.crypto === 'napi' ? await NapiCrypto.create() : await WasmCrypto.create()

const agentSecret = crypto.newRandomAgentSecret()
const localNode = new LocalNode(agentSecret, crypto.newRandomSessionID(crypto.getAgentID(agentSecret)), crypto)

if (!opts['in-memory']) {
  mkdirSync(dirname(opts.db), { recursive: true })
  localNode.setStorage(getSqliteStorage(await betterSqliteDriver(opts.db)))
}
localNode.enableGarbageCollector()

const server = createServer((req, res) => {
  if (req.url === '/health') {
    res.writeHead(200)
    res.end('ok')
  }
  // anything else: left open, as jazz-run does (it only answers /health)
})
const wss = new WebSocketServer({ noServer: true })
const pingMs = Number(opts['ping-ms'])

wss.on('connection', (ws, req) => {
  const pinging = setInterval(() => {
    ws.send(JSON.stringify({ type: 'ping', time: Date.now(), dc: 'unknown' }))
  }, pingMs)
  ws.on('close', () => clearInterval(pinging))

  const clientAddress = String(req.headers['x-forwarded-for'] ?? '').split(',')[0].trim() || req.socket.remoteAddress
  const clientId = `${clientAddress}@${new Date().toISOString()}`
  localNode.syncManager.addPeer(createWebSocketPeer({
    id: clientId,
    role: 'client',
    websocket: ws,
    expectPings: false,
    batchingByDefault: false,
    deletePeerStateOnClose: true
  }))
  ws.on('error', (e) => log(`error on connection ${clientId}: ${e && e.message}`))
})

server.on('upgrade', (req, socket, head) => {
  if (req.url === '/health') return socket.destroy()
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req))
})

let stopping = false
const shutdown = (signal) => {
  if (stopping) return
  stopping = true
  log(`${signal}: shutting down`)
  for (const ws of wss.clients) ws.terminate()
  Promise.resolve(localNode.gracefulShutdown()).finally(() => {
    server.close(() => process.exit(0))
    setTimeout(() => process.exit(0), 2000).unref()
  })
}
process.on('SIGTERM', () => shutdown('SIGTERM'))
process.on('SIGINT', () => shutdown('SIGINT'))

server.listen(Number(opts.port), opts.host, () => {
  const { port } = server.address()
  log(`sync server on ws://${opts.host}:${port}/sync (${opts['in-memory'] ? 'in memory' : `db ${opts.db}`}, crypto ${opts.crypto})`)
  process.stdout.write(`listening ${port}\n`)
})
