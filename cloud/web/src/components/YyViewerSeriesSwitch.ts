export interface YyViewerSeriesSwitchProps {
  label: string
  position: number
  total: number
}

export interface YyViewerSeriesSwitchEmits {
  (e: 'go', delta: number): void
}
