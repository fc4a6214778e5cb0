#!/usr/bin/env node
// yjs-driver: hosts real, unmodified `yjs` + `y-websocket` clients and lets a test process
// remote-control them over stdin/stdout. See README.md for the command protocol.
//
//   stdin : one JSON command per line    {"id":1,"cmd":"connect","name":"a",...}
//   stdout: one JSON reply per command   {"id":1,"ok":true,...} | {"id":1,"ok":false,"error":"..."}
//           plus unsolicited events      {"event":"status","name":"a","status":"connected"}
//   stderr: human-readable logs only
//
// Commands run concurrently: a `wait*` command never blocks the commands after it, so replies
// can come out of order; match them by `id`.

import { out, serveCommands, versions } from './command-loop.mjs'
import * as Y from 'yjs'
import { WebsocketProvider } from 'y-websocket'
import * as awarenessProtocol from 'y-protocols/awareness'
import WebSocket from 'ws'

const DEFAULT_TIMEOUT_MS = 10000
const MESSAGE_TYPES = ['sync', 'awareness', 'auth', 'queryAwareness'] // y-websocket message type ids 0..3

// ---------------------------------------------------------------------------------------------
// Output. stdout carries the protocol only, so everything any library prints goes to stderr
// (y-websocket uses console.warn/error, which already go there; console.log would not).

const log = (...args) => process.stderr.write('[yjs-driver] ' + args.join(' ') + '\n')
console.log = console.info = console.debug = (...args) => console.error(...args)

const emitEvent = (event, fields) => out({ event, ...fields })

// Safety net: an exception escaping a library callback would kill the process (a browser would
// log it and go on). Message handling has its own catch (see browserLikeWebSocket), so this
// should never fire; report it as an event and go on.
let uncaughtExceptions = 0
process.on('uncaughtException', (err) => {
  uncaughtExceptions++
  log('uncaught exception:', err && err.stack ? err.stack : String(err))
  emitEvent('uncaughtException', { error: String(err && err.message ? err.message : err) })
})

// ---------------------------------------------------------------------------------------------
// WebSocket polyfill

// `ws` with one browser behaviour restored: in a browser an exception thrown by an `onmessage`
// handler (y-websocket failing to decode a malformed frame) is reported and the next frames are
// still delivered. With plain `ws` the exception escapes from inside its frame parser, which
// also loses the frames that followed in the same TCP read. So catch it per message and report.
const browserLikeWebSocket = (onMessageError) => class extends WebSocket {
  get onmessage () { return super.onmessage }
  set onmessage (fn) {
    super.onmessage = fn && ((event) => {
      try { fn(event) } catch (err) { onMessageError(err) }
    })
  }
}

// ---------------------------------------------------------------------------------------------
// Clients

/** @type {Map<string, Client>} */
const clients = new Map()

class Client {
  constructor (name, { url, room, params = {}, protocols = [], awarenessState, maxBackoffTime, startOffline = false }) {
    this.name = name
    this.doc = new Y.Doc()
    // Own Awareness so that the initial local state is in place before the first connection
    // (y-websocket sends the local state right after SyncStep1 on `open`). Without the
    // `awarenessState` option the y-protocols default `{}` stays, as in a real app.
    this.awareness = new awarenessProtocol.Awareness(this.doc)
    if (awarenessState !== undefined) this.awareness.setLocalState(awarenessState)

    this.closes = [] // every 'connection-close' seen, oldest first
    this.closeCursor = 0 // index of the next close that `waitClosed` will return
    this.statuses = [] // status transitions, oldest first
    this.statusCounts = { connecting: 0, connected: 0, disconnected: 0 }
    this.received = Object.fromEntries(MESSAGE_TYPES.map((t) => [t, 0]))
    this.connectionErrors = []
    this.waiters = new Set() // pending waits, so that `destroy` can fail them
    this.blackHoled = [] // TCP sockets muted by dropSocket mode "silent"

    this.messageErrors = []
    const WS = browserLikeWebSocket((err) => {
      log(`client ${name}: error while handling a message:`, err && err.stack ? err.stack : String(err))
      this.messageErrors.push(String(err && err.message ? err.message : err))
      emitEvent('messageError', { name, error: this.messageErrors[this.messageErrors.length - 1] })
    })
    // Created with connect: false so that our listeners see the very first 'connecting' status;
    // connect() below is exactly what the constructor would have called.
    const opts = { WebSocketPolyfill: WS, params, protocols, awareness: this.awareness, disableBc: true, connect: false }
    if (maxBackoffTime !== undefined) opts.maxBackoffTime = maxBackoffTime
    this.provider = new WebsocketProvider(url, room, this.doc, opts)
    // Count received frames by message type without changing behaviour (`messageHandlers` is a
    // per-provider copy of y-websocket's handler table).
    this.provider.messageHandlers = this.provider.messageHandlers.map((handler, type) => (...args) => {
      this.received[MESSAGE_TYPES[type]]++
      return handler(...args)
    })
    this.listen()
    if (!startOffline) this.provider.connect()
  }

