#!/usr/bin/env node
// Runs the reference server bench/peers/cojson-server.mjs unchanged (same arguments), but with
// the packages it imports (cojson, cojson-transport-ws, ws, better-sqlite3) resolved from
// bench/cojson/node_modules, this benchmark's own pinned install, so a concurrent
// `npm ci --ignore-scripts` in bench/peers (bench/run-yjs.sh does one) cannot pull the native
// better-sqlite3 binding out from under a run.
//
//   node reference-server.mjs --port 0 --db /tmp/x/storage.db     # see cojson-server.mjs

import { register } from 'node:module'

const here = new URL('./package.json', import.meta.url).href
const peers = new URL('../peers/', import.meta.url).href

// Resolve hook (its own module context, hence a data: URL): a bare specifier imported from
// bench/peers/ is resolved as if imported from bench/cojson/.
const hook = `
  export async function resolve (specifier, context, next) {
    const bare = !/^(\\.|\\/|[a-z][a-z0-9+.-]*:)/i.test(specifier)
    if (bare && context.parentURL && context.parentURL.startsWith(${JSON.stringify(peers)})) {
      return next(specifier, { ...context, parentURL: ${JSON.stringify(here)} })
    }
    return next(specifier, context)
  }`
register('data:text/javascript,' + encodeURIComponent(hook))

await import('../peers/cojson-server.mjs')
