#!/usr/bin/env node
// End-to-end check that the high-level jazz-tools 0.20.19 API (what Jazz apps use, not bare cojson)
// works against a sync server such as moai:
//
//   node jazz-tools-check.mjs --url ws://127.0.0.1:4201/sync [--timeout-ms 20000]
//
// Two separate clients A and B (own account, own LocalNode, own WebSocket, no storage; they share
// nothing but the server) run a todo-list scenario: A creates a list in a group everyone may write,
// B loads it by ID through the server and subscribes, A ticks a todo and B must see it, B appends
// one and A must see it. stdout gets exactly one JSON line ({"ok":true,...} / {"ok":false,...});
// everything else, jazz/cojson logs included, goes to stderr. Exit code 0 = pass, 1 = fail.
//
// Entry points, as a Node backend uses them (no react/browser peer deps are loaded):
// - credentials: `createJazzContextForNewAccount` (jazz-tools) over `createWebSocketPeer`
//   (cojson-transport-ws) — what `jazz-run account create` does to mint worker credentials;
// - clients: `startWorker` (jazz-tools/worker), which builds its own reconnecting WebSocket peer
//   from the `syncServer` URL and uses WasmCrypto, i.e. the documented server-worker path;
// - data: `co.map` / `co.list` / `z` / `Group` schemas and their `$jazz` API.

import { readFileSync } from 'node:fs'

// cojson's logger and jazz-tools write via console.log/info, which would pollute the one-line
// stdout contract. Route them to stderr before any Jazz module is evaluated (hence the dynamic
// imports below instead of static ones, which would be hoisted above this).
for (const level of ['log', 'info', 'debug', 'warn']) console[level] = console.error

const args = process.argv.slice(2)
const arg = (name, dflt) => {
  const i = args.indexOf(name)
  return i >= 0 && i + 1 < args.length ? args[i + 1] : dflt
}
const url = arg('--url')
const timeoutMs = Number(arg('--timeout-ms', '20000'))
const log = (...a) => console.error('[jazz-tools-check]', ...a)

let step = 'init'
let done = false
function finish (result, code) {
  if (done) return
  done = true
  process.stdout.write(JSON.stringify(result) + '\n')
  process.exitCode = code
}

// The whole run, shutdown included, must fit in this budget; the timer is unref'd once the result
// is printed, so it only fires then if something (a socket, a cojson timer) still holds the loop.
const hardTimer = setTimeout(() => {
  if (!done) finish({ ok: false, step, error: `hard timeout after ${timeoutMs} ms` }, 1)
  else log('process still alive after shutdown; forcing exit')
  process.exit(1)
}, timeoutMs)

process.on('unhandledRejection', (e) => { log('unhandledRejection', e); finish({ ok: false, step, error: `unhandledRejection: ${e?.stack ?? e}` }, 1); process.exit(1) })
process.on('uncaughtException', (e) => { log('uncaughtException', e); finish({ ok: false, step, error: `uncaughtException: ${e?.stack ?? e}` }, 1); process.exit(1) })

if (!url) {
  finish({ ok: false, step, error: 'usage: node jazz-tools-check.mjs --url ws://HOST:PORT/sync [--timeout-ms 20000]' }, 1)
  process.exit(1)
}

const { co, z, Group, createJazzContextForNewAccount, MockSessionProvider } = await import('jazz-tools')
const { startWorker } = await import('jazz-tools/worker')
const { createWebSocketPeer } = await import('cojson-transport-ws')
// The crypto jazz-tools/worker itself defaults to (it imports it from this very module path).
const { WasmCrypto } = await import('cojson/crypto/WasmCrypto')
// Initialise the WASM module once, before anything runs concurrently: cojson-core-wasm's async
// init (wasm-bindgen __wbg_init) is not safe to race — two concurrent first calls instantiate the
// module twice, objects of one instance are then used with the other's memory, and cojson dies
// with "memory access out of bounds" / a dlmalloc panic. (jazz-tools' own `jazz-tools/wasm`
// initWasm export would be the tool for this, but 0.20.19 ships it without its dist/worker/wasm.js.)
// The provider is stateless, so both clients use this one instance.
const crypto = await WasmCrypto.create()
const { WebSocket } = await import('ws') // Node 20 has no global WebSocket

const versionOf = (pkg) => JSON.parse(readFileSync(new URL(`./node_modules/${pkg}/package.json`, import.meta.url), 'utf8')).version
const versions = Object.fromEntries(['jazz-tools', 'cojson', 'cojson-transport-ws', 'cojson-core-wasm', 'ws'].map((p) => [p, versionOf(p)]))

const Todo = co.map({ title: z.string(), done: z.boolean() })
const TodoList = co.list(Todo)

// Per-call budget for jazz's own waits, leaving the rest of the hard budget for shutdown.
const stepMs = Math.max(1000, Math.floor(timeoutMs / 3))
const startedAt = Date.now()
const steps = {}
const mark = (name, extra = {}) => { steps[name] = { ms: Date.now() - startedAt, ...extra }; log('ok', name, JSON.stringify(extra)) }

// Mint credentials like `jazz-run account create`: a throw-away node that creates the account
// (account + profile + profile group + inbox), uploads it and goes away. The worker then has to
// load its own account back from the server — part of what we want to prove.
async function createCredentials (name) {
  const peer = createWebSocketPeer({ id: 'upstream', websocket: new WebSocket(url), role: 'server' })
  const ctx = await createJazzContextForNewAccount({
    creationProps: { name },
    peers: [peer],
    crypto,
    sessionProvider: new MockSessionProvider()
  })
  await ctx.account.$jazz.waitForAllCoValuesSync({ timeout: stepMs })
  const creds = { accountID: ctx.account.$jazz.id, accountSecret: ctx.node.getCurrentAgent().agentSecret }
  ctx.done() // gracefulShutdown: closes the peer (and its socket)
  return creds
}

