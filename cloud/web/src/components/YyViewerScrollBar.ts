export interface YyViewerScrollBarProps {
  index: number
  count: number
  /** Images loaded so far (drawn as the track's fill). */
  loaded: number
}

export interface YyViewerScrollBarEmits {
  (e: 'index', i: number): void
}
