#!/usr/bin/env node
// CoJSON fan-out benchmark load generator (run by run.sh; see docs/benchmarks-cojson.md).
//
//   node fanout.mjs run --url ws://127.0.0.1:P/sync --server-pid PID [--label moai]
//        [--subscribers 50] [--procs 2] [--updates 200] [--rate 20] [--warmup 5]
//        [--drain-s 20] [--setup-s 120] [--crypto napi|wasm]
//   node fanout.mjs report --dir bench/cojson/results/<timestamp>
//
// `run`: this process is the writer: one account (a LocalNode with no storage, one
// WebSocketPeerWithReconnection over `ws`, wired as jazz-tools and interop/cojson-driver.mjs do)
// creates a group (everyone: reader) and a private (encrypted) CoMap. It forks `--procs` child
// processes that host the subscribers: `--subscribers` separate LocalNodes in total, each with
// its own account and its own WebSocket, each subscribed to the map (`node.subscribe`). The
// writer then sets key `t` `--updates` times on a fixed schedule (`--rate` per second); the
// value carries the update's sequence number and send time (CLOCK_MONOTONIC via
// process.hrtime, shared by all processes of the machine). Each subscriber records, per
// update, the time its subscribe callback saw it (`app` latency, the reported one) and the time
// the WebSocket frame carrying it arrived (`wire` latency: server + kernel + the client's event
// loop reaching the socket). Missing and duplicate deliveries are counted.
//
// Server CPU: utime+stime of --server-pid (/proc/PID/stat, all threads) from just before the
// first measured write until every delivery arrived and the writer's last write was acked (or
// the drain timeout), divided by the deliveries. Client CPU (writer + subscriber processes,
// process.cpuUsage) and the subscriber processes' event-loop delay over the same window show
// whether the clients kept up. One JSON object on stdout; progress on stderr.
//
// Safety: loopback URLs only; every phase has a count and a deadline.

import { fork } from 'node:child_process'
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import os from 'node:os'
import WebSocket from 'ws'
import { LocalNode } from 'cojson'
import { WasmCrypto } from 'cojson/crypto/WasmCrypto'
import { NapiCrypto } from 'cojson/crypto/NapiCrypto'
import { WebSocketPeerWithReconnection } from 'cojson-transport-ws'

// cojson, cojson-transport-ws and ws: this directory's pinned install (package-lock.json).
const pkgVersion = (name) => JSON.parse(readFileSync(new URL(`./node_modules/${name}/package.json`, import.meta.url), 'utf8')).version

const log = (...a) => process.stderr.write(`[fanout ${process.pid}] ${a.join(' ')}\n`)
// cojson logs through console.*: keep stdout for the result JSON.
console.log = console.info = console.debug = (...a) => console.error(...a)

const nowUs = () => Number(process.hrtime.bigint() / 1000n)
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const withTimeout = (promise, ms, what) => {
  let t
  return Promise.race([
    promise,
    new Promise((_resolve, reject) => { t = setTimeout(() => reject(new Error(`timeout after ${ms} ms: ${what}`)), ms) })
  ]).finally(() => clearTimeout(t))
}

const assertLoopback = (url) => {
  const host = new URL(url).hostname
  if (!['127.0.0.1', 'localhost', '[::1]', '::1'].includes(host)) throw new Error(`refusing non-loopback url ${url}`)
}

async function loadCojson (kind) {
  const crypto = kind === 'napi' ? await NapiCrypto.create() : await WasmCrypto.create()
  return { LocalNode, crypto, WebSocketPeerWithReconnection, WebSocket }
}

// One client: a LocalNode with a new account and one WebSocketPeerWithReconnection, as
// interop/cojson-driver.mjs (jazz-tools' wiring). `onFrame(data)` sees every incoming frame.
async function newClient (cj, url, name, onFrame = null) {
  const stats = { opens: 0, closes: 0, errors: 0, closeCodes: [] }
  let node = null
  const pending = []
  class TapWebSocket extends cj.WebSocket {
    constructor (address) {
      super(address)
      this.addEventListener('open', () => { stats.opens++ })
      this.addEventListener('close', (ev) => { stats.closes++; stats.closeCodes.push(ev.code); if (!closing) log(`${name}: socket closed ${ev.code} ${ev.reason || ''}`) })
      this.addEventListener('error', () => { stats.errors++ })
      if (onFrame) this.addEventListener('message', (ev) => onFrame(ev.data))
    }
  }
  const wsPeer = new cj.WebSocketPeerWithReconnection({
    peer: url,
    WebSocketConstructor: TapWebSocket,
    addPeer: (peer) => { if (node) node.syncManager.addPeer(peer); else pending.push(peer) },
    removePeer: () => {}
  })
  wsPeer.enable()
  const r = await cj.LocalNode.withNewlyCreatedAccount({ creationProps: { name }, peers: pending, crypto: cj.crypto })
  node = r.node
  return { node, wsPeer, stats, url }
}

