// The viewer chunk (Cornerstone3D is large): loaded only with the viewer,
// once. Opening a study, its first image is fetched first (api/prefetch.ts)
// and the chunk right after it: on a slow link the two would share the
// bandwidth and the first image (the preview) would arrive later.
import type { Component } from 'vue'

let chunk: Promise<Component> | null = null
let gate: Promise<unknown> = Promise.resolve()

/** The chunk waits for p (at most maxMs) before it is requested. */
export function holdViewerChunk(p: Promise<unknown>, maxMs = 1500): void {
  if (chunk) return
  gate = Promise.race([p.catch(() => undefined), new Promise((r) => setTimeout(r, maxMs))])
}

export function loadViewer(): Promise<Component> {
  chunk ??= gate.then(() => import('../components/YyViewer.vue')).then((m) => m.default as Component)
  chunk.catch(() => {
    chunk = null // a later navigation tries again
  })
  return chunk
}
