// Which target columns a mapping writes, and from what: computed once per (mapping, source
// relation), never per row.
import type { MappingConfig } from '../config/types.ts';
import { DSO_COLUMN_NAMES } from '../sql/form-catalog.ts';
import type { FormCatalog } from './catalog.ts';

export type ColumnSource = { kind: 'column'; column: string } | { kind: 'constant'; text: string | null };

export interface PlannedColumn {
  target: string;
  /** the column's type, with its modifier */
  type: string;
  /** what text values are cast to (no modifier: the assignment checks it) */
  castType: string;
  from: ColumnSource;
}

export interface ColumnPlan {
  mapping: MappingConfig;
  target: FormCatalog;
  /** every carried column except the key and the dso_* columns */
  columns: readonly PlannedColumn[];
  /**
   * Source columns byName does not carry, and why: generated on the target (computed there, as
   * PostgreSQL's own replication does), or missing on the target. For rules check and the log.
   */
  notCarried: readonly { column: string; reason: 'generated' | 'missing' }[];
}

/** Columns a mapping names that do not exist; `pointer` is relative to the mapping. */
export class PlanError extends Error {
  constructor(
    readonly mappingName: string,
    readonly problems: readonly { pointer: string; message: string }[],
  ) {
    super(`mapping "${mappingName}": ${problems.map((p) => p.message).join('; ')}`);
  }
}

export function constantText(value: unknown): string | null {
  if (value === null || value === undefined) return null;
  if (typeof value === 'string') return value;
  if (typeof value === 'boolean') return value ? 'true' : 'false';
  if (typeof value === 'number' || typeof value === 'bigint') return String(value);
  return JSON.stringify(value);
}

/** Builds the plan; throws PlanError naming every column that does not exist. */
export function buildColumnPlan(
  mapping: MappingConfig,
  sourceColumns: readonly string[],
  sourceKey: string,
  target: FormCatalog,
): ColumnPlan {
  const problems: { pointer: string; message: string }[] = [];
  const source = new Set(sourceColumns);
  const planned = new Map<string, PlannedColumn>();
  const targetName = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
  const skip = (name: string) => DSO_COLUMN_NAMES.has(name) || name === target.keyColumn;
  const notCarried: { column: string; reason: 'generated' | 'missing' }[] = [];
  if (mapping.fields.byName) {
    const mapped = new Set(Object.values(mapping.fields.map));
    for (const name of sourceColumns) {
      if (DSO_COLUMN_NAMES.has(name) || name === sourceKey || mapping.fields.exclude.includes(name) || mapped.has(name)) continue;
      const column = target.columns.get(name);
      if (!column) notCarried.push({ column: name, reason: 'missing' });
      else if (column.generated) notCarried.push({ column: name, reason: 'generated' });
    }
    for (const column of target.columns.values()) {
      if (
        skip(column.name) ||
        column.generated ||
        !source.has(column.name) ||
        mapping.fields.exclude.includes(column.name) ||
        column.name === sourceKey
      )
        continue;
      planned.set(column.name, {
        target: column.name,
        type: column.type,
        castType: column.castType,
        from: { kind: 'column', column: column.name },
      });
    }
  }
  const generated = (pointer: string, name: string) =>
    problems.push({
      pointer,
      message: `column "${name}" is a generated column on ${targetName}: it is computed there and cannot be written`,
    });
  for (const [targetColumn, sourceColumn] of Object.entries(mapping.fields.map)) {
    const column = target.columns.get(targetColumn);
    const pointer = `/fields/map/${escapePointer(targetColumn)}`;
    if (!column) problems.push({ pointer, message: `column "${targetColumn}" does not exist on ${targetName}` });
    if (!source.has(sourceColumn))
      problems.push({
        pointer,
        message: `source column "${sourceColumn}" does not exist on ${mapping.from.server}.${mapping.from.schema}.${mapping.from.table}`,
      });
    if (column?.generated) generated(pointer, targetColumn);
    else if (column && source.has(sourceColumn) && !skip(targetColumn))
      planned.set(targetColumn, {
        target: targetColumn,
        type: column.type,
        castType: column.castType,
        from: { kind: 'column', column: sourceColumn },
      });
  }
  for (const [targetColumn, value] of Object.entries(mapping.fields.set)) {
    const column = target.columns.get(targetColumn);
    if (!column)
      problems.push({
        pointer: `/fields/set/${escapePointer(targetColumn)}`,
        message: `column "${targetColumn}" does not exist on ${targetName}`,
      });
    else if (column.generated) generated(`/fields/set/${escapePointer(targetColumn)}`, targetColumn);
    else if (!skip(targetColumn))
      planned.set(targetColumn, {
        target: targetColumn,
        type: column.type,
        castType: column.castType,
        from: { kind: 'constant', text: constantText(value) },
      });
  }
  if (problems.length) throw new PlanError(mapping.name, problems);
  return { mapping, target, columns: [...planned.values()], notCarried };
}

function escapePointer(token: string): string {
  return token.replace(/~/g, '~0').replace(/\//g, '~1');
}
