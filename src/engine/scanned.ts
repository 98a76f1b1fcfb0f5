// Scanned requests in the stream: a batch a form scan (an escalation run, `pgdso sync`) wrote into
// the source's WAL (src/scan/message.ts). Each request of the batch goes through the same DSO
// operations as a changed row that a filter fired on, with the batch's actions: ownership,
// history, bookkeeping, the queue and pending_errors, exactly once with the rest of the WAL.
import type { Relation, RowChange, TextRow } from '../change.ts';
import { formatLsn } from '../change.ts';
import type { DsoActions } from '../dso/actions.ts';
import { buildFacts } from '../rules/facts.ts';
import { decodeBatch, type ScanBatch } from '../scan/message.ts';
import type { Peers } from './peers.ts';
import type { SessionState } from './state.ts';
import type { Topology } from './topology.ts';
import type { ChangeContext, OpenTransaction } from './types.ts';

/** The actions read only `master` from the facts: the batch's conditions were evaluated by the scan. */
const MASTER_ONLY: ReadonlySet<string> = new Set(['dso_master']);

export class ScannedRequests {
  private key: string | null = null;
  private readonly relations = new Map<string, Relation>();

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly peers: Peers,
    private readonly actions: DsoActions,
  ) {}

  async handle(content: Buffer, lsn: bigint, tx: OpenTransaction): Promise<void> {
    const { state } = this;
    this.key ??= (await state.control.query<{ key: string }>('SELECT key FROM pgdso.scan_key')).rows[0]?.key ?? null;
    let batch: ScanBatch;
    try {
      if (this.key === null) throw new Error('pgdso.scan_key is empty: run pgdso migrate');
      batch = decodeBatch(content, this.key);
    } catch (err) {
      state.log.error({ lsn: formatLsn(lsn) }, `a scan message was not acted on: ${(err as Error).message}`);
      return;
    }
    const formKey = `${batch.schema}.${batch.table}`;
    const form = this.topology.forms.get(formKey);
    const known = batch.actions.filter((a) => a.type === 'return' || state.opts.config.mappings[a.mapping] !== undefined);
    if (!form || known.length < batch.actions.length) {
      const why = !form
        ? `form ${formKey} is not a form of ${state.server} in the rules this engine runs`
        : 'a mapping of its actions is not in the rules this engine runs (those actions were skipped)';
      state.log.error(
        { [batch.kind]: batch.name, run: batch.run, form: formKey, lsn: formatLsn(lsn), requests: batch.rows.length },
        `${batch.kind} "${batch.name}": ${why}: run it again once the rules agree`,
      );
      if (!form) return;
    }
    const relation = this.relationOf(form.oid, batch);
    const peers = this.topology.catalogsToRead(relation, () => [...this.peers.names()]);
    if (peers) await this.peers.refreshPlans(peers);
    const label = `${batch.kind} ${batch.name}`;
    state.stats.scanned += batch.rows.length;
    for (const values of batch.rows) {
      const row: TextRow = {};
      for (let i = 0; i < batch.columns.length; i++) row[batch.columns[i]![0]] = values[i] ?? null;
      const change: RowChange = { op: 'update', relation, lsn, new: row, old: null };
      const ctx: ChangeContext = { change, form, tx, sentTo: new Set(), ownership: null, waits: [] };
      const facts = buildFacts(change, null, MASTER_ONLY, this.topology.baseTypes);
      for (const action of known) this.actions.perform(action, label, ctx, facts);
      if (ctx.waits.length > 0) await Promise.all(ctx.waits);
    }
  }

  /** A relation for the batch's columns: the same object for the same columns (plans are kept per relation). */
  private relationOf(oid: number, batch: ScanBatch): Relation {
    const signature = `${oid}:${batch.columns.map(([name, type]) => `${name}/${type}`).join(',')}`;
    let relation = this.relations.get(signature);
    if (!relation) {
      relation = {
        oid,
        schema: batch.schema,
        table: batch.table,
        replicaIdentity: 'full',
        columns: batch.columns.map(([name, typeOid]) => ({ name, typeOid, typeMod: -1, isKey: false })),
      };
      this.relations.set(signature, relation);
    }
    return relation;
  }
}