  listen () {
    const p = this.provider
    const name = this.name
    p.on('status', ({ status }) => {
      this.statuses.push(status)
      this.statusCounts[status] = (this.statusCounts[status] || 0) + 1
      emitEvent('status', { name, status })
    })
    p.on('sync', (synced) => emitEvent('sync', { name, synced }))
    p.on('connection-error', (ev) => {
      const error = String((ev && (ev.message || (ev.error && ev.error.message))) || 'error')
      this.connectionErrors.push(error)
      emitEvent('connection-error', { name, error })
    })
    // `event` is the socket's CloseEvent for closes reported by the socket (server close, network
    // drop, failed handshake) and null when y-websocket closed it locally (disconnect() or its
    // 30 s no-message watchdog). y-websocket emits 'closed' (terminal, no reconnect) right after
    // 'connection-close' in the same call, so the record is completed in a microtask.
    p.on('connection-close', (ev) => {
      const rec = ev
        ? { code: ev.code, reason: String(ev.reason || ''), wasClean: !!ev.wasClean, local: false, terminal: false }
        : { code: null, reason: '', wasClean: true, local: true, terminal: false }
      rec.index = this.closes.length
      this.closes.push(rec)
      queueMicrotask(() => {
        rec.shouldConnect = p.shouldConnect
        emitEvent('connection-close', { name, ...rec })
        if (rec.terminal) emitEvent('closed', { name, code: rec.code, reason: rec.reason })
        this.notify()
      })
    })
    p.on('closed', () => { this.closes[this.closes.length - 1].terminal = true })
  }

  // Re-evaluate pending waits. Waits also subscribe to doc/awareness/provider events directly;
  // this is for state the driver itself records (close list).
  notify () { for (const w of this.waiters) w.check() }

  /**
   * Event-driven wait: resolves with `check()`'s first non-undefined result, re-evaluated on each
   * of `events` ([emitter, eventName] pairs) and on `notify()`; rejects after `timeoutMs` with
   * `describe()` so the failure shows the actual state.
   */
  waitFor ({ timeoutMs = DEFAULT_TIMEOUT_MS, check, describe, events = [] }) {
    return new Promise((resolve, reject) => {
      const waiter = {}
      const finish = (fn, value) => {
        clearTimeout(timer)
        for (const [emitter, ev] of events) emitter.off(ev, waiter.check)
        this.waiters.delete(waiter)
        fn(value)
      }
      waiter.check = () => {
        let result
        try { result = check() } catch (e) { return finish(reject, e) }
        if (result !== undefined) finish(resolve, result)
      }
      waiter.abort = (err) => finish(reject, err)
      const timer = setTimeout(() => finish(reject, new Error(`timeout after ${timeoutMs} ms: ${describe()}`)), timeoutMs)
      for (const [emitter, ev] of events) emitter.on(ev, waiter.check)
      this.waiters.add(waiter)
      waiter.check()
    })
  }

  awarenessList () {
    return [...this.awareness.getStates()].map(([clientId, state]) => ({ clientId, state, self: clientId === this.doc.clientID }))
  }

