// The composition root of one server's engine: decoder -> rules -> applier lanes.
//
// Per source transaction: each change meets only the filters indexed for its (server, form, op);
// each fired action becomes operations in apply lanes (one per target server and pool, each with
// its own replication origin). At a transaction boundary, when enough work is buffered or the
// stream is idle, the engine flushes: target lanes apply and commit (recording the source
// position), rows that could not be applied are recorded in the source's pending_errors, the
// source copies get their bookkeeping, and only then is the commit-end LSN confirmed.
// Any other failure ends the session: everything unconfirmed is replayed by a new one, and what
// a lane had committed is skipped by its progress (pgdso.apply_progress). Nothing is lost or
// applied twice.
import pg from 'pg';
import type { Logger } from 'pino';
import { setTimeout as delay } from 'node:timers/promises';
import type { ChangeSink } from './decoder/stream.ts';
import { ReplicationStream } from './decoder/stream.ts';
import type { Relation, RowChange, TxBegin, TxCommit } from './change.ts';
import { formatLsn } from './change.ts';
import type { ActionConfig, MappingConfig, PgdsoConfig } from './config/types.ts';
import { toPgClientConfig } from './config/load.ts';
import type { CompiledRules } from './rules/index.ts';
import { buildFacts, type Facts } from './rules/facts.ts';
import { ApplyLane } from './applier/lane.ts';
import { LaneBuffer } from './applier/buffer.ts';
import type { FormCatalog } from './applier/catalog.ts';
import { buildColumnPlan, type ColumnPlan } from './applier/plan.ts';
import { TransferGroup, TransferredGroup, changeKey, recordFailures, type ApplyFailure } from './applier/transfer.ts';
import { describeForm, ensureSlot, type FormInfo } from './sql/forms.ts';
import { originName, slotName, writerOfOrigin } from './sql/identifiers.ts';
import { waitForOperationLock } from './groupboard/lock.ts';

export interface EngineOptions {
  config: PgdsoConfig;
  rules: CompiledRules;
  server: string;
  log: Logger;
  /** flush at the next transaction boundary once this many operations are buffered */
  batchRows?: number;
  /** rows per set-based statement */
  chunkRows?: number;
  /** reconnect backoff bounds, ms */
  backoff?: { minMs: number; maxMs: number };
}

export interface EngineStats {
  transactions: number;
  changes: number;
  applied: number;
  failed: number;
  confirmedLsn: string;
  sessions: number;
}

/** Runs one server's engine until the signal aborts, reconnecting after failures. */
export class ServerEngine {
  readonly stats: EngineStats = { transactions: 0, changes: 0, applied: 0, failed: 0, confirmedLsn: '0/0', sessions: 0 };
  readonly server: string;
  private readonly log: Logger;
  private session: EngineSession | null = null;

  constructor(private readonly opts: EngineOptions) {
    this.server = opts.server;
    this.log = opts.log.child({ server: opts.server });
  }

  /** True while a session streams the server's slot. */
  streaming(): boolean {
    return this.session?.streaming ?? false;
  }

  async run(signal: AbortSignal): Promise<void> {
    const { minMs, maxMs } = this.opts.backoff ?? { minMs: 200, maxMs: 30_000 };
    let wait = minMs;
    while (!signal.aborted) {
      const session = new EngineSession(this.opts, this.log, this.stats);
      this.session = session;
      const started = Date.now();
      this.stats.sessions += 1;
      try {
        await session.run(signal);
      } catch (err) {
        if (signal.aborted) break;
        this.log.warn({ err }, 'engine session failed; replaying from the confirmed position');
      } finally {
        this.session = null;
        await session.close();
      }
      if (signal.aborted) break;
      if (Date.now() - started > 60_000) wait = minMs;
      const jittered = wait / 2 + Math.random() * (wait / 2);
      await delay(jittered, undefined, { signal }).catch(() => {});
      wait = Math.min(maxMs, wait * 2);
    }
  }
}

interface OpenTransaction {
  finalLsn: bigint;
  commitTime: Date;
  /** the server whose engine wrote this transaction, or null for a user's */
  writer: string | null;
}