const waitSynced = (client, ids, ms) =>
  withTimeout(Promise.all(ids.map((id) => client.node.syncManager.waitForSyncWithPeer(client.url, id, ms))), ms, `sync of ${ids.length} values`)

const readProcStat = (pid) => {
  // utime and stime (fields 14, 15) in clock ticks; the command name may contain spaces.
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ')
  return { utime: Number(f[11]), stime: Number(f[12]) }
}
const readRssKiB = (pid) => {
  const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))
  return m ? Number(m[1]) : null
}
let closing = false // set before the clients are shut down (their closes are not logged)
const CLK_TCK = 100 // Linux USER_HZ
const ELD_RES_MS = 2 // event-loop delay sampling; the histogram includes this period, subtracted below

const pct = (sorted, p) => sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)] : null
const summarize = (arr) => {
  const s = Float64Array.from(arr).sort()
  return { n: s.length, p50: pct(s, 50), p90: pct(s, 90), p99: pct(s, 99), max: s.length ? s[s.length - 1] : null, mean: s.length ? s.reduce((a, b) => a + b, 0) / s.length : null }
}
const round = (x, d = 3) => x === null || x === undefined ? x : Math.round(x * 10 ** d) / 10 ** d

// ---------------------------------------------------------------------------------------------
// Subscriber process: `count` subscribers, driven by the parent over IPC.

async function subscriberMain () {
  const { url, mapId, count, first, crypto: cryptoKind, setupMs } = JSON.parse(process.env.FANOUT_SUB)
  const cj = await loadCojson(cryptoKind)
  const subs = []
  const seenCount = new Map() // seq -> how many of our subscribers saw it
  const notify = (seq) => {
    const c = (seenCount.get(seq) ?? 0) + 1
    seenCount.set(seq, c)
    if (c === count) process.send({ type: 'all', seq })
  }
  let measuring = false
  const eld = monitorEventLoopDelay({ resolution: ELD_RES_MS })

  const makeSub = async (i) => {
    const sub = { i, lastContentFrameUs: 0, processed: 0, seen: new Set(), app: [], appSeq: [], wire: [], dups: 0, unsub: null }
    const onFrame = (data) => {
      if (typeof data === 'string' && data.includes('"content"') && data.includes(mapId)) sub.lastContentFrameUs = nowUs()
    }
    sub.client = await newClient(cj, url, `sub${first + i}`, onFrame)
    await waitSynced(sub.client, [sub.client.node.getCurrentAccountOrAgentID()], setupMs)
    await new Promise((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`sub${first + i}: map ${mapId} not loaded`)), setupMs)
      sub.unsub = sub.client.node.subscribe(mapId, (map) => {
        const at = nowUs()
        if (map === 'unavailable') { clearTimeout(t); reject(new Error(`map ${mapId} unavailable`)); return }
        clearTimeout(t)
        resolve()
        // Every edit of key `t` not seen yet (normally exactly one per callback).
        const ops = map.ops.t ?? []
        for (; sub.processed < ops.length; sub.processed++) {
          const v = ops[sub.processed].change.value
          if (!v || typeof v.seq !== 'number') continue
          if (sub.seen.has(v.seq)) { sub.dups++; continue }
          sub.seen.add(v.seq)
          if (v.seq >= 0 && measuring) {
            sub.app.push((at - v.sentUs) / 1000)
            sub.appSeq.push(v.seq)
            sub.wire.push(sub.lastContentFrameUs ? (sub.lastContentFrameUs - v.sentUs) / 1000 : NaN)
          }
          notify(v.seq)
        }
      })
    })
    return sub
  }

  try {
    // One at a time: the reference server names a peer `<address>@<ISO time in ms>`, so two
    // sockets opened in the same millisecond collide and it closes the first one (cojson's
    // addPeer replaces a peer of the same ID). Such setup closes are counted in the result.
    for (let i = 0; i < count; i++) subs.push(await makeSub(i))
  } catch (e) {
    process.send({ type: 'error', error: String(e && e.stack ? e.stack : e) })
    return
  }
  let cpu0 = null
  let setupCloses = 0
  process.on('message', (msg) => {
    if (msg.type === 'start') {
      measuring = true
      for (const s of subs) { setupCloses += s.client.stats.closes; s.client.stats.closes = 0 }
      cpu0 = process.cpuUsage()
      eld.reset()
      eld.enable()
    } else if (msg.type === 'stop') {
      measuring = false
      eld.disable()
      const cpu = process.cpuUsage(cpu0)
      const app = []; const appSeq = []; const wire = []
      let missing = 0; let dups = 0; let opens = 0; let closes = 0; let errors = 0
      for (const s of subs) {
        app.push(...s.app); appSeq.push(...s.appSeq); wire.push(...s.wire.filter((x) => !Number.isNaN(x)))
        for (let k = 0; k < msg.updates; k++) if (!s.seen.has(k)) missing++
        dups += s.dups; opens += s.client.stats.opens; closes += s.client.stats.closes; errors += s.client.stats.errors
      }
      process.send({
        type: 'result',
        app, appSeq, wire, missing, dups, opens, closes, errors, setupCloses,
        cpuS: (cpu.user + cpu.system) / 1e6,
        eventLoopDelayMs: { p50: eld.percentile(50) / 1e6 - ELD_RES_MS, p99: eld.percentile(99) / 1e6 - ELD_RES_MS, max: eld.max / 1e6 - ELD_RES_MS }
      })
    } else if (msg.type === 'exit') {
      closing = true
      for (const s of subs) { try { s.unsub(); s.client.wsPeer.disable(); s.client.node.gracefulShutdown() } catch {} }
      setTimeout(() => process.exit(0), 100)
    }
  })
  process.send({ type: 'ready' })
}

