// The only place that talks to Cornerstone3D. A StackViewer shows one series
// (a list of image ids) in a stack viewport with scroll, window/level, zoom,
// pan and reset, for mouse and touch. Callers get plain data (ViewerState),
// never Cornerstone objects.
import {
  Enums,
  RenderingEngine,
  getShouldUseCPURendering,
  init as csInit,
  setUseCPURendering,
  type Types,
} from '@cornerstonejs/core'
import { init as dicomImageLoaderInit } from '@cornerstonejs/dicom-image-loader'
import {
  Enums as ToolEnums,
  PanTool,
  StackScrollTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  addTool,
  init as toolsInit,
  utilities as toolUtilities,
} from '@cornerstonejs/tools'

export type ToolName = 'wl' | 'pan' | 'zoom' | 'scroll'

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
}

const TOOL_IDS: Record<ToolName, string> = {
  wl: WindowLevelTool.toolName,
  pan: PanTool.toolName,
  zoom: ZoomTool.toolName,
  scroll: StackScrollTool.toolName,
}

const { MouseBindings } = ToolEnums

let initPromise: Promise<void> | null = null

function wantCpu(): boolean {
  try {
    const q = new URLSearchParams(window.location.search).get('render')
    if (q === 'cpu') return true
    return localStorage.getItem('yy.render') === 'cpu'
  } catch {
    return false
  }
}

function isTouchDevice(): boolean {
  return typeof window.matchMedia === 'function' && window.matchMedia('(pointer: coarse)').matches
}

/** Initialises Cornerstone3D, the DICOM loader (decode workers) and the tools once. */
export function initViewer(): Promise<void> {
  if (!initPromise) {
    initPromise = (async () => {
      csInit({ isMobile: isTouchDevice(), debug: {} })
      // WebGL absent (headless, old phones): Cornerstone falls back to CPU
      // rendering by itself; ?render=cpu forces it.
      if (wantCpu()) setUseCPURendering(true)
      const cores = navigator.hardwareConcurrency || 2
      dicomImageLoaderInit({ maxWebWorkers: Math.max(1, Math.min(4, Math.floor(cores / 2))) })
      toolsInit()
      for (const tool of [WindowLevelTool, PanTool, ZoomTool, StackScrollTool]) addTool(tool)
    })()
  }
  return initPromise
}

/** Image id for one instance (or one frame of it) fetched whole over WADO-URI. */
export function wadoUriImageId(url: string, frame?: number): string {
  return frame === undefined ? `wadouri:${url}` : `wadouri:${url}&frame=${frame}`
}

let seq = 0

