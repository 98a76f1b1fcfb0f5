// What the applier needs to know about a target form, read from the live catalog.
import type pg from 'pg';
import { describeForm, type FormInfo } from '../sql/form-catalog.ts';

export interface ColumnInfo {
  name: string;
  /** format_type() of the column, with its modifier (varchar(40)) */
  type: string;
  /**
   * The type without its modifier, to cast text values to: an explicit cast to varchar(40)
   * would silently truncate; the assignment to the column then checks the modifier as an
   * INSERT by a user would (value too long is an error, not a truncation). char and bit cast
   * to bpchar and varbit: without a length, `character` and `bit` mean length 1.
   */
  castType: string;
  notNull: boolean;
  hasDefault: boolean;
  /** a generated column (GENERATED ALWAYS AS ... STORED): computed by its server, never written */
  generated: boolean;
}

export interface FormCatalog extends FormInfo {
  columns: ReadonlyMap<string, ColumnInfo>;
}

export async function describeFormColumns(client: pg.ClientBase, schema: string, table: string): Promise<FormCatalog> {
  const info = await describeForm(client, schema, table);
  const res = await client.query(
    `SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type, CASE a.atttypid
              WHEN 'bpchar'::regtype THEN 'bpchar' WHEN 'bpchar[]'::regtype THEN 'bpchar[]'
              WHEN 'bit'::regtype THEN 'varbit' WHEN 'bit[]'::regtype THEN 'varbit[]'
              ELSE format_type(a.atttypid, NULL) END AS cast_type, a.attnotnull AS not_null,
            (a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> '') AS has_default, a.attgenerated <> '' AS generated
       FROM pg_attribute a
      WHERE a.attrelid = format('%I.%I', $1::text, $2::text)::regclass AND a.attnum > 0 AND NOT a.attisdropped
      ORDER BY a.attnum`,
    [schema, table],
  );
  const columns = new Map<string, ColumnInfo>();
  for (const row of res.rows)
    columns.set(row.name, {
      name: row.name,
      type: row.type,
      castType: row.cast_type,
      notNull: row.not_null,
      hasDefault: row.has_default,
      generated: row.generated,
    });
  return { ...info, columns };
}
