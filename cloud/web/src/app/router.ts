import { createRouter, createWebHistory } from 'vue-router'
import { setUnauthorizedHandler } from '../api/http'
import { useSession } from '../composables/useSession'
import YyLogin from '../components/YyLogin.vue'
import YyStudyList from '../components/YyStudyList.vue'

export const router = createRouter({
  history: createWebHistory(),
  routes: [
    { path: '/', redirect: '/studies' },
    { path: '/login', name: 'login', component: YyLogin, meta: { public: true } },
    { path: '/studies', name: 'studies', component: YyStudyList },
    {
      path: '/viewer/:studyUID',
      name: 'viewer',
      // Cornerstone3D is large: load it only with the viewer.
      component: () => import('../components/YyViewer.vue'),
      props: true,
    },
    { path: '/:rest(.*)*', redirect: '/studies' },
  ],
})

router.beforeEach(async (to) => {
  if (to.meta.public) return true
  const user = await useSession().probe()
  if (!user) return { name: 'login', query: { redirect: to.fullPath } }
  return true
})

setUnauthorizedHandler(() => {
  useSession().forget()
  const cur = router.currentRoute.value
  if (!cur.meta.public) void router.replace({ name: 'login', query: { redirect: cur.fullPath } })
})
