import type { SubtractionState } from './YyViewerViewport'

export interface YyViewerCineProps {
  index: number
  count: number
  playing: boolean
  fps: number
  loop: boolean
  /** Mask frames from MaskSubtractionSequence (1-based), if any. */
  maskFrames: number[]
  /** MaskSubPixelShift (column, row) from the header, or [0, 0]. */
  maskShift: [number, number]
  subtraction: SubtractionState | null
}

export interface YyViewerCineEmits {
  (e: 'play'): void
  (e: 'stop'): void
  (e: 'step', delta: number): void
  (e: 'cine', o: { fps?: number; loop?: boolean }): void
  (e: 'subtract', s: SubtractionState | null): void
}
