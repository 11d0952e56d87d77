#!/usr/bin/env node
// Viewer load benchmark (driven by tests/bench/bench_viewer.sh): opens one
// series in a fresh Chromium profile (cold cache) and times, from the start of
// the navigation:
//   first  - the first non-black image on a canvas (pixels read back, the
//            same test for every viewer);
//   all    - the whole series viewable: ours, every image loaded and decoded
//            (the viewer's progress counter); the anchor, every image of the
//            series answered (resource timing of its image requests);
// plus the series' bytes and their arrival rate (first image request start
// to last response end).
//
// Env: YY_BENCH_TARGETS  JSON list of {name, url, login?: {url, username,
//        password}, imagePattern, images}
//      YY_BENCH_PROFILES  "4g,lan" (default); 4g = 20 Mbit/s down, 60 ms
//        latency (CDP Network.emulateNetworkConditions); lan = unthrottled
//      YY_BENCH_RUNS (default 3), YY_BENCH_TIMEOUT_MS (default 300000),
//      YY_CHROMIUM (default /usr/bin/chromium), YY_PLAYWRIGHT (path of
//        playwright-core's index.mjs)
// Prints one JSON line per run ("RUN {...}") and a JSON summary ("SUMMARY {...}").

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { pathToFileURL } from 'node:url'

const { chromium } = await import(pathToFileURL(process.env.YY_PLAYWRIGHT).href)
const TARGETS = JSON.parse(process.env.YY_BENCH_TARGETS || '[]')
const PROFILES = (process.env.YY_BENCH_PROFILES || '4g,lan').split(',').filter(Boolean)
const RUNS = Number(process.env.YY_BENCH_RUNS || 3)
const TIMEOUT = Number(process.env.YY_BENCH_TIMEOUT_MS || 300000)
const CHROMIUM = process.env.YY_CHROMIUM || '/usr/bin/chromium'

const LINK = {
  '4g': { offline: false, latency: 60, downloadThroughput: 20e6 / 8, uploadThroughput: 10e6 / 8, connectionType: 'cellular4g' },
  lan: null,
}

// Runs in the page before any of its scripts: resource timing for every
// request, and a per-frame check of the canvases for a drawn image.
function probe() {
  performance.setResourceTimingBufferSize(100000)
  const st = { first: null, all: null }
  window.__yyBench = st
  const small = document.createElement('canvas')
  small.width = 32
  small.height = 32
  const tick = () => {
    if (st.first === null) {
      for (const c of document.querySelectorAll('canvas')) {
        if (c.width < 100 || c.height < 100) continue
        const x = small.getContext('2d', { willReadFrequently: true })
        x.clearRect(0, 0, 32, 32)
        try {
          x.drawImage(c, 0, 0, 32, 32)
        } catch {
          continue
        }
        const d = x.getImageData(0, 0, 32, 32).data
        let n = 0
        for (let i = 0; i < d.length; i += 4) if (d[i] + d[i + 1] + d[i + 2] > 30) n++
        if (n > 20) {
          st.first = performance.now()
          break
        }
      }
    }
    const v = window.__yyViewer
    if (st.all === null && v && v.imageCount() > 0 && v.state().loaded >= v.imageCount()) st.all = performance.now()
    requestAnimationFrame(tick)
  }
  requestAnimationFrame(tick)
}

