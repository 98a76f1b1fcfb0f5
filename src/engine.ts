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
import type { Relation, RowChange, TextRow, TxBegin, TxCommit } from './change.ts';
import { formatLsn } from './change.ts';
import type { ActionConfig, MappingConfig, PgdsoConfig } from './config/types.ts';
import { toPgClientConfig } from './config/load.ts';
import type { CompiledRules } from './rules/index.ts';
import { buildFacts, type Facts } from './rules/facts.ts';
import { ApplyLane } from './applier/lane.ts';
import { LaneBuffer } from './applier/buffer.ts';
import { describeFormColumns, type FormCatalog } from './applier/catalog.ts';
import { buildColumnPlan, type ColumnPlan } from './applier/plan.ts';
import { TransferGroup } from './applier/transfer.ts';
import { SourceBookkeeping, countHops, recordFailures, type Outcome } from './applier/bookkeeping.ts';
import { CopyDeleteGroup, CopyUpdateGroup, reversePlan, type CopyDelete, type CopyUpdate, type Link, type UpdateKind } from './applier/chain.ts';
import { changeKey, type ApplyFailure, type RequestGroup } from './applier/sets.ts';
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

/** One decoded change on its way through the actions. */
interface ChangeContext {
  change: RowChange;
  form: FormInfo;
  tx: OpenTransaction;
  /** servers an action of this change already carried the request's values to */
  sentTo: Set<string>;
  /** the data+ownership mapping that already moved ownership in this change */
  ownership: string | null;
  /** backpressure: lanes to wait for before taking the next change */
  waits: Promise<void>[];
}

