// The only place that talks to Cornerstone3D (with tools.ts). A StackViewer
// shows one series (a list of image ids) in a stack viewport: scroll,
// window/level (drag, numbers, presets), zoom, pan, invert, rotate, flip,
// measurements and annotations, cine, subtraction; for mouse and touch.
// Callers get plain data (ViewerState, Readout), never Cornerstone objects.
import {
  Enums,
  RenderingEngine,
  cache,
  eventTarget,
  getShouldUseCPURendering,
  imageLoader,
  init as csInit,
  metaData,
  setUseCPURendering,
  utilities as csUtils,
  type Types,
} from '@cornerstonejs/core'
import { init as dicomImageLoaderInit, wadouri } from '@cornerstonejs/dicom-image-loader'
import { utilities as metadataUtils } from '@cornerstonejs/metadata'
import {
  AngleTool,
  ArrowAnnotateTool,
  CobbAngleTool,
  EllipticalROITool,
  Enums as ToolEnums,
  LabelTool,
  LengthTool,
  PanTool,
  RectangleROITool,
  StackScrollTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  addTool,
  annotation as csAnnotation,
  init as toolsInit,
  utilities as toolUtilities,
} from '@cornerstonejs/tools'
import { Cine, ManualClock, realClock } from './cine'
import { readout, type Calibration, type Readout } from './measure'
import { PRESETS, voiFromWindow, windowFromVoi, type PresetName } from './presets'
import { averageFrames, subtractFrames, type MaskInfo } from './subtract'
import {
  YyCtrTool,
  YyCurveTool,
  YyDeviationTool,
  YyEllipseShapeTool,
  YyProbeTool,
  YyRectShapeTool,
  YyRegionTool,
  pixelValueAt,
} from './tools'

// Load-time marks, read by tests/bench/bench_viewer.mjs (YY_BENCH_TRACE=1).
performance.mark('yy:viewer-chunk')

export type NavTool = 'wl' | 'pan' | 'zoom' | 'scroll'
export type MeasureTool = 'length' | 'angle' | 'cobb' | 'probe' | 'rect' | 'ellipse' | 'deviation' | 'ctr'
export type AnnotateTool = 'arrow' | 'text' | 'shapeRect' | 'shapeEllipse' | 'curve' | 'region'
export type ToolName = NavTool | MeasureTool | AnnotateTool
export type { Readout, PresetName }

export const NAV_TOOLS: NavTool[] = ['wl', 'pan', 'zoom', 'scroll']
export const MEASURE_TOOLS: MeasureTool[] = ['length', 'angle', 'cobb', 'probe', 'rect', 'ellipse', 'deviation', 'ctr']
export const ANNOTATE_TOOLS: AnnotateTool[] = ['arrow', 'text', 'shapeRect', 'shapeEllipse', 'curve', 'region']

export interface SubtractionState {
  /** 1-based mask frame (the first of masks). */
  mask: number
  /** 1-based frames averaged into the mask (MaskSubtractionSequence AVG_SUB); [mask] when absent. */
  masks?: number[]
  dx: number
  dy: number
}

export interface ViewerState {
  /** Index of the image the stack shows (0-based). */
  index: number
  count: number
  /** Index of the image last drawn on the canvas, -1 before the first. */
  renderedIndex: number
  /** Number of renders so far (tests wait for it to move). */
  renders: number
  ready: boolean
  error: string
  windowWidth: number | null
  windowCenter: number | null
  zoom: number
  backend: 'cpu' | 'gpu'
  invert: boolean
  rotation: number
  flipH: boolean
  flipV: boolean
  /** Calibration of the image shown: '' before the first image. */
  calibration: Calibration['kind'] | ''
  /** Images of the series loaded so far (progress bar). */
  loaded: number
  playing: boolean
  fps: number
  loop: boolean
  /** Recommended rate from the DICOM header (FrameTime / CineRate), or null. */
  headerFps: number | null
  /** MaskSubtractionSequence of the series' multi-frame instance, if any. */
  maskInfo: MaskInfo | null
  subtraction: SubtractionState | null
  /** Read-outs of the measurements and annotations on the image shown. */
  readouts: Readout[]
  /** Bumped whenever an annotation is completed, changed or removed. */
  annotationsVersion: number
  /** Annotations completed so far (drawing finished). */
  completed: number
}

/** Asks the user for a text (in-app, never window.prompt); null = cancelled. */
export type AskText = (initial: string) => Promise<string | null>

const TOOL_IDS: Record<ToolName, string> = {
  wl: WindowLevelTool.toolName,
  pan: PanTool.toolName,
  zoom: ZoomTool.toolName,
  scroll: StackScrollTool.toolName,
  length: LengthTool.toolName,
  angle: AngleTool.toolName,
  cobb: CobbAngleTool.toolName,
  probe: YyProbeTool.toolName,
  rect: RectangleROITool.toolName,
  ellipse: EllipticalROITool.toolName,
  deviation: YyDeviationTool.toolName,
  ctr: YyCtrTool.toolName,
  arrow: ArrowAnnotateTool.toolName,
  text: LabelTool.toolName,
  shapeRect: YyRectShapeTool.toolName,
  shapeEllipse: YyEllipseShapeTool.toolName,
  curve: YyCurveTool.toolName,
  region: YyRegionTool.toolName,
}
const TOOL_BY_CS: Record<string, ToolName> = Object.fromEntries(
  Object.entries(TOOL_IDS).map(([k, v]) => [v, k as ToolName]),
) as Record<string, ToolName>

const { MouseBindings } = ToolEnums
const SUB_SCHEME = 'yysub'

let initPromise: Promise<void> | null = null

