// Window presets (width / level in HU for CT), the values documented in
// docs/viewer.md. Sources: common radiology practice (Radiopaedia "Windowing
// (CT)"): brain 80/40, abdomen soft tissue 400/50, lung 1500/-600, bone
// 1800/400, mediastinum 350/50. 'default' goes back to the image's own
// WindowCenter/WindowWidth.
export type PresetName = 'default' | 'brain' | 'abdomen' | 'lung' | 'bone' | 'mediastinum'

export interface WindowPreset {
  name: PresetName
  width: number
  level: number
}

export const PRESETS: readonly WindowPreset[] = [
  { name: 'brain', width: 80, level: 40 },
  { name: 'abdomen', width: 400, level: 50 },
  { name: 'lung', width: 1500, level: -600 },
  { name: 'bone', width: 1800, level: 400 },
  { name: 'mediastinum', width: 350, level: 50 },
]

/** Plain (non-DICOM-offset) conversion: lower = L - W/2, upper = L + W/2. */
export function voiFromWindow(width: number, level: number): { lower: number; upper: number } {
  const w = Math.max(1, width)
  return { lower: level - w / 2, upper: level + w / 2 }
}

export function windowFromVoi(v: { lower: number; upper: number }): { width: number; level: number } {
  return { width: v.upper - v.lower, level: (v.upper + v.lower) / 2 }
}