/** A mapping keeps the copies of its chain in step when its master's changes reach them at once. */
export function keptInStep(m: MappingConfig): boolean {
  return m.transferMode !== 'independent-copy' && m.whenToUpdate === 'immediately' && m.afterTransfer === 'keep';
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
  /** target servers served by more than one pool: their requests are pinned to one lane per batch */
  private readonly pooledServers = new Set<string>();
  private readonly pinned = new Map<string, LaneBuffer<ApplyFailure>>();
  private readonly forms = new Map<string, FormInfo>();
  /** forms with a mapping that keeps its chain in step (their updates and deletes are relayed) */
  private readonly chainForms = new Set<string>();
  private readonly catalogs = new Map<string, FormCatalog>();
  /** `${mapping}>` forward (to its target), `${mapping}<` backward (to its source) */
  private readonly links = new Map<string, Link>();
  private readonly plans = new WeakMap<Relation, Map<string, ColumnPlan>>();
  /** target keys taken under new-id in this batch, per mapping */
  private readonly assigned = new Map<string, Map<string, string>>();
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
    await this.openLanes(control);
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

  /**
   * A lane for every (neighbour, pool) a mapping of this server's forms leads to, in either
   * direction, and each mapping's links: forward for the mappings from this server (transfers,
   * updates, deletes, the chain kept in step), backward for the mappings to it (returns, the
   * chain kept in step towards the request's origin).
   */
  private async openLanes(control: pg.Client): Promise<void> {
    const database = String(this.connection.database);
    const sourceLane = new ApplyLane<never>({ connection: this.connection, origin: originName(this.server, '~source', database), name: `${this.server}/~source`, log: this.log });
    this.sourceLane = sourceLane;
    await sourceLane.open();
    this.sourceBuffer = new LaneBuffer(sourceLane, this.chunkRows, true);
    const local = new Map<string, FormCatalog>();
    const localCatalog = async (ref: { schema: string; table: string }) => {
      const key = `${ref.schema}.${ref.table}`;
      let found = local.get(key);
      if (!found) local.set(key, (found = await describeFormColumns(control, ref.schema, ref.table)));
      return found;
    };
    for (const mapping of Object.values(this.opts.config.mappings)) {
      if (mapping.from.server === this.server) {
        const buffer = await this.laneFor(mapping.to.server, mapping.pool);
        const target = await buffer.lane.describe(mapping.to.schema, mapping.to.table);
        this.catalogs.set(mapping.name, target);
        const source = await localCatalog(mapping.from);
        const plan = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, target);
        this.links.set(`${mapping.name}>`, { mapping, forward: true, server: mapping.to.server, plan });
        if (keptInStep(mapping)) this.chainForms.add(`${mapping.from.schema}.${mapping.from.table}`);
      }
      if (mapping.to.server === this.server) {
        const buffer = await this.laneFor(mapping.from.server, mapping.pool);
        const source = await buffer.lane.describe(mapping.from.schema, mapping.from.table);
        const forward = buildColumnPlan(mapping, [...source.columns.keys()], source.keyColumn, await localCatalog(mapping.to));
        this.links.set(`${mapping.name}<`, { mapping, forward: false, server: mapping.from.server, plan: reversePlan(forward, source) });
        if (keptInStep(mapping)) this.chainForms.add(`${mapping.to.schema}.${mapping.to.table}`);
      }
    }
  }

  private async laneFor(server: string, pool: string): Promise<LaneBuffer<ApplyFailure>> {
    const key = `${server}/${pool}`;
    const found = this.lanes.get(key);
    if (found) return found;
    if ([...this.lanes.keys()].some((k) => k.startsWith(`${server}/`))) this.pooledServers.add(server);
    const target = this.opts.config.servers[server]!;
    const connection = toPgClientConfig(target.connection);
    const lane = new ApplyLane<ApplyFailure>({
      connection,
      origin: originName(this.server, pool, String(connection.database)),
      name: `${this.server}->${key}`,
      log: this.log,
    });
    const buffer = new LaneBuffer(lane, this.chunkRows);
    this.lanes.set(key, buffer);
    await lane.open();
    return buffer;
  }

  /**
   * The lane of (server, pool) for an operation on a request. A server served by several pools
   * keeps each request in the lane that took its first operation of the batch: the order of one
   * request's operations is kept across pools.
   */
  private bufferFor(server: string, pool: string, table: string, key: string): LaneBuffer<ApplyFailure> {
    const buffer = this.lanes.get(`${server}/${pool}`)!;
    if (!this.pooledServers.has(server)) return buffer;
    const pin = `${server}\u0000${table}\u0000${key}`;
    const pinned = this.pinned.get(pin);
    if (pinned) return pinned;
    this.pinned.set(pin, buffer);
    return buffer;
  }

  /** Counts an operation buffered in a lane, and waits for the lane when it falls behind. */
  private enqueued(ctx: ChangeContext, buffer: LaneBuffer<ApplyFailure>, groupKey: string): void {
    buffer.added(groupKey);
    this.unflushed += 1;
    if (buffer.lane.backlog > 2) ctx.waits.push(buffer.lane.drainTo(1));
  }

  private bookkeeping(ctx: ChangeContext, outcome: Outcome, mapping: MappingConfig, requestId: string, ran: boolean, row: TextRow): void {
    const source = this.sourceBuffer!;
    if (source.lane.applied(ctx.tx.finalLsn)) return;
    const { form } = ctx;
    source
      .group(`${outcome.op}:${mapping.name}`, `${form.schema}.${form.table}`, requestId, () => new SourceBookkeeping(outcome, mapping, form, this.assigned.get(mapping.name)))
      .add(requestId, ctx.change.lsn, ran, { version: row.dso_version ?? null, hops: countHops(row.dso_mapping_history), current: row.dso_current_server ?? null });
    this.unflushed += 1;
  }

  private reject(ctx: ChangeContext, type: ApplyFailure['type'], mapping: MappingConfig, requestId: string, targetServer: string, error: string, payload: Record<string, unknown>): void {
    this.rejected.push({ type, mapping, source: ctx.form, targetServer, requestId, lsn: ctx.change.lsn, sqlstate: null, payload, error });
    this.unflushed += 1;
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
    const { schema, table } = change.relation;
    const formKey = `${schema}.${table}`;
    const form = this.forms.get(formKey);
    if (!form) return;
    const { rules } = this.opts;
    const filtered = rules.filtersFor(this.server, schema, table, change.op).length > 0;
    const chained = change.op !== 'insert' && this.chainForms.has(formKey);
    if (!filtered && !chained) return;
    const ctx: ChangeContext = { change, form, tx, sentTo: new Set(), ownership: null, waits: [] };
    if (filtered) {
      const facts = buildFacts(change, tx.writer, rules.columnsFor(this.server, schema, table, change.op), this.baseTypes);
      const fired = rules.evaluate(this.server, schema, table, facts, (err) => this.log.warn({ filter: err.filter, lsn: formatLsn(change.lsn) }, err.message));
      for (const { filter, actions } of fired) {
        for (const action of actions) this.perform(action, filter, ctx, facts);
      }
    }
    if (chained) this.keepInStep(ctx);
    if (ctx.waits.length === 0) return;
    return Promise.all(ctx.waits).then(() => undefined);
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

  private perform(action: ActionConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const { mappings } = this.opts.config;
    switch (action.type) {
      case 'transfer':
        return this.transfer(mappings[action.mapping]!, action.overrideLoopDetection, filter, ctx, facts);
      case 'update':
        return this.update(mappings[action.mapping]!, filter, ctx, facts);
      case 'return':
        return this.return(action.mapping, action.overrideLoopDetection, filter, ctx, facts);
      case 'delete':
        return this.deleteCopy(mappings[action.mapping]!, ctx);
    }
  }

  /**
   * The new row and request ID of a change a master-only operation (transfer, update, return)
   * acts on; null (and a debug line) when it does not: a delete, or a copy that is not master.
   */
  private masterChange(ctx: ChangeContext, facts: Facts, filter: string, operation: string): { row: TextRow; requestId: string } | null {
    const row = ctx.change.new;
    if (ctx.change.op === 'delete' || !row) return null;
    const requestId = row[ctx.form.keyColumn];
    if (requestId === null || requestId === undefined) return null;
    if (!facts.master) {
      this.log.debug({ filter, requestId }, `not the master copy: no ${operation}`);
      return null;
    }
    return { row, requestId };
  }

  private transfer(mapping: MappingConfig, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'transfer');
    if (!found) return;
    const { row, requestId } = found;
    const { change, form, tx } = ctx;
    const target = `${mapping.to.server}.${mapping.to.schema}.${mapping.to.table}`;
    const historyText = row.dso_mapping_history ?? '[]';
    const visited = visitedServers(historyText);
    if (visited === null) {
      // a history edited into something else: no loop information, no chain to extend
      this.reject(ctx, 'transfer', mapping, requestId, mapping.to.server, `mapping "${mapping.name}": request ${requestId}: dso_mapping_history is not a list of hops with fromServer and fromRequestId: ${historyText.slice(0, 200)}`, { target, history: historyText });
      return;
    }
    if (!override && visited.has(mapping.to.server)) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request has been on the target server');
      return;
    }
    const owns = mapping.transferMode === 'data+ownership';
    if (owns && ctx.ownership !== null && ctx.ownership !== mapping.name) {
      // DSO: ownership cannot be broadcast; the first transfer with ownership took it
      this.reject(ctx, 'transfer', mapping, requestId, mapping.to.server, `mapping "${mapping.name}": request ${requestId}: ownership cannot be broadcast: filter "${filter}" already transferred it with ownership by mapping "${ctx.ownership}" in the same change; use data-only or independent-copy for the other copies`, { target });
      return;
    }
    if (owns) ctx.ownership = mapping.name;
    ctx.sentTo.add(mapping.to.server);
    const targetKey = targetKeyOf(row, mapping, requestId);
    const buffer = this.bufferFor(mapping.to.server, mapping.pool, `${mapping.to.schema}.${mapping.to.table}`, targetKey);
    const runs = !buffer.lane.applied(tx.finalLsn);
    if (runs) {
      const plan = this.planFor(change.relation, mapping, form);
      const [before, after] = this.hopTemplate(mapping, form, tx);
      const history = withHop(historyText, `${before}${JSON.stringify(requestId)}${after}`);
      const groupKey = `transfer:${mapping.name}`;
      buffer
        .group(groupKey, `${mapping.to.schema}.${mapping.to.table}`, targetKey, () => new TransferGroup(plan, form, this.assignedFor(mapping)))
        .addChange({ requestId, targetKey, values: valuesOf(plan, row, form), history, modifiedAt: row.dso_modified_at ?? null, lsn: change.lsn }, change.op === 'insert');
      this.enqueued(ctx, buffer, groupKey);
    }
    this.bookkeeping(ctx, { op: 'transfer' }, mapping, requestId, runs, row);
    // the copies behind this one learn where the master is now
    if (owns) this.relay(ctx, row, 'from', { current: [mapping.to.server, mapping.to.table], values: false });
  }

  private assignedFor(mapping: MappingConfig): Map<string, string> {
    let found = this.assigned.get(mapping.name);
    if (!found) this.assigned.set(mapping.name, (found = new Map()));
    return found;
  }

  /** The update action: the master's current values to the copy on the mapping's target, now. */
  private update(mapping: MappingConfig, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'update');
    if (!found) return;
    const { row, requestId } = found;
    const link = this.links.get(`${mapping.name}>`)!;
    ctx.sentTo.add(link.server);
    const ran = this.updateCopy(ctx, link, 'update', true, { requestId, targetKey: targetKeyOf(row, mapping, requestId), history: row.dso_mapping_history ?? '[]', values: valuesOf(link.plan, row, ctx.form), current: null, master: null, newHistory: null, lsn: ctx.change.lsn });
    this.bookkeeping(ctx, { op: 'update' }, mapping, requestId, ran, row);
  }

  /**
   * The return action: ownership back to the server the request came from (by the mapping that
   * brought it, or the one named), with the current values unless the mapping never updates.
   * Loop detection: a request is not returned twice to the same server unless overridden.
   */
  private return(named: string | undefined, override: boolean, filter: string, ctx: ChangeContext, facts: Facts): void {
    const found = this.masterChange(ctx, facts, filter, 'return');
    if (!found) return;
    const { row, requestId } = found;
    const { change, form, tx } = ctx;
    const name = named ?? row.dso_from_mapping;
    const mapping = name ? this.opts.config.mappings[name] : undefined;
    const link = name ? this.links.get(`${name}<`) : undefined;
    const fromKey = row.dso_from_request_id;
    if (!mapping || !link || !fromKey || mapping.to.schema !== form.schema || mapping.to.table !== form.table) {
      const anyMapping = mapping ?? Object.values(this.opts.config.mappings).find((m) => m.to.server === this.server && m.to.schema === form.schema && m.to.table === form.table);
      if (!anyMapping) throw new Error(`filter "${filter}": a return action on ${form.schema}.${form.table} without a mapping to it`); // refused by the config check
      this.reject(ctx, 'return', anyMapping, requestId, row.dso_from_server ?? '(none)', `filter "${filter}": request ${requestId} has nowhere to return to: it was not transferred here${name ? ` by mapping "${name}"` : ''} (dso_from_mapping ${row.dso_from_mapping ?? 'is empty'})`, { from: { server: row.dso_from_server ?? null, requestId: fromKey ?? null, mapping: row.dso_from_mapping ?? null } });
      return;
    }
    const historyText = row.dso_mapping_history ?? '[]';
    if (!override && returnedBefore(historyText, link.server)) {
      this.log.debug({ filter, mapping: mapping.name, requestId }, 'loop detection: the request was returned to that server before');
      return;
    }
    const hop = JSON.stringify({
      at: tx.commitTime.toISOString(), mapping: mapping.name, operation: 'return',
      fromServer: this.server, fromForm: form.table, fromRequestId: requestId, toServer: link.server, toForm: mapping.from.table,
    });
    const newHistory = withHop(historyText, hop);
    const current = [mapping.from.server, mapping.from.table] as const;
    ctx.sentTo.add(link.server);
    const withValues = mapping.whenToUpdate !== 'never';
    const ran = this.updateCopy(ctx, link, 'return', withValues, { requestId, targetKey: fromKey, history: historyText, values: withValues ? valuesOf(link.plan, row, form) : [], current, master: true, newHistory, lsn: change.lsn });
    this.bookkeeping(ctx, { op: 'return' }, mapping, requestId, ran, row);
    this.relay(ctx, row, 'to', { current, values: false });
  }

  /** The delete action: the copy on the mapping's target goes. */
  private deleteCopy(mapping: MappingConfig, ctx: ChangeContext): void {
    const row = ctx.change.op === 'delete' ? ctx.change.old : ctx.change.new;
    const requestId = row?.[ctx.form.keyColumn];
    if (!row || requestId === null || requestId === undefined) return;
    const link = this.links.get(`${mapping.name}>`)!;
    this.deleteOn(ctx, link, { requestId, targetKey: targetKeyOf(row, mapping, requestId), history: row.dso_mapping_history ?? '[]', lsn: ctx.change.lsn });
  }

  /**
   * Keeps the chain in step: a change of the master copy (by a user, or relayed by a
   * neighbour's engine) goes to the copies linked to this one by mappings that update
   * immediately, except the neighbour it came from and any server an action already carried
   * it to; a deleted master deletes them.
   */
  private keepInStep(ctx: ChangeContext): void {
    const { change, tx } = ctx;
    const row = change.op === 'delete' ? change.old : change.new;
    if (!row) return;
    if (tx.writer === null && row.dso_master !== 't') return;
    for (const side of ['from', 'to'] as const) {
      if (change.op === 'delete') {
        const link = this.chainLink(ctx, row, side);
        const targetKey = row[`dso_${side}_request_id`];
        if (!link || !targetKey) continue;
        this.deleteOn(ctx, link, { requestId: row[ctx.form.keyColumn]!, targetKey, history: row.dso_mapping_history ?? '[]', lsn: change.lsn });
      } else {
        this.relay(ctx, row, side, { current: row.dso_current_server && row.dso_current_form ? [row.dso_current_server, row.dso_current_form] : null, values: true });
      }
    }
  }

  /** The link on that side of the copy when it keeps the chain in step and is not where the change came from. */
  private chainLink(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', evenToWriter = false): Link | undefined {
    const name = row[`dso_${side}_mapping`];
    const mapping = name ? this.opts.config.mappings[name] : undefined;
    if (!mapping || !keptInStep(mapping)) return undefined;
    const here = side === 'to' ? mapping.from : mapping.to;
    if (here.server !== this.server || here.schema !== ctx.form.schema || here.table !== ctx.form.table) return undefined;
    const link = this.links.get(`${mapping.name}${side === 'to' ? '>' : '<'}`);
    if (!link || (!evenToWriter && link.server === ctx.tx.writer)) return undefined;
    return link;
  }

  /**
   * An update of the linked copy on that side: values and where the master is, or only where
   * the master is now (that news goes to the writer's server too: it does not know yet).
   */
  private relay(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', what: { current: readonly [string, string] | null; values: boolean }): void {
    const link = this.chainLink(ctx, row, side, !what.values);
    const targetKey = row[`dso_${side}_request_id`];
    const requestId = row[ctx.form.keyColumn];
    if (!link || !targetKey || !requestId || ctx.sentTo.has(link.server)) return;
    this.updateCopy(ctx, link, 'chain', what.values, { requestId, targetKey, history: row.dso_mapping_history ?? '[]', values: what.values ? valuesOf(link.plan, row, ctx.form) : [], current: what.current, master: null, newHistory: null, lsn: ctx.change.lsn });
  }

  /** Buffers an update of a copy on a link's server; false when the lane had already applied it (replay). */
  private updateCopy(ctx: ChangeContext, link: Link, kind: UpdateKind, withValues: boolean, row: CopyUpdate): boolean {
    return this.onLink(ctx, link, `${kind}:${withValues}`, row, () => new CopyUpdateGroup(link, kind, withValues, ctx.form, this.server));
  }

  private deleteOn(ctx: ChangeContext, link: Link, row: CopyDelete): void {
    this.onLink(ctx, link, 'delete', row, () => new CopyDeleteGroup(link, ctx.form, this.server));
  }

  /** Buffers an operation on a copy on a link's server; false when the lane had already applied it (replay). */
  private onLink<R extends { requestId: string; targetKey: string }>(ctx: ChangeContext, link: Link, kind: string, row: R, create: () => RequestGroup<R>): boolean {
    const table = `${link.plan.target.schema}.${link.plan.target.table}`;
    const buffer = this.bufferFor(link.server, link.mapping.pool, table, row.targetKey);
    if (buffer.lane.applied(ctx.tx.finalLsn)) return false;
    const groupKey = `${kind}:${link.mapping.name}${link.forward ? '>' : '<'}`;
    buffer.group(groupKey, table, row.targetKey, create).add(row);
    this.enqueued(ctx, buffer, groupKey);
    return true;
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
      await sourceLane.runAlone((client) => recordFailures(client, failures));
      for (const f of failures) this.log.warn({ mapping: f.mapping.name, type: f.type, requestId: f.requestId, sqlstate: f.sqlstate }, f.error);
    }
    // Targets commit first, then the source copies' bookkeeping: no transaction of this engine
    // stays open while it waits for another engine (two engines writing each other's rows would
    // wait for each other forever, unseen by PostgreSQL's deadlock detector). Meanwhile a target's
    // engine may already act on its new copy and write back (a return, a transfer back): the
    // bookkeeping leaves ownership alone on a copy another engine wrote since (SourceBookkeeping).
    await Promise.all(lanes.filter((b) => b.lane.dirty).map((b) => b.lane.commit(last.finalLsn, last.commitTime)));
    const failed = new Set(failures.map((f) => changeKey(f.type, f.mapping.name, f.requestId, f.lsn)));
    for (const group of this.sourceBuffer!.pendingGroups()) if (group instanceof SourceBookkeeping) group.dropFailed(failed);
    this.sourceBuffer!.submitAll();
    await sourceLane.commit(last.finalLsn, last.commitTime);
    this.stats.applied += this.unflushed;
    this.stats.failed += failures.length;
    this.unflushed = 0;
    this.pinned.clear();
    for (const ids of this.assigned.values()) ids.clear();
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

