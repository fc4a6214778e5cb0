#!/usr/bin/env node
// cojson-driver: hosts real, unmodified Jazz clients (npm `cojson` + `cojson-transport-ws`, `ws`
// as the WebSocket implementation) and lets a test process remote-control them over
// stdin/stdout. See COJSON.md for the command protocol.
//
//   stdin : one JSON command per line    {"id":1,"cmd":"createAccount","name":"a","url":"ws://..."}
//   stdout: one JSON reply per command   {"id":1,"ok":true,...} | {"id":1,"ok":false,"error":"..."}
//           plus unsolicited events      {"event":"status","name":"a","connected":true}
//   stderr: human-readable logs only (the driver's and cojson's logger)
//
// Each named client is one cojson `LocalNode` with no local storage (so two names never share
// anything but the server) and one `WebSocketPeerWithReconnection` to the sync server, wired as
// jazz-tools wires it. Commands run concurrently: match replies by `id`.

import { out, serveCommands, versions } from './command-loop.mjs'
import { isDeepStrictEqual } from 'node:util'
import WebSocket from 'ws'
import { LocalNode } from 'cojson'
import { WasmCrypto } from 'cojson/crypto/WasmCrypto'
import { NapiCrypto } from 'cojson/crypto/NapiCrypto'
import { WebSocketPeerWithReconnection } from 'cojson-transport-ws'

const DEFAULT_TIMEOUT_MS = 10000
const ACTIONS = ['load', 'known', 'content', 'done', 'reconcile', 'reconcile-ack']

// ---------------------------------------------------------------------------------------------
// Output. stdout carries the protocol only; cojson's logger uses console.debug/info/warn/error,
// so send console.log/info/debug to stderr too.

const log = (...args) => process.stderr.write('[cojson-driver] ' + args.join(' ') + '\n')
console.log = console.info = console.debug = (...args) => console.error(...args)
const emitEvent = (event, fields) => out({ event, ...fields })
const errText = (e) => String(e && e.message ? e.message : e)

let uncaughtExceptions = 0
const onUncaught = (err) => {
  uncaughtExceptions++
  log('uncaught:', err && err.stack ? err.stack : String(err))
  emitEvent('uncaughtException', { error: errText(err) })
}
process.on('uncaughtException', onUncaught)
process.on('unhandledRejection', onUncaught)

// Crypto: WASM is what jazz-tools picks by default; COJSON_CRYPTO=napi selects the native
// binding (same bytes, spec §8). One provider is shared by all nodes.
const cryptoKind = process.env.COJSON_CRYPTO === 'napi' ? 'napi' : 'wasm'
const crypto = cryptoKind === 'napi' ? await NapiCrypto.create() : await WasmCrypto.create()

// ---------------------------------------------------------------------------------------------
// Clients

/** @type {Map<string, Client>} */
const clients = new Map()

const countFrame = (counter, data) => {
  counter.frames++
  if (typeof data !== 'string') { counter.binaryFrames++; return }
  for (const part of data.split('\n')) {
    let msg
    try { msg = JSON.parse(part) } catch { counter.unparsable++; continue }
    if (msg && typeof msg === 'object' && 'action' in msg) {
      counter.messages[msg.action] = (counter.messages[msg.action] || 0) + 1
    } else if (msg && typeof msg === 'object' && 'time' in msg) {
      counter.pings++
      counter.lastPing = msg
    }
  }
}
const newCounter = () => ({ frames: 0, binaryFrames: 0, unparsable: 0, pings: 0, lastPing: null, messages: Object.fromEntries(ACTIONS.map((a) => [a, 0])) })

