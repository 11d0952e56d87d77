// Build stub for vtk.js's surface-mesh readers (PLY, STL, OBJ, VTP/XML),
// which Cornerstone's Mesh cache class imports. A 2D stack viewer never loads
// meshes; the real readers bring ~180 KB gzip of XML/YAML libraries
// (xmlbuilder2, js-yaml, @oozcitak/*). Aliased in vite.config.ts.
function unavailable(): never {
  throw new Error('surface meshes are not supported by this viewer build')
}

export default { newInstance: unavailable, extend: unavailable }
