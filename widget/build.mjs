// Builds dist/widget.js: one minified IIFE. Prints its size and SRI hash, and fails when the
// gzipped bundle is over budget or contains code a strict Content-Security-Policy refuses.
import { createHash } from 'node:crypto'
import { readFileSync } from 'node:fs'
import { gzipSync } from 'node:zlib'

import { build } from 'esbuild'

const BUDGET = 12 * 1024 // bytes, gzipped
const OUT = new URL('./dist/widget.js', import.meta.url)
// What a strict CSP blocks (eval and friends), or what could turn text into markup.
const FORBIDDEN = [/\beval\(/, /\bnew Function\b/, /\.innerHTML\b/, /\.outerHTML\b/,
  /insertAdjacentHTML/, /document\.write/]

await build({
  entryPoints: [new URL('./src/index.js', import.meta.url).pathname],
  outfile: OUT.pathname,
  bundle: true,
  minify: true,
  format: 'iife',
  target: ['chrome100', 'firefox100', 'safari15.4'],
  legalComments: 'none',
  charset: 'utf8',
})

const bundle = readFileSync(OUT)
const text = bundle.toString('utf8')
const gzipped = gzipSync(bundle, { level: 9 }).length
const integrity = `sha384-${createHash('sha384').update(bundle).digest('base64')}`
console.log(`widget/dist/widget.js: ${bundle.length} bytes, ${gzipped} bytes gzipped `
  + `(budget ${BUDGET}), ${integrity}`)
const found = FORBIDDEN.filter((pattern) => pattern.test(text))
if (found.length) {
  console.error(`widget build: the bundle contains ${found.join(', ')}`)
  process.exit(1)
}
if (gzipped > BUDGET) {
  console.error(`widget build: ${gzipped} bytes gzipped is over the ${BUDGET} byte budget`)
  process.exit(1)
}