// Event-driven wait on a subscription: resolves as soon as the latest delivered value satisfies
// `pred`, rejects at the deadline with the last value seen, so a failure says what was there.
function watch (label, subscribe) {
  let latest
  const waiters = new Set()
  const unsubscribe = subscribe((value) => {
    latest = value
    for (const w of waiters) w.check()
  })
  const until = (pred, what, ms = stepMs) => new Promise((resolve, reject) => {
    const w = {
      check () {
        let hit = false
        try { hit = latest !== undefined && pred(latest) } catch {}
        if (hit) { clearTimeout(w.timer); waiters.delete(w); resolve(latest) }
      },
      timer: setTimeout(() => {
        waiters.delete(w)
        reject(new Error(`${label}: timeout after ${ms} ms waiting for ${what}; last value: ${JSON.stringify(latest?.toJSON?.() ?? latest)}`))
      }, ms)
    }
    waiters.add(w)
    w.check()
  })
  return { until, unsubscribe }
}

// Plain JSON view of a loaded list of todos (for logs/results).
const plain = (list) => [...list].map((t) => ({ title: t.title, done: t.done }))

const workers = []
const unsubs = []
try {
  // Connections are opened one after the other, never concurrently: jazz-run's sync server (and
  // the reference server that mirrors it) names each client peer `<ip>@<ISO time, ms>`, so two
  // sockets from one host accepted in the same millisecond collide and one silently replaces the
  // other (its uploads are never acked). Real clients rarely hit that; a script easily does.
  step = 'credentials'
  const credsA = await createCredentials('jazz-tools-check A')
  const credsB = await createCredentials('jazz-tools-check B')
  mark('credentials', { accountA: credsA.accountID, accountB: credsB.accountID })

  step = 'startWorker'
  // asActiveAccount:false — two accounts live in this process, so nothing may rely on jazz's
  // global "active account"; every create/load below names its owner / loadAs explicitly.
  const start = (creds) => startWorker({ ...creds, syncServer: url, WebSocket, crypto, asActiveAccount: false })
  const wa = await start(credsA)
  workers.push(wa)
  await wa.waitForConnection()
  const wb = await start(credsB)
  workers.push(wb)
  await wb.waitForConnection()
  const A = wa.worker
  const B = wb.worker
  mark('startWorker', { profileA: A.$jazz.refs.profile?.id, profileB: B.$jazz.refs.profile?.id })

  step = 'a.create'
  const group = Group.create({ owner: A })
  group.addMember('everyone', 'writer')
  const first = Todo.create({ title: 'buy milk', done: false }, { owner: group })
  const listA = TodoList.create([first], { owner: group })
  await listA.$jazz.waitForSync({ timeout: stepMs })
  await first.$jazz.waitForSync({ timeout: stepMs })
  const listId = listA.$jazz.id
  mark('a.create', { listId, groupId: group.$jazz.id, todoId: first.$jazz.id })

  step = 'b.load'
  const loaded = await TodoList.load(listId, { loadAs: B, resolve: { $each: true } })
  if (!loaded.$isLoaded) throw new Error(`B could not load ${listId}: ${loaded.$jazz?.loadingState}`)
  if (loaded.length !== 1 || loaded[0].title !== 'buy milk' || loaded[0].done !== false) {
    throw new Error(`B loaded unexpected content: ${JSON.stringify(plain(loaded))}`)
  }
  mark('b.load', { list: plain(loaded) })

  step = 'b.subscribe'
  const onError = (label) => (v) => log(label, 'subscription error', v?.$jazz?.loadingState)
  const subB = watch('B', (cb) => TodoList.subscribe(listId, { loadAs: B, resolve: { $each: true }, onError: onError('B') }, cb))
  const subA = watch('A', (cb) => TodoList.subscribe(listId, { loadAs: A, resolve: { $each: true }, onError: onError('A') }, cb))
  unsubs.push(subB.unsubscribe, subA.unsubscribe)
  await subB.until((l) => l.length === 1, 'first delivery')
  await subA.until((l) => l.length === 1, 'first delivery')
  mark('b.subscribe')

  step = 'a.setDone'
  first.$jazz.set('done', true)
  const seenByB = await subB.until((l) => l[0]?.done === true, 'todo[0].done === true')
  mark('a.setDone', { list: plain(seenByB) })

  step = 'b.push'
  const bList = await subB.until(() => true, 'any value')
  const second = Todo.create({ title: 'walk dog', done: false }, { owner: bList.$jazz.owner })
  bList.$jazz.push(second)
  const seenByA = await subA.until((l) => l.length === 2 && l[1]?.title === 'walk dog', '2 items, [1] = walk dog')
  // B's own writes must reach the server too, as an app's would before closing.
  await bList.$jazz.waitForSync({ timeout: stepMs })
  mark('b.push', { list: plain(seenByA) })

  step = 'shutdown'
  for (const u of unsubs.splice(0)) u()
  // shutdownWorker = waitForAllCoValuesSync + close the socket + gracefulShutdown of the node.
  await Promise.all(workers.splice(0).map((w) => w.shutdownWorker()))
  mark('shutdown')

  finish({ ok: true, versions, url, listId, accounts: { A: credsA.accountID, B: credsB.accountID }, steps }, 0)
} catch (e) {
  log('FAILED at', step, e)
  finish({ ok: false, step, error: String(e?.message ?? e), versions, url, steps }, 1)
  // No orderly shutdown on failure: shutdownWorker waits for sync first (the server may be what
  // is broken) and the reconnecting peer would keep the process alive, so exit right away.
  process.exit(1)
}
hardTimer.unref()