// ---------------------------------------------------------------------------------------------
// Writer / orchestrator.

async function runMain (o) {
  assertLoopback(o.url)
  const N = Number(o.subscribers); const procs = Math.max(1, Math.min(Number(o.procs), N))
  const K = Number(o.updates); const rate = Number(o.rate); const warmup = Number(o.warmup)
  const setupMs = Number(o['setup-s']) * 1000; const drainMs = Number(o['drain-s']) * 1000
  const serverPid = o['server-pid'] ? Number(o['server-pid']) : null
  const t0 = Date.now()
  const cj = await loadCojson(o.crypto)

  log(`writer account on ${o.url}`)
  const writer = await withTimeout(newClient(cj, o.url, 'writer'), setupMs, 'writer account')
  const group = writer.node.createGroup()
  group.addMember('everyone', 'reader')
  const map = group.createMap({ title: 'fanout' }, null, 'private')
  await waitSynced(writer, [...writer.node.allCoValues()].filter((c) => c.isAvailable()).map((c) => c.id), setupMs)
  log(`map ${map.id}; starting ${N} subscribers in ${procs} processes`)

  // Subscriber processes.
  const children = []
  const waiters = new Map() // seq -> {left, resolve}
  const allSeen = (seq) => new Promise((resolve) => waiters.set(seq, { left: procs, resolve }))
  let lastAllSeq = -Infinity
  let first = 0
  for (let p = 0; p < procs; p++) {
    const count = Math.floor(N / procs) + (p < N % procs ? 1 : 0)
    const child = fork(new URL(import.meta.url).pathname, ['sub'], {
      env: { ...process.env, FANOUT_SUB: JSON.stringify({ url: o.url, mapId: map.id, count, first, crypto: o.crypto, setupMs }) },
      stdio: ['ignore', 'inherit', 'inherit', 'ipc']
    })
    first += count
    const c = { child, count, ready: null, result: null }
    c.ready = new Promise((resolve, reject) => {
      child.on('message', (msg) => {
        if (msg.type === 'ready') resolve()
        else if (msg.type === 'error') reject(new Error(`subscriber process: ${msg.error}`))
        else if (msg.type === 'all') {
          const w = waiters.get(msg.seq)
          if (w && --w.left === 0) { waiters.delete(msg.seq); if (msg.seq > lastAllSeq) lastAllSeq = msg.seq; w.resolve() }
        } else if (msg.type === 'result') c.result = msg
      })
      child.on('exit', (code) => reject(new Error(`subscriber process exited ${code}`)))
    })
    children.push(c)
  }
  const killChildren = () => { for (const c of children) { try { c.child.kill('SIGKILL') } catch {} } }
  process.on('exit', killChildren)

  try {
    await withTimeout(Promise.all(children.map((c) => c.ready)), setupMs, 'subscribers ready')
    const setupS = (Date.now() - t0) / 1000
    log(`subscribers ready after ${setupS.toFixed(1)} s; warm-up`)

    // Warm-up (not measured): every subscriber sees each warm-up write.
    for (let w = 0; w < warmup; w++) {
      const seq = -(w + 1)
      const seen = allSeen(seq)
      map.set('t', { seq, sentUs: nowUs() }, 'private')
      await withTimeout(seen, 10000, `warm-up write ${seq}`)
      await sleep(100)
    }
    await waitSynced(writer, [map.id], 10000)
    await sleep(500)

    // Measured window.
    const interval = 1000 / rate
    const deliveredAll = Array.from({ length: K }, (_, k) => allSeen(k))
    for (const c of children) c.child.send({ type: 'start' })
    await sleep(50) // let the children see 'start' before the first write
    const srv0 = serverPid ? readProcStat(serverPid) : null
    const cpuW0 = process.cpuUsage()
    const wall0 = nowUs()
    const lags = []
    for (let k = 0; k < K; k++) {
      const due = wall0 + k * interval * 1000
      const wait = (due - nowUs()) / 1000
      if (wait > 1) await sleep(wait - 0.5)
      while (nowUs() < due) { /* spin the last ms for an exact schedule */ }
      const sentUs = nowUs()
      lags.push((sentUs - due) / 1000)
      map.set('t', { seq: k, sentUs }, 'private')
    }
    const sendEnd = nowUs()
    let drained = true
    try {
      await withTimeout(Promise.all([...deliveredAll, waitSynced(writer, [map.id], drainMs)]), drainMs, 'drain')
    } catch (e) { drained = false; log(e.message) }
    const wall1 = nowUs()
    const srv1 = serverPid ? readProcStat(serverPid) : null
    const cpuW = process.cpuUsage(cpuW0)
    const serverRssKiB = serverPid ? readRssKiB(serverPid) : null

    for (const c of children) c.child.send({ type: 'stop', updates: K })
    await withTimeout((async () => { while (children.some((c) => !c.result)) await sleep(20) })(), 30000, 'subscriber results')

    const app = []; const wire = []
    const firstBySeq = new Map() // seq -> earliest delivery over all subscribers
    let missing = 0; let dups = 0; let closes = 0; let errors = 0; let subCpuS = 0; let setupCloses = 0
    const eventLoop = []
    for (const c of children) {
      const r = c.result
      for (let i = 0; i < r.app.length; i++) {
        app.push(r.app[i])
        const f = firstBySeq.get(r.appSeq[i])
        if (f === undefined || r.app[i] < f) firstBySeq.set(r.appSeq[i], r.app[i])
      }
      for (const x of r.wire) wire.push(x)
      missing += r.missing; dups += r.dups; closes += r.closes; errors += r.errors; subCpuS += r.cpuS; setupCloses += r.setupCloses
      eventLoop.push(r.eventLoopDelayMs)
    }
    const windowS = (wall1 - wall0) / 1e6
    const serverCpuS = srv1 ? ((srv1.utime + srv1.stime) - (srv0.utime + srv0.stime)) / CLK_TCK : null
    const delivered = app.length
    const writerCpuS = (cpuW.user + cpuW.system) / 1e6
    const appS = summarize(app); const wireS = summarize(wire); const lagS = summarize(lags)
    const firstS = summarize([...firstBySeq.values()])
    const result = {
      label: o.label,
      url: o.url,
      params: { subscribers: N, procs, updates: K, rate, warmup, crypto: o.crypto },
      versions: { cojson: pkgVersion('cojson'), 'cojson-transport-ws': pkgVersion('cojson-transport-ws'), ws: pkgVersion('ws'), node: process.version },
      machine: { cores: os.cpus().length, loadavg: os.loadavg() },
      setup_s: round(setupS, 2),
      expected_deliveries: N * K,
      delivered,
      missing,
      duplicates: dups,
      drained,
      socket_closes: closes, // during the measured window
      setup_socket_closes: setupCloses,
      socket_errors: errors,
      latency_ms: { p50: round(appS.p50), p90: round(appS.p90), p99: round(appS.p99), max: round(appS.max), mean: round(appS.mean) },
      // Per update, its earliest delivery over all subscribers: the server's pass-through
      // latency without the subscriber processes' serial work on the other deliveries.
      first_delivery_latency_ms: { p50: round(firstS.p50), p99: round(firstS.p99), max: round(firstS.max) },
      wire_latency_ms: { p50: round(wireS.p50), p99: round(wireS.p99), max: round(wireS.max) },
      send_lag_ms: { p50: round(lagS.p50), p99: round(lagS.p99), max: round(lagS.max) },
      send_s: round((sendEnd - wall0) / 1e6),
      window_s: round(windowS),
      server_cpu_s: serverCpuS,
      server_cpu_user_s: srv1 ? (srv1.utime - srv0.utime) / CLK_TCK : null,
      server_cpu_sys_s: srv1 ? (srv1.stime - srv0.stime) / CLK_TCK : null,
      server_cpu_us_per_delivery: serverCpuS !== null && delivered ? round(serverCpuS * 1e6 / delivered, 2) : null,
      server_cpu_util: serverCpuS !== null ? round(serverCpuS / windowS) : null,
      server_rss_kib: serverRssKiB,
      writer_cpu_s: round(writerCpuS),
      subscriber_cpu_s: round(subCpuS),
      client_cpu_util: round((writerCpuS + subCpuS) / windowS), // in cores
      subscriber_event_loop_delay_ms: eventLoop.map((e) => ({ p50: round(e.p50), p99: round(e.p99), max: round(e.max) })),
      writer_closes: writer.stats.closes,
      writer_close_codes: writer.stats.closeCodes
    }
    process.stdout.write(JSON.stringify(result) + '\n')
    log(`${o.label}: ${delivered}/${N * K} delivered, p50 ${result.latency_ms.p50} ms, p99 ${result.latency_ms.p99} ms, server ${result.server_cpu_us_per_delivery} µs CPU/delivery, clients ${result.client_cpu_util} cores`)
  } finally {
    closing = true
    for (const c of children) { try { c.child.send({ type: 'exit' }) } catch {} }
    await sleep(300)
    killChildren()
    try { writer.wsPeer.disable(); writer.node.gracefulShutdown() } catch {}
  }
}

