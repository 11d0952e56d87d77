// The first image of a study opened by URL, drawn while the viewer chunk
// (Cornerstone3D, most of the app's JavaScript) is still arriving and being
// compiled: on a phone over 4G that is most of a second. The picture is the
// original: the instance's own bytes (api/prefetch.ts), JPEG-LS decoded
// losslessly with the same CharLS build the viewer's decode worker uses,
// Modality LUT (rescale) and the instance's first VOI window applied, drawn
// to fit. It is replaced by the viewer as soon as the viewer is ready; it
// has no tools. Anything it cannot show exactly (colour, multi-frame, other
// compressed syntaxes, huge images) it does not show at all.
//
// This module is its own chunk (dicom-parser + CharLS), loaded in parallel
// with the viewer chunk, so the entry chunk stays small.
import dicomParser from 'dicom-parser'
import charlsFactory from '@cornerstonejs/codec-charls/decodewasmjs'

const charlsWasm = new URL('@cornerstonejs/codec-charls/decodewasm', import.meta.url)

const NATIVE = new Set(['1.2.840.10008.1.2', '1.2.840.10008.1.2.1'])
const JPEG_LS = new Set(['1.2.840.10008.1.2.4.80', '1.2.840.10008.1.2.4.81'])
const MAX_PIXELS = 4096 * 4096

/** A grey-scale image, windowed to 8 bits: what the preview draws. */
export interface PreviewImage {
  width: number
  height: number
  /** width * height display values, 0..255. */
  grey: Uint8ClampedArray
}

interface CharLS {
  JpegLSDecoder: new () => {
    getEncodedBuffer(n: number): Uint8Array
    decode(): void
    getFrameInfo(): { width: number; height: number; bitsPerSample: number; componentCount: number }
    getDecodedBuffer(): Uint8Array
    delete(): void
  }
}

let charls: Promise<CharLS> | null = null

function loadCharls(): Promise<CharLS> {
  charls ??= (charlsFactory as unknown as (o: object) => Promise<CharLS>)({
    locateFile: (f: string) => (f.endsWith('.wasm') ? charlsWasm.toString() : f),
  })
  return charls
}

/** Fetches and compiles the decoder ahead of the image. */
export function warmUp(): void {
  void loadCharls().catch(() => {
    charls = null
  })
}

function firstNumber(ds: dicomParser.DataSet, tag: string): number | undefined {
  const v = ds.string(tag)
  if (v === undefined) return undefined
  const n = Number(v.split('\\')[0])
  return Number.isFinite(n) ? n : undefined
}

/** Stored values of the single frame, or null when the preview cannot show it exactly. */
async function storedValues(ds: dicomParser.DataSet, bytes: Uint8Array): Promise<ArrayLike<number> | null> {
  const ts = (ds.string('x00020010') ?? '').replace(/\0/g, '').trim()
  const rows = ds.uint16('x00280010') ?? 0
  const cols = ds.uint16('x00280011') ?? 0
  const bits = ds.uint16('x00280100') ?? 0
  const signed = ds.uint16('x00280103') === 1
  const el = ds.elements.x7fe00010
  if (!el || rows * cols === 0 || rows * cols > MAX_PIXELS || (bits !== 8 && bits !== 16)) return null
  const n = rows * cols
  let raw: Uint8Array
  if (NATIVE.has(ts)) {
    if (el.length < n * (bits / 8)) return null
    raw = bytes.subarray(el.dataOffset, el.dataOffset + n * (bits / 8))
  } else if (JPEG_LS.has(ts) && el.encapsulatedPixelData && el.fragments?.length) {
    const frame = dicomParser.readEncapsulatedPixelDataFromFragments(ds, el, 0, el.fragments.length)
    const codec = await loadCharls()
    const dec = new codec.JpegLSDecoder()
    try {
      dec.getEncodedBuffer(frame.length).set(frame)
      dec.decode()
      const info = dec.getFrameInfo()
      if (info.width !== cols || info.height !== rows || info.componentCount !== 1) return null
      raw = dec.getDecodedBuffer().slice() // out of the WASM heap before delete()
      if (raw.length < n * (bits / 8)) return null
    } finally {
      dec.delete()
    }
  } else {
    return null
  }
  // Stored values, little endian; copy so the typed view is aligned.
  const buf = raw.slice().buffer
  if (bits === 8) return signed ? new Int8Array(buf, 0, n) : new Uint8Array(buf, 0, n)
  return signed ? new Int16Array(buf, 0, n) : new Uint16Array(buf, 0, n)
}

