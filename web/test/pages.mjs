#!/usr/bin/env node
// moai's pages in a real browser: headless Chromium (Debian's `chromium`) driven by
// playwright-core against a running moai. Run by crates/moai/tests/pages.rs, which starts the
// server with --admin-token and a short --yjs-idle-evict; runnable by hand too:
//
//   node web/test/pages.mjs --url http://127.0.0.1:4201 --admin-token TOKEN --version 0.1.0 \
//     [--screenshots docs/images]
//   node web/test/pages.mjs --url … --admin-token TOKEN --demo-token CONNECTION_TOKEN
//
// Checks, each step printed as one JSON line on stdout (exit 1 with the failing step):
//   - / names the server, its version and its readiness;
//   - /dashboard refuses a browser without the token (401 and the sign-in form; a wrong token
//     too, its event stream too), and the form signs it in;
//   - two /demo tabs (separate browser profiles, so nothing is shared but the server) converge
//     on what each types and see each other's cursor and name;
//   - the signed-in dashboard shows the demo's document with its two clients, live (the page
//     never reloads), and drops it once both tabs are gone and the document was evicted.
// With --screenshots, docs/images/dashboard.png and demo.png are taken along the way. With
// --demo-token (a server with SYNC_SHARED_SECRET): the demo is refused without a token and
// works with `?token=`.

import { chromium } from 'playwright-core'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, a, i, all) => (a.startsWith('--') ? [...pairs, [a.slice(2), all[i + 1]]] : pairs), [])
)
const base = args.url || 'http://127.0.0.1:4201'
const token = args['admin-token']
const version = args.version
const shots = args.screenshots
const executablePath = process.env.MOAI_CHROMIUM || '/usr/bin/chromium'
if (!token) throw new Error('--admin-token is required')

const step = (name, extra = {}) => console.log(JSON.stringify({ step: name, ok: true, ...extra }))
const fail = (name, error) => {
  console.log(JSON.stringify({ step: name, ok: false, error: String(error && error.stack ? error.stack : error) }))
  process.exitCode = 1
}
const expect = (cond, message) => { if (!cond) throw new Error(message) }

// The flags headless Chromium needs here: no sandbox (root in a container), no GPU, and none of
// its background network traffic (no network is reachable but loopback). Playwright adds
// --headless and its own fresh --user-data-dir.
const profile = mkdtempSync(join(tmpdir(), 'moai-chromium-'))
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
  env: { ...process.env, HOME: profile },
  timeout: 60000
})
const TIMEOUT = 20000

let current = 'start'
try {
  if (args['demo-token']) await demoWithTokens(args['demo-token'])
  else await allPages()
} catch (e) {
  fail(current, e)
} finally {
  await browser.close()
  rmSync(profile, { recursive: true, force: true })
}

// On a server that requires connection tokens (SYNC_SHARED_SECRET): the demo without a token says
// it was refused; with `?token=` two tabs edit together.
async function demoWithTokens (demoToken) {
  current = 'landing says tokens are required'
  const ctx = await browser.newContext()
  const page = await ctx.newPage()
  await page.goto(base + '/')
  expect((await page.textContent('dl.facts')).includes('connection tokens required'), 'auth not shown')
  step(current)

  current = 'demo without a token is refused'
  await page.goto(base + '/demo?room=tokens&name=nobody')
  await page.waitForFunction(() => document.querySelector('#status').textContent.startsWith('refused by the server (4401'), null, { timeout: TIMEOUT })
  step(current, { status: await page.textContent('#status') })

  current = 'demo with a token edits'
  const other = await browser.newContext()
  const tabs = [page, await other.newPage()]
  for (const [p, name] of [[tabs[0], 'carol'], [tabs[1], 'dave']]) {
    await p.goto(`${base}/demo?room=tokens&name=${name}&token=${encodeURIComponent(demoToken)}`)
    await p.waitForFunction(() => document.querySelector('#status').textContent === 'synced', null, { timeout: TIMEOUT })
  }
  await tabs[0].click('.cm-content')
  await tabs[0].keyboard.type('with a token')
  await tabs[1].waitForFunction(() => window.moaiDemo.view.state.doc.toString().includes('with a token'), null, { timeout: TIMEOUT })
  step(current)
  await ctx.close()
  await other.close()
}

