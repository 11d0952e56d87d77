// Opening a study straight by its URL (a shared link, a reload, a phone
// tapping a message): the viewer chunk (Cornerstone3D) is most of the app's
// JavaScript, so start the study's queries and the bytes of its first image
// while that chunk is still on the wire, instead of after it has run.
//
// Each prefetched result is handed out once (take*): the viewer consumes
// it when it opens the study; anything later asks the server again. A failed
// prefetch (no session, a network error) hands out nothing, and the viewer
// runs its normal path, which reports the error.
import { getStudy, listInstances, listSeries, str, Tag, wadoUriUrl } from './dicomweb'
import type { DicomJson, InstanceRef } from './dicomweb'

interface Prefetched {
  studyUID: string
  studyTaken: boolean
  instancesTaken: boolean
  study: Promise<DicomJson | null>
  series: Promise<DicomJson[]>
  /** Instances of the first series (by SeriesNumber), keyed by its UID. */
  instances: Promise<{ seriesUID: string; list: InstanceRef[] }>
  /** Original DICOM bytes of the first image of that series, keyed by its WADO-URI URL. */
  image: Promise<{ url: string; bytes: ArrayBuffer }>
}

let pending: Prefetched | null = null

function quiet<T>(p: Promise<T>): Promise<T> {
  p.catch(() => {}) // consumers see the rejection; nobody must see it unhandled
  return p
}

/**
 * Starts the prefetch of a study opened by URL. Idempotent per study.
 * Resolves when the first image's bytes are here (or there are none).
 */
export function prefetchStudy(studyUID: string): Promise<unknown> {
  if (pending?.studyUID === studyUID && !pending.studyTaken) return pending.image
  const study = quiet(getStudy(studyUID))
  const series = quiet(listSeries(studyUID))
  const instances = quiet(
    series.then(async (se) => {
      const first = se[0]
      if (!first) throw new Error('no series')
      const seriesUID = str(first, Tag.SeriesInstanceUID)
      return { seriesUID, list: await listInstances(studyUID, seriesUID) }
    }),
  )
  // The preview's decoder (viewer/preview.ts) loads while the queries run.
  void import('../viewer/preview').then((m) => m.warmUp()).catch(() => {})
  const image = quiet(
    instances.then(async ({ seriesUID, list }) => {
      const first = list[0]
      if (!first || first.frames > 1) throw new Error('no single-frame first image')
      const url = wadoUriUrl(studyUID, seriesUID, first.sopUID)
      const res = await fetch(url, { credentials: 'same-origin', priority: 'high' })
      if (!res.ok) throw new Error(`HTTP ${res.status}`)
      return { url, bytes: await res.arrayBuffer() }
    }),
  )
  pending = { studyUID, studyTaken: false, instancesTaken: false, study, series, instances, image }
  return image
}

/** The study's QIDO results if prefetched (once), else undefined. */
export function takeStudy(studyUID: string): [Promise<DicomJson | null>, Promise<DicomJson[]>] | undefined {
  if (!pending || pending.studyUID !== studyUID || pending.studyTaken) return undefined
  pending.studyTaken = true
  return [pending.study, pending.series]
}

/** The instance list of seriesUID if it was the prefetched one (once). */
export function takeInstances(studyUID: string, seriesUID: string): Promise<InstanceRef[]> | undefined {
  if (!pending || pending.studyUID !== studyUID || pending.instancesTaken) return undefined
  pending.instancesTaken = true
  return pending.instances.then(
    (r) => (r.seriesUID === seriesUID ? r.list : listInstances(studyUID, seriesUID)),
    () => listInstances(studyUID, seriesUID),
  )
}

/** The first image's bytes if url is the prefetched one; null when there is none or it failed. */
export async function takeImage(url: string): Promise<ArrayBuffer | null> {
  if (!pending) return null
  const p = pending.image
  try {
    const r = await p
    if (r.url !== url) return null
    pending = null // everything is handed out
    return r.bytes
  } catch {
    return null
  }
}

/** The first image's bytes of studyUID's prefetch without handing them out (the preview), or null. */
export async function peekImage(studyUID: string): Promise<ArrayBuffer | null> {
  if (!pending || pending.studyUID !== studyUID) return null
  try {
    return (await pending.image).bytes
  } catch {
    return null
  }
}

/** Drops a prefetch nobody consumed (the user navigated elsewhere). */
export function dropPrefetch(): void {
  pending = null
}
