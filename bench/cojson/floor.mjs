#!/usr/bin/env node
// Server-CPU floor of the CoJSON fan-out pattern (run by floor.sh): fanout.mjs's wire traffic
// without cojson. 1 writer socket (`/writer`) sends K text frames shaped and sized like moai's
// content message at a fixed rate; N subscriber sockets in forked processes answer each with a
// frame shaped and sized like a cojson `known` ack. The server under test (yjs-load
// cojson-floor) relays the writer's frames and drops the acks. Server CPU is read from
// /proc/PID/stat over the same window as fanout.mjs (just before the first measured write until
// all N×K deliveries arrived), split into user and system time.
//
//   node floor.mjs run --url ws://127.0.0.1:P --server-pid PID [--label multi]
//        [--subscribers 50] [--procs 2] [--updates 200] [--rate 20] [--warmup 5]
//        [--content-bytes 480] [--ack-bytes 139]
//   node floor.mjs report --dir DIR        # medians per label of DIR/*.json
//
// Default sizes are moai's, measured with strace on its /sync sockets during a fanout.mjs run
// (2026-11-22): content frames 484 bytes on the wire (480 payload), acks 147 (139 payload).
// Loopback only; every phase has a deadline.

import { fork } from 'node:child_process'
import { readFileSync, readdirSync } from 'node:fs'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import os from 'node:os'
import WebSocket from 'ws'

const log = (...a) => process.stderr.write(`[floor ${process.pid}] ${a.join(' ')}\n`)
const nowUs = () => Number(process.hrtime.bigint() / 1000n) // CLOCK_MONOTONIC: same in all processes
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))
const withTimeout = (p, ms, what) => {
  let t
  return Promise.race([p, new Promise((_r, rej) => { t = setTimeout(() => rej(new Error(`timeout ${ms} ms: ${what}`)), ms) })]).finally(() => clearTimeout(t))
}
const CLK_TCK = 100
const procStat = (pid) => {
  const s = readFileSync(`/proc/${pid}/stat`, 'utf8')
  const f = s.slice(s.lastIndexOf(')') + 2).split(' ')
  return { utime: Number(f[11]), stime: Number(f[12]) }
}
// Context switches summed over threads (/proc/PID/status alone is the main thread's).
const ctxSwitches = (pid) => {
  let v = 0; let n = 0
  for (const t of readdirSync(`/proc/${pid}/task`)) {
    try {
      const s = readFileSync(`/proc/${pid}/task/${t}/status`, 'utf8')
      v += Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(s)[1]); n += Number(/^nonvoluntary_ctxt_switches:\s+(\d+)/m.exec(s)[1])
    } catch {} // thread gone
  }
  return { v, n }
}

// On-CPU ns summed over threads (/proc/PID/task/*/schedstat): finer than the 10 ms ticks of
// /proc/PID/stat (1 tick = 1 µs per delivery here), as a cross-check; no user/sys split.
const schedNs = (pid) => readdirSync(`/proc/${pid}/task`).reduce((a, t) => {
  try { return a + Number(readFileSync(`/proc/${pid}/task/${t}/schedstat`, 'utf8').split(' ')[0]) } catch { return a }
}, 0)

// IDs as cojson prints them (taken from a real run), so JSON shapes and lengths are realistic.
const MAP = 'co_z3hmpFjLBf2di2Lc9uAevRPsSvi'
const SESSION = 'co_zANfbQfCgWxcMsgazFSpWJxqL3k_session_z9UQ6ycEAmJe'
const padTo = (s, bytes, field) => s.replace(`"${field}":""`, `"${field}":"${'x'.repeat(Math.max(0, bytes - s.length))}"`)
// `after` carries the sequence number, `madeAt` the send time (µs, monotonic).
const contentFrame = (seq, bytes) => padTo(JSON.stringify({
  action: 'content', id: MAP, priority: 3,
  new: { [SESSION]: { after: seq, newTransactions: [{ privacy: 'private', madeAt: nowUs(), keyUsed: 'key_zFFyXj8ga5pzkcfXAy3vcq', encryptedChanges: '' }], lastSignature: 'signature_z2Qb5UcEdYFXTxSFjzHjPGQvH6GJkMKfR1Pn3VfH9nVp1qwTKdM8aZdNiY3wFWMxj2RzNVz8xTQm3WKbmXh4d5' } }
}), bytes, 'encryptedChanges')
const ackFrame = (seq, bytes) => {
  const s = JSON.stringify({ action: 'known', id: MAP, header: true, sessions: { [SESSION]: seq + 1 } })
  return s.length >= bytes ? s : s.slice(0, -1) + `,"p":"${'x'.repeat(Math.max(0, bytes - s.length - 7))}"}`
}
const numAfter = (buf, key) => { // integer after `key` in a Buffer, without parsing the JSON
  let i = buf.indexOf(key); if (i < 0) return null
  i += key.length; let neg = false; if (buf[i] === 45) { neg = true; i++ }
  let n = 0; for (; buf[i] >= 48 && buf[i] <= 57; i++) n = n * 10 + buf[i] - 48
  return neg ? -n : n
}
const connect = (url) => new Promise((resolve, reject) => {
  const ws = new WebSocket(url, { perMessageDeflate: false })
  ws.once('open', () => resolve(ws)); ws.once('error', reject)
})
const pct = (s, p) => s.length ? s[Math.min(s.length - 1, Math.ceil(p / 100 * s.length) - 1)] : null
const r3 = (x) => x === null ? null : Math.round(x * 1000) / 1000