/**
 * CPU rendering when asked (?render=cpu|gpu, localStorage yy.render), and by
 * default when WebGL is a software rasteriser (SwiftShader, llvmpipe: thin
 * clients and virtual desktops, common in hospitals, and browsers with the
 * GPU blocked). There Cornerstone's CPU path draws a stack image several
 * times faster than emulated WebGL, whose first frame alone (shader
 * compilation) cost 270 ms in tests/bench/bench_viewer.sh.
 */
function wantCpu(): boolean {
  let asked: string | null = null
  try {
    asked = new URLSearchParams(window.location.search).get('render') ?? localStorage.getItem('yy.render')
  } catch {
    /* storage blocked */
  }
  if (asked === 'cpu' || asked === 'gpu') return asked === 'cpu'
  return softwareWebGl()
}

function softwareWebGl(): boolean {
  try {
    const gl = document.createElement('canvas').getContext('webgl2') ?? document.createElement('canvas').getContext('webgl')
    if (!gl) return true
    const ext = gl.getExtension('WEBGL_debug_renderer_info')
    const name = ext ? String(gl.getParameter(ext.UNMASKED_RENDERER_WEBGL)) : ''
    gl.getExtension('WEBGL_lose_context')?.loseContext()
    return /swiftshader|llvmpipe|softpipe|software/i.test(name)
  } catch {
    return false
  }
}

function isTouchDevice(): boolean {
  return typeof window.matchMedia === 'function' && window.matchMedia('(pointer: coarse)').matches
}

// ------------------------------------------------------------- DICOM header

/** The instance's attributes, naturalized (keyword -> value) as the loader keeps them. */
type Naturalized = Record<string, unknown>

function headerOf(imageId: string): Naturalized | undefined {
  if (!imageId.startsWith('wadouri:')) return undefined
  const img = cache.getImage(imageId) as unknown as { data?: Naturalized } | undefined
  if (img?.data && typeof img.data === 'object' && 'Rows' in img.data) return img.data
  try {
    const n = metaData.get('naturalized', imageId) as Naturalized | undefined
    if (n && typeof n === 'object') return n
  } catch {
    /* not loaded */
  }
  return undefined
}

function nums(v: unknown): number[] {
  const a = Array.isArray(v) ? v : v === undefined || v === null || v === '' ? [] : [v]
  return a.map((x) => (typeof x === 'number' ? x : Number(String(x)))).filter(Number.isFinite)
}

function item(v: unknown): Naturalized | undefined {
  const a = Array.isArray(v) ? v[0] : v
  return a && typeof a === 'object' ? (a as Naturalized) : undefined
}

const calCache = new Map<string, Calibration>()

/** PixelSpacing, else ImagerPixelSpacing, else none. */
export function calibrationOf(imageId: string): Calibration {
  if (imageId.startsWith(`${SUB_SCHEME}:`)) return calibrationOf(subSource.get(imageId) ?? '')
  const key = imageId.startsWith('wadouri:') ? wadouri.parseImageId(imageId).url : imageId
  const hit = calCache.get(key)
  if (hit) return hit
  const h = headerOf(imageId)
  // Not loaded yet: answer without caching (asked again once it is).
  if (!h) return { kind: 'none', spacing: [1, 1] }
  let ps = nums(h.PixelSpacing)
  if (ps.length < 2) ps = nums(item(item(h.SharedFunctionalGroupsSequence)?.PixelMeasuresSequence)?.PixelSpacing)
  const ips = nums(h.ImagerPixelSpacing)
  let cal: Calibration = { kind: 'none', spacing: [1, 1] }
  if (ps.length >= 2 && ps[0] > 0 && ps[1] > 0) cal = { kind: 'pixel', spacing: [ps[0], ps[1]] }
  else if (ips.length >= 2 && ips[0] > 0 && ips[1] > 0) cal = { kind: 'imager', spacing: [ips[0], ips[1]] }
  calCache.set(key, cal)
  return cal
}

function maskInfoOf(imageId: string): MaskInfo | null {
  const m = item(headerOf(imageId)?.MaskSubtractionSequence)
  if (!m) return null
  const r = nums(m.ApplicableFrameRange)
  const sh = nums(m.MaskSubPixelShift)
  return {
    frames: nums(m.MaskFrameNumbers).filter((f) => f >= 1),
    range: r.length >= 2 ? [r[0], r[1]] : null,
    operation: String(m.MaskOperation ?? ''),
    shift: sh.length >= 2 ? [sh[0], sh[1]] : [0, 0],
  }
}

function headerFpsOf(imageId: string): number | null {
  const h = headerOf(imageId)
  if (!h) return null
  const rec = nums(h.RecommendedDisplayFrameRate)[0]
  if (rec > 0) return rec
  const rate = nums(h.CineRate)[0]
  if (rate > 0) return rate
  const ft = nums(h.FrameTime)[0]
  if (ft > 0) return 1000 / ft
  return null
}

// ---------------------------------------------------------- metadata fixes

/** Subtracted image id -> its source frame's image id. */
const subSource = new Map<string, string>()
let inProvider = false

/**
 * Cornerstone reads only PixelSpacing; projection images calibrated with
 * ImagerPixelSpacing alone would measure in pixels labelled mm. This
 * provider gives the image plane their imager spacing; subtracted frames
 * take their source frame's attributes, with plain linear output.
 */
