import type { ToolName } from './YyViewerViewport'

export interface YyViewerToolbarProps {
  tool: ToolName
  index: number
  count: number
}

export interface YyViewerToolbarEmits {
  (e: 'update:tool', t: ToolName): void
  (e: 'reset'): void
  (e: 'step', delta: number): void
}

export const TOOLS: ToolName[] = ['wl', 'pan', 'zoom', 'scroll']
