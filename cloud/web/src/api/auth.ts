// Cloud web API: login, logout, current user.
import { requestJson, request } from './http'

export interface User {
  username: string
  role: string
}

export function login(username: string, password: string): Promise<User> {
  return requestJson<User>('/api/v1/login', {
    method: 'POST',
    body: { username, password },
    quiet401: true,
  })
}

export async function logout(): Promise<void> {
  await request('/api/v1/logout', { method: 'POST', quiet401: true })
}

export function me(): Promise<User> {
  return requestJson<User>('/api/v1/me', { quiet401: true })
}
