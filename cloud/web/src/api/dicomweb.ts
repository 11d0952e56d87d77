// DICOMweb (QIDO-RS, WADO-URI) helpers over the cloud's /dicomweb root.
// Results are DICOM JSON (PS3.18 F.2); the accessors below read the few
// attributes the app shows.
import { requestJson } from './http'

export const DICOMWEB_ROOT = '/dicomweb'

export interface DicomJsonElement {
  vr: string
  Value?: unknown[]
}
export type DicomJson = Record<string, DicomJsonElement>

export const Tag = {
  StudyDate: '00080020',
  StudyTime: '00080030',
  AccessionNumber: '00080050',
  ModalitiesInStudy: '00080061',
  Modality: '00080060',
  StudyDescription: '00081030',
  SeriesDescription: '0008103E',
  PatientName: '00100010',
  PatientID: '00100020',
  PatientBirthDate: '00100030',
  PatientSex: '00100040',
  StudyInstanceUID: '0020000D',
  SeriesInstanceUID: '0020000E',
  SOPInstanceUID: '00080018',
  SeriesNumber: '00200011',
  InstanceNumber: '00200013',
  NumberOfFrames: '00280008',
  NumberOfStudyRelatedSeries: '00201206',
  NumberOfStudyRelatedInstances: '00201208',
  NumberOfSeriesRelatedInstances: '00201209',
} as const

export function str(ds: DicomJson, tag: string): string {
  const v = ds[tag]?.Value?.[0]
  if (v === undefined || v === null) return ''
  if (typeof v === 'object') return personName(v)
  return String(v)
}

export function strs(ds: DicomJson, tag: string): string[] {
  return (ds[tag]?.Value ?? []).map((v) => (typeof v === 'object' && v ? personName(v) : String(v)))
}

export function num(ds: DicomJson, tag: string): number | null {
  const v = ds[tag]?.Value?.[0]
  if (v === undefined || v === null || v === '') return null
  const n = typeof v === 'number' ? v : Number(v)
  return Number.isFinite(n) ? n : null
}

/** PN value: prefer the ideographic (Chinese) group, then alphabetic. */
function personName(v: object): string {
  const pn = v as { Alphabetic?: string; Ideographic?: string; Phonetic?: string }
  const raw = pn.Ideographic || pn.Alphabetic || pn.Phonetic || ''
  return raw.replace(/\^+/g, ' ').trim()
}

/** 20261128 -> 2026-11-28 (other strings unchanged). */
export function formatDate(da: string): string {
  return /^\d{8}$/.test(da) ? `${da.slice(0, 4)}-${da.slice(4, 6)}-${da.slice(6, 8)}` : da
}

export interface StudyQuery {
  patientName?: string
  patientId?: string
  /** YYYY-MM-DD from <input type="date"> */
  dateFrom?: string
  dateTo?: string
  modality?: string
  studyUID?: string
  limit?: number
  offset?: number
}

const STUDY_FIELDS = [
  Tag.StudyDescription,
  Tag.NumberOfStudyRelatedSeries,
  Tag.NumberOfStudyRelatedInstances,
  Tag.ModalitiesInStudy,
]

/** "zhang" -> "*zhang*"; user-typed wildcards are kept as they are. */
function wildcard(s: string): string {
  return /[*?]/.test(s) ? s : `*${s}*`
}

function daRange(from?: string, to?: string): string {
  const f = (from ?? '').replace(/-/g, '')
  const t = (to ?? '').replace(/-/g, '')
  if (!f && !t) return ''
  if (f && t && f === t) return f
  return `${f}-${t}`
}

export function studyQueryParams(q: StudyQuery): URLSearchParams {
  const p = new URLSearchParams()
  const name = q.patientName?.trim()
  if (name) p.set('PatientName', wildcard(name))
  const id = q.patientId?.trim()
  if (id) p.set('PatientID', id)
  const range = daRange(q.dateFrom, q.dateTo)
  if (range) p.set('StudyDate', range)
  if (q.modality) p.set('ModalitiesInStudy', q.modality)
  if (q.studyUID) p.set('StudyInstanceUID', q.studyUID)
  for (const f of STUDY_FIELDS) p.append('includefield', f)
  if (q.limit !== undefined) p.set('limit', String(q.limit))
  if (q.offset !== undefined) p.set('offset', String(q.offset))
  return p
}

async function qido(path: string, params?: URLSearchParams, signal?: AbortSignal): Promise<DicomJson[]> {
  const qs = params && [...params.keys()].length ? `?${params}` : ''
  const res = await requestJson<DicomJson[] | undefined>(`${DICOMWEB_ROOT}${path}${qs}`, {
    accept: 'application/dicom+json',
    signal,
  })
  return res ?? []
}

export function searchStudies(q: StudyQuery, signal?: AbortSignal): Promise<DicomJson[]> {
  return qido('/studies', studyQueryParams(q), signal)
}

export async function getStudy(studyUID: string, signal?: AbortSignal): Promise<DicomJson | null> {
  const r = await qido('/studies', studyQueryParams({ studyUID }), signal)
  return r[0] ?? null
}

export async function listSeries(studyUID: string, signal?: AbortSignal): Promise<DicomJson[]> {
  const p = new URLSearchParams()
  p.append('includefield', Tag.SeriesDescription)
  p.append('includefield', Tag.NumberOfSeriesRelatedInstances)
  const r = await qido(`/studies/${encodeURIComponent(studyUID)}/series`, p, signal)
  return r.sort((a, b) => (num(a, Tag.SeriesNumber) ?? 1e9) - (num(b, Tag.SeriesNumber) ?? 1e9))
}

export interface InstanceRef {
  sopUID: string
  instanceNumber: number | null
  frames: number
}

/** Instances of a series in display order (InstanceNumber, then UID). */
export async function listInstances(studyUID: string, seriesUID: string, signal?: AbortSignal): Promise<InstanceRef[]> {
  const p = new URLSearchParams()
  p.append('includefield', Tag.InstanceNumber)
  p.append('includefield', Tag.NumberOfFrames)
  const r = await qido(
    `/studies/${encodeURIComponent(studyUID)}/series/${encodeURIComponent(seriesUID)}/instances`,
    p,
    signal,
  )
  const list = r
    .map((ds) => ({
      sopUID: str(ds, Tag.SOPInstanceUID),
      instanceNumber: num(ds, Tag.InstanceNumber),
      frames: Math.max(1, num(ds, Tag.NumberOfFrames) ?? 1),
    }))
    .filter((i) => i.sopUID)
  list.sort((a, b) => {
    const d = (a.instanceNumber ?? 1e9) - (b.instanceNumber ?? 1e9)
    return d !== 0 ? d : a.sopUID < b.sopUID ? -1 : a.sopUID > b.sopUID ? 1 : 0
  })
  return list
}

/** Absolute WADO-URI URL of one original DICOM instance. */
export function wadoUriUrl(studyUID: string, seriesUID: string, sopUID: string): string {
  const p = new URLSearchParams({
    requestType: 'WADO',
    studyUID,
    seriesUID,
    objectUID: sopUID,
    contentType: 'application/dicom',
  })
  return `${window.location.origin}/wado?${p}`
}
