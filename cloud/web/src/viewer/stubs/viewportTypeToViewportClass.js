// Build replacement for @cornerstonejs/core 5.14.0's
// RenderingEngine/helpers/viewportTypeToViewportClass.js (aliased in
// vite.config.ts, loaded in place of the original, so the relative imports
// resolve from its directory): the same exports, but only the stack viewport is
// registered. The original registers every viewport class (volume, 3D,
// video, whole-slide, ECG and the "next" generic viewports), which keeps
// them, and the vtk.js volume mappers behind them, in the bundle although
// this 2D viewer only ever creates Enums.ViewportType.STACK.
import StackViewport from '../StackViewport.js'
import ViewportType from '../../enums/ViewportType.js'
import ViewportTypes, { registerViewportTypesConstant } from '../../enums/ViewportTypes.js'

const viewportConstructors = new Map()
const viewportTypeToViewportClass = {}
const resolvers = []
const registeredViewportTypes = new Set()
let hasRegisteredCoreViewportTypes = false

function registerCoreViewportTypes() {
  if (hasRegisteredCoreViewportTypes) return
  hasRegisteredCoreViewportTypes = true
  registerViewportType({ type: ViewportType.STACK, ViewportClass: StackViewport })
}

export function registerViewportType({ type, name, ViewportClass, resolveClass }) {
  if (viewportConstructors.has(type)) throw new Error(`Viewport type "${type}" is already registered`)
  if (name && Object.prototype.hasOwnProperty.call(ViewportTypes, name)) {
    throw new Error(`Viewport type constant "${name}" already exists`)
  }
  viewportConstructors.set(type, ViewportClass)
  viewportTypeToViewportClass[type] = ViewportClass
  registeredViewportTypes.add(type)
  if (name) registerViewportTypesConstant(name, type)
  if (resolveClass) resolvers.push(resolveClass)
}

export function isRegisteredViewportType(type) {
  registerCoreViewportTypes()
  return registeredViewportTypes.has(type)
}

export default viewportTypeToViewportClass

export function getViewportClassForInput(input) {
  registerCoreViewportTypes()
  for (const resolveClass of resolvers) {
    const resolved = resolveClass(input)
    if (resolved) return resolved
  }
  const viewportClass = viewportConstructors.get(input.type)
  if (!viewportClass) throw new Error(`Unknown viewport type: ${input.type} (this build has the stack viewport only)`)
  return viewportClass
}
