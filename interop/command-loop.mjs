// The stdin/stdout command protocol both drivers speak (interop/README.md, COJSON.md): one JSON
// command per line in, one reply per command out, matched by `id`. Commands run concurrently.
// When the test process goes away (stdin closes), the driver exits instead of lingering.

import { createInterface } from 'node:readline'
import { readFileSync } from 'node:fs'

export const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')

const errText = (e) => String(e && e.message ? e.message : e)

/** Serve `commands` (name → (msg) => result | Promise<result>) on stdin/stdout. */
export function serveCommands (commands) {
  const handle = async (line) => {
    if (!line.trim()) return
    let msg
    try { msg = JSON.parse(line) } catch (e) { return out({ id: null, ok: false, error: `bad JSON: ${e.message}` }) }
    const id = msg.id ?? null
    const fn = Object.hasOwn(commands, msg.cmd) ? commands[msg.cmd] : null
    if (!fn) return out({ id, ok: false, error: `unknown cmd ${JSON.stringify(msg.cmd)}` })
    try {
      const result = await fn(msg)
      out({ ...result, id, ok: true })
    } catch (e) {
      out({ id, ok: false, error: errText(e) })
    }
  }
  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity })
  rl.on('line', (line) => { handle(line) })
  rl.on('close', () => process.exit(0))
}

/** Versions of installed packages, for the `ready` event. */
export const versions = (pkgs) =>
  Object.fromEntries(pkgs.map((p) => [p, JSON.parse(readFileSync(new URL(`./node_modules/${p}/package.json`, import.meta.url))).version]))
