import type { PresetName } from './YyViewerViewport'

export interface YyViewerDisplayProps {
  windowWidth: number | null
  windowCenter: number | null
  invert: boolean
}

export interface YyViewerDisplayEmits {
  (e: 'window', width: number, level: number): void
  (e: 'preset', p: PresetName): void
  (e: 'invert', on: boolean): void
  (e: 'rotate', deg: number): void
  (e: 'flip', axis: 'h' | 'v'): void
}

export const PRESET_NAMES: PresetName[] = ['default', 'brain', 'abdomen', 'lung', 'bone', 'mediastinum']
