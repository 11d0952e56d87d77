#!/usr/bin/env node
// Browser end-to-end test of the web app against a real yunying-cloud.
//
// Drives Debian's /usr/bin/chromium through playwright-core (no test runner):
// login, study list + search, viewer (first image drawn, wheel/touch scroll
// changes the slice and the pixels, window/level drag, pinch zoom, reset), at
// a desktop (1280x800, mouse) and a phone (390x844, touch) size.
//
// Env: YY_CLOUD_URL (e.g. http://127.0.0.1:8080), YY_USER, YY_PASSWORD: a user
//      of that cloud, which holds at least one study whose first series has
//      two or more images (a CT is preferred when there are several).
//      Optional: YY_E2E_STUDY_UID (the study to open), YY_CHROMIUM (browser
//      path), YY_E2E_ARTIFACTS (directory for failure screenshots),
//      YY_E2E_TIMEOUT_MS (per wait, default 60000), YY_E2E_PROFILES
//      (default desktop,phone), YY_E2E_RENDER=cpu|gpu (force a rendering
//      back end; default: the app's choice), YY_E2E_PREVIEW_REF (JSON
//      {width, height, grey: base64}: the first image as the preview must
//      draw it, made by tests/integration/test_web_e2e.py with pydicom).
// Prints "N passed, N failed" last; exits non-zero on any failure.

import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'

const BASE = (process.env.YY_CLOUD_URL || '').replace(/\/+$/, '')
const USER = process.env.YY_USER || ''
const PASSWORD = process.env.YY_PASSWORD || ''
const STUDY_UID = process.env.YY_E2E_STUDY_UID || ''
const CHROMIUM = process.env.YY_CHROMIUM || '/usr/bin/chromium'
const TIMEOUT = Number(process.env.YY_E2E_TIMEOUT_MS || 60000)
const ARTIFACTS = process.env.YY_E2E_ARTIFACTS || join(tmpdir(), 'yy-e2e-artifacts')
const RENDER = process.env.YY_E2E_RENDER || '' // 'cpu' | 'gpu' forces Cornerstone's rendering back end
const PREVIEW_REF = process.env.YY_E2E_PREVIEW_REF || ''

const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
]

let passed = 0
let failed = 0

function log(msg) {
  process.stdout.write(`${msg}\n`)
}

class Skip extends Error {}

/** Runs one named check; a thrown error fails it. Returns the check's value. */
async function check(name, fn, ctx) {
  const t0 = Date.now()
  try {
    const v = await fn()
    passed++
    log(`ok   ${name} (${Date.now() - t0} ms)`)
    return v
  } catch (e) {
    if (e instanceof Skip) throw e
    failed++
    log(`FAIL ${name}: ${e && e.message ? e.message.split('\n')[0] : e}`)
    if (ctx?.page) {
      try {
        mkdirSync(ARTIFACTS, { recursive: true })
        const f = join(ARTIFACTS, `${ctx.label}-${name.replace(/[^a-z0-9]+/gi, '_')}.png`)
        await ctx.page.screenshot({ path: f, timeout: 10000 })
        log(`     screenshot: ${f}`)
      } catch {
        /* page gone */
      }
      if (ctx.pageErrors.length) log(`     page errors: ${ctx.pageErrors.slice(-5).join(' | ')}`)
    }
    return undefined
  }
}

function assert(cond, msg) {
  if (!cond) throw new Error(msg)
}

/** Pixel summary of the viewport's on-screen canvas: non-black count and a sampled fingerprint. */
async function canvasStats(page) {
  return page.evaluate(async () => {
    const canvas = document.querySelector('[data-testid="viewport"] canvas')
    if (!canvas) return { error: 'no canvas' }
    const w = canvas.width
    const h = canvas.height
    if (!w || !h) return { error: `empty canvas ${w}x${h}` }
    let ctx = canvas.getContext('2d', { willReadFrequently: true })
    if (!ctx) {
      // A WebGL canvas: copy it through an image.
      const img = new Image()
      img.src = canvas.toDataURL('image/png')
      await img.decode()
      const c2 = document.createElement('canvas')
      c2.width = w
      c2.height = h
      ctx = c2.getContext('2d')
      ctx.drawImage(img, 0, 0)
    }
    const d = ctx.getImageData(0, 0, w, h).data
    let nonBlack = 0
    let sum = 0
    // 64x64 grid of luminance samples, to compare two renders.
    const grid = []
    for (let i = 0; i < d.length; i += 4) {
      const l = d[i] + d[i + 1] + d[i + 2]
      if (l > 24) nonBlack++
      sum += l
    }
    for (let gy = 0; gy < 64; gy++) {
      for (let gx = 0; gx < 64; gx++) {
        const x = Math.floor(((gx + 0.5) * w) / 64)
        const y = Math.floor(((gy + 0.5) * h) / 64)
        const o = (y * w + x) * 4
        grid.push(d[o] + d[o + 1] + d[o + 2])
      }
    }
    return { w, h, nonBlack, total: w * h, mean: sum / (w * h * 3), grid }
  })
}

