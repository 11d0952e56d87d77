import type { ToolName, ViewerState } from '../viewer/stackViewer'

export type { ToolName, ViewerState }

export interface YyViewerViewportEmits {
  (e: 'state', s: ViewerState): void
}

/** Methods the parent calls through a template ref. */
export interface YyViewerViewportApi {
  load(imageIds: string[], startIndex?: number): Promise<void>
  setTool(t: ToolName): void
  reset(): void
  scroll(delta: number): void
}

/** Test hook on window (read-only; see tests/e2e). */
export interface YyViewerHook {
  readonly ready: boolean
  currentIndex(): number
  imageCount(): number
  renderedIndex(): number
  renders(): number
  zoom(): number
  windowWidth(): number | null
  error(): string
  backend(): string
}

declare global {
  interface Window {
    __yyViewer?: YyViewerHook
  }
}