// ---------------------------------------------------------------------------------------------
// Report: medians per server over the runs of a results directory, as markdown.

function reportMain (dir) {
  const rows = new Map() // label -> [result]
  const bad = []
  for (const f of readdirSync(dir).filter((f) => f.endsWith('.json')).sort()) {
    let r
    try { r = JSON.parse(readFileSync(join(dir, f), 'utf8')) } catch { bad.push(`${f}: no result (see ${f.replace(/\.json$/, '.log')})`); continue }
    if (!rows.has(r.label)) rows.set(r.label, [])
    rows.get(r.label).push(r)
    if (r.missing || r.duplicates || !r.drained || r.socket_closes || r.socket_errors) {
      bad.push(`${f}: missing ${r.missing}, duplicates ${r.duplicates}, drained ${r.drained}, socket closes ${r.socket_closes}, errors ${r.socket_errors}`)
    }
  }
  const median = (xs) => {
    const s = xs.filter((x) => typeof x === 'number' && !Number.isNaN(x)).sort((a, b) => a - b)
    if (!s.length) return null
    const m = s.length >> 1
    return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2
  }
  const f = (x, d = 1) => x === null || x === undefined ? '–' : x.toFixed(d)
  const cols = [
    ['runs', (rs) => rs.length, 0],
    ['delivered / expected', (rs) => `${median(rs.map((r) => r.delivered))} / ${rs[0].expected_deliveries}`],
    ['missing (sum)', (rs) => rs.reduce((a, r) => a + r.missing, 0), 0],
    ['p50 ms', (rs) => median(rs.map((r) => r.latency_ms.p50)), 1],
    ['p99 ms', (rs) => median(rs.map((r) => r.latency_ms.p99)), 1],
    ['max ms', (rs) => median(rs.map((r) => r.latency_ms.max)), 1],
    ['first-delivery p50 / p99 ms', (rs) => `${f(median(rs.map((r) => r.first_delivery_latency_ms.p50)))} / ${f(median(rs.map((r) => r.first_delivery_latency_ms.p99)))}`],
    ['wire p50 / p99 ms', (rs) => `${f(median(rs.map((r) => r.wire_latency_ms.p50)))} / ${f(median(rs.map((r) => r.wire_latency_ms.p99)))}`],
    ['server CPU µs / delivery', (rs) => median(rs.map((r) => r.server_cpu_us_per_delivery)), 1],
    ['server CPU (cores)', (rs) => median(rs.map((r) => r.server_cpu_util)), 3],
    ['server RSS MiB', (rs) => median(rs.map((r) => r.server_rss_kib / 1024)), 0],
    ['client CPU (cores)', (rs) => median(rs.map((r) => r.client_cpu_util)), 2],
    ['sub event-loop p99 ms', (rs) => median(rs.map((r) => Math.max(...r.subscriber_event_loop_delay_ms.map((e) => e.p99)))), 1],
    ['send lag p99 ms', (rs) => median(rs.map((r) => r.send_lag_ms.p99)), 1]
  ]
  const labels = [...rows.keys()].sort((a, b) => (a === 'moai' ? -1 : b === 'moai' ? 1 : a.localeCompare(b)))
  const lines = []
  lines.push(`| server | ${cols.map((c) => c[0]).join(' | ')} |`)
  lines.push(`|---|${cols.map(() => '---:').join('|')}|`)
  for (const l of labels) {
    const rs = rows.get(l)
    lines.push(`| ${l} | ${cols.map(([, fn, d]) => { const v = fn(rs); return typeof v === 'number' ? f(v, d ?? 1) : v }).join(' | ')} |`)
  }
  // The peer is the reference server, not moai on other storage (moai-pg).
  const m = rows.get('moai'); const refLabel = labels.find((l) => !l.startsWith('moai'))
  if (m && refLabel) {
    const r = rows.get(refLabel)
    const mc = median(m.map((x) => x.server_cpu_us_per_delivery)); const rc = median(r.map((x) => x.server_cpu_us_per_delivery))
    const mp = median(m.map((x) => x.latency_ms.p99)); const rp = median(r.map((x) => x.latency_ms.p99))
    const mMissing = m.reduce((a, x) => a + x.missing, 0)
    lines.push('')
    lines.push(`Targets (issue): server CPU per delivered message ≤ 1/10 of ${refLabel}: moai ${f(mc, 1)} µs vs ${f(rc, 1)} µs = **${f(rc / mc, 1)}× less** → ${rc / mc >= 10 ? 'PASS' : 'FAIL'}; ` +
      `p99 no worse: moai ${f(mp)} ms vs ${f(rp)} ms → ${mp <= rp ? 'PASS' : 'FAIL'}; missing deliveries (moai, all runs): ${mMissing} → ${mMissing === 0 ? 'PASS' : 'FAIL'}`)
  }
  if (bad.length) {
    lines.push('')
    lines.push('Anomalies:')
    for (const b of bad) lines.push(`- ${b}`)
  }
  process.stdout.write(lines.join('\n') + '\n')
}

