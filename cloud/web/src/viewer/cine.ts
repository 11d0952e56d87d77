// Cine playback with an injectable clock. The frame shown is derived from
// elapsed time (start + floor(elapsed * fps)), so a slow renderer skips
// frames instead of slowing the clip down; tests drive a manual clock.

export interface CineClock {
  now(): number
  /** Runs fn soon (next animation frame); returns a cancel function. */
  schedule(fn: () => void): () => void
}

export const realClock: CineClock = {
  now: () => performance.now(),
  schedule(fn) {
    const id = requestAnimationFrame(() => fn())
    return () => cancelAnimationFrame(id)
  },
}

/** A clock that only moves when told: advance(ms) runs what was scheduled. */
export class ManualClock implements CineClock {
  private t = 0
  private queue: Array<() => void> = []
  now(): number {
    return this.t
  }
  schedule(fn: () => void): () => void {
    this.queue.push(fn)
    return () => {
      this.queue = this.queue.filter((f) => f !== fn)
    }
  }
  /** Moves time on in steps of at most stepMs, running the due callbacks each step. */
  advance(ms: number, stepMs = 10): void {
    let left = ms
    while (left > 0) {
      const d = Math.min(stepMs, left)
      this.t += d
      left -= d
      const q = this.queue
      this.queue = []
      for (const f of q) f()
    }
  }
}

export interface CineOptions {
  fps: number
  loop: boolean
}

/** Frame index after `elapsedMs` from `start` in a clip of `count` frames; null when a non-looping clip has ended. */
export function cineFrameAt(start: number, count: number, elapsedMs: number, o: CineOptions): number | null {
  if (count <= 0) return null
  const steps = Math.floor((elapsedMs * o.fps) / 1000 + 1e-9)
  const i = start + steps
  if (o.loop) return ((i % count) + count) % count
  return i >= count ? null : i
}

export class Cine {
  private clock: CineClock = realClock
  private cancel: (() => void) | null = null
  private t0 = 0
  private start = 0
  private last = -1
  private count = 0
  /** Clip position in frames since play() (time-based: the set rate, whatever the renderer keeps up with). */
  advanced = 0
  /** Frames actually handed to the viewport since play() (fewer when rendering lags). */
  shown = 0
  opts: CineOptions = { fps: 10, loop: true }

  constructor(private readonly show: (index: number) => void, private readonly onStop: () => void) {}

  get playing(): boolean {
    return this.cancel !== null
  }

  setClock(c: CineClock): void {
    const was = this.playing
    this.stop(false)
    this.clock = c
    if (was) this.play(this.last, this.count)
  }

  play(start: number, count: number): void {
    this.stop(false)
    this.start = Math.max(0, start)
    this.last = this.start
    this.count = count
    this.advanced = 0
    this.shown = 0
    this.base = 0
    this.t0 = this.clock.now()
    this.cancel = this.clock.schedule(this.tick)
  }

  stop(notify = true): void {
    if (this.cancel) {
      this.cancel()
      this.cancel = null
      if (notify) this.onStop()
    }
  }

  /** Changing the rate while playing restarts the clock from the current frame. */
  setOptions(o: Partial<CineOptions>): void {
    this.opts = { ...this.opts, ...o, fps: Math.min(60, Math.max(0.5, o.fps ?? this.opts.fps)) }
    if (this.playing) {
      const adv = this.advanced
      this.play(this.last, this.count)
      this.base = adv
      this.advanced = adv
    }
  }

  private base = 0
  /** Clock time from play() to the last tick, ms. */
  elapsed = 0

  private readonly tick = (): void => {
    const elapsed = this.clock.now() - this.t0
    this.elapsed = elapsed
    const i = cineFrameAt(this.start, this.count, elapsed, this.opts)
    if (i === null) {
      this.advanced = this.base + this.count - 1 - this.start
      this.cancel = null
      this.onStop()
      return
    }
    this.advanced = this.base + Math.floor((elapsed * this.opts.fps) / 1000 + 1e-9)
    if (i !== this.last) {
      this.last = i
      this.shown++
      this.show(i)
    }
    this.cancel = this.clock.schedule(this.tick)
  }
}