function gridDiff(a, b) {
  let n = 0
  for (let i = 0; i < a.grid.length; i++) if (Math.abs(a.grid[i] - b.grid[i]) > 6) n++
  return n
}

function hook(page, expr) {
  return page.evaluate(`(() => { const v = window.__yyViewer; return v ? (${expr}) : undefined })()`)
}

async function waitRendered(page, what) {
  // The slice the stack shows has been drawn, and nothing is pending.
  await page.waitForFunction(
    () => {
      const v = window.__yyViewer
      return v && v.ready && v.currentIndex() >= 0 && v.renderedIndex() === v.currentIndex()
    },
    undefined,
    { timeout: TIMEOUT, polling: 100 },
  ).catch(async (e) => {
    const err = await hook(page, 'v.error()').catch(() => '')
    throw new Error(`${what}: viewer not ready in ${TIMEOUT} ms${err ? ` (viewer error: ${err})` : ''}: ${e.message}`)
  })
  // One more frame so the canvas holds what was rendered.
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))))
}

async function sliceText(page) {
  return (await page.getByTestId('slice-index').textContent()).trim()
}

/** Dispatches raw touch events through CDP (playwright's touchscreen only taps). */
async function touchDrag(cdp, starts, ends, steps = 12) {
  const pts = (t) =>
    starts.map((s, i) => ({
      x: s.x + (ends[i].x - s.x) * t,
      y: s.y + (ends[i].y - s.y) * t,
      id: i + 1,
      radiusX: 4,
      radiusY: 4,
      force: 1,
    }))
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: pts(0) })
  for (let i = 1; i <= steps; i++) {
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchMove', touchPoints: pts(i / steps) })
    await new Promise((r) => setTimeout(r, 16))
  }
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] })
}

async function viewportBox(page) {
  const box = await page.getByTestId('viewport').boundingBox()
  assert(box && box.width > 50 && box.height > 50, `viewport too small: ${JSON.stringify(box)}`)
  return box
}

