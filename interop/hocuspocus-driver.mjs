#!/usr/bin/env node
// hocuspocus-driver: hosts real, unmodified `@hocuspocus/provider` clients (4.x as
// `@hocuspocus/provider`, 3.x as the alias `hocuspocus-provider-v3`) over `yjs`, remote-controlled
// over stdin/stdout like yjs-driver.mjs (README.md, "hocuspocus-driver.mjs").
//
//   stdin : one JSON command per line    {"id":1,"cmd":"socket","socket":"s","url":"ws://…","version":4}
//   stdout: one JSON reply per command   {"id":1,"ok":true,...} | {"id":1,"ok":false,"error":"..."}
//           plus unsolicited events      {"event":"authenticationFailed","name":"a","reason":"…"}
//   stderr: human-readable logs only
//
// A *socket* is one HocuspocusProviderWebsocket; a *client* is one HocuspocusProvider (one
// document) attached to a socket, so several clients on one socket share it as in an app.

import { out, serveCommands, versions } from './command-loop.mjs'
import * as Y from 'yjs'
import * as V4 from '@hocuspocus/provider'
import * as V3 from 'hocuspocus-provider-v3'
import WebSocket from 'ws'

const DEFAULT_TIMEOUT_MS = 10000
const PROVIDERS = { 3: V3, 4: V4 }

const log = (...args) => process.stderr.write('[hocuspocus-driver] ' + args.join(' ') + '\n')
console.log = console.info = console.debug = (...args) => console.error(...args)
const emitEvent = (event, fields) => out({ event, ...fields })

let uncaughtExceptions = 0
process.on('uncaughtException', (err) => {
  uncaughtExceptions++
  log('uncaught exception:', err && err.stack ? err.stack : String(err))
  emitEvent('uncaughtException', { error: String(err && err.message ? err.message : err) })
})

// `ws` with a browser's behaviour for listeners: an exception in a message listener (the
// provider failing on a frame) is reported, and later frames are still delivered.
const messageErrors = []
class BrowserLikeWebSocket extends WebSocket {
  addEventListener (type, listener, options) {
    if (type !== 'message') return super.addEventListener(type, listener, options)
    const wrapped = (event) => {
      try { listener(event) } catch (err) {
        messageErrors.push(String(err && err.message ? err.message : err))
        log('error while handling a message:', err && err.stack ? err.stack : String(err))
        emitEvent('messageError', { error: messageErrors[messageErrors.length - 1] })
      }
    }
    listener.__wrapped = wrapped
    return super.addEventListener(type, wrapped, options)
  }

  removeEventListener (type, listener) {
    return super.removeEventListener(type, (listener && listener.__wrapped) || listener)
  }
}

// ---------------------------------------------------------------------------------------------
// Waiting on state

const waiters = new Set()
const notifyAll = () => { for (const w of waiters) w.check() }

/** Resolves with `check()`'s first non-undefined result, re-checked on every event of any client. */
const waitFor = ({ timeoutMs = DEFAULT_TIMEOUT_MS, check, describe }) => new Promise((resolve, reject) => {
  const waiter = {}
  const finish = (fn, value) => { clearTimeout(timer); waiters.delete(waiter); fn(value) }
  waiter.check = () => {
    let result
    try { result = check() } catch (e) { return finish(reject, e) }
    if (result !== undefined) finish(resolve, result)
  }
  waiter.abort = (err) => finish(reject, err)
  const timer = setTimeout(() => finish(reject, new Error(`timeout after ${timeoutMs} ms: ${describe()}`)), timeoutMs)
  waiters.add(waiter)
  waiter.check()
})

// ---------------------------------------------------------------------------------------------
// Sockets and clients

/** @type {Map<string, object>} */
const sockets = new Map()
/** @type {Map<string, object>} */
const clients = new Map()