class Client {
  constructor (name, url, { reconnectionTimeout } = {}) {
    this.name = name
    this.url = url // also the peer ID on the client side, as in jazz-tools
    this.node = null
    this.pendingPeers = [] // peers created before the LocalNode exists (handed to its constructor)
    this.waiters = new Set() // pending waits, failed by `close`
    this.opens = 0
    this.closes = [] // {code, reason, wasClean}, oldest first
    this.connectionErrors = []
    this.received = newCounter()
    this.sent = newCounter()
    this.connected = false
    this.socket = null

    const client = this
    // `ws` plus counting of frames in both directions; behaviour unchanged.
    class CountingWebSocket extends WebSocket {
      constructor (address) {
        super(address)
        client.socket = this
        this.addEventListener('open', () => { client.opens++; emitEvent('socket-open', { name }) })
        this.addEventListener('message', (ev) => countFrame(client.received, ev.data))
        this.addEventListener('error', (ev) => {
          const error = errText(ev.error || ev.message || 'error')
          client.connectionErrors.push(error)
          emitEvent('connection-error', { name, error })
        })
        this.addEventListener('close', (ev) => {
          const rec = { code: ev.code, reason: String(ev.reason || ''), wasClean: !!ev.wasClean }
          client.closes.push(rec)
          emitEvent('connection-close', { name, ...rec })
        })
      }

      send (data, ...rest) {
        countFrame(client.sent, data)
        return super.send(data, ...rest)
      }
    }

    // Wired as jazz-tools does: removePeer is a no-op, because the peer is persistent and the
    // SyncManager keeps its known states across reconnects (a new Peer with the same ID).
    this.wsPeer = new WebSocketPeerWithReconnection({
      peer: url,
      reconnectionTimeout: reconnectionTimeout,
      WebSocketConstructor: CountingWebSocket,
      addPeer: (peer) => {
        if (this.node) this.node.syncManager.addPeer(peer)
        else this.pendingPeers.push(peer)
      },
      removePeer: () => {}
    })
    // `connected` = the transport got its first frame on the current socket (cojson's notion).
    this.wsPeer.subscribe((connected) => {
      if (connected === this.connected) return
      this.connected = connected
      emitEvent('status', { name, connected })
    })
  }

  start () {
    this.wsPeer.enable() // creates the first socket synchronously and calls addPeer
    return this.pendingPeers
  }

  attach (node) {
    this.node = node
    this.pendingPeers = []
  }

  close () {
    this.wsPeer.disable()
    if (this.node) this.node.gracefulShutdown()
    for (const w of [...this.waiters]) w.fail(new Error(`client ${this.name} closed`))
  }

  serverPeer () {
    return this.node && this.node.syncManager.peers[this.url]
  }
}

const getClient = (name) => {
  const c = clients.get(name)
  if (!c || !c.node) throw new Error(`unknown client ${JSON.stringify(name)}`)
  return c
}

const newClient = (name, url, opts) => {
  if (typeof name !== 'string' || !name) throw new Error('name required')
  if (clients.has(name)) throw new Error(`client ${JSON.stringify(name)} already exists`)
  if (typeof url !== 'string') throw new Error('url required')
  const c = new Client(name, url, opts)
  clients.set(name, c) // reserved now; `node` is set once the account exists
  return c
}

// Race a promise against a timeout; the error says what was being waited for.
const withTimeout = (promise, ms, what) => {
  let t
  return Promise.race([
    promise,
    new Promise((_resolve, reject) => { t = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms) })
  ]).finally(() => clearTimeout(t))
}

// Load a CoValue (through the server if not in memory) and fail if it is unavailable.
const loadAvailable = async (c, id, timeoutMs = DEFAULT_TIMEOUT_MS) => {
  const v = await withTimeout(c.node.load(id), timeoutMs, `loading ${id}`)
  if (v === 'unavailable') throw new Error(`${id} unavailable`)
  return v
}

const contentJSON = (v) => v.toJSON()

// Event-driven wait: subscribe to the CoValue and resolve once `predicate(content)` holds.
// Fails after timeoutMs with `describe(last content)`, or at once if the value is unavailable.
const waitForContent = (c, id, predicate, describe, timeoutMs = DEFAULT_TIMEOUT_MS) =>
  new Promise((resolve, reject) => {
    let done = false
    let last
    let unsub = null
    const waiter = {
      fail: (err) => finish(err)
    }
    const finish = (err, value) => {
      if (done) return
      done = true
      clearTimeout(timer)
      c.waiters.delete(waiter)
      if (unsub) unsub()
      if (err) reject(err)
      else resolve(value)
    }
    const timer = setTimeout(() => {
      finish(new Error(`timeout after ${timeoutMs} ms: ${last === undefined ? 'not loaded yet' : describe(last)}`))
    }, timeoutMs)
    c.waiters.add(waiter)
    unsub = c.node.subscribe(id, (v) => {
      if (v === 'unavailable') return finish(new Error(`${id} unavailable`))
      last = v
      try {
        if (predicate(v)) finish(null, v)
      } catch (e) { finish(e) }
    })
    if (done) unsub()
  })

