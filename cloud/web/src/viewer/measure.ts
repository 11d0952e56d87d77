// Measurement arithmetic and read-outs, free of Cornerstone so it can be
// unit-tested. Points are world coordinates (mm when the image is
// calibrated, pixels otherwise); `cal` tells which.

export type Vec3 = [number, number, number] | number[]

export type CalibrationKind = 'pixel' | 'imager' | 'none'

export interface Calibration {
  kind: CalibrationKind
  /** [row spacing, column spacing] in mm, or [1, 1] when none. */
  spacing: [number, number]
}

/** Words used in read-outs (set from the UI language). */
export interface MeasureLabels {
  deviation: string
  right: string
  left: string
  up: string
  down: string
  ctr: string
  heart: string
  thorax: string
  mean: string
  sd: string
  min: string
  max: string
  area: string
}

let labels: MeasureLabels = {
  deviation: 'Deviation',
  right: 'image right',
  left: 'image left',
  up: 'image up',
  down: 'image down',
  ctr: 'CTR',
  heart: 'heart',
  thorax: 'thorax',
  mean: 'mean',
  sd: 'SD',
  min: 'min',
  max: 'max',
  area: 'area',
}

export function setMeasureLabels(l: Partial<MeasureLabels>): void {
  labels = { ...labels, ...l }
}

const sub = (a: Vec3, b: Vec3): number[] => [a[0] - b[0], a[1] - b[1], (a[2] ?? 0) - (b[2] ?? 0)]
const dot = (a: number[], b: number[]): number => a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
const norm = (a: number[]): number => Math.hypot(a[0], a[1], a[2])
const cross = (a: number[], b: number[]): number[] => [
  a[1] * b[2] - a[2] * b[1],
  a[2] * b[0] - a[0] * b[2],
  a[0] * b[1] - a[1] * b[0],
]

export function distance(a: Vec3, b: Vec3): number {
  return norm(sub(b, a))
}

/** Acute angle in degrees between lines p0-p1 and p2-p3 (Cobb angle). */
export function cobbAngle(p: Vec3[]): number {
  const d1 = sub(p[1], p[0])
  const d2 = sub(p[3], p[2])
  const n = norm(d1) * norm(d2)
  if (n === 0) return 0
  const c = Math.min(1, Math.abs(dot(d1, d2)) / n)
  return (Math.acos(c) * 180) / Math.PI
}

/**
 * Signed perpendicular distance of `pt` from the line a-b, in world units.
 * `right`/`down` are the image's row and column directions in world space;
 * the line is oriented top-to-bottom (mostly vertical lines) or left-to-right
 * (mostly horizontal ones) and the sign is positive towards image right for
 * vertical reference lines and towards image up for horizontal ones.
 */
export function signedDeviation(
  a: Vec3,
  b: Vec3,
  pt: Vec3,
  right: Vec3 = [1, 0, 0],
  down: Vec3 = [0, 1, 0],
): { distance: number; side: 'right' | 'left' | 'up' | 'down' } {
  const d = sub(b, a)
  const len = norm(d)
  if (len === 0) return { distance: 0, side: 'right' }
  const r = right as number[]
  const dn = down as number[]
  const vertical = Math.abs(dot(d, dn)) >= Math.abs(dot(d, r))
  const v = sub(pt, a)
  // component of v perpendicular to the line
  const along = dot(v, d) / (len * len)
  const perp = [v[0] - d[0] * along, v[1] - d[1] * along, v[2] - d[2] * along]
  const mag = norm(perp)
  if (vertical) {
    const s = dot(perp, r) >= 0 ? 1 : -1
    return { distance: s * mag, side: s > 0 ? 'right' : 'left' }
  }
  const s = dot(perp, dn) <= 0 ? 1 : -1
  return { distance: s * mag, side: s > 0 ? 'up' : 'down' }
}

/** |cross| helper kept for callers that only need the magnitude. */
export function lineDistance(a: Vec3, b: Vec3, pt: Vec3): number {
  const d = sub(b, a)
  const l = norm(d)
  return l === 0 ? distance(a, pt) : norm(cross(d, sub(pt, a))) / l
}

export function midpoint(a: Vec3, b: Vec3): number[] {
  return [(a[0] + b[0]) / 2, (a[1] + b[1]) / 2, ((a[2] ?? 0) + (b[2] ?? 0)) / 2]
}