function metadataFix(type: string, imageId: string): unknown {
  if (inProvider || typeof imageId !== 'string') return undefined
  if (imageId.startsWith(`${SUB_SCHEME}:`)) {
    const src = subSource.get(imageId)
    if (!src || type === 'imagePlaneModule' || type === 'imagePixelModule') return undefined
    if (type === 'modalityLutModule') return { rescaleSlope: 1, rescaleIntercept: 0, rescaleType: '' }
    if (type === 'voiLutModule') return { windowCenter: [0], windowWidth: [256] }
    inProvider = true
    try {
      return metaData.get(type, src)
    } finally {
      inProvider = false
    }
  }
  if (type !== 'imagePlaneModule' || !imageId.startsWith('wadouri:')) return undefined
  const cal = calibrationOf(imageId)
  if (cal.kind !== 'imager') return undefined
  inProvider = true
  try {
    const base = metaData.get(type, imageId) as Record<string, unknown> | undefined
    if (!base) return undefined
    return {
      ...base,
      usingDefaultValues: false,
      rowPixelSpacing: cal.spacing[0],
      columnPixelSpacing: cal.spacing[1],
      pixelSpacing: [cal.spacing[0], cal.spacing[1]],
      rowCosines: base.rowCosines ?? [1, 0, 0],
      columnCosines: base.columnCosines ?? [0, 1, 0],
      imagePositionPatient: base.imagePositionPatient ?? [0, 0, 0],
      imageOrientationPatient: base.imageOrientationPatient ?? [1, 0, 0, 0, 1, 0],
    }
  } finally {
    inProvider = false
  }
}

/** Initialises Cornerstone3D, the DICOM loader (decode workers) and the tools once. */
export function initViewer(): Promise<void> {
  if (!initPromise) {
    initPromise = (async () => {
      performance.mark('yy:init')
      csInit({ isMobile: isTouchDevice(), debug: {} })
      // WebGL absent (headless, old phones): Cornerstone falls back to CPU
      // rendering by itself; ?render=cpu forces it.
      if (wantCpu()) setUseCPURendering(true)
      const cores = navigator.hardwareConcurrency || 2
      dicomImageLoaderInit({ maxWebWorkers: Math.max(1, Math.min(4, Math.floor(cores / 2))) })
      metaData.addProvider(metadataFix as never, 20000)
      toolsInit()
      for (const tool of [
        WindowLevelTool, PanTool, ZoomTool, StackScrollTool, LengthTool, AngleTool, CobbAngleTool, YyProbeTool,
        RectangleROITool, EllipticalROITool, YyDeviationTool, YyCtrTool, ArrowAnnotateTool, LabelTool,
        YyRectShapeTool, YyEllipseShapeTool, YyCurveTool, YyRegionTool,
      ]) addTool(tool)
      performance.mark('yy:init-done')
    })()
  }
  return initPromise
}

/**
 * Hands the loader the bytes of a single-frame instance fetched elsewhere
 * (the study prefetch, api/prefetch.ts), so that loading imageId does not
 * fetch them a second time.
 */
export async function primeImage(imageId: string, bytes: ArrayBuffer): Promise<void> {
  await initViewer()
  await metadataUtils.addDicomPart10Instance(imageId, bytes)
  // Decode it now, in the worker, while the viewport is being set up.
  void imageLoader.loadAndCacheImage(imageId).catch(() => {})
}

/** Image id for one instance (or one frame of it) fetched whole over WADO-URI. */
export function wadoUriImageId(url: string, frame?: number): string {
  return frame === undefined ? `wadouri:${url}` : `wadouri:${url}&frame=${frame}`
}

/** Serialised annotation as stored on the server (image ids without origin). */
export type StoredAnnotation = Record<string, unknown>

let seq = 0

export class StackViewer {
  private readonly element: HTMLDivElement
  private readonly onChange: (s: ViewerState) => void
  private readonly askText: AskText
  private readonly engineId: string
  private readonly viewportId: string
  private readonly toolGroupId: string
  private engine: RenderingEngine | null = null
  private primary: ToolName = 'wl'
  private userVoi: Types.VOIRange | null = null
  private pointerDown = false
  /** An annotation was dragged: save when the pointer goes up. */
  private editedWhileDown = false
  /** The user zoomed or panned since the last load/reset: keep that on resize. */
  private cameraTouched = false
  private touch: { d0: number; z0: number; cx: number; cy: number } | null = null
  private loadToken = 0
  private resizeObs: ResizeObserver | null = null
  /** The series' own image ids (the stack shows derived ids while subtracting). */
  private sourceIds: string[] = []
  private readonly cine: Cine
  private manualClock: ManualClock | null = null
  private state: ViewerState = {
    index: 0,
    count: 0,
    renderedIndex: -1,
    renders: 0,
    ready: false,
    error: '',
    windowWidth: null,
    windowCenter: null,
    zoom: 1,
    backend: 'gpu',
    invert: false,
    rotation: 0,
    flipH: false,
    flipV: false,
    calibration: '',
    loaded: 0,
    playing: false,
    fps: 10,
    loop: true,
    headerFps: null,
    maskInfo: null,
    subtraction: null,
    readouts: [],
    annotationsVersion: 0,
    completed: 0,
  }

  private constructor(element: HTMLDivElement, onChange: (s: ViewerState) => void, askText: AskText) {
    seq += 1
    this.element = element
    this.onChange = onChange
    this.askText = askText
    this.engineId = `yy-engine-${seq}`
    this.viewportId = `yy-stack-${seq}`
    this.toolGroupId = `yy-tools-${seq}`
    this.cine = new Cine(
      (i) => void this.viewport?.setImageIdIndex(i),
      () => this.emit({ playing: false }),
    )
  }

  static async create(element: HTMLDivElement, onChange: (s: ViewerState) => void, askText: AskText): Promise<StackViewer> {
    await initViewer()
    const v = new StackViewer(element, onChange, askText)
    v.setup()
    return v
  }

  private get viewport(): Types.IStackViewport | null {
    if (!this.engine) return null
    return (this.engine.getViewport(this.viewportId) as Types.IStackViewport | undefined) ?? null
  }

  private emit(patch: Partial<ViewerState>): void {
    this.state = { ...this.state, ...patch }
    this.onChange(this.state)
  }