// Until the server peer's confirmed known state covers ours for each id (cojson's own
// `waitForSyncWithPeer`, i.e. the server acked with `known`).
const waitSyncedIds = async (c, ids, timeoutMs) => {
  const sm = c.node.syncManager
  if (!c.serverPeer()) throw new Error(`client ${c.name} has no server peer`)
  const waiter = { fail: null }
  const failed = new Promise((_resolve, reject) => { waiter.fail = reject })
  c.waiters.add(waiter)
  try {
    await Promise.race([failed, Promise.all(ids.map((id) => sm.waitForSyncWithPeer(c.url, id, timeoutMs)))])
  } finally {
    c.waiters.delete(waiter)
  }
}

const availableIds = (node) => [...node.allCoValues()].filter((core) => core.isAvailable()).map((core) => core.id)

// Session of this node in a CoValue: same random part; account CoValues use the agent form.
const ownSessionOf = (node, sessions) => {
  const suffix = node.currentSessionID.slice(node.currentSessionID.indexOf('_session_'))
  return sessions.find((s) => s.endsWith(suffix))
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket (forgery tests): open, send frames, collect replies.

const sendRaw = ({ url, frames = [], collectMs = 1000, untilMessages, keepPings = false, openTimeoutMs = 5000 }) =>
  new Promise((resolve) => {
    const ws = new WebSocket(url)
    const received = [] // every frame, in order (strings; binary as base64 marked)
    const messages = [] // parsed non-ping messages
    let pings = 0
    let opened = false
    let closeCode = null
    let closeReason = null
    let error = null
    let timer = null
    let finished = false

    const finish = () => {
      if (finished) return
      finished = true
      clearTimeout(timer)
      if (ws.readyState === WebSocket.OPEN) ws.close(1000)
      else if (ws.readyState === WebSocket.CONNECTING) ws.terminate()
      resolve({ opened, frames: received, messages, pings, closeCode, closeReason, error })
    }

    timer = setTimeout(finish, openTimeoutMs)
    ws.on('open', () => {
      opened = true
      clearTimeout(timer)
      for (const f of frames) ws.send(typeof f === 'string' ? f : JSON.stringify(f))
      timer = setTimeout(finish, collectMs)
    })
    ws.on('message', (data, isBinary) => {
      const text = isBinary ? null : data.toString()
      let onlyPings = text !== null
      if (text !== null) {
        for (const part of text.split('\n')) {
          let msg
          try { msg = JSON.parse(part) } catch { onlyPings = false; continue }
          if (msg && typeof msg === 'object' && 'time' in msg && !('action' in msg)) { pings++; continue }
          onlyPings = false
          messages.push(msg)
        }
      }
      if (!onlyPings || keepPings) received.push(text ?? `binary:${Buffer.from(data).toString('base64')}`)
      if (untilMessages !== undefined && messages.length >= untilMessages) finish()
    })
    ws.on('error', (e) => { error = errText(e) })
    ws.on('close', (code, reason) => {
      closeCode = code
      closeReason = reason.toString()
      finish()
    })
  })

// ---------------------------------------------------------------------------------------------
// Commands

const commands = {
  async createAccount ({ name, url, profileName, reconnectionTimeout, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = newClient(name, url, { reconnectionTimeout })
    try {
      const peers = c.start()
      const { node, accountID, accountSecret, sessionID } = await LocalNode.withNewlyCreatedAccount({
        creationProps: { name: profileName ?? name },
        peers,
        crypto
      })
      c.attach(node)
      // Account, profile group and profile must be on the server before another node can use
      // this account (openAccount) or load values it owns.
      await waitSyncedIds(c, availableIds(node), timeoutMs)
      return { accountId: accountID, agentSecret: accountSecret, sessionId: sessionID }
    } catch (e) {
      c.close()
      clients.delete(name)
      throw e
    }
  },

  async openAccount ({ name, url, accountId, agentSecret, sessionId, reconnectionTimeout, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = newClient(name, url, { reconnectionTimeout })
    try {
      const peers = c.start()
      const node = await withTimeout(LocalNode.withLoadedAccount({
        accountID: accountId,
        accountSecret: agentSecret,
        sessionID: sessionId, // undefined = a new session (never share a live session)
        peers,
        crypto
      }), timeoutMs, `loading account ${accountId}`)
      c.attach(node)
      return { accountId, sessionId: node.currentSessionID }
    } catch (e) {
      c.close()
      clients.delete(name)
      throw e
    }
  },

  createGroup ({ name, everyone }) {
    const c = getClient(name)
    const group = c.node.createGroup()
    if (everyone) group.addMember('everyone', everyone)
    return { groupId: group.id }
  },

  async addMember ({ name, groupId, memberAccountId, role, timeoutMs }) {
    const c = getClient(name)
    const group = await loadAvailable(c, groupId, timeoutMs)
    if (memberAccountId === 'everyone') {
      group.addMember('everyone', role)
    } else {
      const account = await loadAvailable(c, memberAccountId, timeoutMs)
      group.addMember(account, role)
    }
    return { group: contentJSON(group) }
  },

  // `child.extend(parent, role)`: the child group inherits the parent's members (`inherit`,
  // stored as `parent_<id>: "extend"`) or gives them one fixed role.
  async extendGroup ({ name, groupId, parentId, role = 'inherit', timeoutMs }) {
    const c = getClient(name)
    const child = await loadAvailable(c, groupId, timeoutMs)
    const parent = await loadAvailable(c, parentId, timeoutMs)
    child.extend(parent, role)
    return { group: contentJSON(child) }
  },

  async createMap ({ name, groupId, init, privacy = 'private', timeoutMs }) {
    const c = getClient(name)
    const group = await loadAvailable(c, groupId, timeoutMs)
    const map = group.createMap(init && Object.keys(init).length ? init : undefined, null, privacy)
    return { mapId: map.id }
  },

  async setKey ({ name, coId: id, key, value, privacy = 'private', timeoutMs }) {
    const c = getClient(name)
    const map = await loadAvailable(c, id, timeoutMs)
    map.set(key, value, privacy)
    const current = c.node.getLoaded(id)
    const edit = current.lastEditAt(key)
    return { map: contentJSON(current), madeAt: edit ? edit.at.getTime() : null, by: edit ? edit.by : null }
  },

  async delKey ({ name, coId: id, key, privacy = 'private', timeoutMs }) {
    const c = getClient(name)
    const map = await loadAvailable(c, id, timeoutMs)
    map.delete(key, privacy)
    return { map: contentJSON(c.node.getLoaded(id)) }
  },

  // A Jazz auth token for this client's account, exactly as jazz-tools' generateAuthToken makes
  // it: the current agent signs secureHash({id, createdAt}); `createdAt` defaults to now.
  async authToken ({ name, createdAt }) {
    const c = getClient(name)
    const node = c.node
    const id = node.expectCurrentAccount('authToken').id
    const at = createdAt ?? Date.now()
    const payload = node.crypto.secureHash({ id, createdAt: at })
    const signature = node.crypto.sign(node.getCurrentAgent().currentSignerSecret(), payload)
    return { token: `${signature}~${id}~${at}` }
  },

  async getMap ({ name, coId: id, timeoutMs }) {
    const c = getClient(name)
    return { map: contentJSON(await loadAvailable(c, id, timeoutMs)) }
  },

  async waitMap ({ name, coId: id, key, equals, absent = false, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = getClient(name)
    if (typeof key !== 'string') throw new Error('key required')
    const pred = absent
      ? (m) => m.get(key) === undefined
      : (m) => isDeepStrictEqual(m.get(key), equals)
    const m = await waitForContent(c, id, pred, (m) => `map is ${JSON.stringify(contentJSON(m))}`, timeoutMs)
    return { map: contentJSON(m) }
  },

  async createList ({ name, groupId, items = [], privacy = 'private', timeoutMs }) {
    const c = getClient(name)
    const group = await loadAvailable(c, groupId, timeoutMs)
    const list = group.createList(items, null, privacy)
    return { listId: list.id }
  },

  async append ({ name, coId: id, value, privacy = 'private', timeoutMs }) {
    const c = getClient(name)
    const list = await loadAvailable(c, id, timeoutMs)
    list.append(value, undefined, privacy)
    return { list: contentJSON(c.node.getLoaded(id)) }
  },

  async getList ({ name, coId: id, timeoutMs }) {
    const c = getClient(name)
    return { list: contentJSON(await loadAvailable(c, id, timeoutMs)) }
  },

  async waitList ({ name, coId: id, length, minLength, contains, equals, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = getClient(name)
    const preds = []
    if (length !== undefined) preds.push((a) => a.length === length)
    if (minLength !== undefined) preds.push((a) => a.length >= minLength)
    if (contains !== undefined) preds.push((a) => a.some((x) => isDeepStrictEqual(x, contains)))
    if (equals !== undefined) preds.push((a) => isDeepStrictEqual(a, equals))
    if (!preds.length) throw new Error('one of length, minLength, contains, equals required')
    const l = await waitForContent(c, id, (l) => { const a = contentJSON(l); return preds.every((p) => p(a)) },
      (l) => `list is ${JSON.stringify(contentJSON(l))}`, timeoutMs)
    return { list: contentJSON(l) }
  },

  async load ({ name, coId: id, retry = true, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = getClient(name)
    // retry=false: take the first answer (cojson otherwise retries an unavailable value once
    // after CO_VALUE_LOADING_CONFIG.RETRY_DELAY = 3 s).
    const v = await withTimeout(c.node.load(id, !retry), timeoutMs, `loading ${id}`)
    if (v === 'unavailable') return { available: false, content: 'unavailable' }
    return { available: true, type: v.core.verified.header.type, header: v.core.verified.header, content: contentJSON(v), deleted: v.core.isDeleted }
  },

  // Delete a CoValue the way an app does (`CoValueCore.deleteCoValue`): cojson first checks
  // locally that this account is admin of the owner group, then sends one delete session.
  async deleteCoValue ({ name, coId: id, timeoutMs }) {
    const c = getClient(name)
    const v = await loadAvailable(c, id, timeoutMs)
    v.core.deleteCoValue()
    return { deleted: v.core.isDeleted }
  },

  // A delete sent by a client that skips those local checks (a non-admin, or a modified
  // client): the same signed delete session through `makeTransaction`, which only the
  // server's check can stop.
  async forgeDelete ({ name, coId: id, timeoutMs }) {
    const c = getClient(name)
    const v = await loadAvailable(c, id, timeoutMs)
    const made = v.core.makeTransaction([], 'trusting', { deleted: id })
    return { made: Boolean(made), deleted: v.core.isDeleted }
  },

  async waitSynced ({ name, coId: id, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = getClient(name)
    const ids = id ? [id] : availableIds(c.node)
    await waitSyncedIds(c, ids, timeoutMs)
    return { count: ids.length }
  },

  // Low-level view of one CoValue: our known state, the server peer's (confirmed and
  // optimistic) known state, and whether the value is marked errored for that peer.
  inspect ({ name, coId: id }) {
    const c = getClient(name)
    const core = c.node.getCoValue(id)
    const peer = c.serverPeer()
    return {
      loadingState: core.loadingState,
      known: core.knownState(),
      peerKnown: peer ? peer.getKnownState(id) ?? null : null,
      peerOptimistic: peer ? peer.getOptimisticKnownState(id) ?? null : null,
      erroredInPeer: core.getErroredInPeerError(c.url) ? errText(core.getErroredInPeerError(c.url)) : null,
      synced: peer ? c.node.syncManager.syncState.isSynced(peer, id) : false
    }
  },

  disconnect ({ name }) {
    getClient(name).wsPeer.disable() // closes the socket, keeps the node and its data
    return {}
  },

  reconnect ({ name }) {
    getClient(name).wsPeer.enable()
    return {}
  },

  // Until the transport considers itself connected (first frame received on the socket).
  waitConnected ({ name, timeoutMs = DEFAULT_TIMEOUT_MS }) {
    const c = getClient(name)
    if (c.connected) return {}
    return new Promise((resolve, reject) => {
      const listener = (connected) => {
        if (!connected) return
        cleanup()
        resolve({})
      }
      const waiter = { fail: (e) => { cleanup(); reject(e) } }
      const timer = setTimeout(() => waiter.fail(new Error(`timeout after ${timeoutMs} ms: not connected`)), timeoutMs)
      const cleanup = () => { clearTimeout(timer); c.wsPeer.unsubscribe(listener); c.waiters.delete(waiter) }
      c.waiters.add(waiter)
      c.wsPeer.subscribe(listener)
    })
  },

  close ({ name }) {
    const c = getClient(name)
    clients.delete(name)
    c.close()
    return {}
  },

  stats ({ name }) {
    const c = getClient(name)
    const peer = c.serverPeer()
    return {
      accountId: c.node.getCurrentAccountOrAgentID(),
      sessionId: c.node.currentSessionID,
      url: c.url,
      connected: c.connected,
      peerClosed: peer ? peer.closed : null,
      opens: c.opens,
      closes: c.closes,
      connectionErrors: c.connectionErrors,
      received: c.received,
      sent: c.sent,
      coValues: availableIds(c.node).length,
      uncaughtExceptions
    }
  },

  sendRaw (args) {
    if (typeof args.url !== 'string') throw new Error('url required')
    return sendRaw(args)
  },

  // A content message as this node would send it for `id` from scratch (header + all sessions),
  // then tampered with, ready for `sendRaw`. Modes:
  //   appendTx  (default) one made-up trusting transaction appended to a session, keeping that
  //             session's lastSignature: a transaction the server does not have yet, signed wrong.
  //   signature lastSignature replaced by a well-formed signature over something else. Only
  //             detected if the message carries transactions the server lacks.
  //   tx        the last transaction's madeAt changed (hash no longer matches the signature).
  //   header    header.uniqueness changed, so the header no longer hashes to `id`.
  forgeFrom ({ name, coId: id, mode = 'appendTx', session }) {
    const c = getClient(name)
    const core = c.node.getCoValue(id)
    if (!core.isAvailable()) throw new Error(`${id} not loaded in ${name}`)
    const pieces = JSON.parse(JSON.stringify(core.newContentSince(undefined) ?? []))
    if (!pieces.length) throw new Error(`no content for ${id}`)

    if (mode === 'header') {
      const h = pieces[0].header
      h.uniqueness = `forged-${String(h.uniqueness)}`
      return { mode, messages: pieces, frames: pieces.map((p) => JSON.stringify(p)) }
    }

    // Pick the session to tamper with: the one asked for, else this node's own, else the last.
    const all = pieces.flatMap((p) => Object.keys(p.new))
    const sid = session ?? ownSessionOf(c.node, all) ?? all[all.length - 1]
    if (!sid) throw new Error(`${id} has no sessions`)
    const piece = pieces.findLast((p) => p.new[sid])
    if (!piece) throw new Error(`session ${sid} not in content of ${id}`)
    const s = piece.new[sid]
    if (mode === 'appendTx') {
      s.newTransactions.push({
        privacy: 'trusting',
        madeAt: Date.now(),
        changes: JSON.stringify([{ op: 'set', key: 'forged', value: true }])
      })
    } else if (mode === 'signature') {
      s.lastSignature = crypto.sign(crypto.getAgentSignerSecret(c.node.agentSecret), 'moai-forged')
    } else if (mode === 'tx') {
      s.newTransactions[s.newTransactions.length - 1].madeAt += 1
    } else {
      throw new Error(`unknown mode ${JSON.stringify(mode)}`)
    }
    return { mode, session: sid, messages: pieces, frames: pieces.map((p) => JSON.stringify(p)) }
  },

  exit () {
    setImmediate(() => process.stdout.write('', () => process.exit(0)))
    return {}
  }
}

// ---------------------------------------------------------------------------------------------
// Main loop

serveCommands(commands)

emitEvent('ready', {
  versions: versions(['cojson', 'cojson-transport-ws', 'cojson-core-wasm', 'ws']),
  crypto: cryptoKind,
  pid: process.pid
})
log('ready')