  destroy () {
    for (const w of [...this.waiters]) w.abort(new Error(`client ${this.name} destroyed`))
    this.provider.destroy()
    for (const sock of this.blackHoled) sock.destroy()
    this.awareness.destroy()
    this.doc.destroy()
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers

const getClient = (name) => {
  const c = clients.get(name)
  if (!c) throw new Error(`unknown client ${JSON.stringify(name)}`)
  return c
}
const text = (c, key) => c.doc.getText(key || 't')
const map = (c) => c.doc.getMap('m')
const deepEqual = (a, b) => JSON.stringify(canonical(a)) === JSON.stringify(canonical(b))
const canonical = (v) => Array.isArray(v)
  ? v.map(canonical)
  : (v && typeof v === 'object' ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, canonical(v[k])])) : v)
// does `state` carry every field of `fields` with an equal value?
const matches = (state, fields) => state != null && Object.entries(fields).every(([k, v]) => deepEqual(state[k], v))

// ---------------------------------------------------------------------------------------------
// Commands: each returns (a promise of) an object merged into the reply.

const commands = {
  connect (m) {
    if (!m.name || !m.url || m.room === undefined) throw new Error('connect needs name, url, room')
    if (clients.has(m.name)) throw new Error(`client ${m.name} already exists`)
    const c = new Client(m.name, m)
    clients.set(m.name, c)
    return { clientId: c.doc.clientID, url: c.provider.url }
  },

  waitSynced (m) {
    const c = getClient(m.name)
    return c.waitFor({
      timeoutMs: m.timeoutMs,
      check: () => c.provider.synced ? {} : undefined,
      describe: () => `not synced (status log: ${c.statuses.join(',')}; closes: ${JSON.stringify(c.closes)})`,
      events: [[c.provider, 'sync']]
    })
  },

  insertText (m) {
    const c = getClient(m.name)
    const t = text(c, m.key)
    t.insert(m.index ?? t.length, m.text) // default: append
    return { text: t.toString() }
  },

  deleteText (m) {
    const c = getClient(m.name)
    text(c, m.key).delete(m.index, m.length)
    return { text: text(c, m.key).toString() }
  },

  getText (m) { return { text: text(getClient(m.name), m.key).toString() } },

  waitText (m) {
    const c = getClient(m.name)
    if (m.equals === undefined && m.contains === undefined) throw new Error('waitText needs equals or contains')
    const t = text(c, m.key)
    return c.waitFor({
      timeoutMs: m.timeoutMs,
      check: () => {
        const s = t.toString()
        if (m.equals !== undefined ? s === m.equals : s.includes(m.contains)) return { text: s }
      },
      describe: () => `text is ${JSON.stringify(t.toString())}`,
      events: [[c.doc, 'update']]
    })
  },

  setMap (m) {
    const c = getClient(m.name)
    map(c).set(m.key, m.value)
    return {}
  },

  getMap (m) { return { map: map(getClient(m.name)).toJSON() } },

  waitMap (m) {
    const c = getClient(m.name)
    return c.waitFor({
      timeoutMs: m.timeoutMs,
      check: () => deepEqual(map(c).get(m.key), m.equals) ? { map: map(c).toJSON() } : undefined,
      describe: () => `map is ${JSON.stringify(map(c).toJSON())}`,
      events: [[c.doc, 'update']]
    })
  },

  stateVector (m) {
    return { stateVector: Buffer.from(Y.encodeStateVector(getClient(m.name).doc)).toString('base64') }
  },

  clientId (m) { return { clientId: getClient(m.name).doc.clientID } },

  setAwareness (m) {
    getClient(m.name).awareness.setLocalState(m.state ?? null)
    return {}
  },

  getAwareness (m) { return { states: getClient(m.name).awarenessList() } },

  // Predicates (all given ones must hold): clientCountEquals (states incl. self), hasStateWith /
  // lacksStateWith (some / no state has all these fields), hasClientId / lacksClientId.
  waitAwareness (m) {
    const c = getClient(m.name)
    const preds = []
    if (m.clientCountEquals !== undefined) preds.push((l) => l.length === m.clientCountEquals)
    if (m.hasStateWith !== undefined) preds.push((l) => l.some((e) => matches(e.state, m.hasStateWith)))
    if (m.lacksStateWith !== undefined) preds.push((l) => !l.some((e) => matches(e.state, m.lacksStateWith)))
    if (m.hasClientId !== undefined) preds.push((l) => l.some((e) => e.clientId === m.hasClientId))
    if (m.lacksClientId !== undefined) preds.push((l) => !l.some((e) => e.clientId === m.lacksClientId))
    if (preds.length === 0) throw new Error('waitAwareness needs a predicate')
    return c.waitFor({
      timeoutMs: m.timeoutMs,
      check: () => {
        const l = c.awarenessList()
        if (preds.every((p) => p(l))) return { states: l }
      },
      describe: () => `awareness is ${JSON.stringify(c.awarenessList())}`,
      // 'change' fires on add/remove/content change, not on same-content renewals
      events: [[c.awareness, 'change']]
    })
  },

  disconnect (m) { getClient(m.name).provider.disconnect(); return {} },

  reconnect (m) { getClient(m.name).provider.connect(); return {} },

  destroy (m) {
    const c = getClient(m.name)
    clients.delete(m.name)
    c.destroy()
    return {}
  },

  // Kill the current connection without a WebSocket close frame from this side.
  //   mode "destroy" (default): close the TCP socket (server sees FIN, no close frame)
  //   mode "reset": abort the TCP connection (server sees RST)
  //   mode "silent": black hole - stop reading and drop everything y-websocket sends, keep TCP
  //       open (the server's pings go unanswered; the client notices only via its 30 s watchdog,
  //       then reconnects on a new socket while the old one stays muted)
  // stayOffline: true stops y-websocket from reconnecting afterwards (until `reconnect`).
  dropSocket (m) {
    const c = getClient(m.name)
    const ws = c.provider.ws
    if (!ws || ws.readyState !== WebSocket.OPEN || !ws._socket) throw new Error(`client ${m.name} has no open socket`)
    if (m.stayOffline) c.provider.shouldConnect = false
    const mode = m.mode || 'destroy'
    if (mode === 'destroy') ws._socket.destroy()
    else if (mode === 'reset') ws._socket.resetAndDestroy()
    else if (mode === 'silent') {
      // A real black hole also swallows whatever the client does later, including the close
      // frame of y-websocket's 30 s watchdog: keep the TCP socket open and mute until the server
      // gives up on it (or the client is destroyed), so the server's ping timeout is what ends it.
      ws._socket.pause()
      ws._socket.removeAllListeners('data') // already-buffered bytes must not be parsed either
      ws.send = () => {}
      ws.close = () => {}
      c.blackHoled.push(ws._socket)
    } else throw new Error(`unknown mode ${mode}`)
    return {}
  },

  // Returns the next connection-close not yet returned by an earlier waitClosed of this client
  // (so a close that happened before the command arrived is not missed), or with `since: n` the
  // first close with index >= n (take n = stats.closeCount before triggering a close to get
  // "the next close from now"). `gaveUp` is true when y-websocket will not reconnect by itself
  // (4400-4499 close, or stayOffline/disconnect).
  waitClosed (m) {
    const c = getClient(m.name)
    return c.waitFor({
      timeoutMs: m.timeoutMs,
      check: () => {
        const i = Math.max(c.closeCursor, m.since ?? 0)
        const rec = c.closes[i]
        if (rec && rec.shouldConnect !== undefined) { // completed (see listen())
          c.closeCursor = i + 1
          return { ...rec, gaveUp: !c.provider.shouldConnect, closeCount: c.closes.length }
        }
      },
      describe: () => `no new close (closes so far: ${JSON.stringify(c.closes)})`
    })
  },

  stats (m) {
    const c = getClient(m.name)
    const p = c.provider
    return {
      closeCount: c.closes.length,
      closes: c.closes,
      statusCounts: c.statusCounts,
      statuses: c.statuses,
      connectionErrors: c.connectionErrors,
      messageErrors: c.messageErrors,
      received: c.received,
      synced: p.synced,
      wsconnected: p.wsconnected,
      shouldConnect: p.shouldConnect,
      uncaughtExceptions
    }
  },

  exit () {
    // reply first, then leave once stdout has flushed
    setImmediate(() => process.stdout.write('', () => process.exit(0)))
    return {}
  }
}

// ---------------------------------------------------------------------------------------------
// Main loop

serveCommands(commands)

emitEvent('ready', { versions: versions(['yjs', 'y-websocket', 'y-protocols', 'ws']), pid: process.pid })
log('ready')
