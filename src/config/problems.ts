// The problems found in a config and its rule files, and the "did you mean" suggestion their
// messages carry.

import { ConfigError, type ConfigProblem } from './types.ts';

/** Problems in discovery order, without duplicates. */
export class ProblemList {
  private readonly problems: ConfigProblem[] = [];
  private readonly seen = new Set<string>();
  private readonly pointersByFile = new Map<string, Set<string>>();

  get size(): number {
    return this.problems.length;
  }

  add(file: string, pointer: string, message: string): void {
    const key = `${file}\u0000${pointer}\u0000${message}`;
    if (this.seen.has(key)) return;
    this.seen.add(key);
    this.problems.push({ file, pointer, message });
    const pointers = this.pointersByFile.get(file) ?? new Set<string>();
    pointers.add(pointer);
    this.pointersByFile.set(file, pointers);
  }

  /** The problems so far, in discovery order. */
  list(): readonly ConfigProblem[] {
    return [...this.problems];
  }

  addAll(problems: readonly ConfigProblem[]): void {
    for (const p of problems) this.add(p.file, p.pointer, p.message);
  }

  /** Whether a problem was already reported at this pointer (to avoid a second one about the same value). */
  hasAt(file: string, pointer: string): boolean {
    return this.pointersByFile.get(file)?.has(pointer) ?? false;
  }

  /** Whether a problem was already reported at this pointer or inside the value it points to. */
  hasAtOrUnder(file: string, pointer: string): boolean {
    for (const p of this.pointersByFile.get(file) ?? []) if (p === pointer || p.startsWith(`${pointer}/`)) return true;
    return false;
  }

  /** The error, grouped by file (in the given order, then by first appearance), discovery order within a file. */
  toError(preferredFileOrder: readonly string[] = []): ConfigError {
    const fileOrder = [...new Set([...preferredFileOrder.filter((f) => this.pointersByFile.has(f)), ...this.pointersByFile.keys()])];
    const sorted = this.problems
      .map((p, i) => ({ p, i }))
      .sort((a, b) => fileOrder.indexOf(a.p.file) - fileOrder.indexOf(b.p.file) || a.i - b.i)
      .map(({ p }) => p);
    return new ConfigError(sorted);
  }
}

/** The known name closest to a misspelt one, when close enough to be a typo. */
export function closestName(name: string, candidates: readonly string[]): string | undefined {
  let best: string | undefined;
  let bestDistance = Infinity;
  for (const candidate of candidates) {
    const distance = editDistance(name.toLowerCase(), candidate.toLowerCase());
    if (distance < bestDistance) {
      best = candidate;
      bestDistance = distance;
    }
  }
  return best !== undefined && bestDistance <= Math.max(1, Math.floor(best.length / 3)) ? best : undefined;
}

/** Damerau-Levenshtein distance (optimal string alignment), so "trasnfer" is one edit from "transfer". */
function editDistance(a: string, b: string): number {
  const d: number[][] = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)]);
  for (let j = 1; j <= b.length; j++) d[0]![j] = j;
  for (let i = 1; i <= a.length; i++) {
    for (let j = 1; j <= b.length; j++) {
      const cost = a[i - 1] === b[j - 1] ? 0 : 1;
      let value = Math.min(d[i - 1]![j]! + 1, d[i]![j - 1]! + 1, d[i - 1]![j - 1]! + cost);
      if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) value = Math.min(value, d[i - 2]![j - 2]! + 1);
      d[i]![j] = value;
    }
  }
  return d[a.length]![b.length]!;
}