  private toolConfig(name: ToolName): Record<string, unknown> {
    const fmt = (data: { handles: { points: Types.Point3[] }; cachedStats: Record<string, unknown> }, target: string | string[]) =>
      this.readoutOf(name, data, Array.isArray(target) ? target[0] ?? '' : String(target ?? '')).lines
    const textCb = {
      getTextCallback: (done: (t: string) => void) => {
        void this.askText('').then((t) => done(t ?? ''))
      },
      changeTextCallback: (data: { data?: { label?: string } }, _e: unknown, done: (t: string) => void) => {
        const cur = data?.data?.label ?? ''
        void this.askText(cur).then((t) => done(t === null ? cur : t))
      },
    }
    const none = () => []
    switch (name) {
      case 'arrow':
      case 'text':
        return textCb
      case 'shapeRect':
      case 'shapeEllipse':
        return { calculateStats: false, getTextLines: none }
      case 'curve':
        return { calculateStats: false, allowOpenContours: true, getTextLines: none }
      case 'region':
        return { calculateStats: false, allowOpenContours: false, getTextLines: none }
      case 'length':
      case 'angle':
      case 'cobb':
      case 'probe':
      case 'rect':
      case 'ellipse':
      case 'deviation':
      case 'ctr':
        return { getTextLines: fmt }
      default:
        return {}
    }
  }