/** The request's mapping history (jsonb text) with one more hop (JSON text). */
function withHop(historyText: string, hop: string): string {
  return historyText === '[]' ? `[${hop}]` : `${historyText.slice(0, -1)}, ${hop}]`;
}

/** The request ID of the copy a mapping's target holds: the one the source copy recorded, else the same. */
function targetKeyOf(row: TextRow, mapping: MappingConfig, requestId: string): string {
  return row.dso_to_mapping === mapping.name && row.dso_to_request_id ? row.dso_to_request_id : requestId;
}

/** A plan's values from a row, as text, aligned with plan.columns. */
function valuesOf(plan: ColumnPlan, row: TextRow, form: FormInfo): (string | null)[] {
  const values = plan.columns.map((c) => (c.from.kind === 'constant' ? c.from.text : row[c.from.column]));
  if (values.some((v) => v === undefined)) throw new Error(`form ${form.schema}.${form.table} is not replica identity full: run pgdso forms enable`);
  return values as (string | null)[];
}

/** True when the history holds a return to that server. */
function returnedBefore(historyText: string, server: string): boolean {
  if (historyText === '[]') return false;
  try {
    const hops = JSON.parse(historyText) as { operation?: unknown; toServer?: unknown }[];
    return Array.isArray(hops) && hops.some((h) => h?.operation === 'return' && h.toServer === server);
  } catch {
    return false;
  }
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
