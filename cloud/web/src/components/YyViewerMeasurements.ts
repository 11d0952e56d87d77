import type { Readout } from './YyViewerViewport'

export interface YyViewerMeasurementsProps {
  readouts: Readout[]
  /** '' (saved), 'saving', 'error: ...' */
  saveState: string
}

export interface YyViewerMeasurementsEmits {
  (e: 'remove', uid: string): void
  (e: 'clear'): void
}
