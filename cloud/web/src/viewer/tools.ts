// Yunying's Cornerstone3D tool classes: fixes and new measurements built on
// the stock tools. Only viewer/ imports Cornerstone.
import { cache, metaData, utilities as csUtils, type Types } from '@cornerstonejs/core'
import {
  CobbAngleTool,
  EllipticalROITool,
  PlanarFreehandROITool,
  ProbeTool,
  RectangleROITool,
  annotation as csAnnotation,
  Enums as ToolEnums,
} from '@cornerstonejs/tools'

type AnyAnnotation = {
  annotationUID?: string
  invalidated?: boolean
  metadata: { referencedImageId?: string; toolName: string }
  data: { handles: { points: Types.Point3[] }; cachedStats: Record<string, Record<string, unknown>> }
}
type EnabledLike = { viewport: { element: HTMLDivElement } }

/** The pixel value under a world point of an image (rescaled: HU for CT), or null. */
export function pixelValueAt(imageId: string, world: Types.Point3): { value: number; col: number; row: number } | null {
  const image = cache.getImage(imageId) as Types.IImage | undefined
  if (!image) return null
  let xy: number[]
  try {
    xy = csUtils.worldToImageCoords(imageId, world) as number[]
  } catch {
    return null
  }
  const col = Math.floor(xy[0])
  const row = Math.floor(xy[1])
  if (col < 0 || row < 0 || col >= image.columns || row >= image.rows) return null
  const px = image.getPixelData()
  let v = Number(px[row * image.columns + col])
  const scaled = (image as unknown as { preScale?: { scaled?: boolean } }).preScale?.scaled
  if (!scaled && (image.slope !== 1 || image.intercept !== 0)) v = v * (image.slope ?? 1) + (image.intercept ?? 0)
  return { value: v, col, row }
}

function modalityUnitOf(imageId: string): string {
  const series = metaData.get('generalSeriesModule', imageId) as { modality?: string } | undefined
  return series?.modality === 'CT' ? 'HU' : ''
}

/**
 * ProbeTool with the 5.14.0 slice bug fixed: the stock tool indexes a
 * one-image buffer by the stack position, so it shows nothing except on the
 * first slice. This one reads the value from the image the probe is on.
 */
export class YyProbeTool extends ProbeTool {
  static toolName = 'YyProbe'

  _calculateCachedStats(annotation: AnyAnnotation, _re: unknown, enabledElement: EnabledLike): unknown {
    const data = annotation.data
    const world = data.handles.points[0]
    for (const targetId of Object.keys(data.cachedStats)) {
      const imageId = targetId.startsWith('imageId:') ? targetId.slice(8) : annotation.metadata.referencedImageId
      if (!imageId) continue
      const v = pixelValueAt(imageId, world)
      data.cachedStats[targetId] = v
        ? { index: [v.col, v.row, 0], value: v.value, modalityUnit: modalityUnitOf(imageId) }
        : { value: null }
    }
    const was = annotation.invalidated
    annotation.invalidated = false
    if (was) {
      csAnnotation.state.triggerAnnotationModified(
        annotation as never,
        enabledElement.viewport.element,
        ToolEnums.ChangeTypes.StatsUpdated,
      )
    }
    return data.cachedStats
  }
}

/**
 * Two-line measurements on CobbAngleTool's drawing (drag a first line, then a
 * second). The stock tool only labels a non-zero angle, so the subclasses
 * keep a non-zero `angle` and put their own values in the read-out.
 */
class TwoLineTool extends CobbAngleTool {
  constructor(props = {}) {
    super(props)
    // A click without dragging for the second line (a point) completes it.
    const self = this as unknown as {
      editData: { newAnnotation?: boolean; handleIndex?: number; hasMoved?: boolean; annotation: AnyAnnotation } | null
      _endCallback: (evt: unknown) => void
    }
    const end = self._endCallback
    self._endCallback = (evt: unknown) => {
      const ed = self.editData
      if (ed && ed.newAnnotation && ed.handleIndex === 3 && ed.annotation.data.handles.points.length === 4) {
        ed.hasMoved = true
      }
      end(evt)
    }
  }

  _calculateCachedStats(annotation: AnyAnnotation, renderingEngine: unknown, enabledElement: unknown): unknown {
    const r = super._calculateCachedStats(annotation, renderingEngine, enabledElement)
    for (const t of Object.keys(annotation.data.cachedStats)) {
      const s = annotation.data.cachedStats[t]
      s.lineAngle = s.angle
      s.angle = 1 // keeps the text box drawn even for parallel lines
    }
    return r
  }
}

/** Reference line + point (or second line's midpoint): signed perpendicular distance. */
export class YyDeviationTool extends TwoLineTool {
  static toolName = 'YyDeviation'
}

/** Heart width line + thorax width line: cardiothoracic ratio. */
export class YyCtrTool extends TwoLineTool {
  static toolName = 'YyCTR'
}

/** Plain shapes (annotations, no statistics). */
export class YyRectShapeTool extends RectangleROITool {
  static toolName = 'YyRectShape'
}
export class YyEllipseShapeTool extends EllipticalROITool {
  static toolName = 'YyEllipseShape'
}
export class YyCurveTool extends PlanarFreehandROITool {
  static toolName = 'YyCurve'
}
export class YyRegionTool extends PlanarFreehandROITool {
  static toolName = 'YyRegion'
}
