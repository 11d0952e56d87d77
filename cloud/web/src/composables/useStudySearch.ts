// Study search state: QIDO-RS /studies with paging (limit/offset).
import { ref, shallowRef } from 'vue'
import { searchStudies, type DicomJson, type StudyQuery } from '../api/dicomweb'

const PAGE = 50

export function useStudySearch() {
  const studies = shallowRef<DicomJson[]>([])
  const loading = ref(false)
  const error = ref('')
  const hasMore = ref(false)
  let query: StudyQuery = {}
  let ctrl: AbortController | null = null

  async function run(append: boolean): Promise<void> {
    ctrl?.abort()
    const c = new AbortController()
    ctrl = c
    loading.value = true
    error.value = ''
    const offset = append ? studies.value.length : 0
    try {
      const page = await searchStudies({ ...query, limit: PAGE, offset }, c.signal)
      if (c.signal.aborted) return
      studies.value = append ? [...studies.value, ...page] : page
      hasMore.value = page.length >= PAGE
    } catch (e) {
      if (c.signal.aborted) return
      error.value = e instanceof Error ? e.message : String(e)
      if (!append) studies.value = []
      hasMore.value = false
    } finally {
      if (ctrl === c) loading.value = false
    }
  }

  return {
    studies,
    loading,
    error,
    hasMore,
    search: (q: StudyQuery) => {
      query = { ...q }
      return run(false)
    },
    more: () => run(true),
  }
}
