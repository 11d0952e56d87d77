// The signed-in user, shared by the router guard and the header.
import { ref } from 'vue'
import * as auth from '../api/auth'
import type { User } from '../api/auth'

const user = ref<User | null>(null)
let probed = false

async function probe(): Promise<User | null> {
  if (!probed) {
    try {
      user.value = await auth.me()
    } catch {
      user.value = null
    }
    probed = true
  }
  return user.value
}

async function login(username: string, password: string): Promise<User> {
  const u = await auth.login(username, password)
  user.value = u
  probed = true
  return u
}

async function logout(): Promise<void> {
  try {
    await auth.logout()
  } finally {
    user.value = null
  }
}

/** Session expired server-side: forget the user so the guard asks again. */
function forget(): void {
  user.value = null
  probed = true
}

export function useSession() {
  return { user, probe, login, logout, forget }
}
