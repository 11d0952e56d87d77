import type { StudyQuery } from '../api/dicomweb'

export interface YyStudyListSearchProps {
  modelValue: StudyQuery
  busy?: boolean
}

export interface YyStudyListSearchEmits {
  (e: 'update:modelValue', v: StudyQuery): void
  (e: 'search'): void
  (e: 'clear'): void
}

export const MODALITIES = ['CT', 'MR', 'CR', 'DX', 'XA', 'RF', 'MG', 'US', 'PT', 'NM', 'SC'] as const
