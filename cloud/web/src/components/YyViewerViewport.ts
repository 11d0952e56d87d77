import type {
  AskText,
  PresetName,
  Readout,
  StoredAnnotation,
  SubtractionState,
  ToolName,
  ViewerState,
} from '../viewer/stackViewer'

export type { AskText, PresetName, Readout, StoredAnnotation, SubtractionState, ToolName, ViewerState }

export interface YyViewerViewportProps {
  askText: AskText
}

export interface YyViewerViewportEmits {
  (e: 'state', s: ViewerState): void
}

/** Methods the parent calls through a template ref. */
export interface YyViewerViewportApi {
  load(imageIds: string[], startIndex?: number): Promise<void>
  setTool(t: ToolName): void
  reset(): void
  scroll(delta: number): void
  setIndex(i: number): void
  setWindow(width: number, level: number): void
  applyPreset(p: PresetName): void
  setInvert(on: boolean): void
  rotate(deg: number): void
  flip(axis: 'h' | 'v'): void
  zoomToPixels(s?: number): void
  play(): void
  stop(): void
  setCine(o: { fps?: number; loop?: boolean }): void
  setSubtraction(s: SubtractionState | null): Promise<void>
  removeAnnotation(uid: string): void
  clearAnnotations(): void
  exportAnnotations(): StoredAnnotation[]
  importAnnotations(list: StoredAnnotation[]): void
  /** Resolves once Cornerstone is up (annotations can be imported). */
  whenReady(): Promise<void>
}

/** Test hook on window (see tests/e2e). */
export interface YyViewerHook {
  readonly ready: boolean
  currentIndex(): number
  imageCount(): number
  renderedIndex(): number
  renders(): number
  zoom(): number
  windowWidth(): number | null
  windowCenter(): number | null
  error(): string
  backend(): string
  state(): ViewerState | null
  readouts(all?: boolean): Readout[]
  imageToClient(x: number, y: number): { x: number; y: number } | null
  zoomToPixels(s?: number): void
  pixelStats(): { min: number; max: number; mean: number; std: number } | null
  pixelAt(x: number, y: number): number | null
  useManualClock(on: boolean): void
  advanceClock(ms: number): void
  cineAdvanced(): number
  cineStats(): { advanced: number; shown: number; elapsed: number; fps: number } | null
  setIndex(i: number): void
}

declare global {
  interface Window {
    __yyViewer?: YyViewerHook
  }
}
