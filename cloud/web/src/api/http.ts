// Thin fetch wrapper for the cloud's same-origin APIs. The session is the
// HttpOnly yy_session cookie, so every request goes with credentials.

export class ApiError extends Error {
  readonly status: number
  readonly code: string

  constructor(status: number, code: string, message: string) {
    super(message)
    this.name = 'ApiError'
    this.status = status
    this.code = code
  }
}

type UnauthorizedHandler = () => void
let onUnauthorized: UnauthorizedHandler | null = null

/** Called on any 401 except from the login call itself (session expired). */
export function setUnauthorizedHandler(fn: UnauthorizedHandler | null): void {
  onUnauthorized = fn
}

export interface RequestOptions {
  method?: string
  body?: unknown
  accept?: string
  signal?: AbortSignal
  /** Do not run the global 401 handler (login, session probe). */
  quiet401?: boolean
}

async function errorFrom(res: Response): Promise<ApiError> {
  let code = `http_${res.status}`
  let message = res.statusText || code
  try {
    const j = (await res.json()) as { error?: string; message?: string }
    if (j.error) code = j.error
    if (j.message) message = j.message
  } catch {
    /* not JSON: keep the status text */
  }
  return new ApiError(res.status, code, message)
}

export async function request(url: string, opts: RequestOptions = {}): Promise<Response> {
  const headers: Record<string, string> = { Accept: opts.accept ?? 'application/json' }
  let body: BodyInit | undefined
  if (opts.body !== undefined) {
    headers['Content-Type'] = 'application/json'
    body = JSON.stringify(opts.body)
  }
  const res = await fetch(url, {
    method: opts.method ?? 'GET',
    headers,
    body,
    credentials: 'same-origin',
    signal: opts.signal,
  })
  if (!res.ok) {
    if (res.status === 401 && !opts.quiet401 && onUnauthorized) onUnauthorized()
    throw await errorFrom(res)
  }
  return res
}

export async function requestJson<T>(url: string, opts: RequestOptions = {}): Promise<T> {
  const res = await request(url, opts)
  if (res.status === 204) return undefined as T
  const text = await res.text()
  return (text ? JSON.parse(text) : undefined) as T
}