async function allPages () {
  // ---- the landing page
  current = 'landing'
  {
    const ctx = await browser.newContext()
    const page = await ctx.newPage()
    const resp = await page.goto(base + '/')
    expect(resp.status() === 200, 'GET / answered ' + resp.status())
    const shown = (await page.textContent('#version')).trim()
    if (version) expect(shown === version, `version shown is "${shown}", expected "${version}"`)
    await page.waitForFunction(() => document.querySelector('#readiness').textContent.includes('ready'), null, { timeout: TIMEOUT })
    const links = await page.$$eval('a', (as) => as.map((a) => a.getAttribute('href')))
    for (const href of ['/health', '/metrics', '/dashboard', '/demo']) expect(links.includes(href), 'no link to ' + href)
    const engines = await page.textContent('table.engines')
    expect(engines.includes('Yjs') && engines.includes('CoJSON'), 'engines not listed: ' + engines)
    step(current, { version: shown })
    await ctx.close()
  }

  // ---- the dashboard refuses a browser without the token
  current = 'dashboard refuses a missing token'
  const admin = await browser.newContext()
  const dash = await admin.newPage()
  {
    const resp = await dash.goto(base + '/dashboard')
    expect(resp.status() === 401, 'GET /dashboard without a token answered ' + resp.status())
    expect(await dash.isVisible('form.login input[name=token]'), 'no sign-in form on the 401 page')
    expect((await dash.$('#docs')) === null, 'the refused page shows dashboard content')
    const events = await dash.evaluate(async () => (await fetch('/dashboard/events')).status)
    expect(events === 401, 'the event stream without a token answered ' + events)
    await dash.fill('input[name=token]', 'not-' + token)
    const [wrong] = await Promise.all([dash.waitForNavigation(), dash.click('form.login button')])
    expect(wrong.status() === 401, 'a wrong token answered ' + wrong.status())
    step(current)
  }

  current = 'dashboard signs in'
  {
    await dash.fill('input[name=token]', token)
    const [signed] = await Promise.all([dash.waitForNavigation(), dash.click('form.login button')])
    expect(signed.status() === 200 && new URL(dash.url()).pathname === '/dashboard', `sign-in ended at ${dash.url()} (${signed.status()})`)
    await dash.waitForFunction(() => document.querySelector('#live').textContent.startsWith('live'), null, { timeout: TIMEOUT })
    // Marks this page load: it must still be there at the end (updates never reload the page).
    await dash.evaluate(() => { window.__moaiSameLoad = true })
    step(current)
  }

  // ---- two demo tabs
  current = 'demo tabs converge'
  const room = 'test-' + Math.random().toString(36).slice(2, 8)
  const docId = 'demo-' + room
  const ctxA = await browser.newContext({ viewport: { width: 1200, height: 760 } })
  const ctxB = await browser.newContext({ viewport: { width: 1200, height: 760 } })
  const a = await ctxA.newPage()
  const b = await ctxB.newPage()
  // What the editor holds (its DOM also has the remote cursors' name labels).
  const editorText = (p) => p.evaluate(() => window.moaiDemo.view.state.doc.toString())
  const waitText = (p, s) => p.waitForFunction((s) => window.moaiDemo && window.moaiDemo.view.state.doc.toString().includes(s), s, { timeout: TIMEOUT })
  {
    for (const [p, name] of [[a, 'alice'], [b, 'bob']]) {
      const resp = await p.goto(`${base}/demo?room=${room}&name=${name}`)
      expect(resp.status() === 200, 'GET /demo answered ' + resp.status())
      await p.waitForFunction(() => document.querySelector('#status').textContent === 'synced', null, { timeout: TIMEOUT })
    }
    await a.click('.cm-content')
    await a.keyboard.type('Hello from alice. ')
    await waitText(b, 'Hello from alice.')
    await b.click('.cm-content')
    await b.keyboard.press('End')
    await b.keyboard.type('And bob.')
    await waitText(a, 'And bob.')
    const [ta, tb] = [await editorText(a), await editorText(b)]
    expect(ta === tb, `tabs differ: ${JSON.stringify(ta)} vs ${JSON.stringify(tb)}`)
    step(current, { text: ta })
  }

  current = "demo tabs see each other's cursor"
  {
    const caretOf = (p, name) => p.waitForFunction((name) => [...document.querySelectorAll('.cm-ySelectionInfo')].some((e) => e.textContent === name), name, { timeout: TIMEOUT })
    // Each moves its cursor, so the other has a fresh position to show.
    await a.keyboard.press('Home')
    await caretOf(b, 'alice')
    await b.keyboard.press('End')
    await caretOf(a, 'bob')
    const people = await a.$$eval('#people li', (lis) => lis.map((li) => li.textContent))
    expect(people.some((t) => t.startsWith('alice')) && people.some((t) => t.startsWith('bob')), 'people list: ' + JSON.stringify(people))
    step(current, { people })
  }

  // ---- the dashboard shows the document, live
  current = 'dashboard shows the document'
  const docRow = (id) => `#docs tr[data-doc="${id}"]`
  {
    await dash.waitForFunction((sel) => {
      const tr = document.querySelector(sel)
      return tr && tr.children[1].textContent === '2'
    }, docRow(docId), { timeout: TIMEOUT })
    // Some traffic for the plots (and the screenshot): lines typed in turns, Enter included;
    // each waits for the other's line first, so lines never interleave.
    const rounds = shots ? 12 : 3
    for (let i = 1; i <= rounds; i++) {
      for (const [p, name, other] of [[a, 'alice', `bob: line ${i - 1}`], [b, 'bob', `alice: line ${i}`]]) {
        if (i > 1 || name === 'bob') await waitText(p, other)
        await p.keyboard.press('Control+End')
        await p.keyboard.press('Enter')
        await p.keyboard.type(`${name}: line ${i}`, { delay: shots ? 40 : 0 })
      }
    }
    await waitText(a, `bob: line ${rounds}`)
    await waitText(b, `alice: line ${rounds}`)
    const lines = await a.evaluate(() => window.moaiDemo.view.state.doc.lines)
    expect(lines >= 7, 'Enter did not make new lines: ' + lines)
    await dash.waitForFunction(() => Number(document.querySelector('#conn-total').textContent) >= 2, null, { timeout: TIMEOUT })
    await dash.waitForFunction(() => /\d+(\.\d)? (B|KiB|MiB|GiB) stored/.test(document.querySelector('#commit-detail').textContent), null, { timeout: TIMEOUT })
    step(current, { doc: docId, lines })
    if (shots) {
      // Bob keeps typing while the pictures are taken, so they show the system at work.
      let typing = true
      const busy = (async () => {
        while (typing) {
          await b.keyboard.press('Control+End')
          await b.keyboard.press('Enter')
          for (const ch of 'bob is still typing') {
            if (!typing) break
            await b.keyboard.type(ch, { delay: 60 })
          }
        }
      })()
      await a.waitForTimeout(3000)
      await a.screenshot({ path: join(shots, 'demo.png') })
      await dash.setViewportSize({ width: 1280, height: 1000 })
      await dash.screenshot({ path: join(shots, 'dashboard.png'), fullPage: true })
      typing = false
      await busy
      step('screenshots', { dir: shots })
    }
  }

  current = 'dashboard shows document ids as text'
  {
    // A document id is whatever a client put in its URL: the dashboard must show it, not run it.
    const evil = '<img src=x onerror="window.__moaiXss=1">'
    await dash.evaluate((id) => {
      window.__moaiEvil = new WebSocket(location.origin.replace('http', 'ws') + '/sync/v1/' + encodeURIComponent(id))
    }, evil)
    await dash.waitForFunction((id) => [...document.querySelectorAll('#docs tr')].some((tr) => tr.dataset.doc === id && tr.children[0].textContent === id), evil, { timeout: TIMEOUT })
    expect(await dash.evaluate(() => window.__moaiXss === undefined && document.querySelector('#docs img') === null), 'a document id was run as HTML')
    await dash.evaluate(() => window.__moaiEvil.close())
    step(current)
  }

  current = 'dashboard drops the document after eviction'
  {
    await ctxA.close()
    await ctxB.close()
    await dash.waitForFunction((sel) => document.querySelector(sel) === null, docRow(docId), { timeout: TIMEOUT })
    expect(await dash.evaluate(() => window.__moaiSameLoad === true), 'the dashboard page was reloaded')
    step(current)
  }
  await admin.close()
}