export class StackViewer {
  private readonly element: HTMLDivElement
  private readonly onChange: (s: ViewerState) => void
  private readonly engineId: string
  private readonly viewportId: string
  private readonly toolGroupId: string
  private engine: RenderingEngine | null = null
  private primary: ToolName = 'wl'
  private userVoi: Types.VOIRange | null = null
  private pointerDown = false
  /** The user zoomed or panned since the last load/reset: keep that on resize. */
  private cameraTouched = false
  /** Own two-finger pinch (CPU rendering only, see setup). */
  private ownPinch = false
  private pinch: { d0: number; z0: number } | null = null
  private loadToken = 0
  private resizeObs: ResizeObserver | null = null
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
  }

  private constructor(element: HTMLDivElement, onChange: (s: ViewerState) => void) {
    seq += 1
    this.element = element
    this.onChange = onChange
    this.engineId = `yy-engine-${seq}`
    this.viewportId = `yy-stack-${seq}`
    this.toolGroupId = `yy-tools-${seq}`
  }

  static async create(element: HTMLDivElement, onChange: (s: ViewerState) => void): Promise<StackViewer> {
    await initViewer()
    const v = new StackViewer(element, onChange)
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

  private setup(): void {
    const el = this.element
    el.addEventListener('contextmenu', this.preventContextMenu)
    el.addEventListener('pointerdown', this.onPointerDown)
    window.addEventListener('pointerup', this.onPointerUp)
    window.addEventListener('pointercancel', this.onPointerUp)

    this.engine = new RenderingEngine(this.engineId)
    this.engine.enableElement({
      viewportId: this.viewportId,
      type: Enums.ViewportType.STACK,
      element: el,
      defaultOptions: { background: [0, 0, 0] as Types.Point3 },
    })

    const group = ToolGroupManager.createToolGroup(this.toolGroupId)
    if (!group) throw new Error('cannot create tool group')
    for (const id of Object.values(TOOL_IDS)) group.addTool(id)
    group.addViewport(this.viewportId, this.engineId)
    // Mouse: left = current tool (window/level), middle = pan, right = zoom,
    // wheel = scroll. Touch: one finger = current tool, two = pinch zoom
    // (also pans), three = scroll.
    group.setToolActive(TOOL_IDS.wl, { bindings: [{ mouseButton: MouseBindings.Primary }] })
    group.setToolActive(TOOL_IDS.pan, { bindings: [{ mouseButton: MouseBindings.Auxiliary }] })
    // ZoomTool's pinch zooms the wrong way under CPU rendering (5.14.0):
    // there the viewer does the pinch itself.
    this.ownPinch = getShouldUseCPURendering()
    group.setToolActive(TOOL_IDS.zoom, {
      bindings: this.ownPinch
        ? [{ mouseButton: MouseBindings.Secondary }]
        : [{ mouseButton: MouseBindings.Secondary }, { numTouchPoints: 2 }],
    })
    if (this.ownPinch) {
      el.addEventListener('touchstart', this.onTouch, { passive: true })
      el.addEventListener('touchmove', this.onTouch, { passive: true })
      el.addEventListener('touchend', this.onTouch, { passive: true })
      el.addEventListener('touchcancel', this.onTouch, { passive: true })
    }
    group.setToolActive(TOOL_IDS.scroll, { bindings: [{ mouseButton: MouseBindings.Wheel }, { numTouchPoints: 3 }] })

    el.addEventListener(Enums.Events.STACK_NEW_IMAGE, this.onNewImage as EventListener)
    el.addEventListener(Enums.Events.IMAGE_RENDERED, this.onRendered as EventListener)
    el.addEventListener(Enums.Events.VOI_MODIFIED, this.onVoi as EventListener)
    el.addEventListener(Enums.Events.CAMERA_MODIFIED, this.onCamera as EventListener)

    this.resizeObs = new ResizeObserver(() => this.resize())
    this.resizeObs.observe(el)
    this.emit({ backend: getShouldUseCPURendering() ? 'cpu' : 'gpu' })
  }

  /** Shows a new stack; resolves once the first image is on screen. */
  async load(imageIds: string[], startIndex = 0): Promise<void> {
    const vp = this.viewport
    if (!vp) return
    const token = ++this.loadToken
    toolUtilities.stackContextPrefetch.disable(this.element)
    this.userVoi = null
    this.cameraTouched = false
    this.emit({ count: imageIds.length, index: startIndex, renderedIndex: -1, ready: false, error: '' })
    if (imageIds.length === 0) return
    try {
      await vp.setStack(imageIds, startIndex)
      if (token !== this.loadToken) return
      vp.render()
      toolUtilities.stackContextPrefetch.enable(this.element)
      this.emit({ index: vp.getCurrentImageIdIndex(), ready: true })
      this.syncProps()
    } catch (e) {
      if (token !== this.loadToken) return
      this.emit({ error: errorText(e) })
      throw e
    }
  }

  setTool(name: ToolName): void {
    const group = ToolGroupManager.getToolGroup(this.toolGroupId)
    if (!group || name === this.primary) return
    group.setToolPassive(TOOL_IDS[this.primary]) // drops only its primary binding
    group.setToolActive(TOOL_IDS[name], { bindings: [{ mouseButton: MouseBindings.Primary }] })
    this.primary = name
  }

  scroll(delta: number): void {
    this.viewport?.scroll(delta)
  }

  reset(): void {
    const vp = this.viewport
    if (!vp) return
    this.userVoi = null
    this.cameraTouched = false
    vp.resetProperties()
    vp.resetCamera()
    vp.render()
    this.syncProps()
  }

  resize(): void {
    if (!this.engine) return
    // Untouched: fit the image to the new size; else keep the user's view.
    this.engine.resize(true, this.cameraTouched)
  }

  destroy(): void {
    this.loadToken++
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
    ToolGroupManager.destroyToolGroup(this.toolGroupId)
    this.engine?.destroy()
    this.engine = null
  }

  private syncProps(): void {
    const vp = this.viewport
    if (!vp) return
    const voi = vp.getProperties().voiRange
    const patch: Partial<ViewerState> = { zoom: vp.getZoom() }
    if (voi) {
      patch.windowWidth = voi.upper - voi.lower
      patch.windowCenter = (voi.upper + voi.lower) / 2
    }
    this.emit(patch)
  }

  private readonly preventContextMenu = (e: Event): void => e.preventDefault()
  private readonly onPointerDown = (): void => {
    this.pointerDown = true
  }
  private readonly onPointerUp = (): void => {
    this.pointerDown = false
  }

  private readonly onTouch = (e: TouchEvent): void => {
    const vp = this.viewport
    if (!vp) return
    if (e.touches.length !== 2) {
      this.pinch = null
      return
    }
    const d = Math.hypot(e.touches[0].clientX - e.touches[1].clientX, e.touches[0].clientY - e.touches[1].clientY)
    if (!this.pinch || e.type === 'touchstart') {
      this.pinch = { d0: Math.max(d, 1), z0: vp.getZoom() }
      return
    }
    const zoom = Math.min(50, Math.max(0.05, (this.pinch.z0 * d) / this.pinch.d0))
    this.cameraTouched = true
    vp.setZoom(zoom)
    vp.render()
  }

  private readonly onNewImage = (e: CustomEvent<{ imageIdIndex: number }>): void => {
    const vp = this.viewport
    // CPU rendering in 5.14.0 drops a user-chosen VOI on slice change:
    // put it back (harmless on WebGL, where it is kept).
    if (vp && this.userVoi) {
      const cur = vp.getProperties().voiRange
      if (!cur || cur.lower !== this.userVoi.lower || cur.upper !== this.userVoi.upper) {
        vp.setProperties({ voiRange: this.userVoi })
        vp.render()
      }
    }
    this.emit({ index: e.detail.imageIdIndex })
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
