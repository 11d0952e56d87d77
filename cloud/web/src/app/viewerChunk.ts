// The viewer chunk (Cornerstone3D is large): loaded only with the viewer,
// once; the router starts it early when the app opens on a viewer URL.
import type { Component } from 'vue'

let chunk: Promise<Component> | null = null

export function loadViewer(): Promise<Component> {
  chunk ??= import('../components/YyViewer.vue').then((m) => m.default as Component)
  chunk.catch(() => {
    chunk = null // a later navigation tries again
  })
  return chunk
}