async function runOnce(target, profile) {
  const dir = mkdtempSync(join(tmpdir(), 'yy-bench-viewer-'))
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 1,
    isMobile: true,
    hasTouch: true,
  })
  try {
    const page = context.pages()[0] || (await context.newPage())
    if (target.login) {
      const r = await context.request.post(target.login.url, { data: { username: target.login.username, password: target.login.password } })
      if (!r.ok()) throw new Error(`login: HTTP ${r.status()}`)
    }
    await context.addInitScript(probe)
    const cdp = await context.newCDPSession(page)
    await cdp.send('Network.enable')
    if (LINK[profile]) await cdp.send('Network.emulateNetworkConditions', LINK[profile])
    const pattern = new RegExp(target.imagePattern)
    await page.goto(target.url, { waitUntil: 'commit', timeout: TIMEOUT })
    const diag = () => page.evaluate((pat) => {
      const re = new RegExp(pat)
      const all = performance.getEntriesByType('resource')
      return `first=${window.__yyBench?.first} images=${all.filter((e) => re.test(e.name)).length}` +
        ` resources=${all.length} last=${all.slice(-3).map((e) => e.name.slice(0, 120)).join(' ')}`
    }, target.imagePattern.toString()).catch(() => '')
    await page.waitForFunction(() => window.__yyBench && window.__yyBench.first !== null, undefined, { timeout: TIMEOUT, polling: 50 })
      .catch(async (e) => { throw new Error(`no first image: ${await diag()}: ${e.message}`) })
    // The anchor's viewer fetches only the slice shown (no client prefetch):
    // fetch the rest of its series from the page, as its viewer would on
    // scrolling, the browser's usual 6 connections, timed the same way.
    if (target.fetchAll) {
      await page.evaluate(async ([pat, seriesUrl]) => {
        const re = new RegExp(pat)
        const firstUrl = performance.getEntriesByType('resource').find((e) => re.test(e.name)).name
        const m = /^(.*\/instances\/[^-]+-)([0-9a-f-]{44}_\d+)$/.exec(firstUrl)
        if (!m) throw new Error(`unexpected image URL ${firstUrl}`)
        const text = await (await fetch(seriesUrl)).text()
        const slices = [...new Set(text.match(/[0-9a-f]{8}(?:-[0-9a-f]{8}){4}_\d+/g) || [])].filter((s) => s !== m[2])
        let next = 0
        const worker = async () => {
          while (next < slices.length) {
            const r = await fetch(m[1] + slices[next++])
            await r.arrayBuffer()
          }
        }
        await Promise.all([worker(), worker(), worker(), worker(), worker(), worker()])
      }, [target.imagePattern.toString(), target.fetchAll])
    }
    // Whole series: our viewer says so; the anchor's image requests have all been answered.
    await page.waitForFunction(([pat, n]) => {
      const re = new RegExp(pat)
      const st = window.__yyBench
      if (window.__yyViewer) return st.all !== null
      const done = performance.getEntriesByType('resource').filter((e) => re.test(e.name) && e.responseEnd > 0)
      if (new Set(done.map((e) => e.name)).size >= n) {
        if (st.all === null) st.all = Math.max(...done.map((e) => e.responseEnd))
        return true
      }
      return false
    }, [target.imagePattern.toString(), target.images], { timeout: TIMEOUT, polling: 100 })
      .catch(async (e) => { throw new Error(`series incomplete: ${await diag()}: ${e.message}`) })
    const res = await page.evaluate((pat) => {
      const re = new RegExp(pat)
      const all = performance.getEntriesByType('resource')
      const img = all.filter((e) => re.test(e.name))
      const js = all.filter((e) => e.initiatorType === 'script' || /\.m?js(\?|$)/.test(e.name))
      const bytes = img.reduce((s, e) => s + (e.encodedBodySize || e.transferSize || 0), 0)
      const t0 = Math.min(...img.map((e) => e.startTime))
      const t1 = Math.max(...img.map((e) => e.responseEnd))
      return {
        first: window.__yyBench.first,
        // ours: the viewer (Cornerstone, tools live) has drawn its first image;
        // before that the first image may be the preview (viewer/preview.ts)
        ready: performance.getEntriesByName('yy:first-render')[0]?.startTime ?? window.__yyBench.first,
        all: window.__yyBench.all,
        images: new Set(img.map((e) => e.name)).size,
        seriesBytes: bytes,
        seriesSpan: t1 - t0,
        jsBytes: js.reduce((s, e) => s + (e.encodedBodySize || e.transferSize || 0), 0),
        jsDecoded: js.reduce((s, e) => s + (e.decodedBodySize || 0), 0),
        backend: window.__yyViewer ? window.__yyViewer.state().backend : '',
        // YY_BENCH_TRACE=1: the requests that started before the first image
        trace: [...all.filter((e) => e.startTime <= window.__yyBench.first), ...performance.getEntriesByType('mark')
          .map((m) => ({ startTime: m.startTime, responseEnd: m.startTime, encodedBodySize: 0, name: m.name }))]
          .sort((a, b) => a.startTime - b.startTime)
          .map((e) => `${e.startTime.toFixed(0)}-${e.responseEnd.toFixed(0)} ${(e.encodedBodySize / 1e3).toFixed(0)}KB ${e.name.replace(/^https?:\/\/[^/]+/, '').slice(0, 90)}`),
      }
    }, target.imagePattern.toString())
    if (process.env.YY_BENCH_TRACE) console.log(`TRACE ${target.name} ${profile} first=${res.first.toFixed(0)}\n  ${res.trace.join('\n  ')}`)
    delete res.trace
    return res
  } finally {
    await context.close().catch(() => {})
    rmSync(dir, { recursive: true, force: true })
  }
}

const median = (a) => {
  const s = [...a].sort((x, y) => x - y)
  return s.length ? (s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2) : NaN
}

const summary = []
for (const profile of PROFILES) {
  for (const target of TARGETS) {
    const runs = []
    for (let i = 0; i < RUNS; i++) {
      try {
        const r = await runOnce(target, profile)
        runs.push(r)
        process.stdout.write(`RUN ${JSON.stringify({ profile, target: target.name, ...r })}\n`)
      } catch (e) {
        process.stdout.write(`RUN ${JSON.stringify({ profile, target: target.name, error: String(e.message || e).split('\n')[0] })}\n`)
      }
    }
    const ok = runs.filter((r) => r.first !== null)
    summary.push({
      profile,
      target: target.name,
      runs: ok.length,
      first: median(ok.map((r) => r.first)),
      ready: median(ok.map((r) => r.ready)),
      all: median(ok.map((r) => r.all)),
      images: ok.length ? ok[0].images : 0,
      seriesBytes: median(ok.map((r) => r.seriesBytes)),
      rateMbit: median(ok.map((r) => (r.seriesBytes * 8) / (r.seriesSpan * 1000))),
      jsBytes: median(ok.map((r) => r.jsBytes)),
      backend: ok.length ? ok[0].backend : '',
    })
  }
}
process.stdout.write(`SUMMARY ${JSON.stringify(summary)}\n`)