// ---------------------------------------------------------------------------------------------

const mode = process.argv[2]
if (mode === 'sub') {
  process.on('disconnect', () => process.exit(0)) // parent gone
  await subscriberMain()
} else if (mode === 'run') {
  const { values } = parseArgs({
    args: process.argv.slice(3),
    options: {
      url: { type: 'string' },
      'server-pid': { type: 'string' },
      label: { type: 'string', default: 'server' },
      subscribers: { type: 'string', default: '50' },
      procs: { type: 'string', default: '2' },
      updates: { type: 'string', default: '200' },
      rate: { type: 'string', default: '20' },
      warmup: { type: 'string', default: '5' },
      'drain-s': { type: 'string', default: '20' },
      'setup-s': { type: 'string', default: '120' },
      crypto: { type: 'string', default: 'napi' }
    }
  })
  if (!values.url) { log('--url required'); process.exit(2) }
  try {
    await runMain(values)
    process.exit(0)
  } catch (e) {
    log('failed:', e && e.stack ? e.stack : e)
    process.exit(1)
  }
} else if (mode === 'report') {
  const { values } = parseArgs({ args: process.argv.slice(3), options: { dir: { type: 'string' } } })
  reportMain(values.dir)
} else {
  log('usage: fanout.mjs run --url ws://127.0.0.1:P/sync --server-pid PID | report --dir DIR')
  process.exit(2)
}
