import { createApp } from 'vue'
import YyApp from './components/YyApp.vue'
import { router } from './app/router'
import './app/base.css'

createApp(YyApp).use(router).mount('#app')
