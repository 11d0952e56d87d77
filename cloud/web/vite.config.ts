// Vite build of the Yunying web app. The cloud serves dist/ at / with an SPA
// fallback. `npm run dev` proxies the API and DICOMweb to a running cloud
// (YY_CLOUD_URL, default http://127.0.0.1:8080).
import { defineConfig } from 'vite'
import vue from '@vitejs/plugin-vue'

declare const process: { env: Record<string, string | undefined> }

const cloud = process.env.YY_CLOUD_URL || 'http://127.0.0.1:8080'

export default defineConfig({
  plugins: [vue()],
  base: '/',
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    chunkSizeWarningLimit: 5000,
  },
  worker: {
    format: 'es',
  },
  // The DICOM image loader starts its decode worker from its own files; the
  // dev server must not pre-bundle it, but must pre-bundle its CommonJS deps
  // and codec entries, or the worker dies silently (notes/web-viewer.md).
  optimizeDeps: {
    exclude: ['@cornerstonejs/dicom-image-loader'],
    include: [
      'dicom-parser',
      '@cornerstonejs/metadata',
      '@cornerstonejs/codec-charls/decodewasmjs',
      '@cornerstonejs/codec-libjpeg-turbo-8bit/decodewasmjs',
      '@cornerstonejs/codec-openjpeg/decodewasmjs',
      '@cornerstonejs/codec-openjph/wasmjs',
    ],
  },
  server: {
    host: '127.0.0.1',
    proxy: {
      '/api': cloud,
      '/dicomweb': cloud,
      '/wado': cloud,
    },
  },
})