// Subscriber process: `count` sockets; acks every content frame, reports when all saw a seq.
async function subMain () {
  const { url, count, first, ackBytes } = JSON.parse(process.env.FLOOR_SUB)
  const seen = new Map(); const lat = []; let measuring = false; let closes = 0
  for (let i = 0; i < count; i++) {
    const ws = await withTimeout(connect(`${url}/sub${first + i}`), 10000, 'connect')
    ws.on('close', () => { closes++ })
    ws.on('message', (data, isBinary) => {
      if (isBinary || data[2] !== 97) return // '{"a…': content; '{"t…': the server's ping
      const seq = numAfter(data, '"after":')
      if (measuring) lat.push((nowUs() - numAfter(data, '"madeAt":')) / 1000)
      ws.send(ackFrame(seq, ackBytes))
      const c = (seen.get(seq) ?? 0) + 1; seen.set(seq, c)
      if (c === count) { seen.delete(seq); process.send({ type: 'all', seq }) }
    })
  }
  process.on('message', (m) => {
    if (m.type === 'start') measuring = true
    else if (m.type === 'stop') process.send({ type: 'result', lat, closes })
  })
  process.send({ type: 'ready' })
}

async function runMain (o) {
  const url = o.url.replace(/\/$/, '')
  if (!['127.0.0.1', 'localhost'].includes(new URL(url).hostname)) throw new Error('loopback only')
  const N = Number(o.subscribers); const procs = Number(o.procs); const K = Number(o.updates)
  const rate = Number(o.rate); const warmup = Number(o.warmup); const pid = Number(o['server-pid'])
  const contentBytes = Number(o['content-bytes']); const ackBytes = Number(o['ack-bytes'])
  const writer = await withTimeout(connect(`${url}/writer`), 10000, 'writer connect')
  await sleep(100) // the relay must see the writer join before any subscriber

  const waiters = new Map() // seq -> {left, resolve}
  const allSeen = (seq) => new Promise((resolve) => waiters.set(seq, { left: procs, resolve }))
  const children = []; let first = 0
  for (let p = 0; p < procs; p++) {
    const count = Math.floor(N / procs) + (p < N % procs ? 1 : 0)
    const child = fork(new URL(import.meta.url).pathname, ['sub'], {
      env: { ...process.env, FLOOR_SUB: JSON.stringify({ url, count, first, ackBytes }) }, stdio: ['ignore', 'inherit', 'inherit', 'ipc']
    })
    first += count
    const c = { child, result: null }
    c.ready = new Promise((resolve, reject) => {
      child.on('message', (m) => {
        if (m.type === 'ready') resolve()
        else if (m.type === 'all') { const w = waiters.get(m.seq); if (w && --w.left === 0) { waiters.delete(m.seq); w.resolve() } } else if (m.type === 'result') c.result = m
      })
      child.on('exit', (code) => reject(new Error(`subscriber process exited ${code}`)))
    })
    children.push(c)
  }
  process.on('exit', () => { for (const c of children) try { c.child.kill('SIGKILL') } catch {} })
  await withTimeout(Promise.all(children.map((c) => c.ready)), 60000, 'subscribers ready')

  let seq = 0
  for (let w = 0; w < warmup; w++, seq++) {
    const s = allSeen(seq); writer.send(contentFrame(seq, contentBytes)); await withTimeout(s, 10000, 'warm-up'); await sleep(100)
  }
  await sleep(500)

  // Measured window, as fanout.mjs: fixed schedule, last ms spun.
  const delivered = Array.from({ length: K }, (_, k) => allSeen(seq + k))
  for (const c of children) c.child.send({ type: 'start' })
  await sleep(50)
  const cs0 = ctxSwitches(pid); const ns0 = schedNs(pid); const srv0 = procStat(pid); const wall0 = nowUs()
  for (let k = 0; k < K; k++) {
    const due = wall0 + k * 1e6 / rate
    const wait = (due - nowUs()) / 1000
    if (wait > 1) await sleep(wait - 0.5)
    while (nowUs() < due) { /* spin */ }
    writer.send(contentFrame(seq + k, contentBytes))
  }
  let drained = true
  try { await withTimeout(Promise.all(delivered), 20000, 'drain') } catch (e) { drained = false; log(e.message) }
  const wall1 = nowUs(); const srv1 = procStat(pid); const ns1 = schedNs(pid); const cs1 = ctxSwitches(pid)
  for (const c of children) c.child.send({ type: 'stop' })
  await withTimeout((async () => { while (children.some((c) => !c.result)) await sleep(20) })(), 10000, 'results')
  const lat = Float64Array.from(children.flatMap((c) => c.result.lat)).sort()
  const n = lat.length; const user = (srv1.utime - srv0.utime) / CLK_TCK; const sys = (srv1.stime - srv0.stime) / CLK_TCK
  const perD = (s) => n ? Math.round(s * 1e6 / n * 100) / 100 : null
  const res = {
    label: o.label, params: { subscribers: N, procs, updates: K, rate, warmup },
    frame_bytes: { content: contentFrame(0, contentBytes).length, ack: ackFrame(0, ackBytes).length },
    expected_deliveries: N * K, delivered: n, drained, socket_closes: children.reduce((a, c) => a + c.result.closes, 0),
    loadavg: os.loadavg().map(r3), window_s: r3((wall1 - wall0) / 1e6),
    server_cpu_s: user + sys, server_cpu_user_s: user, server_cpu_sys_s: sys,
    server_cpu_us_per_delivery: perD(user + sys), server_user_us_per_delivery: perD(user), server_sys_us_per_delivery: perD(sys),
    server_schedstat_us_per_delivery: n ? r3((ns1 - ns0) / 1000 / n) : null,
    server_ctx_switches_per_delivery: { voluntary: r3((cs1.v - cs0.v) / n), involuntary: r3((cs1.n - cs0.n) / n) },
    server_threads: readdirSync(`/proc/${pid}/task`).length,
    latency_ms: { p50: r3(pct(lat, 50)), p99: r3(pct(lat, 99)), max: r3(lat[n - 1] ?? null) }
  }
  process.stdout.write(JSON.stringify(res) + '\n')
  log(`${o.label}: ${n}/${N * K}, server ${res.server_cpu_us_per_delivery} µs/delivery (user ${res.server_user_us_per_delivery}, sys ${res.server_sys_us_per_delivery}), load ${res.loadavg[0]}`)
  writer.close()
}

