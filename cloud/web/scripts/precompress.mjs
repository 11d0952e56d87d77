// Writes a gzip twin (file.gz) next to every compressible file in dist/, so
// yunying-cloud can send it to browsers that accept gzip without compressing
// on each request (cloud/static.c picks the twin when it is not older).
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs'
import { join, extname } from 'node:path'
import { gzipSync, constants } from 'node:zlib'

const root = new URL('../dist/', import.meta.url).pathname
const exts = new Set(['.js', '.mjs', '.css', '.html', '.svg', '.json', '.wasm', '.txt'])
let files = 0
let before = 0
let after = 0

function walk(dir) {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name)
    const st = statSync(p)
    if (st.isDirectory()) {
      walk(p)
    } else if (exts.has(extname(name)) && st.size >= 1024) {
      const raw = readFileSync(p)
      const gz = gzipSync(raw, { level: constants.Z_BEST_COMPRESSION })
      if (gz.length < raw.length * 0.95) {
        writeFileSync(p + '.gz', gz)
        files++
        before += raw.length
        after += gz.length
      }
    }
  }
}

walk(root)
console.log(`precompress: ${files} files, ${(before / 1024).toFixed(0)} KiB -> ${(after / 1024).toFixed(0)} KiB gzip`)