  private setup(): void {
    const el = this.element
    el.addEventListener('contextmenu', this.preventContextMenu)
    el.addEventListener('pointerdown', this.onPointerDown)
    window.addEventListener('pointerup', this.onPointerUp)
    window.addEventListener('pointercancel', this.onPointerUp)

    performance.mark('yy:engine')
    this.engine = new RenderingEngine(this.engineId)
    this.engine.enableElement({
      viewportId: this.viewportId,
      type: Enums.ViewportType.STACK,
      element: el,
      defaultOptions: { background: [0, 0, 0] as Types.Point3 },
    })

    const group = ToolGroupManager.createToolGroup(this.toolGroupId)
    if (!group) throw new Error('cannot create tool group')
    for (const name of Object.keys(TOOL_IDS) as ToolName[]) group.addTool(TOOL_IDS[name], this.toolConfig(name))
    group.addViewport(this.viewportId, this.engineId)
    // Mouse: left = current tool, middle = pan, right = zoom, wheel = scroll.
    // Touch: one finger = current tool; two fingers = pinch zoom and pan (our
    // own handler: ZoomTool's pinch zooms the wrong way under CPU rendering
    // in 5.14.0); three = scroll.
    group.setToolActive(TOOL_IDS.wl, { bindings: [{ mouseButton: MouseBindings.Primary }] })
    group.setToolActive(TOOL_IDS.pan, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] })
    group.setToolActive(TOOL_IDS.zoom, { bindings: [{ mouseButton: MouseBindings.Secondary }] })
    group.setToolActive(TOOL_IDS.scroll, { bindings: [{ mouseButton: MouseBindings.Wheel }, { numTouchPoints: 3 }] })
    // Annotations stay visible (passive) whatever tool is active.
    for (const name of [...MEASURE_TOOLS, ...ANNOTATE_TOOLS]) group.setToolPassive(TOOL_IDS[name])
    el.addEventListener('touchstart', this.onTouch, { passive: true })
    el.addEventListener('touchmove', this.onTouch, { passive: true })
    el.addEventListener('touchend', this.onTouch, { passive: true })
    el.addEventListener('touchcancel', this.onTouch, { passive: true })

    el.addEventListener(Enums.Events.STACK_NEW_IMAGE, this.onNewImage as EventListener)
    el.addEventListener(Enums.Events.IMAGE_RENDERED, this.onRendered as EventListener)
    el.addEventListener(Enums.Events.VOI_MODIFIED, this.onVoi as EventListener)
    el.addEventListener(Enums.Events.CAMERA_MODIFIED, this.onCamera as EventListener)
    for (const ev of [
      ToolEnums.Events.ANNOTATION_COMPLETED,
      ToolEnums.Events.ANNOTATION_MODIFIED,
      ToolEnums.Events.ANNOTATION_REMOVED,
    ]) eventTarget.addEventListener(ev, this.onAnnotation as EventListener)

    this.resizeObs = new ResizeObserver(() => this.resize())
    this.resizeObs.observe(el)
    this.emit({ backend: getShouldUseCPURendering() ? 'cpu' : 'gpu' })
  }

  /** Shows a new stack; resolves once the first image is on screen. */
  async load(imageIds: string[], startIndex = 0): Promise<void> {
    const vp = this.viewport
    if (!vp) return
    const token = ++this.loadToken
    this.cine.stop(false)
    toolUtilities.stackContextPrefetch.disable(this.element)
    this.userVoi = null
    this.cameraTouched = false
    this.sourceIds = imageIds.slice()
    this.emit({
      count: imageIds.length, index: startIndex, renderedIndex: -1, ready: false, error: '', loaded: 0,
      playing: false, subtraction: null, maskInfo: null, headerFps: null, invert: false, rotation: 0,
      flipH: false, flipV: false, readouts: [],
    })
    if (imageIds.length === 0) return
    try {
      // First image of the series first; the rest follows (progress bar).
      performance.mark('yy:set-stack')
      await vp.setStack(imageIds, startIndex)
      if (token !== this.loadToken) return
      vp.render()
      performance.mark('yy:first-render')
      toolUtilities.stackContextPrefetch.enable(this.element)
      const first = imageIds[startIndex]
      const fps = headerFpsOf(first)
      this.emit({
        index: vp.getCurrentImageIdIndex(), ready: true, calibration: calibrationOf(first).kind,
        headerFps: fps, fps: fps ? Math.round(fps * 10) / 10 : this.state.fps, maskInfo: maskInfoOf(first),
      })
      this.syncProps()
      this.refreshReadouts()
      void this.preload(imageIds, startIndex, token)
    } catch (e) {
      if (token !== this.loadToken) return
      this.emit({ error: errorText(e) })
      throw e
    }
  }

  /** Loads every image of the stack, nearest to the shown one first, counting progress. */
  private async preload(ids: string[], start: number, token: number): Promise<void> {
    const order = ids.map((id, i) => ({ id, d: Math.abs(i - start) + (i < start ? 0.5 : 0) }))
    order.sort((a, b) => a.d - b.d)
    let next = 0
    let loaded = 0
    const worker = async (): Promise<void> => {
      while (next < order.length && token === this.loadToken) {
        const { id } = order[next++]
        try {
          await imageLoader.loadAndCacheImage(id)
        } catch {
          /* shown as an error when displayed */
        }
        if (token !== this.loadToken) return
        loaded++
        if (loaded === order.length || loaded % 4 === 0) this.emit({ loaded })
      }
    }
    // As many requests in flight as a browser opens connections to one
    // HTTP/1.1 host (6): on a high-latency link fewer leave it idle between
    // a response's end and the next response's first byte.
    await Promise.all(Array.from({ length: 6 }, worker))
  }

  setTool(name: ToolName): void {
    const group = ToolGroupManager.getToolGroup(this.toolGroupId)
    if (!group || name === this.primary) return
    const old = this.primary
    if (NAV_TOOLS.includes(old as NavTool)) {
      group.setToolPassive(TOOL_IDS[old]) // drops only its primary binding
      if (old === 'scroll') group.setToolActive(TOOL_IDS.scroll, { bindings: [{ mouseButton: MouseBindings.Wheel }, { numTouchPoints: 3 }] })
      if (old === 'pan') group.setToolActive(TOOL_IDS.pan, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] })
      if (old === 'zoom') group.setToolActive(TOOL_IDS.zoom, { bindings: [{ mouseButton: MouseBindings.Secondary }] })
    } else {
      group.setToolPassive(TOOL_IDS[old])
    }
    group.setToolActive(TOOL_IDS[name], { bindings: [{ mouseButton: MouseBindings.Primary }] })
    this.primary = name
  }

  scroll(delta: number): void {
    this.viewport?.scroll(delta)
  }

  setIndex(i: number): void {
    const vp = this.viewport
    if (!vp) return
    const n = vp.getImageIds().length
    void vp.setImageIdIndex(Math.max(0, Math.min(n - 1, Math.round(i))))
  }

  reset(): void {
    const vp = this.viewport
    if (!vp) return
    this.userVoi = null
    this.cameraTouched = false
    vp.resetProperties()
    vp.resetCamera()
    if (this.state.subtraction) vp.setProperties({ voiRange: { lower: -128, upper: 128 } })
    vp.render()
    this.syncProps()
  }

  // ------------------------------------------------------------ display

  /** Window width/level by numbers. */
  setWindow(width: number, level: number): void {
    const vp = this.viewport
    if (!vp || !Number.isFinite(width) || !Number.isFinite(level)) return
    const voi = voiFromWindow(width, level)
    this.userVoi = voi
    vp.setProperties({ voiRange: voi })
    vp.render()
    this.syncProps()
  }

  applyPreset(name: PresetName): void {
    const vp = this.viewport
    if (!vp) return
    if (name === 'default') {
      this.userVoi = null
      const invert = this.state.invert
      vp.resetProperties()
      if (invert) vp.setProperties({ invert })
      vp.render()
      this.syncProps()
      return
    }
    const p = PRESETS.find((x) => x.name === name)
    if (p) this.setWindow(p.width, p.level)
  }

  setInvert(on: boolean): void {
    const vp = this.viewport
    if (!vp) return
    vp.setProperties({ invert: on })
    vp.render()
    this.emit({ invert: on })
  }

  rotate(deg: number): void {
    const vp = this.viewport
    if (!vp) return
    const cur = vp.getViewPresentation().rotation ?? 0
    const rotation = (((cur + deg) % 360) + 360) % 360
    vp.setViewPresentation({ rotation })
    vp.render()
    this.cameraTouched = true
    this.syncProps()
  }

  flip(axis: 'h' | 'v'): void {
    const vp = this.viewport
    if (!vp) return
    const cam = vp.getCamera()
    if (axis === 'h') vp.setCamera({ flipHorizontal: !cam.flipHorizontal })
    else vp.setCamera({ flipVertical: !cam.flipVertical })
    vp.render()
    this.cameraTouched = true
    this.syncProps()
  }

  /**
   * 1:1 display: one image pixel = `s` CSS pixels, with the image's corner
   * on a whole canvas pixel (exact pointer measurements in tests, and the
   * "actual size" button).
   */
  zoomToPixels(s = 1): void {
    const vp = this.viewport
    const id = vp?.getCurrentImageId()
    if (!vp || !id) return
    const canvas = vp.canvas as HTMLCanvasElement
    const h = canvas.clientHeight || canvas.height
    const plane = metaData.get('imagePlaneModule', id) as { rowPixelSpacing?: number } | undefined
    const sp = plane?.rowPixelSpacing || 1
    vp.resetCamera()
    const cam = vp.getCamera()
    vp.setCamera({ parallelScale: (h * sp) / (2 * s) })
    vp.render()
    // Snap the image corner to a whole pixel.
    const corner = csUtils.imageToWorldCoords(id, [0, 0]) as Types.Point3
    const c = vp.worldToCanvas(corner)
    const target: Types.Point2 = [Math.round(c[0]), Math.round(c[1])]
    const w0 = vp.canvasToWorld(c)
    const w1 = vp.canvasToWorld(target)
    const d = [w0[0] - w1[0], w0[1] - w1[1], w0[2] - w1[2]]
    const cam2 = vp.getCamera()
    const fp = cam2.focalPoint ?? cam.focalPoint
    const pos = cam2.position ?? cam.position
    if (fp && pos) {
      vp.setCamera({
        focalPoint: [fp[0] + d[0], fp[1] + d[1], fp[2] + d[2]] as Types.Point3,
        position: [pos[0] + d[0], pos[1] + d[1], pos[2] + d[2]] as Types.Point3,
      })
    }
    vp.render()
    this.cameraTouched = true
    this.syncProps()
  }

  /** Client (page) coordinates of an image point (x = column, y = row; pixel i spans [i, i+1)). */
  imageToClient(x: number, y: number): { x: number; y: number } | null {
    const vp = this.viewport
    const id = vp?.getCurrentImageId()
    if (!vp || !id) return null
    const w = csUtils.imageToWorldCoords(id, [x, y]) as Types.Point3
    const c = vp.worldToCanvas(w)
    const r = (vp.canvas as HTMLCanvasElement).getBoundingClientRect()
    return { x: r.left + c[0], y: r.top + c[1] }
  }

  /** Statistics of the pixel values of the image shown (tests: flat subtraction). */
  pixelStats(): { min: number; max: number; mean: number; std: number } | null {
    const img = this.viewport?.getCornerstoneImage()
    if (!img) return null
    const px = img.getPixelData()
    let min = Infinity
    let max = -Infinity
    let sum = 0
    let sq = 0
    for (let i = 0; i < px.length; i++) {
      const v = Number(px[i])
      if (v < min) min = v
      if (v > max) max = v
      sum += v
      sq += v * v
    }
    const mean = sum / px.length
    return { min, max, mean, std: Math.sqrt(Math.max(0, sq / px.length - mean * mean)) }
  }

  /** Value of the pixel at image (x, y) of the image shown. */
  pixelAt(x: number, y: number): number | null {
    const vp = this.viewport
    const id = vp?.getCurrentImageId()
    if (!vp || !id) return null
    return pixelValueAt(id, csUtils.imageToWorldCoords(id, [x + 0.5, y + 0.5]) as Types.Point3)?.value ?? null
  }

  // --------------------------------------------------------------- cine

  play(): void {
    const vp = this.viewport
    if (!vp) return
    this.cine.play(vp.getCurrentImageIdIndex(), vp.getImageIds().length)
    this.emit({ playing: true })
  }

  stop(): void {
    this.cine.stop(false)
    this.emit({ playing: false })
  }

  setCine(o: { fps?: number; loop?: boolean }): void {
    this.cine.setOptions(o)
    this.emit({ fps: this.cine.opts.fps, loop: this.cine.opts.loop })
  }

  /** Tests: replace the cine clock by a manual one (true) or the real one (false). */
  useManualClock(on: boolean): void {
    this.manualClock = on ? new ManualClock() : null
    this.cine.setClock(this.manualClock ?? realClock)
  }

  advanceClock(ms: number): void {
    this.manualClock?.advance(ms)
  }

  cineAdvanced(): number {
    return this.cine.advanced
  }

  cineStats(): { advanced: number; shown: number; elapsed: number; fps: number } {
    return { advanced: this.cine.advanced, shown: this.cine.shown, elapsed: this.cine.elapsed, fps: this.cine.opts.fps }
  }

  // -------------------------------------------------------- subtraction

  /**
   * Shows every frame minus the mask frame (1-based), the mask shifted by
   * (dx, dy) pixels; null goes back to the original frames.
   */
  async setSubtraction(sub: SubtractionState | null): Promise<void> {
    const vp = this.viewport
    if (!vp || !this.sourceIds.length) return
    const token = this.loadToken
    const index = vp.getCurrentImageIdIndex()
    const wasPlaying = this.cine.playing
    this.cine.stop(false)
    if (!sub) {
      await vp.setStack(this.sourceIds, index)
      vp.render()
      this.emit({ subtraction: null })
      this.syncProps()
      if (wasPlaying) this.play()
      return
    }
    const images = await Promise.all(this.sourceIds.map((id) => imageLoader.loadAndCacheImage(id)))
    if (token !== this.loadToken) return
    const clampFrame = (f: number): number => Math.max(1, Math.min(images.length, Math.round(f)))
    const masks = [...new Set((sub.masks?.length ? sub.masks : [sub.mask]).map(clampFrame))]
    const m = masks[0]
    const w = images[m - 1].columns
    const h = images[m - 1].rows
    const mask = averageFrames(masks.map((f) => images[f - 1].getPixelData()), w * h)
    const key = `${this.loadToken}:${masks.join(',')}:${sub.dx}:${sub.dy}`
    const ids: string[] = []
    images.forEach((img, i) => {
      const id = `${SUB_SCHEME}:${key}:${i}`
      ids.push(id)
      if (cache.getImage(id)) return
      subSource.set(id, this.sourceIds[i])
      const plane = metaData.get('imagePlaneModule', this.sourceIds[i]) as {
        rowPixelSpacing?: number; columnPixelSpacing?: number; imagePositionPatient?: number[]; imageOrientationPatient?: number[]
      } | undefined
      imageLoader.createAndCacheLocalImage(id, {
        scalarData: subtractFrames(img.getPixelData(), mask, w, h, sub.dx, sub.dy),
        dimensions: [w, h],
        spacing: [plane?.columnPixelSpacing || 1, plane?.rowPixelSpacing || 1],
        origin: (plane?.imagePositionPatient ?? [0, 0, 0]) as Types.Point3,
        direction: (plane?.imageOrientationPatient
          ? [...plane.imageOrientationPatient.slice(0, 3), ...plane.imageOrientationPatient.slice(3, 6)]
          : [1, 0, 0, 0, 1, 0]) as unknown as Types.Mat3,
      } as never)
    })
    await vp.setStack(ids, index)
    vp.setProperties({ voiRange: { lower: -128, upper: 128 } })
    vp.render()
    this.emit({ subtraction: { mask: m, masks, dx: sub.dx, dy: sub.dy } })
    this.syncProps()
    if (wasPlaying) this.play()
  }

  // -------------------------------------------------------- annotations

  private readoutOf(
    name: ToolName,
    data: { handles: { points: Types.Point3[] }; cachedStats: Record<string, unknown> },
    targetId: string,
  ): Pick<Readout, 'lines' | 'values'> {
    const imageId = targetId.startsWith('imageId:') ? targetId.slice(8) : ''
    const cal = imageId ? calibrationOf(imageId) : { kind: 'none' as const, spacing: [1, 1] as [number, number] }
    const plane = imageId ? (metaData.get('imagePlaneModule', imageId) as { rowCosines?: number[]; columnCosines?: number[] } | undefined) : undefined
    const orient = plane?.rowCosines && plane.columnCosines ? { right: plane.rowCosines, down: plane.columnCosines } : undefined
    return readout(name, data.handles.points, data.cachedStats[targetId] as never, cal, orient)
  }

  /** Read-outs of the annotations on the image shown (or on every image of the stack). */
  readouts(all = false): Readout[] {
    const vp = this.viewport
    if (!vp) return []
    const cur = vp.getCurrentImageId()
    const ids = new Set(all ? vp.getImageIds() : [cur])
    const out: Readout[] = []
    for (const a of csAnnotation.state.getAllAnnotations()) {
      const name = TOOL_BY_CS[a.metadata?.toolName ?? ""]
      const ref = a.metadata?.referencedImageId ?? ''
      if (!name || !ids.has(ref)) continue
      const data = a.data as unknown as { handles: { points: Types.Point3[] }; cachedStats: Record<string, unknown>; label?: string }
      const r = this.readoutOf(name, { handles: data.handles, cachedStats: data.cachedStats ?? {} }, `imageId:${ref}`)
      if (name === 'arrow' || name === 'text') r.lines = [data.label ?? '']
      out.push({ uid: a.annotationUID ?? '', tool: name, imageId: ref, lines: r.lines, values: r.values })
    }
    return out
  }

  private refreshReadouts(): void {
    this.emit({ readouts: this.readouts() })
  }

  removeAnnotation(uid: string): void {
    csAnnotation.state.removeAnnotation(uid)
    this.viewport?.render()
    this.refreshReadouts()
    this.emit({ annotationsVersion: this.state.annotationsVersion + 1 })
  }

  /** Removes every annotation of the given image ids' series (the study's annotations). */
  clearAnnotations(): void {
    csAnnotation.state.removeAllAnnotations()
    this.viewport?.render()
    this.refreshReadouts()
    this.emit({ annotationsVersion: this.state.annotationsVersion + 1 })
  }

  /** Annotations as JSON (drawn on original images only), image ids relative to the origin. */
  exportAnnotations(): StoredAnnotation[] {
    const origin = window.location.origin
    const out: StoredAnnotation[] = []
    for (const a of csAnnotation.state.getAllAnnotations()) {
      if (!TOOL_BY_CS[a.metadata?.toolName ?? ""]) continue
      const ref = a.metadata?.referencedImageId ?? ''
      if (!ref.startsWith('wadouri:')) continue
      const c = JSON.parse(JSON.stringify(a)) as {
        metadata: { referencedImageId: string }
        data: { cachedStats?: unknown }
        highlighted?: boolean
        isSelected?: boolean
      }
      c.metadata.referencedImageId = ref.replace(`wadouri:${origin}`, 'wadouri:')
      c.data.cachedStats = {}
      delete c.highlighted
      delete c.isSelected
      out.push(c as unknown as StoredAnnotation)
    }
    return out
  }

  importAnnotations(list: StoredAnnotation[]): void {
    const origin = window.location.origin
    for (const raw of list) {
      const a = JSON.parse(JSON.stringify(raw)) as {
        annotationUID?: string
        metadata?: { toolName?: string; referencedImageId?: string }
        data?: { cachedStats?: unknown }
        invalidated?: boolean
      }
      if (!a.metadata?.toolName || !TOOL_BY_CS[a.metadata?.toolName ?? ""] || !a.data) continue
      const ref = a.metadata?.referencedImageId ?? ''
      if (ref.startsWith('wadouri:/')) a.metadata.referencedImageId = `wadouri:${origin}${ref.slice(8)}`
      if (a.annotationUID && csAnnotation.state.getAnnotation(a.annotationUID)) continue
      a.data.cachedStats = {}
      a.invalidated = true
      csAnnotation.state.addAnnotation(a as never, this.element)
    }
    this.viewport?.render()
    this.refreshReadouts()
  }

  // ---------------------------------------------------------- lifecycle

  resize(): void {
    if (!this.engine) return
    // Untouched: fit the image to the new size; else keep the user's view.
    this.engine.resize(true, this.cameraTouched)
  }

  destroy(): void {
    this.loadToken++
    this.cine.stop(false)
    const el = this.element
    toolUtilities.stackContextPrefetch.disable(el)
    this.resizeObs?.disconnect()
    el.removeEventListener('contextmenu', this.preventContextMenu)
    for (const t of ['touchstart', 'touchmove', 'touchend', 'touchcancel'] as const) el.removeEventListener(t, this.onTouch)
    el.removeEventListener('pointerdown', this.onPointerDown)
    window.removeEventListener('pointerup', this.onPointerUp)
    window.removeEventListener('pointercancel', this.onPointerUp)
    el.removeEventListener(Enums.Events.STACK_NEW_IMAGE, this.onNewImage as EventListener)
    el.removeEventListener(Enums.Events.IMAGE_RENDERED, this.onRendered as EventListener)
    el.removeEventListener(Enums.Events.VOI_MODIFIED, this.onVoi as EventListener)
    el.removeEventListener(Enums.Events.CAMERA_MODIFIED, this.onCamera as EventListener)
    for (const ev of [
      ToolEnums.Events.ANNOTATION_COMPLETED,
      ToolEnums.Events.ANNOTATION_MODIFIED,
      ToolEnums.Events.ANNOTATION_REMOVED,
    ]) eventTarget.removeEventListener(ev, this.onAnnotation as EventListener)
    csAnnotation.state.removeAllAnnotations()
    ToolGroupManager.destroyToolGroup(this.toolGroupId)
    this.engine?.destroy()
    this.engine = null
  }

  private syncProps(): void {
    const vp = this.viewport
    if (!vp) return
    const props = vp.getProperties()
    const voi = props.voiRange
    const cam = vp.getCamera()
    const patch: Partial<ViewerState> = {
      zoom: vp.getZoom(),
      invert: !!props.invert,
      rotation: vp.getViewPresentation().rotation ?? 0,
      flipH: !!cam.flipHorizontal,
      flipV: !!cam.flipVertical,
    }
    if (voi) {
      const w = windowFromVoi(voi)
      patch.windowWidth = w.width
      patch.windowCenter = w.level
    }
    this.emit(patch)
  }

  private readonly preventContextMenu = (e: Event): void => e.preventDefault()
  private readonly onPointerDown = (): void => {
    this.pointerDown = true
  }
  private readonly onPointerUp = (): void => {
    this.pointerDown = false
    if (this.editedWhileDown) {
      this.editedWhileDown = false
      this.emit({ annotationsVersion: this.state.annotationsVersion + 1 })
    }
  }

  /** Two fingers: pinch zoom about the fingers' centre, and pan with it. */
  private readonly onTouch = (e: TouchEvent): void => {
    const vp = this.viewport
    if (!vp) return
    if (e.touches.length !== 2) {
      this.touch = null
      return
    }
    const [a, b] = [e.touches[0], e.touches[1]]
    const d = Math.hypot(a.clientX - b.clientX, a.clientY - b.clientY)
    const r = this.element.getBoundingClientRect()
    const cx = (a.clientX + b.clientX) / 2 - r.left
    const cy = (a.clientY + b.clientY) / 2 - r.top
    if (!this.touch || e.type === 'touchstart') {
      this.touch = { d0: Math.max(d, 1), z0: vp.getZoom(), cx, cy }
      return
    }
    const before = vp.canvasToWorld([this.touch.cx, this.touch.cy])
    const zoom = Math.min(50, Math.max(0.05, (this.touch.z0 * d) / this.touch.d0))
    this.cameraTouched = true
    vp.setZoom(zoom)
    // Keep the world point that was under the fingers' centre under it.
    const after = vp.canvasToWorld([cx, cy])
    const cam = vp.getCamera()
    if (cam.focalPoint && cam.position) {
      const dv = [before[0] - after[0], before[1] - after[1], before[2] - after[2]]
      vp.setCamera({
        focalPoint: [cam.focalPoint[0] + dv[0], cam.focalPoint[1] + dv[1], cam.focalPoint[2] + dv[2]] as Types.Point3,
        position: [cam.position[0] + dv[0], cam.position[1] + dv[1], cam.position[2] + dv[2]] as Types.Point3,
      })
    }
    this.touch.cx = cx
    this.touch.cy = cy
    this.touch.d0 = Math.max(d, 1)
    this.touch.z0 = zoom
    vp.render()
  }

  private readonly onNewImage = (e: CustomEvent<{ imageIdIndex: number; imageId?: string }>): void => {
    const vp = this.viewport
    // CPU rendering in 5.14.0 drops a user-chosen VOI on slice change:
    // put it back (harmless on WebGL, where it is kept).
    if (vp) {
      const want = this.userVoi ?? (this.state.subtraction ? { lower: -128, upper: 128 } : null)
      const cur = vp.getProperties().voiRange
      if (want && (!cur || cur.lower !== want.lower || cur.upper !== want.upper)) {
        vp.setProperties({ voiRange: want })
        vp.render()
      }
      if (this.state.invert && !vp.getProperties().invert) {
        vp.setProperties({ invert: true })
        vp.render()
      }
    }
    const id = vp?.getCurrentImageId() ?? ''
    this.emit({ index: e.detail.imageIdIndex, calibration: id ? calibrationOf(id).kind : '' })
    this.refreshReadouts()
  }

  private readonly onRendered = (): void => {
    const vp = this.viewport
    if (!vp) return
    this.emit({ renderedIndex: vp.getCurrentImageIdIndex(), renders: this.state.renders + 1 })
  }

  private readonly onVoi = (e: CustomEvent<{ range: Types.VOIRange }>): void => {
    if (this.pointerDown && e.detail?.range) this.userVoi = { ...e.detail.range }
    this.syncProps()
  }

  private readonly onCamera = (): void => {
    if (this.pointerDown) this.cameraTouched = true
    const vp = this.viewport
    if (vp) this.emit({ zoom: vp.getZoom() })
  }

  private readonly onAnnotation = (e: CustomEvent<{ annotation?: { metadata?: { toolName?: string } }; changeType?: string }>): void => {
    const tool = e.detail?.annotation?.metadata?.toolName
    if (tool && !TOOL_BY_CS[tool]) return
    this.refreshReadouts()
    if (e.type === ToolEnums.Events.ANNOTATION_COMPLETED) this.emit({ completed: this.state.completed + 1 })
    // Stats refreshes are not edits; everything else is saved.
    if (e.type === ToolEnums.Events.ANNOTATION_MODIFIED && e.detail?.changeType === ToolEnums.ChangeTypes.StatsUpdated) return
    if (e.type === ToolEnums.Events.ANNOTATION_MODIFIED && this.pointerDown) {
      this.editedWhileDown = true
      return
    }
    this.emit({ annotationsVersion: this.state.annotationsVersion + 1 })
  }
}

function errorText(e: unknown): string {
  if (e instanceof Error) return e.message
  if (e && typeof e === 'object') {
    const o = e as { error?: { message?: string; status?: number }; message?: string; status?: number }
    if (o.error?.status) return `HTTP ${o.error.status}`
    if (o.error?.message) return o.error.message
    if (o.message) return o.message
    if (o.status) return `HTTP ${o.status}`
  }
  return String(e)
}
