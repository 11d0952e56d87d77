// Per-user, per-study annotations on the cloud:
//   GET/PUT/DELETE /api/v1/studies/{studyUID}/annotations
// Body: {"v":1,"annotations":[...]} (opaque to the server, size-capped).
import { requestJson } from './http'

export interface AnnotationDoc {
  v: 1
  annotations: Record<string, unknown>[]
}

const path = (studyUID: string) => `/api/v1/studies/${encodeURIComponent(studyUID)}/annotations`

export async function getAnnotations(studyUID: string, signal?: AbortSignal): Promise<AnnotationDoc> {
  const d = await requestJson<AnnotationDoc | undefined>(path(studyUID), { signal })
  return d && Array.isArray(d.annotations) ? d : { v: 1, annotations: [] }
}

export async function putAnnotations(studyUID: string, annotations: Record<string, unknown>[]): Promise<void> {
  await requestJson<unknown>(path(studyUID), { method: 'PUT', body: { v: 1, annotations } })
}

export async function deleteAnnotations(studyUID: string): Promise<void> {
  await requestJson<unknown>(path(studyUID), { method: 'DELETE' })
}