function reportMain (dir) {
  const rows = new Map()
  for (const f of readdirSync(dir).filter((f) => f.endsWith('.json')).sort()) {
    try { const r = JSON.parse(readFileSync(join(dir, f), 'utf8')); if (!rows.has(r.label)) rows.set(r.label, []); rows.get(r.label).push(r) } catch { log(`${f}: no result`) }
  }
  const med = (xs) => { const s = [...xs].sort((a, b) => a - b); const m = s.length >> 1; return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2 }
  console.log('| relay | runs | delivered | µs/delivery (median) | user | sys | per run | schedstat µs/delivery | vol. ctx sw / delivery | p50 / p99 ms | load avg (1 min) per run |')
  console.log('|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|')
  for (const [l, rs] of rows) {
    const m = (k) => med(rs.map((r) => r[k])).toFixed(1)
    console.log(`| ${l} | ${rs.length} | ${med(rs.map((r) => r.delivered))} / ${rs[0].expected_deliveries} | **${m('server_cpu_us_per_delivery')}** | ${m('server_user_us_per_delivery')} | ${m('server_sys_us_per_delivery')} | ` +
      `${rs.map((r) => r.server_cpu_us_per_delivery.toFixed(1)).join(', ')} | ${med(rs.map((r) => r.server_schedstat_us_per_delivery)).toFixed(1)} | ${med(rs.map((r) => r.server_ctx_switches_per_delivery.voluntary)).toFixed(2)} | ` +
      `${med(rs.map((r) => r.latency_ms.p50)).toFixed(2)} / ${med(rs.map((r) => r.latency_ms.p99)).toFixed(2)} | ${rs.map((r) => r.loadavg[0].toFixed(2)).join(', ')} |`)
  }
}

const mode = process.argv[2]
if (mode === 'sub') {
  process.on('disconnect', () => process.exit(0))
  await subMain()
} else if (mode === 'run') {
  const d = { label: 'floor', subscribers: '50', procs: '2', updates: '200', rate: '20', warmup: '5', 'content-bytes': '480', 'ack-bytes': '139' }
  const options = Object.fromEntries(['url', 'server-pid', ...Object.keys(d)].map((k) => [k, { type: 'string', default: d[k] }]))
  const { values } = parseArgs({ args: process.argv.slice(3), options })
  try { await runMain(values); process.exit(0) } catch (e) { log('failed:', e.stack ?? e); process.exit(1) }
} else if (mode === 'report') {
  reportMain(parseArgs({ args: process.argv.slice(3), options: { dir: { type: 'string' } } }).values.dir)
} else {
  log('usage: floor.mjs run --url ws://127.0.0.1:P --server-pid PID | report --dir DIR'); process.exit(2)
}
