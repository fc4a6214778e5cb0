// moai's dashboard: fills /dashboard from the server-sent events of /dashboard/events (the
// plotted history first, then one snapshot a second). Written by hand, no dependencies; every
// value from the server goes into the page as text (textContent), never as HTML.
'use strict'
;(() => {
  const WINDOW_MS = 10 * 60 * 1000
  const $ = (id) => document.getElementById(id)
  let points = []
  let last = null
  let lastAt = 0
  let shownDocs = new Set()

  const num = (v, digits = 0) => (v == null || Number.isNaN(v) ? '–' : Number(v).toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: 0 }))
  const bytes = (n) => {
    if (n == null) return '–'
    if (n < 1024) return n + ' B'
    const units = ['KiB', 'MiB', 'GiB', 'TiB']
    let v = n / 1024
    let i = 0
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++ }
    return (v < 10 ? v.toFixed(1) : Math.round(v)) + ' ' + units[i]
  }
  const duration = (s) => {
    if (s == null) return '–'
    if (s < 60) return s + ' s'
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s'
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min'
    return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h'
  }
  const text = (id, value) => { const el = $(id); if (el) el.textContent = value }
  const cell = (value, cls) => { const td = document.createElement('td'); td.textContent = value; if (cls) td.className = cls; return td }
  const row = (cells, attrs = {}) => {
    const tr = document.createElement('tr')
    for (const c of cells) tr.append(c)
    for (const [k, v] of Object.entries(attrs)) tr.setAttribute(k, v)
    return tr
  }
  const empty = (cols, message) => row([Object.assign(cell(message), { colSpan: cols })], { class: 'empty' })

  // ---- plots: inline SVG, x = last ten minutes, y = 0 .. a round number above the peak
  const svgNS = 'http://www.w3.org/2000/svg'
  const niceMax = (v) => {
    if (!(v > 0)) return 1
    const p = Math.pow(10, Math.floor(Math.log10(v)))
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p
    return 10 * p
  }
  // The plotted span: the last ten minutes, or less (at least one) while the server is younger.
  const span = () => {
    if (points.length < 2) return 60 * 1000
    return Math.min(WINDOW_MS, Math.max(60 * 1000, points[points.length - 1].t - points[0].t))
  }
  const ago = (ms) => (ms >= 60000 ? Math.round(ms / 60000) + ' min ago' : Math.round(ms / 1000) + ' s ago')
  const plot = (svgId, axisId, series, unit) => {
    const svg = $(svgId)
    if (!svg) return
    const W = 600; const H = 160
    const now = points.length ? points[points.length - 1].t : Date.now()
    const windowMs = span()
    const from = now - windowMs
    let peak = 0
    for (const s of series) for (const p of points) { const v = p[s.key]; if (v != null && v > peak) peak = v }
    const top = niceMax(peak)
    const x = (t) => ((t - from) / windowMs) * W
    const y = (v) => H - 2 - (v / top) * (H - 8)
    svg.replaceChildren()
    for (const f of [0.25, 0.5, 0.75]) {
      const l = document.createElementNS(svgNS, 'line')
      l.setAttribute('x1', 0); l.setAttribute('x2', W); l.setAttribute('y1', y(top * f)); l.setAttribute('y2', y(top * f))
      l.setAttribute('class', 'grid')
      svg.append(l)
    }
    for (const s of series) {
      // Break the line where a value is missing (no commits that second).
      let d = ''
      let pen = false
      for (const p of points) {
        if (p.t < from) continue
        const v = p[s.key]
        if (v == null) { pen = false; continue }
        // A segment's first point gets a 1-unit stub, so a lone second still shows.
        d += (pen ? 'L' : 'M') + x(p.t).toFixed(1) + ' ' + y(v).toFixed(1) + (pen ? '' : 'h1')
        pen = true
      }
      if (s.area && d) {
        const visible = points.filter((p) => p.t >= from && p[s.key] != null)
        if (visible.length > 1) {
          const a = document.createElementNS(svgNS, 'path')
          a.setAttribute('d', d + 'L' + x(visible[visible.length - 1].t).toFixed(1) + ' ' + H + 'L' + x(visible[0].t).toFixed(1) + ' ' + H + 'Z')
          a.setAttribute('class', 'area ' + s.cls)
          svg.append(a)
        }
      }
      const path = document.createElementNS(svgNS, 'path')
      path.setAttribute('d', d)
      path.setAttribute('class', 'line ' + s.cls)
      svg.append(path)
    }
    const axis = $(axisId)
    if (axis) {
      axis.replaceChildren()
      for (const label of [ago(windowMs), 'scale: 0 – ' + num(top, 3) + ' ' + unit + (peak ? ' · peak ' + num(peak, 3) : ''), 'now']) {
        const span = document.createElement('span')
        span.textContent = label
        axis.append(span)
      }
    }
  }

  const render = (s) => {
    const state = s.phase === 'ready' ? (s.ready ? 'ready' : 'degraded') : s.phase
    const live = $('live')
    live.textContent = 'live · ' + state
    live.className = 'pill ' + (s.ready ? 'ok' : s.phase === 'failed' ? 'error' : 'warn')
    text('summary', 'moai ' + s.version + ' · up ' + duration(s.uptime_s) + ' · auth ' + s.auth)

    const conns = s.connections || {}
    const total = Object.values(conns).reduce((a, b) => a + b, 0)
    text('conn-total', num(total))
    const protocols = ['yjs', 'cojson', 'pgsync'].concat(Object.keys(conns).filter((p) => !['yjs', 'cojson', 'pgsync'].includes(p)).sort())
    text('conn-split', protocols.map((p) => p + ' ' + num(conns[p] || 0)).join(' · '))
    const p = s.point || {}
    text('deliveries', num(p.deliveries, 1))
    text('received', num(p.received, 1) + '/s received')
    text('commit-ms', p.commit_ms == null ? '–' : num(p.commit_ms, 2))
    const st = s.storage
    const size = st ? (st.bytes != null ? bytes(st.bytes) : st.size_error ? 'size unknown' : 'measuring…') : null
    text('commit-detail', (size ? size + ' stored · ' : '') + (p.commit_p99_ms == null ? '' : 'p99 ≤ ' + num(p.commit_p99_ms, 2) + ' ms · ') + num(p.commits, 1) + ' commits/s · ' + num(s.totals.writes_per_commit, 1) + ' writes each')

    const yjs = s.yjs
    text('yjs-loaded', yjs ? num(yjs.loaded) : '–')
    const co = s.cojson
    text('cojson-resident', co ? num(co.resident_covalues) : '–')
    text('cojson-detail', co ? num(co.peers) + ' peers · ' + num(co.writes_pending) + ' writes pending' : 'not running')
    const pg = s.pgsync
    text('pgsync-role', pg ? pg.role : 'off')
    if (pg) {
      const parts = []
      if (pg.lag_bytes != null) parts.push('lag ' + bytes(pg.lag_bytes))
      if (pg.registered_clients != null) parts.push(num(pg.registered_clients) + ' registered clients')
      parts.push('watermark ' + pg.watermark)
      if (pg.status_error) parts.push('status: ' + pg.status_error)
      text('pgsync-detail', parts.join(' · '))
    } else {
      text('pgsync-detail', 'start with --pg-url')
    }

    // Documents, busiest first; a row that just appeared is highlighted once.
    const tbody = $('docs')
    const docs = (yjs && yjs.documents) || []
    const seen = new Set()
    tbody.replaceChildren(...(docs.length
      ? docs.map((d) => {
        seen.add(d.id)
        const tr = row([
          cell(d.id),
          cell(num(d.connections), 'num'),
          cell(num(d.present), 'num'),
          cell(d.loaded ? bytes(d.snapshot_bytes + d.journal_bytes) : 'loading…', 'num'),
          cell(bytes(d.journal_bytes), 'num'),
          cell(num(d.updates), 'num'),
          cell(duration(d.open_s), 'num')
        ], { 'data-doc': d.id })
        if (!shownDocs.has(d.id)) tr.classList.add('fresh')
        return tr
      })
      : [empty(7, 'no document is open')]))
    shownDocs = seen
    text('docs-note', yjs ? (yjs.loaded > docs.length ? 'the ' + docs.length + ' busiest of ' + num(yjs.loaded) : num(yjs.loaded) + ' open') : '')

    // Errors and rejections since start.
    const rej = Object.entries(s.rejections || {}).filter(([, v]) => v > 0)
    const errors = []
    if (s.error) errors.push(['start failed', s.error])
    if (s.storage_error) errors.push(['storage', s.storage_error])
    if (s.cluster && s.cluster.status !== 'ok') errors.push(['cluster ' + s.cluster.status, s.cluster.reason || ''])
    if (co) {
      for (const [k, label] of [['rejected_sessions_total', 'CoJSON sessions rejected'], ['invalid_headers_total', 'CoJSON invalid headers'], ['slow_peers_closed_total', 'CoJSON slow peers closed'], ['storage_failures_total', 'CoJSON storage failures']]) {
        if (co[k] > 0) errors.push([label, num(co[k])])
      }
    }
    if (s.totals.unknown_messages > 0) errors.push(['unknown messages', num(s.totals.unknown_messages)])
    const rtbody = $('rejections')
    const rrows = errors.map(([k, v]) => row([cell(k), cell(v, 'bad')]))
      .concat(rej.sort((a, b) => b[1] - a[1]).map(([k, v]) => row([cell('rejected: ' + k), cell(num(v), 'num')])))
    rtbody.replaceChildren(...(rrows.length ? rrows : [empty(2, 'none since start')]))

    const server = [
      ['version', s.version],
      ['state', state],
      ['uptime', duration(s.uptime_s)],
      ['auth', s.auth === 'token' ? 'connection tokens required' : 'open (no SYNC_SHARED_SECRET)'],
      ['messages in / out', num(s.totals.messages_in) + ' / ' + num(s.totals.messages_out)],
      ['bytes in / out', bytes(s.totals.bytes_in) + ' / ' + bytes(s.totals.bytes_out)],
      ['storage commits', num(s.totals.commits) + ' (mean ' + num(s.totals.commit_ms_mean, 3) + ' ms)']
    ]
    if (st) server.push(['storage', (st.bytes != null ? bytes(st.bytes) : st.size_error ? 'size unknown (' + st.size_error + ')' : 'measuring…') + ' · ' + st.what])
    if (s.cluster) server.push(['cluster', s.cluster.status + ' · instance ' + s.cluster.instance])
    if (pg) server.push(['change feed', pg.role + (pg.caught_up ? ', caught up' : ', catching up') + ' · generation ' + pg.generation + ' · horizon ' + pg.horizon])
    $('server').replaceChildren(...server.map(([k, v]) => row([cell(k), cell(v)])))

    plot('plot-deliveries', 'axis-deliveries', [{ key: 'deliveries', cls: 'deliveries', area: true }], '/s')
    plot('plot-commit', 'axis-commit', [{ key: 'commit_ms', cls: 'mean' }, { key: 'commit_p99_ms', cls: 'p99' }], 'ms')
  }

  const connect = () => {
    const es = new EventSource('/dashboard/events')
    es.addEventListener('history', (e) => {
      points = JSON.parse(e.data)
    })
    es.addEventListener('snapshot', (e) => {
      const s = JSON.parse(e.data)
      if (!s.point) return
      if (!points.length || points[points.length - 1].t < s.point.t) points.push(s.point)
      const cutoff = s.point.t - WINDOW_MS
      while (points.length && points[0].t < cutoff) points.shift()
      last = s
      lastAt = Date.now()
      render(s)
    })
    es.onerror = () => {
      const live = $('live')
      if (es.readyState === EventSource.CLOSED) {
        // Refused (the token changed or the cookie went): only a new sign-in helps.
        live.textContent = 'disconnected · reload to sign in again'
        live.className = 'pill error'
      } else {
        live.textContent = 'reconnecting…'
        live.className = 'pill warn'
      }
    }
  }
  // A stream that went quiet (server gone) shows as stale.
  setInterval(() => {
    if (last && Date.now() - lastAt > 3500) {
      const live = $('live')
      live.textContent = 'stale · last update ' + Math.round((Date.now() - lastAt) / 1000) + ' s ago'
      live.className = 'pill warn'
    }
  }, 1000)
  connect()
})()
