export interface YyViewerTextPromptProps {
  open: boolean
  initial: string
}

export interface YyViewerTextPromptEmits {
  (e: 'done', text: string | null): void
}
