// Vite build of the Yunying web app. The cloud serves dist/ at / with an SPA
// fallback. `npm run dev` proxies the API and DICOMweb to a running cloud
// (YY_CLOUD_URL, default http://127.0.0.1:8080).
import { defineConfig, type Plugin } from 'vite'
import { readFileSync } from 'node:fs'
import vue from '@vitejs/plugin-vue'
import { fileURLToPath } from 'node:url'

declare const process: { env: Record<string, string | undefined> }

const cloud = process.env.YY_CLOUD_URL || 'http://127.0.0.1:8080'

/*
 * Bundle trimming (issue 5, "Speed"). Packages that do not declare
 * "sideEffects": false keep every module they import, used or not: vtk.js
 * drags in its XML/YAML mesh readers (xmlbuilder2, js-yaml, @oozcitak/*),
 * WebGPU back end and 3D filters; the DICOM image loader's index drags the
 * whole decode worker (all codecs) into the main thread. These modules are
 * pure except where noted, so let the bundler drop what is unused.
 */
const PURE_PACKAGES = [
  '/@kitware/vtk.js/',
  '/@cornerstonejs/dicom-image-loader/',
  '/@cornerstonejs/codec-',
  '/@cornerstonejs/calculate-suv/',
  '/@oozcitak/',
  '/xmlbuilder2/',
  '/js-yaml/',
  '/clipper2-ts/',
  '/pako/',
  '/seedrandom/',
  '/spark-md5/',
  '/lodash.get/',
  '/fflate/',
  '/d3-',
]
// vtk.js's WebGL view nodes register themselves when imported (through the
// Rendering/Profiles/* imports Cornerstone makes). Keep the registrations a
// stack viewport draws with; the volume, reslice, CPR, glyph, skybox, axes and
// scalar-bar nodes (and the WebGPU back end, never used) may go.
const VTK_PROFILES = /\/@kitware\/vtk\.js\/Rendering\/(OpenGL\/)?Profiles\//
const VTK_STACK_NODES =
  /\/@kitware\/vtk\.js\/Rendering\/OpenGL\/(Actor|Actor2D|Camera|ImageMapper|ImageSlice|PixelSpaceCallbackMapper|PolyDataMapper|PolyDataMapper2D|RenderWindow|Renderer|Texture)\.js$/

// Surface-mesh readers (Cornerstone's Mesh class): stubbed, see the stub.
const MESH_READERS = /^@kitware\/vtk\.js\/IO\/(XML\/XMLPolyDataReader|Geometry\/PLYReader|Geometry\/STLReader|Misc\/OBJReader)(\.js)?$/
const MESH_READER_STUB = fileURLToPath(new URL('./src/viewer/stubs/vtkMeshReader.ts', import.meta.url))

// Cornerstone modules replaced by our own (see each file's header).
const CORE_ESM = '/node_modules/@cornerstonejs/core/dist/esm/'
const stub = (name: string): string => fileURLToPath(new URL(`./src/viewer/stubs/${name}`, import.meta.url))
const REPLACED: Record<string, string> = {
  [`${CORE_ESM}RenderingEngine/helpers/viewportTypeToViewportClass.js`]: stub('viewportTypeToViewportClass.js'),
  [`${CORE_ESM}RenderingEngine/vtkClasses/vtkStreamingOpenGLViewNodeFactory.js`]: stub('vtkStreamingOpenGLViewNodeFactory.js'),
}
// vtk.js's colour-map presets (140 KB of JSON): keep the few a grey-scale
// viewer could offer. Cornerstone looks presets up by name only when a
// colour map is set.
const VTK_COLORMAPS = '/node_modules/@kitware/vtk.js/Rendering/Core/ColorTransferFunction/ColorMaps.json.js'
const KEPT_COLORMAPS = new Set(['Grayscale', 'X Ray', 'Black, White and Red', 'hsv', 'jet', 'Rainbow Uniform', 'Cool to Warm'])

function trimmedColorMaps(original: string): string {
  const m = /JSON\.parse\(("(?:[^"\\]|\\.)*")\)/.exec(original)
  if (!m) throw new Error('yy-replace-modules: ColorMaps.json.js changed shape')
  const all = JSON.parse(JSON.parse(m[1]) as string) as { Name?: string }[]
  const kept = all.filter((c) => c.Name && KEPT_COLORMAPS.has(c.Name))
  return `export default JSON.parse(${JSON.stringify(JSON.stringify(kept))});\n`
}

/** Loads a replacement in place of a dependency module (same id: relative imports still resolve). */
function replaceModules(): Plugin {
  return {
    name: 'yy-replace-modules',
    apply: 'build',
    load(id) {
      const f = id.replace(/\\/g, '/')
      for (const [suffix, file] of Object.entries(REPLACED)) {
        if (f.endsWith(suffix)) return readFileSync(file, 'utf8')
      }
      if (f.endsWith(VTK_COLORMAPS)) return trimmedColorMaps(readFileSync(f, 'utf8'))
      return null
    },
  }
}

function moduleSideEffects(id: string): boolean | undefined {
  const f = id.replace(/\\/g, '/')
  if (!f.includes('/node_modules/')) return undefined
  if (VTK_PROFILES.test(f) || VTK_STACK_NODES.test(f)) return true
  if (PURE_PACKAGES.some((p) => f.includes(p))) return false
  return undefined
}

export default defineConfig({
  plugins: [vue(), replaceModules()],
  base: '/',
  resolve: {
    alias: [{ find: MESH_READERS, replacement: MESH_READER_STUB }],
  },
  build: {
    outDir: 'dist',
    emptyOutDir: true,
    target: 'es2022',
    chunkSizeWarningLimit: 5000,
    rolldownOptions: {
      treeshake: { moduleSideEffects },
    },
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
