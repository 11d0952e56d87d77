import { ANNOTATE_TOOLS, MEASURE_TOOLS, NAV_TOOLS } from '../viewer/stackViewer'
import type { ToolName } from './YyViewerViewport'

export interface YyViewerToolbarProps {
  tool: ToolName
  index: number
  count: number
  /** Phone layout: tools live in the drawer; the bar keeps the essentials. */
  compact?: boolean
}

export interface YyViewerToolbarEmits {
  (e: 'update:tool', t: ToolName): void
  (e: 'reset'): void
  (e: 'actual-size'): void
  (e: 'step', delta: number): void
  (e: 'drawer'): void
}

export interface YyViewerToolbarToolsProps {
  tool: ToolName
}

export interface YyViewerToolbarToolsEmits {
  (e: 'update:tool', t: ToolName): void
}

export const TOOL_GROUPS: { key: 'nav' | 'measure' | 'annotate'; tools: ToolName[] }[] = [
  { key: 'nav', tools: NAV_TOOLS },
  { key: 'measure', tools: MEASURE_TOOLS },
  { key: 'annotate', tools: ANNOTATE_TOOLS },
]

export const TOOLS: ToolName[] = TOOL_GROUPS.flatMap((g) => g.tools)
