// Minimal i18n: zh-CN first, English switchable; the choice persists in
// localStorage and sets <html lang>.
import { computed, ref } from 'vue'
import { en, zhCN, type MessageKey } from '../app/messages'

export type Locale = 'zh-CN' | 'en'
const STORAGE_KEY = 'yy.locale'

function initialLocale(): Locale {
  try {
    const saved = localStorage.getItem(STORAGE_KEY)
    if (saved === 'zh-CN' || saved === 'en') return saved
  } catch {
    /* storage blocked */
  }
  return 'zh-CN'
}

const locale = ref<Locale>(initialLocale())
if (typeof document !== 'undefined') document.documentElement.lang = locale.value

function setLocale(l: Locale): void {
  locale.value = l
  document.documentElement.lang = l
  try {
    localStorage.setItem(STORAGE_KEY, l)
  } catch {
    /* storage blocked: the choice lasts for this page only */
  }
}

function t(key: MessageKey, params?: Record<string, string | number>): string {
  const table = locale.value === 'en' ? en : zhCN
  let s: string = table[key] ?? zhCN[key] ?? key
  if (params) for (const [k, v] of Object.entries(params)) s = s.split(`{${k}}`).join(String(v))
  return s
}

export function useI18n() {
  return {
    locale: computed(() => locale.value),
    t,
    setLocale,
    toggleLocale: () => setLocale(locale.value === 'zh-CN' ? 'en' : 'zh-CN'),
  }
}
