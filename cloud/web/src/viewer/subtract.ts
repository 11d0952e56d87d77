// Digital subtraction: frame minus a (pixel-shifted) mask. Pure functions.

/**
 * out[y][x] = frame[y][x] - mask[y - dy][x - dx] (mask coordinates clamped
 * to the image): a mask shift of (dx, dy) moves the mask right/down, which
 * corrects patient motion of the same amount between mask and frame.
 * Fractional shifts interpolate the mask bilinearly.
 */
export function subtractFrames(
  frame: ArrayLike<number>,
  mask: ArrayLike<number>,
  width: number,
  height: number,
  dx = 0,
  dy = 0,
): Float32Array {
  const out = new Float32Array(width * height)
  const ix = Math.floor(dx)
  const iy = Math.floor(dy)
  const fx = dx - ix
  const fy = dy - iy
  const at = (x: number, y: number): number => {
    const cx = x < 0 ? 0 : x >= width ? width - 1 : x
    const cy = y < 0 ? 0 : y >= height ? height - 1 : y
    return mask[cy * width + cx]
  }
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const sx = x - ix
      const sy = y - iy
      let m: number
      if (fx === 0 && fy === 0) m = at(sx, sy)
      else {
        // shift by (ix + fx): sample between sx - 1 and sx
        const a = at(sx, sy) * (1 - fx) + at(sx - 1, sy) * fx
        const b = at(sx, sy - 1) * (1 - fx) + at(sx - 1, sy - 1) * fx
        m = a * (1 - fy) + b * fy
      }
      out[y * width + x] = frame[y * width + x] - m
    }
  }
  return out
}

export interface MaskInfo {
  /** 1-based frame numbers to average into the mask. */
  frames: number[]
  /** 1-based [first, last] frames the mask applies to, or null. */
  range: [number, number] | null
  operation: string
  /** Sub-pixel shift (column, row) from MaskSubPixelShift, or [0, 0]. */
  shift: [number, number]
}

/** Averages several frames into one mask. */
export function averageFrames(frames: ArrayLike<number>[], length: number): Float32Array {
  const out = new Float32Array(length)
  if (!frames.length) return out
  for (const f of frames) for (let i = 0; i < length; i++) out[i] += f[i]
  for (let i = 0; i < length; i++) out[i] /= frames.length
  return out
}
