#!/usr/bin/env node
// Browser end-to-end test of the viewer's tools on the calibration phantom
// (tests/data/gen_studies.py --only cal): measurements drawn with real
// pointer events read the known geometry; presets, invert/rotate/flip;
// annotations with the in-app text prompt (never window.prompt); saving to
// and reloading from the cloud; cine on a manual clock; DSA subtraction;
// the phone layout (drawer, touch drawing, pinch, two-finger pan, series
// swipe, drag-bar scrolling).
//
// Env: YY_CLOUD_URL, YY_USER, YY_PASSWORD, YY_E2E_CAL_STUDY_UID (the phantom
//      study, already in the cloud). Optional: YY_CHROMIUM, YY_E2E_ARTIFACTS,
//      YY_E2E_TIMEOUT_MS (default 60000), YY_E2E_PROFILES (desktop,phone).
// Prints "N passed, N failed" last; exits non-zero on any failure.

import { mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { chromium } from 'playwright-core'

const BASE = (process.env.YY_CLOUD_URL || '').replace(/\/+$/, '')
const USER = process.env.YY_USER || ''
const PASSWORD = process.env.YY_PASSWORD || ''
const STUDY = process.env.YY_E2E_CAL_STUDY_UID || ''
const CHROMIUM = process.env.YY_CHROMIUM || '/usr/bin/chromium'
const TIMEOUT = Number(process.env.YY_E2E_TIMEOUT_MS || 60000)
const ARTIFACTS = process.env.YY_E2E_ARTIFACTS || join(tmpdir(), 'yy-e2e-artifacts')
const ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']

let passed = 0
let failed = 0
const log = (m) => process.stdout.write(`${m}\n`)
class Skip extends Error {}

async function check(name, fn, ctx) {
  const t0 = Date.now()
  try {
    const v = await fn()
    passed++
    log(`ok   ${name} (${Date.now() - t0} ms)`)
    return v ?? true
  } catch (e) {
    if (e instanceof Skip) throw e
    failed++
    log(`FAIL ${name}: ${e && e.message ? e.message.split('\n')[0] : e}`)
    if (ctx?.page) {
      try {
        mkdirSync(ARTIFACTS, { recursive: true })
        const f = join(ARTIFACTS, `tools-${ctx.label}-${name.replace(/[^a-z0-9]+/gi, '_')}.png`)
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
function near(v, want, tol, what) {
  assert(typeof v === 'number' && Math.abs(v - want) <= tol, `${what}: got ${v}, want ${want} ± ${tol}`)
}

const hook = (page, expr, arg) => page.evaluate(([e, a]) => {
  const v = window.__yyViewer
  // eslint-disable-next-line no-new-func
  return v ? new Function('v', 'a', `return (${e})`)(v, a) : undefined
}, [expr, arg])

async function waitRendered(page, what) {
  await page.waitForFunction(() => {
    const v = window.__yyViewer
    return v && v.ready && v.renderedIndex() === v.currentIndex()
  }, undefined, { timeout: TIMEOUT, polling: 50 }).catch(async (e) => {
    throw new Error(`${what}: not rendered (${await hook(page, 'v.error()').catch(() => '')}): ${e.message}`)
  })
  await page.evaluate(() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r))))
}

async function goIndex(page, i) {
  await hook(page, 'v.setIndex(a)', i)
  await page.waitForFunction((n) => window.__yyViewer.currentIndex() === n, i, { timeout: TIMEOUT })
  await waitRendered(page, `slice ${i}`)
}

/** Client point of image pixel coordinates, rounded to whole CSS pixels. */
async function pt(page, x, y) {
  const p = await hook(page, 'v.imageToClient(a[0], a[1])', [x, y])
  assert(p, 'no image')
  return { x: Math.round(p.x), y: Math.round(p.y) }
}

async function drag(page, a, b, steps = 8) {
  await page.mouse.move(a.x, a.y)
  await page.mouse.down()
  await page.mouse.move(b.x, b.y, { steps })
  await page.mouse.up()
}

async function dragImg(page, a, b) {
  await drag(page, await pt(page, a[0], a[1]), await pt(page, b[0], b[1]))
}

async function clickImg(page, x, y) {
  const p = await pt(page, x, y)
  await page.mouse.click(p.x, p.y)
}

/**
 * Runs a drawing gesture and waits until the viewer reports the annotation
 * completed (Cornerstone delivers a click ~400 ms late, after its
 * double-click window; the next gesture must not start before).
 */
async function drawn(page, fn) {
  const v0 = await hook(page, 'v.state().completed')
  await fn()
  await page.waitForFunction((v) => window.__yyViewer.state().completed > v, v0, { timeout: 10000 })
    .catch(() => { throw new Error('annotation not completed') })
}

/** Waits for the n-th read-out of a tool on the current image and returns it. */
async function readout(page, tool, n = 1) {
  await page.waitForFunction(([t, k]) => {
    const r = window.__yyViewer.readouts().filter((x) => x.tool === t)
    return r.length >= k && r[k - 1].lines.length > 0 && !r[k - 1].lines.some((l) => l.includes('—'))
  }, [tool, n], { timeout: 15000, polling: 50 }).catch(async () => {
    throw new Error(`no ${tool} read-out: ${JSON.stringify(await hook(page, 'v.readouts()'))}`)
  })
  // Statistics are recomputed (throttled) after the last move: wait until they settle.
  let prev = ''
  for (let i = 0; i < 50; i++) {
    const r = (await hook(page, 'v.readouts()')).filter((x) => x.tool === tool)[n - 1]
    const cur = JSON.stringify(r.values)
    if (cur === prev) return r
    prev = cur
    await page.waitForTimeout(100)
  }
  throw new Error(`${tool} read-out does not settle: ${prev}`)
}

async function tool(page, name, touch = false) {
  const b = page.getByTestId(`tool-${name}`)
  if (touch) await b.tap()
  else await b.click()
}

async function touchDrag(cdp, starts, ends, steps = 12) {
  const pts = (t) => starts.map((s, i) => ({
    x: s.x + (ends[i].x - s.x) * t, y: s.y + (ends[i].y - s.y) * t, id: i + 1, radiusX: 2, radiusY: 2, force: 1,
  }))
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchStart', touchPoints: pts(0) })
  for (let i = 1; i <= steps; i++) {
    await cdp.send('Input.dispatchTouchEvent', { type: 'touchMove', touchPoints: pts(i / steps) })
    await new Promise((r) => setTimeout(r, 16))
  }
  await cdp.send('Input.dispatchTouchEvent', { type: 'touchEnd', touchPoints: [] })
}

async function openStudy(page) {
  await page.goto(`${BASE}/studies/${STUDY}/viewer`, { waitUntil: 'domcontentloaded' })
  await waitRendered(page, 'first image')
}

async function login(page) {
  await page.goto(`${BASE}/login`, { waitUntil: 'domcontentloaded' })
  await page.getByTestId('login-username').fill(USER)
  await page.getByTestId('login-password').fill(PASSWORD)
  await page.getByTestId('login-submit').click()
  await page.waitForURL((u) => u.pathname === '/studies', { timeout: TIMEOUT })
}

async function series(page, desc) {
  const uid = await page.evaluate(async ([s, d]) => {
    const r = await fetch(`/dicomweb/studies/${s}/series?includefield=0008103E`, { headers: { Accept: 'application/dicom+json' } })
    const j = await r.json()
    const hit = j.find((x) => x['0008103E']?.Value?.[0] === d)
    return hit ? hit['0020000E'].Value[0] : null
  }, [STUDY, desc])
  assert(uid, `no series ${desc}`)
  return uid
}

async function selectSeries(page, desc) {
  const uid = await series(page, desc)
  const before = await hook(page, 'v.renders()')
  await page.locator(`[data-testid="series-item"][data-series-uid="${uid}"]`).click()
  await page.waitForFunction((n) => window.__yyViewer.renders() > n, before, { timeout: TIMEOUT })
  await waitRendered(page, desc)
}

async function stored(page) {
  return page.evaluate(async (s) => {
    const r = await fetch(`/api/v1/studies/${s}/annotations`)
    return (await r.json()).annotations.length
  }, STUDY)
}

async function waitSaved(page) {
  await page.waitForFunction(() => document.querySelector('[data-testid="annotations-save-state"]')?.dataset.state === 'saved',
    undefined, { timeout: TIMEOUT })
}

async function setup(label, opts) {
  const dir = mkdtempSync(join(tmpdir(), `yy-tools-${label}-`))
  const context = await chromium.launchPersistentContext(dir, {
    executablePath: CHROMIUM, headless: true, args: ARGS, locale: 'zh-CN', ignoreHTTPSErrors: true, ...opts,
  })
  // YY_E2E_RENDER=cpu|gpu forces Cornerstone's rendering back end (default: the app's choice).
  if (process.env.YY_E2E_RENDER) await context.addInitScript((r) => localStorage.setItem('yy.render', r), process.env.YY_E2E_RENDER)
  const page = context.pages()[0] || (await context.newPage())
  page.setDefaultTimeout(TIMEOUT)
  const ctx = { label, page, pageErrors: [], context, dir, dialogs: 0 }
  page.on('pageerror', (e) => ctx.pageErrors.push(String(e.message || e)))
  page.on('console', (m) => {
    if (m.type() === 'error' && !/^Failed to load resource/.test(m.text())) ctx.pageErrors.push(`console: ${m.text()}`)
  })
  page.on('dialog', (d) => {
    ctx.dialogs++
    void d.dismiss()
  })
  return ctx
}

async function desktop() {
  const ctx = await setup('desktop', { viewport: { width: 1280, height: 800 } })
  const { page } = ctx
  try {
    await check('desktop: login and open the phantom', async () => {
      await login(page)
      await openStudy(page)
      // start clean (a previous run of the same cloud)
      await page.evaluate((s) => fetch(`/api/v1/studies/${s}/annotations`, { method: 'DELETE' }), STUDY)
    }, ctx) || (() => { throw new Skip('no viewer') })()

    await check('desktop: calibrated CT shows no calibration warning; progress completes', async () => {
      assert((await hook(page, 'v.state().calibration')) === 'pixel', 'CT not calibrated from PixelSpacing')
      assert((await page.getByTestId('calibration-warning').count()) === 0, 'warning shown on a calibrated image')
      await page.waitForFunction(() => window.__yyViewer.state().loaded === window.__yyViewer.imageCount(), undefined, { timeout: TIMEOUT })
    }, ctx)

    await hook(page, 'v.zoomToPixels(1)')
    await waitRendered(page, '1:1')

    await check('desktop: length 100 px at 0.5 mm = 50.0 mm', async () => {
      await tool(page, 'length')
      await drawn(page, () => dragImg(page, [206, 300], [306, 300]))
      const r = await readout(page, 'length')
      near(r.values.length, 50.0, 0.05, 'length')
      assert(r.lines[0] === '50.0 mm', `label ${r.lines[0]}`)
      const panel = await page.getByTestId('measurement-text').first().textContent()
      assert(panel.includes('50.0 mm'), `panel shows ${panel}`)
    }, ctx)

    await check('desktop: angle of a right angle = 90.0°', async () => {
      await tool(page, 'angle')
      await drawn(page, async () => {
        await dragImg(page, [356, 200], [256, 200])
        await clickImg(page, 256, 100)
      })
      const r = await readout(page, 'angle')
      near(r.values.angle, 90, 0.1, 'angle')
    }, ctx)

    await check('desktop: Cobb angle of slopes +1/2 and -1/2 = 53.13°', async () => {
      await tool(page, 'cobb')
      await drawn(page, async () => {
        await dragImg(page, [100, 100], [300, 200])
        await dragImg(page, [100, 420], [300, 320])
      })
      const r = await readout(page, 'cobb')
      near(r.values.angle, (2 * Math.atan(0.5) * 180) / Math.PI, 0.05, 'Cobb angle')
    }, ctx)

    await check('desktop: HU probe on slice 3 reads 200 HU (slice bug fixed)', async () => {
      await goIndex(page, 2)
      await tool(page, 'probe')
      await drawn(page, () => clickImg(page, 330, 150))
      const r = await readout(page, 'probe')
      assert(r.values.value === 200 && r.values.unit === 'HU', `probe ${JSON.stringify(r.values)}`)
    }, ctx)

    await check('desktop: rectangle ROI over uniform 40 HU: mean 40, SD 0, area 1200 mm²', async () => {
      await tool(page, 'rect')
      await drawn(page, () => dragImg(page, [140, 120], [220, 180]))
      const r = await readout(page, 'rect')
      near(r.values.mean, 40, 1e-6, 'mean')
      near(r.values.stdDev, 0, 1e-6, 'SD')
      near(r.values.area, 1200, 12, 'area')
      assert(r.values.areaUnit === 'mm²', `area unit ${r.values.areaUnit}`)
    }, ctx)

    await check('desktop: ellipse ROI inside 40 HU: mean 40, SD 0', async () => {
      await tool(page, 'ellipse')
      await drawn(page, () => dragImg(page, [180, 150], [200, 165]))
      const r = await readout(page, 'ellipse')
      near(r.values.mean, 40, 1e-6, 'mean')
      near(r.values.stdDev, 0, 1e-6, 'SD')
      assert(r.values.area > 0, 'no area')
    }, ctx)

    await check('desktop: deviation of a point 20 px right of a vertical line = +10.0 mm (right)', async () => {
      await goIndex(page, 3)
      await tool(page, 'deviation')
      await drawn(page, async () => {
        await dragImg(page, [256, 60], [256, 460])
        await clickImg(page, 276, 260)
      })
      const r = await readout(page, 'deviation')
      near(r.values.deviation, 10.0, 0.05, 'deviation')
      assert(r.values.side === 'right', `side ${r.values.side}`)
      assert(/偏移 \+10\.0 mm/.test(r.lines[0]), `label ${r.lines[0]}`)
    }, ctx)

    await check('desktop: cardiothoracic ratio of 120 mm heart in 240 mm thorax = 0.50', async () => {
      await tool(page, 'ctr')
      await drawn(page, async () => {
        await dragImg(page, [136, 330], [376, 330])
        await dragImg(page, [16, 256], [496, 256])
      })
      const r = await readout(page, 'ctr')
      near(r.values.heart, 120, 0.05, 'heart')
      near(r.values.thorax, 240, 0.05, 'thorax')
      near(r.values.ratio, 0.5, 0.0005, 'ratio')
      assert(r.lines[0].endsWith('0.50'), `label ${r.lines[0]}`)
    }, ctx)

    await check('desktop: arrow and text use the in-app prompt, never window.prompt', async () => {
      await goIndex(page, 1)
      await tool(page, 'arrow')
      await drawn(page, async () => {
        await dragImg(page, [400, 300], [450, 350])
        await page.getByTestId('text-prompt-input').fill('结节')
        await page.getByTestId('text-prompt-ok').click()
      })
      const a = await readout(page, 'arrow')
      assert(a.lines[0] === '结节', `arrow text ${a.lines[0]}`)
      await tool(page, 'text')
      await drawn(page, async () => {
        await clickImg(page, 420, 420)
        await page.getByTestId('text-prompt-input').fill('note 1')
        await page.getByTestId('text-prompt-ok').click()
      })
      const t = await readout(page, 'text')
      assert(t.lines[0] === 'note 1', `text ${t.lines[0]}`)
      assert(ctx.dialogs === 0, `${ctx.dialogs} browser dialog(s) opened`)
    }, ctx)

    await check('desktop: plain shapes, freehand curve and region (no statistics)', async () => {
      await tool(page, 'shapeRect')
      await drawn(page, () => dragImg(page, [60, 60], [120, 100]))
      await tool(page, 'shapeEllipse')
      await drawn(page, () => dragImg(page, [60, 140], [120, 180]))
      for (const [name, closed] of [['curve', false], ['region', true]]) {
        await tool(page, name)
        const c = name === 'curve' ? [330, 120] : [330, 220]
        await drawn(page, async () => {
          const p0 = await pt(page, c[0], c[1])
          await page.mouse.move(p0.x, p0.y)
          await page.mouse.down()
          const n = 24
          for (let i = 1; i <= n; i++) {
            const a = (i / n) * (closed ? 2 * Math.PI : Math.PI)
            const q = await pt(page, c[0] + 40 * Math.sin(a), c[1] + 30 * (1 - Math.cos(a)))
            await page.mouse.move(q.x, q.y)
          }
          await page.mouse.up()
        })
      }
      await page.waitForFunction(() => ['shapeRect', 'shapeEllipse', 'curve', 'region'].every((t) =>
        window.__yyViewer.readouts().some((r) => r.tool === t)), undefined, { timeout: 10000 }).catch(async () => {
        throw new Error(`shapes: ${JSON.stringify((await hook(page, 'v.readouts()')).map((r) => r.tool))}`)
      })
      const rs = (await hook(page, 'v.readouts()')).filter((r) => ['shapeRect', 'shapeEllipse', 'curve', 'region'].includes(r.tool))
      assert(rs.every((r) => r.lines.length === 0), `shapes carry statistics: ${JSON.stringify(rs.map((r) => r.lines))}`)
    }, ctx)

    await check('desktop: annotations saved to the cloud and reloaded with the study', async () => {
      const all = (await hook(page, 'v.readouts(true)')).length
      assert(all >= 13, `only ${all} annotations drawn`)
      await waitSaved(page)
      const n = await stored(page)
      assert(n === all, `server holds ${n}, viewer ${all}`)
      await openStudy(page)
      await page.waitForFunction((k) => window.__yyViewer.readouts(true).length === k, all, { timeout: TIMEOUT })
      await goIndex(page, 3)
      const r = await readout(page, 'ctr')
      near(r.values.ratio, 0.5, 0.0005, 'reloaded CTR')
    }, ctx)

    await check('desktop: presets set the documented VOI; numbers; default', async () => {
      const want = { brain: [80, 40], abdomen: [400, 50], lung: [1500, -600], bone: [1800, 400], mediastinum: [350, 50] }
      for (const [p, [w, l]] of Object.entries(want)) {
        await page.getByTestId(`preset-${p}`).click()
        const got = [await hook(page, 'v.windowWidth()'), await hook(page, 'v.windowCenter()')]
        assert(got[0] === w && got[1] === l, `${p}: W/L ${got} != ${w}/${l}`)
      }
      await goIndex(page, 1)
      assert((await hook(page, 'v.windowWidth()')) === 350, 'preset lost on slice change')
      await page.getByTestId('wl-width').fill('500')
      await page.getByTestId('wl-level').fill('60')
      await page.getByTestId('wl-apply').click()
      assert((await hook(page, 'v.windowWidth()')) === 500 && (await hook(page, 'v.windowCenter()')) === 60, 'W/L by numbers')
      await page.getByTestId('preset-default').click()
      const d = [await hook(page, 'v.windowWidth()'), await hook(page, 'v.windowCenter()')]
      near(d[0], 400, 1, 'default width')
      near(d[1], 40, 1, 'default level')
    }, ctx)

    await check('desktop: invert, rotate 90°, flip H/V', async () => {
      await page.getByTestId('op-invert').click()
      await page.getByTestId('op-rotate').click()
      await page.getByTestId('op-flip-h').click()
      await page.getByTestId('op-flip-v').click()
      const s = await hook(page, 'v.state()')
      assert(s.invert && s.rotation === 90 && s.flipH && s.flipV, `state ${JSON.stringify([s.invert, s.rotation, s.flipH, s.flipV])}`)
      await page.getByTestId('viewer-reset').click()
      const r = await hook(page, 'v.state()')
      assert(!r.invert && r.rotation === 0 && !r.flipH && !r.flipV, 'reset')
    }, ctx)

    await check('desktop: uncalibrated image warns and measures in px', async () => {
      await selectSeries(page, 'NOCAL')
      await page.getByTestId('calibration-warning').waitFor({ timeout: 5000 })
      await hook(page, 'v.zoomToPixels(1)')
      await waitRendered(page, '1:1')
      await tool(page, 'length')
      await drawn(page, () => dragImg(page, [206, 300], [306, 300]))
      const r = await readout(page, 'length')
      assert(r.lines[0] === '100.0 px', `label ${r.lines[0]}`)
    }, ctx)

    await check('desktop: delete all annotations (server too)', async () => {
      await page.getByTestId('annotations-clear').click()
      await waitSaved(page)
      assert((await stored(page)) === 0, 'server still holds annotations')
      assert((await hook(page, 'v.readouts(true)')).length === 0, 'viewer still shows annotations')
    }, ctx)

    await check('desktop: XA multi-frame: header rate and mask; cine on a manual clock', async () => {
      await selectSeries(page, 'DSA')
      assert((await hook(page, 'v.imageCount()')) === 20, 'frames')
      assert((await hook(page, 'v.state().calibration')) === 'imager', 'ImagerPixelSpacing calibration')
      assert((await page.getByTestId('cine-fps').inputValue()) === '10', 'rate from the header')
      assert((await page.getByTestId('dsa-mask').inputValue()) === '2,3', 'mask frames from MaskSubtractionSequence')
      await hook(page, 'v.useManualClock(true)')
      await page.getByTestId('cine-fps').fill('12')
      await page.getByTestId('cine-fps').dispatchEvent('change')
      await page.getByTestId('cine-play').click()
      await hook(page, 'v.advanceClock(1000)')
      assert((await hook(page, 'v.cineAdvanced()')) === 12, `advanced ${await hook(page, 'v.cineAdvanced()')} frames in 1 s at 12 fps`)
      await page.waitForFunction(() => window.__yyViewer.currentIndex() === 12, undefined, { timeout: 10000 })
      await hook(page, 'v.advanceClock(1000)')
      await page.waitForFunction(() => window.__yyViewer.currentIndex() === 4, undefined, { timeout: 10000 }) // 24 mod 20
      await page.getByTestId('cine-stop').click()
      await page.getByTestId('cine-loop').uncheck()
      await goIndex(page, 15)
      await page.getByTestId('cine-play').click()
      await hook(page, 'v.advanceClock(2000)')
      await page.waitForFunction(() => !window.__yyViewer.state().playing, undefined, { timeout: 5000 })
      await page.waitForFunction(() => window.__yyViewer.currentIndex() === 19, undefined, { timeout: 10000 })
    }, ctx)

    await check('desktop: cine on the real clock plays near the set rate', async () => {
      await hook(page, 'v.useManualClock(false)')
      await page.getByTestId('cine-loop').check()
      await page.getByTestId('cine-fps').fill('20')
      await page.getByTestId('cine-fps').dispatchEvent('change')
      const t0 = await page.evaluate(() => performance.now())
      await page.getByTestId('cine-play').click()
      await page.waitForTimeout(1500)
      await page.getByTestId('cine-stop').click()
      const dt = (await page.evaluate(() => performance.now())) - t0
      const c = await hook(page, 'v.cineStats()')
      // The clip position follows the clock (a slow renderer skips frames
      // rather than slowing the clip down).
      assert(c.fps === 20, `rate ${c.fps}`)
      assert(c.elapsed <= dt && c.elapsed >= 700, `played ${c.elapsed.toFixed(0)} ms of ${dt.toFixed(0)}`)
      assert(c.advanced === Math.floor((c.elapsed * 20) / 1000 + 1e-9), `${c.advanced} frames in ${c.elapsed.toFixed(0)} ms`)
      log(`     ${c.advanced} frames (${c.shown} drawn) in ${c.elapsed.toFixed(0)} ms at 20 fps`)
    }, ctx)

    await check('desktop: subtraction of a frame from itself is flat; mask; pixel shift', async () => {
      await goIndex(page, 7)
      await page.getByTestId('dsa-mask').fill('8')
      await page.getByTestId('dsa-apply').click()
      await page.waitForFunction(() => window.__yyViewer.state().subtraction?.mask === 8, undefined, { timeout: TIMEOUT })
      await waitRendered(page, 'subtracted')
      const s = await hook(page, 'v.pixelStats()')
      assert(s.min === 0 && s.max === 0 && s.std === 0, `frame minus itself: ${JSON.stringify(s)}`)
      // frames 2 and 8 averaged into the mask, on frame 8: background 0, vessel -60 / 2
      await page.getByTestId('dsa-mask').fill('2,8')
      await page.getByTestId('dsa-apply').click()
      await page.waitForFunction(() => window.__yyViewer.state().subtraction?.masks?.join(',') === '2,8', undefined, { timeout: TIMEOUT })
      await waitRendered(page, 'mask 2,8')
      assert((await hook(page, 'v.pixelAt(40, 200)')) === 0, 'background not cancelled (average mask)')
      assert((await hook(page, 'v.pixelAt(128, 10)')) === -30, `vessel minus the 2,8 average ${await hook(page, 'v.pixelAt(128, 10)')}`)
      // the header's mask (frames 2 and 3, averaged) on frame 8: background 0, vessel -60
      await page.getByTestId('dsa-mask').fill('2,3')
      await page.getByTestId('dsa-apply').click()
      await page.waitForFunction(() => window.__yyViewer.state().subtraction?.masks?.join(',') === '2,3', undefined, { timeout: TIMEOUT })
      await waitRendered(page, 'mask 2,3')
      assert((await hook(page, 'v.pixelAt(40, 200)')) === 0, 'background not cancelled')
      assert((await hook(page, 'v.pixelAt(128, 10)')) === -60, `vessel ${await hook(page, 'v.pixelAt(128, 10)')}`)
      // frame 16 moved by (+2, +1): without shift the background remains, with it it cancels
      await goIndex(page, 15)
      const bgErr = async () => {
        let e = 0
        for (let x = 30; x < 70; x += 3) e += Math.abs(await hook(page, 'v.pixelAt(a, 200)', x))
        return e
      }
      const raw = await bgErr()
      assert(raw > 0, 'moved background cancelled without a shift?')
      await page.getByTestId('dsa-dx').fill('2')
      await page.getByTestId('dsa-dy').fill('1')
      await page.getByTestId('dsa-apply').click()
      await page.waitForFunction(() => window.__yyViewer.state().subtraction?.dx === 2, undefined, { timeout: TIMEOUT })
      await waitRendered(page, 'shifted')
      const fixed = await bgErr()
      assert(fixed === 0, `shift did not cancel the background: ${raw} -> ${fixed}`)
      await page.getByTestId('dsa-off').click()
      await page.waitForFunction(() => window.__yyViewer.state().subtraction === null, undefined, { timeout: TIMEOUT })
    }, ctx)

    await check('desktop: no page errors', async () => {
      assert(ctx.pageErrors.length === 0, ctx.pageErrors.slice(0, 5).join(' | '))
    }, ctx)
  } finally {
    await ctx.context.close().catch(() => undefined)
    rmSync(ctx.dir, { recursive: true, force: true })
  }
}

async function phone() {
  const ctx = await setup('phone', { viewport: { width: 390, height: 844 }, deviceScaleFactor: 3, isMobile: true, hasTouch: true })
  const { page } = ctx
  try {
    const cdp = await ctx.context.newCDPSession(page)
    await check('phone: open the phantom', async () => {
      await login(page)
      await openStudy(page)
    }, ctx) || (() => { throw new Skip('no viewer') })()

    await check('phone: tool drawer and a touch-drawn length (50.0 mm)', async () => {
      assert((await page.getByTestId('side-panel').count()) === 0, 'side panel shown on a phone')
      await page.getByTestId('drawer-open').tap()
      await page.getByTestId('side-panel').waitFor()
      await tool(page, 'length', true)
      await page.getByTestId('side-panel').waitFor({ state: 'detached' })
      await hook(page, 'v.zoomToPixels(0.5)')
      await waitRendered(page, '1:2')
      const a = await pt(page, 206, 300)
      const b = await pt(page, 306, 300)
      await touchDrag(cdp, [a], [b], 10)
      const r = await readout(page, 'length')
      near(r.values.length, 50.0, 0.05, 'length')
    }, ctx)

    await check('phone: pinch zoom in', async () => {
      const box = await page.getByTestId('viewport').boundingBox()
      const x = box.x + box.width / 2
      const y = box.y + box.height / 2
      const z0 = await hook(page, 'v.zoom()')
      await touchDrag(cdp, [{ x: x - 30, y: y - 30 }, { x: x + 30, y: y + 30 }], [{ x: x - 100, y: y - 100 }, { x: x + 100, y: y + 100 }], 12)
      const z1 = await hook(page, 'v.zoom()')
      assert(z1 > z0 * 1.5, `zoom ${z0} -> ${z1}`)
    }, ctx)

    await check('phone: two-finger pan moves the image with the fingers', async () => {
      const before = await hook(page, 'v.imageToClient(256, 256)')
      const box = await page.getByTestId('viewport').boundingBox()
      const x = box.x + box.width / 2
      const y = box.y + box.height / 2
      await touchDrag(cdp, [{ x: x - 40, y }, { x: x + 40, y }], [{ x: x - 40 + 60, y: y + 50 }, { x: x + 40 + 60, y: y + 50 }], 12)
      const after = await hook(page, 'v.imageToClient(256, 256)')
      near(after.x - before.x, 60, 4, 'pan x')
      near(after.y - before.y, 50, 4, 'pan y')
    }, ctx)

    await check('phone: drag bar scrolls the stack', async () => {
      const bar = await page.getByTestId('scroll-bar').boundingBox()
      await touchDrag(cdp, [{ x: bar.x + bar.width / 2, y: bar.y + 5 }], [{ x: bar.x + bar.width / 2, y: bar.y + bar.height - 2 }], 8)
      await page.waitForFunction(() => window.__yyViewer.currentIndex() === window.__yyViewer.imageCount() - 1, undefined, { timeout: TIMEOUT })
    }, ctx)

    await check('phone: swipe left on the series bar goes to the next series', async () => {
      const label0 = await page.getByTestId('series-current').textContent()
      const box = await page.getByTestId('series-switch').boundingBox()
      const y = box.y + box.height / 2
      await touchDrag(cdp, [{ x: box.x + box.width * 0.8, y }], [{ x: box.x + box.width * 0.2, y }], 8)
      await page.waitForFunction((l) => document.querySelector('[data-testid="series-current"]').textContent !== l, label0, { timeout: TIMEOUT })
      await waitRendered(page, 'next series')
      const label1 = await page.getByTestId('series-current').textContent()
      assert(/NOCAL/.test(label1), `now on ${label1}`)
    }, ctx)

    await check('phone: no page errors', async () => {
      assert(ctx.pageErrors.length === 0, ctx.pageErrors.slice(0, 5).join(' | '))
    }, ctx)
  } finally {
    await ctx.context.close().catch(() => undefined)
    rmSync(ctx.dir, { recursive: true, force: true })
  }
}

async function main() {
  if (!BASE || !USER || !PASSWORD || !STUDY) {
    log('tools.spec: set YY_CLOUD_URL, YY_USER, YY_PASSWORD and YY_E2E_CAL_STUDY_UID')
    failed++
  } else {
    const t0 = Date.now()
    const only = (process.env.YY_E2E_PROFILES || 'desktop,phone').split(',')
    for (const [name, fn] of [['desktop', desktop], ['phone', phone]]) {
      if (!only.includes(name)) continue
      try {
        await fn()
      } catch (e) {
        if (e instanceof Skip) log(`     ${name}: remaining checks skipped (${e.message})`)
        else {
          failed++
          log(`FAIL ${name}: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' / ') : e}`)
        }
      }
    }
    log(`     tools e2e took ${((Date.now() - t0) / 1000).toFixed(1)} s`)
  }
  log(`${passed} passed, ${failed} failed`)
  process.exit(failed ? 1 : 0)
}

main().catch((e) => {
  log(`tools.spec: ${e && e.stack ? e.stack : e}`)
  log(`${passed} passed, ${failed + 1} failed`)
  process.exit(1)
})