function makeSocket (name, { url, version = 4, delay, minDelay, maxDelay, messageReconnectTimeout }) {
  const P = PROVIDERS[version]
  if (!P) throw new Error(`unknown provider version ${version}`)
  const opts = { url, WebSocketPolyfill: BrowserLikeWebSocket }
  if (delay !== undefined) opts.delay = delay
  if (minDelay !== undefined) opts.minDelay = minDelay
  if (maxDelay !== undefined) opts.maxDelay = maxDelay
  if (messageReconnectTimeout !== undefined) opts.messageReconnectTimeout = messageReconnectTimeout
  const ws = new P.HocuspocusProviderWebsocket(opts)
  const s = { name, version, ws, opens: 0, connects: 0, closes: [], statuses: [] }
  ws.on('open', () => { s.opens++; notifyAll() })
  ws.on('connect', () => { s.connects++; notifyAll() })
  ws.on('status', ({ status }) => { s.statuses.push(status); notifyAll() })
  ws.on('close', ({ event }) => {
    const rec = { code: event ? event.code : null, reason: event ? String(event.reason || '') : '' }
    s.closes.push(rec)
    emitEvent('socketClose', { socket: name, ...rec })
    notifyAll()
  })
  return s
}

function makeClient (name, m) {
  const socket = m.socket !== undefined ? getSocket(m.socket) : null
  const version = socket ? socket.version : (m.version ?? 4)
  const P = PROVIDERS[version]
  if (!P) throw new Error(`unknown provider version ${version}`)
  const doc = new Y.Doc()
  const c = {
    name, doc, version, token: m.token ?? null, authFailures: [], authenticated: [], stateless: [], closeMessages: [],
    unsyncedHistory: []
  }
  const config = {
    name: m.doc,
    document: doc,
    // A function, so that `setToken` changes what the provider sends next (on reconnect, or
    // when the server asks for the token again).
    token: () => c.token,
    onAuthenticationFailed: ({ reason }) => { c.authFailures.push(reason); emitEvent('authenticationFailed', { name, reason }); notifyAll() },
    onAuthenticated: ({ scope }) => { c.authenticated.push(scope); notifyAll() },
    onStateless: ({ payload }) => { c.stateless.push(payload); notifyAll() },
    onSynced: () => notifyAll(),
    onUnsyncedChanges: ({ number }) => { c.unsyncedHistory.push(number); notifyAll() },
    onClose: ({ event }) => { c.closeMessages.push({ code: event.code, reason: String(event.reason || '') }); notifyAll() }
  }
  if (m.sessionAwareness) config.sessionAwareness = true
  if (socket) {
    config.websocketProvider = socket.ws
  } else {
    config.url = m.url
    config.WebSocketPolyfill = BrowserLikeWebSocket
  }
  c.provider = new P.HocuspocusProvider(config)
  if (m.awarenessState !== undefined) c.provider.awareness.setLocalState(m.awarenessState)
  c.provider.awareness.on('change', notifyAll)
  doc.on('update', notifyAll)
  // A shared socket needs the provider attached; one it made itself is attached already.
  if (socket) c.provider.attach()
  c.socket = socket || { name: `${name}.socket`, version, ws: c.provider.configuration.websocketProvider, opens: 0, connects: 0, closes: [], statuses: [] }
  if (!socket) {
    const s = c.socket
    s.ws.on('open', () => { s.opens++; notifyAll() })
    s.ws.on('connect', () => { s.connects++; notifyAll() })
    s.ws.on('status', ({ status }) => { s.statuses.push(status); notifyAll() })
    s.ws.on('close', ({ event }) => { s.closes.push({ code: event ? event.code : null, reason: event ? String(event.reason || '') : '' }); notifyAll() })
  }
  return c
}

const getSocket = (name) => {
  const s = sockets.get(name)
  if (!s) throw new Error(`unknown socket ${JSON.stringify(name)}`)
  return s
}
const getClient = (name) => {
  const c = clients.get(name)
  if (!c) throw new Error(`unknown client ${JSON.stringify(name)}`)
  return c
}
const text = (c, key) => c.doc.getText(key || 't')
const deepEqual = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b))
const canonical = (v) => Array.isArray(v)
  ? v.map(canonical)
  : (v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])])) : v)
