// What the session knows of the forms it serves and where their mappings lead: this server's
// forms, the links of their mappings in either direction, the catalogs of both ends and the
// column plans built from them, read again after a form's table changed.
import type pg from 'pg';
import type { Relation, TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import { toPgClientConfig } from '../config/load.ts';
import { describeFormColumns, type FormCatalog } from '../applier/catalog.ts';
import { buildColumnPlan, type ColumnPlan } from '../applier/plan.ts';
import { reversePlan, type Link } from '../applier/chain.ts';
import { withClient } from '../sql/client.ts';
import { describeForm, domainBaseTypes, type FormInfo } from '../sql/form-catalog.ts';
import type { SessionState } from './state.ts';
import type { LinkRef } from './types.ts';

/** How often the catalogs are read again while a plan leaves out a column the target lacks: 10 s, doubling up to 5 min. */
const CATALOG_RECHECK_MS = 10_000;
const CATALOG_RECHECK_MAX_MS = 300_000;

/** A mapping keeps the copies of its chain in step when its master's changes reach them at once. */
export function keptInStep(m: MappingConfig): boolean {
  return m.transferMode !== 'independent-copy' && m.whenToUpdate === 'immediately' && m.afterTransfer === 'keep';
}

export class Topology {
  readonly forms = new Map<string, FormInfo>();
  /** forms with a mapping that keeps its chain in step (their updates and deletes are relayed) */
  readonly chainForms = new Set<string>();
  /** `${mapping}>` forward (to its target), `${mapping}<` backward (to its source) */
  readonly links = new Map<string, LinkRef>();
  /** domain type OID -> its base type's, for the facts */
  baseTypes = new Map<number, number>();
  private readonly catalogs = new Map<string, FormCatalog>();
  private readonly localCatalogs = new Map<string, FormCatalog>();
  private plans = new WeakMap<Relation, Map<string, ColumnPlan>>();
  /** each form's relation as last decoded, by OID: a new one with other columns means its table changed */
  private readonly relations = new Map<number, Relation>();
  /** (mapping, column, reason) already reported as not carried */
  private readonly warnedColumns = new Set<string>();
  /** a plan leaves out a source column the target lacks: the catalogs are read again now and then (backing off) */
  private missingColumns = false;
  private recheckAt = 0;
  private recheckEvery = CATALOG_RECHECK_MS;
  /** an id per column plan, in group keys: a group's rows all follow its plan */
  private readonly planIds = new WeakMap<ColumnPlan, number>();
  private nextPlanId = 0;

  constructor(private readonly state: SessionState) {}

  /** Reads this server's forms (those the rules name) and its domains. */
  async describeForms(control: pg.Client): Promise<void> {
    const { opts, server } = this.state;
    for (const { schema, table } of opts.rules.formsOf(server)) {
      this.forms.set(`${schema}.${table}`, await describeForm(control, schema, table));
    }
    this.baseTypes = await domainBaseTypes(control);
  }

  /**
   * The links of every mapping of this server's forms, in either direction (forward for the
   * mappings from this server: transfers, updates, deletes, the chain kept in step; backward
   * for the mappings to it: returns, the chain kept in step towards the request's origin).
   */
  linkMappings(): void {
    const { opts, server } = this.state;
    for (const mapping of Object.values(opts.config.mappings)) {
      for (const forward of [true, false]) {
        const here = forward ? mapping.from : mapping.to;
        const there = forward ? mapping.to : mapping.from;
        if (here.server !== server) continue;
        this.links.set(`${mapping.name}${forward ? '>' : '<'}`, { mapping, forward, server: there.server, resolved: null });
        if (keptInStep(mapping)) this.chainForms.add(`${here.schema}.${here.table}`);
      }
    }
  }

  /** The target form's catalog of a mapping from this server, as last read. */
  catalogOf(mapping: string): FormCatalog | undefined {
    return this.catalogs.get(mapping);
  }

  private async localCatalog(ref: { schema: string; table: string }): Promise<FormCatalog> {
    const key = `${ref.schema}.${ref.table}`;
    let found = this.localCatalogs.get(key);
    if (!found) this.localCatalogs.set(key, (found = await describeFormColumns(this.state.control, ref.schema, ref.table)));
    return found;
  }

  /**
   * Reads the peer's forms and builds the column plans of its links. Again after a change of
   * the peer's tables showed (a column missing, a type changed) and when `pgdso pending retry`
   * asks: the fix of a DBA is then what the engine writes against.
   */
  async resolveLinks(peer: string): Promise<void> {
    // a connection of its own: a lane may be in the middle of a transaction (or a failed one)
    const connection = toPgClientConfig(this.state.opts.config.servers[peer]!.connection);
    const resolved = new Map<LinkRef, Link>();
    await withClient({ ...connection, application_name: 'pgdso catalog' }, async (client) => {
      for (const ref of this.links.values()) {
        if (ref.server !== peer) continue;
        const { mapping } = ref;
        if (ref.forward) {
          const targetCatalog = await describeFormColumns(client, mapping.to.schema, mapping.to.table);
          this.catalogs.set(mapping.name, targetCatalog);
          const source = await this.localCatalog(mapping.from);
          const plan = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, targetCatalog);
          this.noteNotCarried(plan);
          resolved.set(ref, { mapping, forward: true, server: peer, plan });
        } else {
          const source = await describeFormColumns(client, mapping.from.schema, mapping.from.table);
          const forward = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, await this.localCatalog(mapping.to));
          resolved.set(ref, { mapping, forward: false, server: peer, plan: reversePlan(forward, source) });
        }
      }
    });
    this.plans = new WeakMap();
    for (const [ref, link] of resolved) ref.resolved = link;
  }

  /**
   * The peers whose catalogs are to be read again before this change goes on, or null: those
   * the mappings of a form lead to once its table changed (a column added, dropped, renamed: a
   * column added on both sides is then carried from the next change on), or every peer now and
   * then while a plan leaves out a column the target lacks.
   */
  catalogsToRead(relation: Relation, everyPeer: () => string[]): string[] | null {
    const seen = this.relations.get(relation.oid);
    if (seen !== relation) {
      this.relations.set(relation.oid, relation);
      const formKey = `${relation.schema}.${relation.table}`;
      const before = seen
        ? seen.columns.map((c) => c.name)
        : this.localCatalogs.get(formKey) && [...this.localCatalogs.get(formKey)!.columns.keys()];
      if (before && before.join(',') !== relation.columns.map((c) => c.name).join(',')) return this.tableChanged(formKey);
    }
    if (this.missingColumns && Date.now() >= this.recheckAt) {
      this.missingColumns = false; // set again by the plans if the column is still missing
      this.recheckAt = Date.now() + this.recheckEvery;
      this.recheckEvery = Math.min(this.recheckEvery * 2, CATALOG_RECHECK_MAX_MS);
      return everyPeer();
    }
    return null;
  }

  /** A form of this server changed: its catalog is read again, and the peers its mappings lead to. */
  private tableChanged(formKey: string): string[] {
    if (!this.forms.has(formKey)) return [];
    this.localCatalogs.delete(formKey);
    this.recheckEvery = CATALOG_RECHECK_MS;
    const servers = [...this.links.values()]
      .filter((ref) => {
        const here = ref.forward ? ref.mapping.from : ref.mapping.to;
        return `${here.schema}.${here.table}` === formKey;
      })
      .map((ref) => ref.server);
    this.state.log.info(
      { form: formKey, peers: [...new Set(servers)] },
      `form ${formKey} changed on ${this.state.server}: its mappings' forms are read again`,
    );
    return servers;
  }

  planId(plan: ColumnPlan): number {
    let id = this.planIds.get(plan);
    if (id === undefined) this.planIds.set(plan, (id = this.nextPlanId++));
    return id;
  }

  /** Says once per mapping and column what byName leaves out: a generated target column, or one the target lacks. */
  private noteNotCarried(plan: ColumnPlan): void {
    const { mapping } = plan;
    for (const { column, reason } of plan.notCarried) {
      if (reason === 'missing' && !this.missingColumns) {
        this.missingColumns = true;
        this.recheckAt = Math.max(this.recheckAt, Date.now() + CATALOG_RECHECK_MS);
      }
      const key = `${mapping.name}\u0000${column}\u0000${reason}`;
      if (this.warnedColumns.has(key)) continue;
      this.warnedColumns.add(key);
      const target = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
      if (reason === 'generated')
        this.state.log.info(
          { mapping: mapping.name, column },
          `mapping "${mapping.name}": column "${column}" is generated on ${target}: computed there, not written`,
        );
      else
        this.state.log.warn(
          { mapping: mapping.name, column },
          `mapping "${mapping.name}": column "${column}" of ${mapping.from.server}.${mapping.from.schema}.${mapping.from.table} ` +
            `is not on ${target}, so its values are not carried: add it there (pgdso reads the catalog again every ` +
            `${CATALOG_RECHECK_MS / 1000} s at first, then less often) or list it in fields.exclude`,
        );
    }
  }

  /** The column plan of a mapping for the columns of a decoded relation. */
  planFor(relation: Relation, mapping: MappingConfig, form: FormInfo): ColumnPlan {
    let byMapping = this.plans.get(relation);
    if (!byMapping) {
      byMapping = new Map();
      this.plans.set(relation, byMapping);
    }
    let plan = byMapping.get(mapping.name);
    if (!plan) {
      plan = buildColumnPlan(
        mapping,
        relation.columns.map((c) => c.name),
        form.keyColumn,
        this.catalogs.get(mapping.name)!,
      );
      byMapping.set(mapping.name, plan);
      this.noteNotCarried(plan);
    }
    return plan;
  }
}

/** A plan's values from a row, as text, aligned with plan.columns. */
export function valuesOf(plan: ColumnPlan, row: TextRow, form: FormInfo): (string | null)[] {
  const values = plan.columns.map((c) => (c.from.kind === 'constant' ? c.from.text : row[c.from.column]));
  if (values.some((v) => v === undefined))
    throw new Error(`form ${form.schema}.${form.table} is not replica identity full: run pgdso forms enable`);
  return values as (string | null)[];
}
