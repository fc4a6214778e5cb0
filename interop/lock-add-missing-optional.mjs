#!/usr/bin/env node
// Make a package-lock.json usable by `npm ci` although the registry reachable here lacks some of
// cojson-core-napi's per-platform optional packages (cojson-core-napi-darwin-*,
// -linux-arm*; they answer 404). `npm install` then silently leaves them out of the lock, and
// `npm ci` refuses the lock ("Missing: cojson-core-napi-darwin-arm64@ from lock file").
//
// This adds a lock entry with the package's `os`/`cpu`/`libc` for each missing one, marked
// optional, so that `npm ci` skips it as platform-incompatible without fetching it. Run after
// every `npm install` that rewrites the lock:
//
//   node ../interop/lock-add-missing-optional.mjs package-lock.json
//
// On Linux x64 nothing changes in what gets installed.

import { readFileSync, writeFileSync } from 'node:fs'

const file = process.argv[2] ?? 'package-lock.json'
const lock = JSON.parse(readFileSync(file, 'utf8'))
const pkgs = lock.packages

// platform suffix (napi-rs naming) -> lock fields
const platform = (suffix) => {
  const [os, cpu, abi] = suffix.split('-')
  const fields = { cpu: [cpu], os: [os] }
  if (abi === 'gnu' || abi === 'gnueabihf') fields.libc = ['glibc']
  if (abi === 'musl') fields.libc = ['musl']
  return fields
}

let added = 0
for (const [path, entry] of Object.entries(pkgs)) {
  for (const [dep, version] of Object.entries(entry.optionalDependencies ?? {})) {
    const m = /^cojson-core-napi-(.+)$/.exec(dep)
    if (!m) continue
    const at = path.slice(0, path.lastIndexOf('node_modules/')) + 'node_modules/' + dep
    if (pkgs[at] || pkgs[`node_modules/${dep}`]) continue
    pkgs[`node_modules/${dep}`] = { version, ...platform(m[1]), license: 'MIT', optional: true }
    added++
  }
}
lock.packages = Object.fromEntries(Object.entries(pkgs).sort(([a], [b]) => (a === '' ? -1 : b === '' ? 1 : a.localeCompare(b))))
writeFileSync(file, JSON.stringify(lock, null, 2) + '\n')
console.error(`${file}: added ${added} missing optional platform entries`)