const matches = (state, fields) => state != null && Object.entries(fields).every(([k, v]) => deepEqual(state[k], v))
const awarenessList = (c) => [...c.provider.awareness.getStates()].map(([clientId, state]) => ({ clientId, state, self: clientId === c.doc.clientID }))
const socketStats = (s) => ({ opens: s.opens, connects: s.connects, closes: s.closes, statuses: s.statuses, status: s.ws.status })

// ---------------------------------------------------------------------------------------------
// Commands

const commands = {
  // One HocuspocusProviderWebsocket. `version`: 3 or 4. `delay`, `minDelay`, `maxDelay`: its
  // reconnect backoff (defaults: the provider's own, 1 s growing to 30 s with jitter);
  // `messageReconnectTimeout`: it closes and reconnects a socket silent this long (30 s).
  socket (m) {
    if (!m.socket || !m.url) throw new Error('socket needs socket, url')
    if (sockets.has(m.socket)) throw new Error(`socket ${m.socket} already exists`)
    sockets.set(m.socket, makeSocket(m.socket, m))
    return {}
  },

  // One HocuspocusProvider for document `doc`: on socket `socket`, or (with `url`, `version`)
  // on a socket of its own. `token` (string or null), `awarenessState`, `sessionAwareness`.
  attach (m) {
    if (!m.name || m.doc === undefined) throw new Error('attach needs name, doc')
    if (clients.has(m.name)) throw new Error(`client ${m.name} already exists`)
    const c = makeClient(m.name, m)
    clients.set(m.name, c)
    return { clientId: c.doc.clientID }
  },

  // What the provider sends as its token from now on.
  setToken (m) { getClient(m.name).token = m.token; return {} },

  // Asks the provider to send its token again (what it does when the server asks).
  sendToken (m) { getClient(m.name).provider.sendToken(); return {} },

  waitSynced (m) {
    const c = getClient(m.name)
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.provider.isSynced ? {} : undefined,
      describe: () => `not synced (socket ${JSON.stringify(socketStats(c.socket))}, auth failures ${JSON.stringify(c.authFailures)})`
    })
  },

  // Until the provider counts no unsaved change (every update acknowledged by the server).
  waitSaved (m) {
    const c = getClient(m.name)
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.provider.isSynced && c.provider.unsyncedChanges === 0 ? { unsyncedChanges: 0 } : undefined,
      describe: () => `unsyncedChanges ${c.provider.unsyncedChanges}, synced ${c.provider.isSynced} (history ${c.unsyncedHistory.join(',')})`
    })
  },

  waitAuthenticated (m) {
    const c = getClient(m.name)
    const n = m.count ?? 1
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.authenticated.length >= n ? { scope: c.authenticated[n - 1], scopes: c.authenticated } : undefined,
      describe: () => `authenticated ${JSON.stringify(c.authenticated)}, failures ${JSON.stringify(c.authFailures)}`
    })
  },

  waitAuthFailed (m) {
    const c = getClient(m.name)
    const n = m.count ?? 1
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.authFailures.length >= n ? { reason: c.authFailures[n - 1], reasons: c.authFailures } : undefined,
      describe: () => `no authentication failure (authenticated ${JSON.stringify(c.authenticated)})`
    })
  },

  // Until the server ended this document's connection with a CLOSE message.
  waitCloseMessage (m) {
    const c = getClient(m.name)
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.closeMessages.length ? c.closeMessages[0] : undefined,
      describe: () => 'no close message'
    })
  },

  insertText (m) {
    const c = getClient(m.name)
    const t = text(c, m.key)
    t.insert(m.index ?? t.length, m.text)
    return { text: t.toString() }
  },

  getText (m) { return { text: text(getClient(m.name), m.key).toString() } },

  waitText (m) {
    const c = getClient(m.name)
    if (m.equals === undefined && m.contains === undefined) throw new Error('waitText needs equals or contains')
    const t = text(c, m.key)
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => {
        const s = t.toString()
        if (m.equals !== undefined ? s === m.equals : s.includes(m.contains)) return { text: s }
      },
      describe: () => `text is ${JSON.stringify(t.toString())}`
    })
  },

  setAwareness (m) { getClient(m.name).provider.awareness.setLocalState(m.state ?? null); return {} },

  getAwareness (m) { return { states: awarenessList(getClient(m.name)) } },

  // Predicates as in yjs-driver: clientCountEquals, hasStateWith, lacksStateWith.
  waitAwareness (m) {
    const c = getClient(m.name)
    const preds = []
    if (m.clientCountEquals !== undefined) preds.push((l) => l.length === m.clientCountEquals)
    if (m.hasStateWith !== undefined) preds.push((l) => l.some((e) => matches(e.state, m.hasStateWith)))
    if (m.lacksStateWith !== undefined) preds.push((l) => !l.some((e) => matches(e.state, m.lacksStateWith)))
    if (preds.length === 0) throw new Error('waitAwareness needs a predicate')
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => {
        const l = awarenessList(c)
        if (preds.every((p) => p(l))) return { states: l }
      },
      describe: () => `awareness is ${JSON.stringify(awarenessList(c))}`
    })
  },

  sendStateless (m) { getClient(m.name).provider.sendStateless(m.payload); return {} },

  waitStateless (m) {
    const c = getClient(m.name)
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.stateless.includes(m.equals) ? { received: c.stateless } : undefined,
      describe: () => `stateless received ${JSON.stringify(c.stateless)}`
    })
  },

  // Until socket `socket` (or the client `name`'s socket) has opened `opens` times.
  waitOpens (m) {
    const s = m.socket !== undefined ? getSocket(m.socket) : getClient(m.name).socket
    return waitFor({
      timeoutMs: m.timeoutMs,
      check: () => s.opens >= m.opens ? socketStats(s) : undefined,
      describe: () => `socket ${JSON.stringify(socketStats(s))}`
    })
  },

  stats (m) {
    const c = getClient(m.name)
    const p = c.provider
    return {
      synced: p.isSynced,
      unsyncedChanges: p.unsyncedChanges,
      unsyncedHistory: c.unsyncedHistory,
      isAuthenticated: p.isAuthenticated,
      authorizedScope: p.authorizedScope ?? null,
      authenticated: c.authenticated,
      authFailures: c.authFailures,
      stateless: c.stateless,
      closeMessages: c.closeMessages,
      socket: socketStats(c.socket),
      messageErrors,
      uncaughtExceptions
    }
  },

  socketStats (m) { return socketStats(getSocket(m.socket)) },

  // Ends the socket's TCP connection without a close frame (the provider reconnects by itself).
  dropSocket (m) {
    const s = m.socket !== undefined ? getSocket(m.socket) : getClient(m.name).socket
    const ws = s.ws.webSocket
    if (!ws || !ws._socket) throw new Error('no open socket')
    ws._socket.destroy()
    return {}
  },

  detach (m) { getClient(m.name).provider.detach(); return {} },

  destroy (m) {
    const c = getClient(m.name)
    clients.delete(m.name)
    c.provider.destroy()
    c.doc.destroy()
    return {}
  },

  destroySocket (m) {
    const s = getSocket(m.socket)
    sockets.delete(m.socket)
    s.ws.destroy()
    return {}
  },

  exit () {
    setImmediate(() => process.stdout.write('', () => process.exit(0)))
    return {}
  }
}

serveCommands(commands)

emitEvent('ready', { versions: versions(['yjs', '@hocuspocus/provider', 'hocuspocus-provider-v3', 'ws']), pid: process.pid })
log('ready')
