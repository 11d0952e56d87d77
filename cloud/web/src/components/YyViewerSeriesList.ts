import type { DicomJson } from '../api/dicomweb'

export interface YyViewerSeriesListProps {
  series: DicomJson[]
  selected: string
}

export interface YyViewerSeriesListEmits {
  (e: 'select', seriesUID: string): void
}