async function runProfile(label, contextOptions) {
  const userDataDir = mkdtempSync(join(tmpdir(), `yy-e2e-${label}-`))
  const ctx = { label, page: null, pageErrors: [] }
  let context
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args: CHROMIUM_ARGS,
      locale: 'zh-CN',
      // The test cloud may serve HTTPS with a test CA the browser does not know.
      ignoreHTTPSErrors: true,
      ...contextOptions,
    })
    const page = context.pages()[0] || (await context.newPage())
    ctx.page = page
    page.setDefaultTimeout(TIMEOUT)
    if (RENDER) await context.addInitScript((r) => localStorage.setItem('yy.render', r), RENDER)
    page.on('pageerror', (e) => ctx.pageErrors.push(String(e.message || e)))
    page.on('console', (m) => {
      // Failed requests are recorded below with their URL.
      if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) ctx.pageErrors.push(`console: ${m.text()}`)
    })
    page.on('response', (r) => {
      if (r.status() >= 400) ctx.pageErrors.push(`HTTP ${r.status()} ${new URL(r.url()).pathname}`)
    })
    page.on('requestfailed', (r) => ctx.pageErrors.push(`request failed: ${new URL(r.url()).pathname}`))
    const touch = !!contextOptions.hasTouch

    const loggedIn = await check(`${label}: login`, async () => {
      await page.goto(`${BASE}/`, { waitUntil: 'domcontentloaded' })
      await page.getByTestId('login-username').waitFor()
      assert(/\/login/.test(page.url()), `expected a redirect to /login, got ${page.url()}`)
      const lang = await page.evaluate(() => document.documentElement.lang)
      assert(lang === 'zh-CN', `default UI language is ${lang}, expected zh-CN`)
      await page.getByTestId('login-username').fill(USER)
      await page.getByTestId('login-password').fill(PASSWORD)
      await page.getByTestId('login-submit').click()
      await page.waitForURL((u) => u.pathname === '/studies', { timeout: TIMEOUT })
      return true
    }, ctx)
    if (!loggedIn) throw new Skip('not logged in')

    const target = await check(`${label}: study list`, async () => {
      await page.getByTestId('study-row').first().waitFor({ timeout: TIMEOUT })
      const rows = await page.getByTestId('study-row').evaluateAll((els) =>
        els.map((e) => ({
          uid: e.getAttribute('data-study-uid'),
          pid: e.querySelector('[data-testid="study-patient-id"]')?.textContent?.trim() ?? '',
          text: e.textContent ?? '',
        })),
      )
      assert(rows.length > 0, 'no study rows')
      let t = STUDY_UID ? rows.find((r) => r.uid === STUDY_UID) : rows.find((r) => /\bCT\b/.test(r.text))
      t = t || rows[0]
      assert(t.uid, 'row without a study UID')
      return t
    }, ctx)
    if (!target) throw new Skip('no study')

    await check(`${label}: search by patient ID`, async () => {
      await page.getByTestId('search-patient-id').fill(target.pid)
      await page.getByTestId('search-submit').click()
      await page.waitForFunction(
        (uid) => !!document.querySelector(`[data-testid="study-row"][data-study-uid="${uid}"]`),
        target.uid,
        { timeout: TIMEOUT },
      )
      // The unfiltered list may still be shown until the search answers.
      await page.waitForFunction(
        (pid) => [...document.querySelectorAll('[data-testid="study-patient-id"]')].every((e) => e.textContent.trim() === pid),
        target.pid,
        { timeout: 10000 },
      ).catch(() => undefined)
      const pids = await page.getByTestId('study-patient-id').allTextContents()
      assert(pids.every((p) => p.trim() === target.pid), `rows of other patients: ${pids.join(',')}`)
    }, ctx)

    await check(`${label}: search with no match`, async () => {
      await page.getByTestId('search-patient-id').fill('NO-SUCH-PATIENT-0000')
      await page.getByTestId('search-submit').click()
      await page.getByTestId('study-empty').waitFor({ timeout: TIMEOUT })
      assert((await page.getByTestId('study-row').count()) === 0, 'rows shown for a patient that does not exist')
      await page.getByTestId('search-clear').click()
      await page.getByTestId('study-row').first().waitFor({ timeout: TIMEOUT })
    }, ctx)

    await check(`${label}: English switch`, async () => {
      const before = await page.getByTestId('search-submit').textContent()
      await page.getByTestId('lang-toggle').click()
      await page.waitForFunction(() => document.documentElement.lang === 'en')
      const after = await page.getByTestId('search-submit').textContent()
      assert(before.trim() === '查询' && after.trim() === 'Search', `labels ${before} -> ${after}`)
      await page.getByTestId('lang-toggle').click()
      await page.waitForFunction(() => document.documentElement.lang === 'zh-CN')
    }, ctx)

    const first = await check(`${label}: viewer shows the first image`, async () => {
      await page.locator(`[data-testid="study-row"][data-study-uid="${target.uid}"]`).click()
      await page.waitForURL((u) => /^\/studies\/[^/]+\/viewer$/.test(u.pathname))
      await waitRendered(page, 'first image')
      const count = await hook(page, 'v.imageCount()')
      assert(count >= 2, `series has ${count} image(s); the test needs two or more`)
      const s = await canvasStats(page)
      assert(!s.error, s.error)
      assert(s.nonBlack > s.total * 0.02, `canvas nearly blank: ${s.nonBlack}/${s.total} non-black pixels`)
      log(`     canvas ${s.w}x${s.h}, ${((100 * s.nonBlack) / s.total).toFixed(1)}% non-black, ` +
        `${count} images, render backend ${await hook(page, 'v.backend()')}`)
      return { stats: s, text: await sliceText(page), count }
    }, ctx)
    if (!first) throw new Skip('no image')

    let before = first
    if (!touch) {
      await check(`${label}: wheel scroll changes slice and pixels`, async () => {
        const box = await viewportBox(page)
        await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2)
        for (let i = 0; i < 3; i++) await page.mouse.wheel(0, 120)
        await page.waitForFunction(() => window.__yyViewer.currentIndex() > 0, undefined, { timeout: TIMEOUT })
        await waitRendered(page, 'after wheel')
        const text = await sliceText(page)
        const s = await canvasStats(page)
        assert(text !== before.text, `slice label unchanged: ${text}`)
        const diff = gridDiff(before.stats, s)
        assert(diff > 20, `pixels unchanged after scroll (${diff} of 4096 samples differ)`)
        log(`     ${before.text} -> ${text}, ${diff}/4096 samples differ`)
        before = { stats: s, text }
      }, ctx)

      await check(`${label}: window/level drag, then reset`, async () => {
        const box = await viewportBox(page)
        const w0 = await hook(page, 'v.windowWidth()')
        const wlText0 = await page.getByTestId('viewer-overlay-wl').textContent()
        await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2)
        await page.mouse.down()
        await page.mouse.move(box.x + box.width / 2 + 120, box.y + box.height / 2 + 60, { steps: 8 })
        await page.mouse.up()
        await page.waitForFunction((w) => window.__yyViewer.windowWidth() !== w, w0, { timeout: TIMEOUT })
        await waitRendered(page, 'after window/level')
        const s = await canvasStats(page)
        assert(gridDiff(before.stats, s) > 20, 'pixels unchanged after window/level drag')
        await page.getByTestId('viewer-reset').click()
        await page.waitForFunction((w) => window.__yyViewer.windowWidth() === w, w0, { timeout: TIMEOUT })
        const wlText1 = await page.getByTestId('viewer-overlay-wl').textContent()
        assert(wlText1 === wlText0, `reset: ${wlText1} != ${wlText0}`)
      }, ctx)
    } else {
      const cdp = await context.newCDPSession(page)
      await check(`${label}: touch scroll changes slice and pixels`, async () => {
        // Phone layout: the tools live in a drawer.
        if (await page.getByTestId('drawer-open').count()) await page.getByTestId('drawer-open').tap()
        await page.getByTestId('tool-scroll').tap()
        const box = await viewportBox(page)
        const x = box.x + box.width / 2
        const y = box.y + box.height / 2
        await touchDrag(cdp, [{ x, y: y - box.height * 0.25 }], [{ x, y: y + box.height * 0.25 }], 20)
        await page.waitForFunction(() => window.__yyViewer.currentIndex() !== 0, undefined, { timeout: TIMEOUT })
        await waitRendered(page, 'after touch scroll')
        const text = await sliceText(page)
        const s = await canvasStats(page)
        assert(text !== before.text, `slice label unchanged: ${text}`)
        const diff = gridDiff(before.stats, s)
        assert(diff > 20, `pixels unchanged after scroll (${diff} of 4096 samples differ)`)
        log(`     ${before.text} -> ${text}, ${diff}/4096 samples differ`)
        before = { stats: s, text }
      }, ctx)

      await check(`${label}: pinch zoom, then reset`, async () => {
        const box = await viewportBox(page)
        const x = box.x + box.width / 2
        const y = box.y + box.height / 2
        const z0 = await hook(page, 'v.zoom()')
        await touchDrag(
          cdp,
          [{ x: x - 30, y: y - 30 }, { x: x + 30, y: y + 30 }],
          [{ x: x - 120, y: y - 120 }, { x: x + 120, y: y + 120 }],
          16,
        )
        // Fingers moving apart zoom in.
        await page.waitForFunction((z) => window.__yyViewer.zoom() > z * 1.2, z0, { timeout: 10000 })
          .catch(async (e) => {
            throw new Error(`zoom stayed ${await hook(page, 'v.zoom()')} (was ${z0}): ${e.message}`)
          })
        const z1 = await hook(page, 'v.zoom()')
        await page.getByTestId('viewer-reset').tap()
        await page.waitForFunction((z) => Math.abs(window.__yyViewer.zoom() - z) < 0.01, z0, { timeout: TIMEOUT })
        log(`     zoom ${z0.toFixed(2)} -> ${z1.toFixed(2)} -> reset`)
      }, ctx)
    }

    if (PREVIEW_REF) {
      await check(`${label}: opened by URL, the original first image shows before the viewer chunk`, async () => {
        const ref = JSON.parse(readFileSync(PREVIEW_REF, 'utf8'))
        const p2 = await context.newPage()
        let release = () => {}
        const held = new Promise((r) => { release = r })
        let requested = 0
        // Hold the viewer chunk (Cornerstone3D): whatever shows now is the preview.
        await p2.route(/\/assets\/YyViewer-[^/]+\.js$/, async (route) => {
          requested++
          await held
          await route.continue()
        })
        try {
          await p2.goto(`${BASE}/studies/${target.uid}/viewer`, { waitUntil: 'commit' })
          await p2.waitForFunction(() => document.querySelector('[data-testid="viewer-preview"] canvas')?.dataset.shown === '1',
            undefined, { timeout: TIMEOUT })
          assert(requested <= 1, `viewer chunk requested ${requested} times while held`)
          assert(await p2.evaluate(() => !window.__yyViewer), 'the viewer ran before its chunk was released')
          // The preview's pixels are the original's, windowed as pydicom computes them.
          const cmp = await p2.evaluate((r) => {
            const img = window.__yyPreview
            if (!img) return { error: 'no window.__yyPreview' }
            const want = Uint8Array.from(atob(r.grey), (ch) => ch.charCodeAt(0))
            if (img.width !== r.width || img.height !== r.height) return { error: `size ${img.width}x${img.height}` }
            let maxDiff = 0
            let off = 0
            for (let i = 0; i < want.length; i++) {
              const d = Math.abs(img.grey[i] - want[i])
              if (d > maxDiff) maxDiff = d
              if (d > 1) off++
            }
            const c = document.querySelector('[data-testid="viewer-preview"] canvas')
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data
            let lit = 0
            for (let i = 0; i < d.length; i += 4) if (d[i] > 8) lit++
            return { maxDiff, off, lit, total: c.width * c.height }
          }, ref)
          assert(!cmp.error, cmp.error)
          assert(cmp.off === 0, `${cmp.off} preview pixels differ from pydicom's by more than 1 (max ${cmp.maxDiff})`)
          assert(cmp.lit > cmp.total * 0.02, `preview canvas nearly blank: ${cmp.lit}/${cmp.total}`)
          release()
          await waitRendered(p2, 'viewer after the preview')
          assert((await p2.getByTestId('viewer-preview').count()) === 0, 'the preview is still shown')
          log(`     preview ${ref.width}x${ref.height} equals pydicom's (max diff ${cmp.maxDiff}); viewer took over`)
        } finally {
          release()
          await p2.close().catch(() => undefined)
        }
      }, ctx)
    }

    await check(`${label}: no page errors`, async () => {
      // The session probe before login answers 401 by design.
      const errs = ctx.pageErrors.filter((e) => e !== 'HTTP 401 /api/v1/me')
      assert(errs.length === 0, errs.slice(0, 5).join(' | '))
    }, ctx)
  } catch (e) {
    if (!(e instanceof Skip)) {
      failed++
      log(`FAIL ${label}: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' / ') : e}`)
    } else {
      log(`     ${label}: remaining checks skipped (${e.message})`)
    }
  } finally {
    if (context) await context.close().catch(() => undefined)
    rmSync(userDataDir, { recursive: true, force: true })
  }
}

async function main() {
  if (!BASE || !USER || !PASSWORD) {
    log('viewer.spec: set YY_CLOUD_URL, YY_USER and YY_PASSWORD')
    failed++
  } else {
    const t0 = Date.now()
    const only = (process.env.YY_E2E_PROFILES || 'desktop,phone').split(',')
    if (only.includes('desktop')) await runProfile('desktop', { viewport: { width: 1280, height: 800 } })
    if (only.includes('phone')) await runProfile('phone', {
      viewport: { width: 390, height: 844 },
      deviceScaleFactor: 3,
      isMobile: true,
      hasTouch: true,
    })
    log(`     e2e took ${((Date.now() - t0) / 1000).toFixed(1)} s`)
  }
  log(`${passed} passed, ${failed} failed`)
  process.exit(failed ? 1 : 0)
}

main().catch((e) => {
  log(`viewer.spec: ${e && e.stack ? e.stack : e}`)
  log(`${passed} passed, ${failed + 1} failed`)
  process.exit(1)
})
