// Build replacement for @cornerstonejs/core 5.14.0's
// RenderingEngine/vtkClasses/vtkStreamingOpenGLViewNodeFactory.js (loaded in
// place of the original by vite.config.ts, so relative imports resolve from
// its directory). Identical except that it creates WebGL view nodes only for
// what a stack viewport draws (image slice, image mapper, camera, renderer,
// texture, actors, poly data); the volume, reslice, CPR, glyph, sphere,
// stick and skybox mappers are left out of the bundle. A scene object of a
// left-out class gets no view node (it is not drawn).
import macro from '@kitware/vtk.js/macros.js';
import vtkOpenGLActor from '@kitware/vtk.js/Rendering/OpenGL/Actor.js';
import vtkOpenGLActor2D from '@kitware/vtk.js/Rendering/OpenGL/Actor2D.js';
import vtkOpenGLCamera from '@kitware/vtk.js/Rendering/OpenGL/Camera.js';
import vtkOpenGLImageMapper from '@kitware/vtk.js/Rendering/OpenGL/ImageMapper.js';
import vtkOpenGLImageSlice from '@kitware/vtk.js/Rendering/OpenGL/ImageSlice.js';
import vtkOpenGLPixelSpaceCallbackMapper from '@kitware/vtk.js/Rendering/OpenGL/PixelSpaceCallbackMapper.js';
import vtkOpenGLPolyDataMapper from '@kitware/vtk.js/Rendering/OpenGL/PolyDataMapper.js';
import vtkOpenGLRenderer from '@kitware/vtk.js/Rendering/OpenGL/Renderer.js';
import vtkOpenGLTexture from '@kitware/vtk.js/Rendering/OpenGL/Texture.js';
import vtkViewNodeFactory from '@kitware/vtk.js/Rendering/SceneGraph/ViewNodeFactory.js';
const CLASS_MAPPING = Object.create(null);
export function registerOverride(className, fn) {
    CLASS_MAPPING[className] = fn;
}
function vtkStreamingOpenGLViewNodeFactory(publicAPI, model) {
    model.classHierarchy.push('vtkStreamingOpenGLViewNodeFactory');
    publicAPI.createNode = (dataObject) => {
        if (dataObject.isDeleted()) {
            return null;
        }
        let cpt = 0;
        let className = dataObject.getClassName(cpt++);
        let isObject = false;
        const keys = Object.keys(model.overrides);
        while (className && !isObject) {
            if (keys.includes(className)) {
                isObject = true;
            }
            else {
                className = dataObject.getClassName(cpt++);
            }
        }
        if (!isObject) {
            return null;
        }
        const initialValues = model.getModelInitialValues(dataObject);
        const vn = model.overrides[className](initialValues);
        vn.setMyFactory(publicAPI);
        return vn;
    };
    model.overrides = CLASS_MAPPING;
    // Only the shared volume/reslice mappers (left out) needed initial values.
    model.getModelInitialValues = () => ({});
}
const DEFAULT_VALUES = {};
export function extend(publicAPI, model, initialValues = {}) {
    Object.assign(model, DEFAULT_VALUES, initialValues);
    vtkViewNodeFactory.extend(publicAPI, model, initialValues);
    vtkStreamingOpenGLViewNodeFactory(publicAPI, model);
    registerOverride('vtkActor', vtkOpenGLActor.newInstance);
    registerOverride('vtkActor2D', vtkOpenGLActor2D.newInstance);
    registerOverride('vtkCamera', vtkOpenGLCamera.newInstance);
    registerOverride('vtkImageMapper', vtkOpenGLImageMapper.newInstance);
    registerOverride('vtkImageSlice', vtkOpenGLImageSlice.newInstance);
    registerOverride('vtkMapper', vtkOpenGLPolyDataMapper.newInstance);
    registerOverride('vtkPixelSpaceCallbackMapper', vtkOpenGLPixelSpaceCallbackMapper.newInstance);
    registerOverride('vtkRenderer', vtkOpenGLRenderer.newInstance);
    registerOverride('vtkTexture', vtkOpenGLTexture.newInstance);
}
export const newInstance = macro.newInstance(extend, 'vtkStreamingOpenGLViewNodeFactory');
export default { newInstance, extend };