class EngineSession implements ChangeSink {
  /** true while the replication stream runs */
  streaming = false;
  private readonly server: string;
  private readonly connection: pg.ClientConfig;
  private control: pg.Client | null = null;
  private stream: ReplicationStream | null = null;
  private sourceLane: ApplyLane<never> | null = null;
  private sourceBuffer: LaneBuffer<never> | null = null;
  private readonly lanes = new Map<string, LaneBuffer<ApplyFailure>>();
  private readonly forms = new Map<string, FormInfo>();
  private readonly catalogs = new Map<string, FormCatalog>();
  private readonly plans = new WeakMap<Relation, Map<string, ColumnPlan>>();
  private tx: OpenTransaction | null = null;
  private readonly hops = new Map<string, { finalLsn: bigint; template: [string, string] }>();
  /** domain type OID -> its base type's, for the facts */
  private baseTypes = new Map<number, number>();
  /** changes refused before reaching a lane (recorded in pending_errors at the next flush) */
  private rejected: ApplyFailure[] = [];
  private last: TxCommit | null = null;
  private unflushed = 0;
  private readonly batchRows: number;
  private readonly chunkRows: number;

  constructor(private readonly opts: EngineOptions, private readonly log: Logger, private readonly stats: EngineStats) {
    this.server = opts.server;
    const server = opts.config.servers[opts.server];
    if (!server) throw new Error(`unknown server ${opts.server}`);
    this.connection = toPgClientConfig(server.connection);
    this.batchRows = opts.batchRows ?? 20_000;
    this.chunkRows = opts.chunkRows ?? 5_000;
  }

  async run(signal: AbortSignal): Promise<void> {
    const control = new pg.Client({ ...this.connection, application_name: 'pgdso control' });
    this.control = control;
    control.on('error', () => {});
    await control.connect();
    const locked = await waitForOperationLock(control, 'dso', signal, 1000, () => this.log.info('another instance runs the dso operation of this server; waiting'));
    if (!locked) return;
    for (const { schema, table } of this.opts.rules.formsOf(this.server)) {
      this.forms.set(`${schema}.${table}`, await describeForm(control, schema, table));
    }
    this.baseTypes = await domainBaseTypes(control);
    await this.openLanes();
    const slot = slotName(String(this.connection.database));
    if (await ensureSlot(control, slot)) {
      // forms enable creates the slot; one that is gone (dropped by hand) lost what happened meanwhile
      this.log.error({ slot }, 'the replication slot was missing and has been created: changes made to the forms of this server before now were not captured');
    }
    const stream = new ReplicationStream({ connection: this.connection, slot, log: this.log });
    this.stream = stream;
    const onAbort = () => void stream.stop();
    signal.addEventListener('abort', onAbort, { once: true });
    try {
      this.streaming = true;
      if (!signal.aborted) await stream.run(this);
    } finally {
      this.streaming = false;
      signal.removeEventListener('abort', onAbort);
    }
  }

  private async openLanes(): Promise<void> {
    const database = String(this.connection.database);
    const sourceLane = new ApplyLane<never>({ connection: this.connection, origin: originName(this.server, '~source', database), name: `${this.server}/~source`, log: this.log });
    this.sourceLane = sourceLane;
    await sourceLane.open();
    this.sourceBuffer = new LaneBuffer(sourceLane, this.chunkRows, true);
    for (const mapping of Object.values(this.opts.config.mappings)) {
      if (mapping.from.server !== this.server) continue;
      const buffer = await this.laneFor(mapping);
      const catalog = await buffer.lane.describe(mapping.to.schema, mapping.to.table);
      this.catalogs.set(mapping.name, catalog);
    }
  }

  private async laneFor(mapping: MappingConfig): Promise<LaneBuffer<ApplyFailure>> {
    const key = `${mapping.to.server}/${mapping.pool}`;
    const found = this.lanes.get(key);
    if (found) return found;
    const target = this.opts.config.servers[mapping.to.server]!;
    const connection = toPgClientConfig(target.connection);
    const lane = new ApplyLane<ApplyFailure>({
      connection,
      origin: originName(this.server, mapping.pool, String(connection.database)),
      name: `${this.server}->${key}`,
      log: this.log,
    });
    const buffer = new LaneBuffer(lane, this.chunkRows);
    this.lanes.set(key, buffer);
    await lane.open();
    return buffer;
  }

  // ---- ChangeSink -------------------------------------------------------------------------

  begin(tx: TxBegin & { origin: string | null }): void {
    this.tx = { finalLsn: tx.finalLsn, commitTime: tx.commitTime, writer: writerOfOrigin(tx.origin) };
  }

