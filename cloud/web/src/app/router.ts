import { createRouter, createWebHistory } from 'vue-router'
import { setUnauthorizedHandler } from '../api/http'
import { prefetchStudy } from '../api/prefetch'
import { useSession } from '../composables/useSession'
import YyLogin from '../components/YyLogin.vue'
import YyStudyList from '../components/YyStudyList.vue'
import YyViewerShell from '../components/YyViewerShell.vue'
import { holdViewerChunk, loadViewer } from './viewerChunk'

// Opened straight on a viewer URL (a shared link, a reload): the study's
// queries and first image start now (api/prefetch.ts), in parallel with the
// session probe, and the viewer chunk right after that image.
const opened = /^\/(?:studies\/([^/]+)\/viewer|viewer\/([^/]+))/.exec(window.location.pathname)
if (opened) {
  holdViewerChunk(prefetchStudy(decodeURIComponent(opened[1] ?? opened[2])))
  void loadViewer().catch(() => {})
}

export const router = createRouter({
  history: createWebHistory(),
  routes: [
    { path: '/', redirect: '/studies' },
    { path: '/login', name: 'login', component: YyLogin, meta: { public: true } },
    { path: '/studies', name: 'studies', component: YyStudyList },
    // The study UID is not the last path segment: UIDs contain dots, and the
    // cloud's SPA fallback serves index.html only for paths whose last
    // segment has no extension (a reload of /viewer/1.2.3 would be a 404).
    { path: '/viewer/:studyUID', redirect: (to) => `/studies/${String(to.params.studyUID)}/viewer` },
    {
      path: '/studies/:studyUID/viewer',
      name: 'viewer',
      component: YyViewerShell,
      props: true,
    },
    { path: '/:rest(.*)*', redirect: '/studies' },
  ],
})

router.beforeEach(async (to) => {
  if (to.meta.public) return true
  // Opening a study from the list: its queries and first image start now,
  // in parallel with the session check and the viewer chunk.
  if (to.name === 'viewer') {
    holdViewerChunk(prefetchStudy(String(to.params.studyUID)))
    void loadViewer().catch(() => {})
  }
  const user = await useSession().probe()
  if (!user) return { name: 'login', query: { redirect: to.fullPath } }
  return true
})

setUnauthorizedHandler(() => {
  useSession().forget()
  const cur = router.currentRoute.value
  if (!cur.meta.public) void router.replace({ name: 'login', query: { redirect: cur.fullPath } })
})