/** Cardiothoracic ratio from the heart line p0-p1 and the thorax line p2-p3. */
export function ctr(p: Vec3[]): { heart: number; thorax: number; ratio: number } {
  const heart = distance(p[0], p[1])
  const thorax = distance(p[2], p[3])
  return { heart, thorax, ratio: thorax > 0 ? heart / thorax : 0 }
}

export const lenUnit = (cal: Calibration): string => (cal.kind === 'none' ? 'px' : 'mm')
export const areaUnit = (cal: Calibration): string => (cal.kind === 'none' ? 'px²' : 'mm²')

export function fmt(v: number | null | undefined, digits = 1): string {
  if (v === null || v === undefined || !Number.isFinite(v)) return '—'
  const s = v.toFixed(digits)
  return s === `-${(0).toFixed(digits)}` ? (0).toFixed(digits) : s
}

/** One measurement as the UI and tests see it. */
export interface Readout {
  uid: string
  tool: string
  imageId: string
  lines: string[]
  values: Record<string, number | string | null>
}

export interface StatsLike {
  length?: number
  angle?: number
  area?: number
  mean?: number
  stdDev?: number
  min?: number
  max?: number
  value?: number | number[]
  modalityUnit?: string
}

/** Builds the read-out of an annotation of `tool` (Yunying tool ids). */
export function readout(
  tool: string,
  points: Vec3[],
  stats: StatsLike | undefined,
  cal: Calibration,
  orient?: { right: Vec3; down: Vec3 },
): Pick<Readout, 'lines' | 'values'> {
  const u = lenUnit(cal)
  const au = areaUnit(cal)
  const s = stats ?? {}
  switch (tool) {
    case 'length': {
      const len = points.length >= 2 ? distance(points[0], points[1]) : null
      return { lines: [`${fmt(len)} ${u}`], values: { length: len, unit: u } }
    }
    case 'angle': {
      const a = s.angle ?? null
      return { lines: [`${fmt(a)}°`], values: { angle: a } }
    }
    case 'cobb': {
      const a = points.length >= 4 ? cobbAngle(points) : null
      return { lines: [`Cobb ${fmt(a)}°`], values: { angle: a } }
    }
    case 'probe': {
      const raw = Array.isArray(s.value) ? s.value[0] : s.value
      const v = raw ?? null
      const mu = s.modalityUnit || ''
      return { lines: [`${fmt(v, 0)} ${mu}`.trim()], values: { value: v, unit: mu } }
    }
    case 'rect':
    case 'ellipse': {
      const mu = s.modalityUnit || ''
      return {
        lines: [
          `${labels.area} ${fmt(s.area, 1)} ${au}`,
          `${labels.mean} ${fmt(s.mean)} ${labels.sd} ${fmt(s.stdDev)} ${mu}`.trim(),
          `${labels.min} ${fmt(s.min, 0)} ${labels.max} ${fmt(s.max, 0)}`,
        ],
        values: {
          area: s.area ?? null,
          mean: s.mean ?? null,
          stdDev: s.stdDev ?? null,
          min: s.min ?? null,
          max: s.max ?? null,
          unit: mu,
          areaUnit: au,
        },
      }
    }
    case 'deviation': {
      if (points.length < 4) return { lines: [], values: {} }
      const pt = midpoint(points[2], points[3])
      const d = signedDeviation(points[0], points[1], pt, orient?.right, orient?.down)
      const sign = d.distance > 0 ? '+' : ''
      return {
        lines: [`${labels.deviation} ${sign}${fmt(d.distance)} ${u} (${labels[d.side]})`],
        values: { deviation: d.distance, side: d.side, unit: u },
      }
    }
    case 'ctr': {
      if (points.length < 4) return { lines: [], values: {} }
      const c = ctr(points)
      return {
        lines: [
          `${labels.ctr} ${fmt(c.ratio, 2)}`,
          `${labels.heart} ${fmt(c.heart)} ${u} / ${labels.thorax} ${fmt(c.thorax)} ${u}`,
        ],
        values: { ratio: c.ratio, heart: c.heart, thorax: c.thorax, unit: u },
      }
    }
    default:
      return { lines: [], values: {} }
  }
}