  change(change: RowChange): void | Promise<void> {
    const tx = this.tx;
    if (!tx) throw new Error('change outside a transaction');
    this.stats.changes += 1;
    // The engine's own bookkeeping on this server (dso_* columns of source copies): no rule
    // fires on it, or every transfer would fire its filter again.
    if (tx.writer === this.server) return;
    const form = this.forms.get(`${change.relation.schema}.${change.relation.table}`);
    if (!form) return;
    const { rules } = this.opts;
    const { schema, table } = change.relation;
    if (rules.filtersFor(this.server, schema, table, change.op).length === 0) return;
    const facts = buildFacts(change, tx.writer, rules.columnsFor(this.server, schema, table, change.op), this.baseTypes);
    const fired = rules.evaluate(this.server, change.relation.schema, change.relation.table, facts, (err) =>
      this.log.warn({ filter: err.filter, lsn: formatLsn(change.lsn) }, err.message),
    );
    if (fired.length === 0) return;
    const waits: Promise<void>[] = [];
    for (const { filter, actions } of fired) {
      for (const action of actions) {
        const wait = this.perform(action, filter, change, facts, form, tx);
        if (wait) waits.push(wait);
      }
    }
    if (waits.length === 0) return;
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => undefined);
  }

  commit(commit: TxCommit): void | Promise<void> {
    this.tx = null;
    this.last = commit;
    this.stats.transactions += 1;
    if (this.unflushed === 0) {
      this.stream?.confirm(commit.endLsn);
      this.stats.confirmedLsn = formatLsn(commit.endLsn);
      return;
    }
    if (this.unflushed >= this.batchRows) return this.flush();
  }

  idle(): void | Promise<void> {
    if (this.unflushed > 0 && this.tx === null) return this.flush();
  }

  caughtUp(): boolean {
    return this.unflushed === 0 && this.tx === null;
  }

  // ---- actions ----------------------------------------------------------------------------

  private perform(action: ActionConfig, filter: string, change: RowChange, facts: Facts, form: FormInfo, tx: OpenTransaction): Promise<void> | undefined {
    switch (action.type) {
      case 'transfer':
        return this.transfer(this.opts.config.mappings[action.mapping]!, action.overrideLoopDetection, filter, change, facts, form, tx);
      default:
        // refused at start by unsupportedOptions(): never confirm past an operation not carried out
        throw new Error(`filter "${filter}": the "${action.type}" action is not supported by this version`);
    }
  }

  private transfer(mapping: MappingConfig, override: boolean, filter: string, change: RowChange, facts: Facts, form: FormInfo, tx: OpenTransaction): Promise<void> | undefined {
    const row = change.new;
    if (change.op === 'delete' || !row) return undefined;
    const requestId = row[form.keyColumn];
    if (requestId === null || requestId === undefined) return undefined;
    if (!facts.master) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'not the master copy: no transfer');
      return undefined;
    }
    const historyText = row.dso_mapping_history ?? '[]';
    const visited = visitedServers(historyText);
    if (visited === null) {
      // a history edited into something else: no loop information, no chain to extend
      this.rejected.push({
        type: 'transfer', mapping, requestId, lsn: change.lsn, sqlstate: null,
        payload: { target: `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`, history: historyText },
        error: `mapping "${mapping.name}": request ${requestId}: dso_mapping_history is not a list of hops with fromServer and fromRequestId: ${historyText.slice(0, 200)}`,
      });
      this.unflushed += 1;
      return undefined;
    }
    if (!override && visited.has(mapping.to.server)) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request has been on the target server');
      return undefined;
    }
    const buffer = this.lanes.get(`${mapping.to.server}/${mapping.pool}`)!;
    let wait: Promise<void> | undefined;
    const runs = !buffer.lane.applied(tx.finalLsn);
    if (runs) {
      const plan = this.planFor(change.relation, mapping, form);
      const values = plan.columns.map((c) => (c.from.kind === 'constant' ? c.from.text : row[c.from.column]));
      if (values.some((v) => v === undefined)) throw new Error(`form ${form.schema}.${form.table} is not replica identity full: run pgdso forms enable`);
      const history = appendHop(historyText, this.hopTemplate(mapping, form, tx), requestId);
      const groupKey = `transfer:${mapping.name}`;
      buffer
        .group(groupKey, `${mapping.to.schema}.${mapping.to.table}`, requestId, () => new TransferGroup(plan))
        .add({ requestId, values: values as (string | null)[], history, lsn: change.lsn }, change.op === 'insert');
      buffer.added(groupKey);
      this.unflushed += 1;
      if (buffer.lane.backlog > 2) wait = buffer.lane.drainTo(1);
    }
    const source = this.sourceBuffer!;
    if (!source.lane.applied(tx.finalLsn)) {
      const groupKey = `transferred:${mapping.name}`;
      source.group(groupKey, `${form.schema}.${form.table}`, requestId, () => new TransferredGroup(mapping, form.keyColumn, form.keyType)).add(requestId, change.lsn, runs);
      this.unflushed += 1;
    }
    return wait;
  }

  /** The hop's JSON around its request ID, the same for every request of a mapping in a transaction. */
  private hopTemplate(mapping: MappingConfig, form: FormInfo, tx: OpenTransaction): [string, string] {
    const cached = this.hops.get(mapping.name);
    if (cached && cached.finalLsn === tx.finalLsn) return cached.template;
    const marker = '\u0000request\u0000';
    const json = JSON.stringify({
      at: tx.commitTime.toISOString(),
      mapping: mapping.name,
      transferMode: mapping.transferMode,
      fromServer: this.server,
      fromForm: form.table,
      fromRequestId: marker,
      toServer: mapping.to.server,
      toForm: mapping.to.table,
    });
    const at = json.indexOf(JSON.stringify(marker));
    const template: [string, string] = [json.slice(0, at), json.slice(at + JSON.stringify(marker).length)];
    this.hops.set(mapping.name, { finalLsn: tx.finalLsn, template });
    return template;
  }

  private planFor(relation: Relation, mapping: MappingConfig, form: FormInfo): ColumnPlan {
    let byMapping = this.plans.get(relation);
    if (!byMapping) {
      byMapping = new Map();
      this.plans.set(relation, byMapping);
    }
    let plan = byMapping.get(mapping.name);
    if (!plan) {
      plan = buildColumnPlan(mapping, relation.columns.map((c) => c.name), form.keyColumn, this.catalogs.get(mapping.name)!);
      byMapping.set(mapping.name, plan);
    }
    return plan;
  }

  // ---- flush ------------------------------------------------------------------------------

  private async flush(): Promise<void> {
    const last = this.last;
    if (!last) return;
    const lanes = [...this.lanes.values()];
    for (const buffer of lanes) buffer.submitAll();
    await Promise.all(lanes.map((b) => b.lane.settle()));
    const failures = [...this.rejected, ...lanes.flatMap((b) => b.lane.takeFailures())];
    this.rejected = [];
    const sourceLane = this.sourceLane!;
    if (failures.length) {
      await sourceLane.runAlone((client) => recordFailures(client, failures, (m) => this.forms.get(`${m.from.schema}.${m.from.table}`)!));
      for (const f of failures) this.log.warn({ mapping: f.mapping.name, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    await Promise.all(lanes.filter((b) => b.lane.dirty).map((b) => b.lane.commit(last.finalLsn, last.commitTime)));
    const failed = new Set(failures.map((f) => changeKey(f.mapping.name, f.requestId, f.lsn)));
    for (const group of this.sourceBuffer!.pendingGroups()) if (group instanceof TransferredGroup) group.dropFailed(failed);
    this.sourceBuffer!.submitAll();
    await sourceLane.commit(last.finalLsn, last.commitTime);
    this.stats.applied += this.unflushed;
    this.stats.failed += failures.length;
    this.unflushed = 0;
    this.stream?.confirm(last.endLsn);
    this.stats.confirmedLsn = formatLsn(last.endLsn);
  }

  async close(): Promise<void> {
    await this.stream?.stop();
    await Promise.all([...this.lanes.values()].map((b) => b.lane.close()));
    await this.sourceLane?.close();
    await this.control?.end().catch(() => {});
  }
}

/** Every domain of the database with its (ultimate) base type. */
async function domainBaseTypes(client: pg.ClientBase): Promise<Map<number, number>> {
  const res = await client.query(`SELECT oid::int AS oid, typbasetype::int AS base FROM pg_type WHERE typtype = 'd'`);
  const direct = new Map<number, number>(res.rows.map((r: { oid: number; base: number }) => [r.oid, r.base]));
  const resolved = new Map<number, number>();
  for (const oid of direct.keys()) {
    let base = direct.get(oid)!;
    for (let depth = 0; direct.has(base) && depth < 32; depth++) base = direct.get(base)!;
    resolved.set(oid, base);
  }
  return resolved;
}

/** The request's mapping history (jsonb text) with one more hop. */
function appendHop(historyText: string, [before, after]: [string, string], requestId: string): string {
  const hop = `${before}${JSON.stringify(requestId)}${after}`;
  return historyText === '[]' ? `[${hop}]` : `${historyText.slice(0, -1)}, ${hop}]`;
}

/** Servers a request has been on, from its mapping history (JSON text); null if malformed. */
function visitedServers(historyText: string): Set<string> | null {
  const visited = new Set<string>();
  if (historyText === '[]') return visited;
  let hops: unknown;
  try {
    hops = JSON.parse(historyText);
  } catch {
    return null;
  }
  if (!Array.isArray(hops)) return null;
  for (const hop of hops as { fromServer?: unknown; toServer?: unknown; fromRequestId?: unknown }[]) {
    if (!hop || typeof hop.fromServer !== 'string' || typeof hop.fromRequestId !== 'string') return null;
    visited.add(hop.fromServer);
    if (typeof hop.toServer === 'string') visited.add(hop.toServer);
  }
  return visited;
}