/** Decodes and windows one single-frame grey-scale instance; null if it cannot be shown exactly. */
export async function previewImage(part10: ArrayBuffer): Promise<PreviewImage | null> {
  const bytes = new Uint8Array(part10)
  const ds = dicomParser.parseDicom(bytes)
  const photometric = (ds.string('x00280004') ?? '').trim()
  if ((ds.uint16('x00280002') ?? 1) !== 1 || (photometric !== 'MONOCHROME1' && photometric !== 'MONOCHROME2')) return null
  if ((firstNumber(ds, 'x00280008') ?? 1) !== 1) return null
  const stored = await storedValues(ds, bytes)
  if (!stored) return null
  const slope = firstNumber(ds, 'x00281053') ?? 1
  const intercept = firstNumber(ds, 'x00281052') ?? 0
  let center = firstNumber(ds, 'x00281050')
  let width = firstNumber(ds, 'x00281051')
  if (center === undefined || width === undefined || width < 1) {
    let lo = Infinity
    let hi = -Infinity
    for (let i = 0; i < stored.length; i++) {
      const v = stored[i]
      if (v < lo) lo = v
      if (v > hi) hi = v
    }
    lo = lo * slope + intercept
    hi = hi * slope + intercept
    center = (lo + hi) / 2
    width = Math.max(1, hi - lo)
  }
  // PS3.3 C.11.2.1.2.1, linear VOI function.
  const grey = new Uint8ClampedArray(stored.length)
  const c = center - 0.5
  const w = width - 1
  const invert = photometric === 'MONOCHROME1'
  for (let i = 0; i < stored.length; i++) {
    const x = stored[i] * slope + intercept
    let y = x <= c - w / 2 ? 0 : x > c + w / 2 ? 255 : ((x - c) / w + 0.5) * 255
    if (invert) y = 255 - y
    grey[i] = y
  }
  return { width: ds.uint16('x00280011') ?? 0, height: ds.uint16('x00280010') ?? 0, grey }
}

/** Draws img into canvas, fitted and centred on black, at the device's pixel ratio. */
export function drawPreview(canvas: HTMLCanvasElement, img: PreviewImage): void {
  const dpr = window.devicePixelRatio || 1
  const cw = Math.max(1, Math.round(canvas.clientWidth * dpr))
  const ch = Math.max(1, Math.round(canvas.clientHeight * dpr))
  canvas.width = cw
  canvas.height = ch
  const src = document.createElement('canvas')
  src.width = img.width
  src.height = img.height
  const sctx = src.getContext('2d')
  const ctx = canvas.getContext('2d')
  if (!sctx || !ctx) return
  const rgba = new ImageData(img.width, img.height)
  for (let i = 0, j = 0; i < img.grey.length; i++, j += 4) {
    const g = img.grey[i]
    rgba.data[j] = rgba.data[j + 1] = rgba.data[j + 2] = g
    rgba.data[j + 3] = 255
  }
  sctx.putImageData(rgba, 0, 0)
  const scale = Math.min(cw / img.width, ch / img.height)
  const dw = img.width * scale
  const dh = img.height * scale
  ctx.fillStyle = '#000'
  ctx.fillRect(0, 0, cw, ch)
  ctx.imageSmoothingEnabled = true
  ctx.drawImage(src, (cw - dw) / 2, (ch - dh) / 2, dw, dh)
}
