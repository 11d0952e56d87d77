// The few Node APIs vite.config.ts uses (the project does not install @types/node).
declare module 'node:fs' {
  export function readFileSync(path: string, encoding: 'utf8'): string
}
declare module 'node:url' {
  export function fileURLToPath(url: URL | string): string
}
