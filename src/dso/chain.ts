// The chain of a request's copies kept in step: a change of the master copy reaches the copies
// linked to it by mappings that update immediately (relayed on from copy to copy), a deleted
// master deletes them, and a move of ownership tells the copies behind where the master is now.
import { InFlight } from './in-flight.ts';
import type { TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import { CopyDeleteGroup, CopyUpdateGroup, type CopyDelete, type CopyUpdate, type Link, type UpdateKind } from '../applier/chain.ts';
import type { RequestGroup } from '../applier/sets.ts';
import type { PendingEntry } from '../queue/sql.ts';
import type { Router } from '../engine/router.ts';
import type { SessionState } from '../engine/state.ts';
import { keptInStep, valuesOf, type Topology } from '../engine/topology.ts';
import type { ChangeContext, LinkRef, Route } from '../engine/types.ts';
import { seenOf } from '../engine/batch.ts';
import { unchangedColumns, type Refusals } from './refusals.ts';

/** transfers remembered at most (the oldest is forgotten first); the WAL shows their bookkeeping within a batch */
const IN_FLIGHT_LIMIT = 200_000;

export class Chain {
  /**
   * Transfers sent by this session whose source bookkeeping (dso_to_*) the WAL has not shown yet:
   * a user's change of the request committed in between carries no dso_to_*, yet its copy exists
   * (or is on its way): the change is relayed along the transfer's link all the same. Forgotten
   * once a change of the request shows that link (the bookkeeping, or a later change).
   */
  private readonly inFlight = new InFlight(IN_FLIGHT_LIMIT);

  constructor(
    private readonly state: SessionState,
    private readonly topology: Topology,
    private readonly router: Router,
    private readonly refusals: Refusals,
  ) {}

  /**
   * Keeps the chain in step: a change of the master copy (by a user, or relayed by a
   * neighbour's engine) goes to the copies linked to this one by mappings that update
   * immediately, except the neighbour it came from and any server an action already carried
   * it to; a deleted master deletes them.
   */
  keepInStep(ctx: ChangeContext): void {
    const { change, tx } = ctx;
    const image = change.op === 'delete' ? change.old : change.new;
    if (!image) return;
    // a user's change may predate the bookkeeping of a transfer in flight; an engine's write
    // carries its own news (a return, a relay) and ends what was remembered
    const row = tx.writer === null ? this.withTransferInFlight(ctx, image) : this.forget(ctx, image);
    // dso_master is NOT NULL: without it, the key alone came
    if (change.op === 'delete' && row.dso_master == null) return this.refusals.incompleteDelete(ctx, row);
    if (tx.writer === null && row.dso_master !== 't') return;
    for (const side of ['from', 'to'] as const) {
      if (change.op === 'delete') {
        const link = this.chainLink(ctx, row, side);
        const targetKey = row[`dso_${side}_request_id`];
        if (!link || !targetKey) continue;
        this.deleteOn(ctx, link, { requestId: row[ctx.form.keyColumn]!, targetKey, history: row.dso_mapping_history ?? '[]' });
      } else {
        this.relay(ctx, row, side, {
          current: row.dso_current_server && row.dso_current_form ? [row.dso_current_server, row.dso_current_form] : null,
          values: true,
        });
      }
    }
  }

  /** A transfer along a mapping that keeps its chain in step was sent for this request. */
  expect(ctx: ChangeContext, mapping: MappingConfig, requestId: string, targetKey: string): void {
    // with ownership, the master is on the target from now on: the relayed change says so
    const master = mapping.transferMode === 'data+ownership' ? ([mapping.to.server, mapping.to.table] as const) : null;
    this.inFlight.set(ctx.form, requestId, { mapping: mapping.name, targetKey, master });
  }

  /** A change of a source copy that this engine wrote (its bookkeeping): what it shows needs no memory. */
  written(ctx: Pick<ChangeContext, 'change' | 'form'>): void {
    if (this.inFlight.size === 0) return;
    const { change } = ctx;
    // two columns of the row (the others are not decoded)
    const value = (column: string) => (change.newValue ? change.newValue(column) : change.new?.[column]);
    const requestId = value(ctx.form.keyColumn);
    if (!requestId) return;
    const mapping = this.inFlight.mappingOf(ctx.form, requestId);
    if (mapping !== undefined && mapping === value('dso_to_mapping')) this.inFlight.delete(ctx.form, requestId);
  }

  private forget(ctx: ChangeContext, row: TextRow): TextRow {
    const requestId = row[ctx.form.keyColumn];
    if (this.inFlight.size > 0 && requestId) this.inFlight.delete(ctx.form, requestId);
    return row;
  }

  /** The row, with the link of a transfer in flight when the row does not show it yet. */
  private withTransferInFlight(ctx: ChangeContext, row: TextRow): TextRow {
    if (this.inFlight.size === 0) return row;
    const requestId = row[ctx.form.keyColumn];
    if (!requestId) return row;
    const sent = this.inFlight.get(ctx.form, requestId);
    if (!sent) return row;
    if (row.dso_to_mapping === sent.mapping) {
      this.inFlight.delete(ctx.form, requestId);
      return row;
    }
    const moved = sent.master ? { dso_current_server: sent.master[0], dso_current_form: sent.master[1] } : {};
    return { ...row, dso_to_mapping: sent.mapping, dso_to_request_id: sent.targetKey, ...moved };
  }

  /** The link on that side of the copy when it keeps the chain in step and is not where the change came from. */
  private chainLink(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', evenToWriter = false): LinkRef | undefined {
    const name = row[`dso_${side}_mapping`];
    const mapping = name ? this.state.opts.config.mappings[name] : undefined;
    if (!mapping || !keptInStep(mapping)) return undefined;
    const here = side === 'to' ? mapping.from : mapping.to;
    if (here.server !== this.state.server || here.schema !== ctx.form.schema || here.table !== ctx.form.table) return undefined;
    const link = this.topology.links.get(`${mapping.name}${side === 'to' ? '>' : '<'}`);
    if (!link || (!evenToWriter && link.server === ctx.tx.writer)) return undefined;
    return link;
  }

  /**
   * An update of the linked copy on that side: values and where the master is, or only where
   * the master is now (that news goes to the writer's server too: it does not know yet).
   */
  relay(ctx: ChangeContext, row: TextRow, side: 'from' | 'to', what: { current: readonly [string, string] | null; values: boolean }): void {
    const link = this.chainLink(ctx, row, side, !what.values);
    const targetKey = row[`dso_${side}_request_id`];
    const requestId = row[ctx.form.keyColumn];
    if (!link || !targetKey || !requestId || ctx.sentTo.has(link.server)) return;
    this.updateCopy(ctx, link, 'chain', what.values, row, {
      requestId,
      targetKey,
      history: row.dso_mapping_history ?? '[]',
      current: what.current,
      master: null,
      newHistory: null,
    });
  }

  /** An update of a copy on a link's server (values from the source row when it carries them). */
  updateCopy(
    ctx: ChangeContext,
    link: LinkRef,
    kind: UpdateKind,
    withValues: boolean,
    row: TextRow,
    update: Omit<CopyUpdate, 'values' | 'lsn'>,
    bk?: 'update' | 'return',
  ): Route['to'] {
    const entry = this.router.entry(
      link,
      {
        group: 'copy-update',
        kind,
        withValues,
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: update.requestId,
        targetKey: update.targetKey,
        history: update.history,
        row: withValues ? row : null,
        current: update.current,
        master: update.master,
        newHistory: update.newHistory,
        ...(bk ? { bookkeeping: { op: bk, seen: seenOf(row) } } : {}),
      },
      ctx.change.lsn,
    );
    const missing = withValues ? unchangedColumns(ctx.change, link) : null;
    if (missing) {
      this.refusals.refuseIncomplete(ctx, entry, missing);
      return 'skip';
    }
    return this.onLink(ctx, link, entry, (resolved) => {
      const group = () => new CopyUpdateGroup(resolved, kind, withValues, ctx.form, this.state.server);
      return [
        `${kind}:${withValues}:${this.topology.planId(resolved.plan)}`,
        group,
        { ...update, values: withValues ? valuesOf(resolved.plan, row, ctx.form) : [], lsn: ctx.change.lsn },
      ];
    });
  }

  /** A delete of the copy on a link's server. */
  deleteOn(ctx: ChangeContext, link: LinkRef, del: Omit<CopyDelete, 'lsn'>): void {
    const entry = this.router.entry(
      link,
      {
        group: 'copy-delete',
        form: `${ctx.form.schema}.${ctx.form.table}`,
        requestId: del.requestId,
        targetKey: del.targetKey,
        history: del.history,
        row: null,
      },
      ctx.change.lsn,
    );
    this.onLink(ctx, link, entry, (resolved) => [
      'delete',
      () => new CopyDeleteGroup(resolved, ctx.form, this.state.server),
      { ...del, lsn: ctx.change.lsn },
    ]);
  }

  /** Sends an operation on a copy on a link's server: to its lane, or to the queue. */
  private onLink<R extends { requestId: string; targetKey: string; lsn: bigint; coalesced?: bigint[] }>(
    ctx: ChangeContext,
    link: LinkRef,
    entry: PendingEntry,
    build: (resolved: Link) => [string, () => RequestGroup<R>, R],
  ): Route['to'] {
    const route = this.router.route(link.server, link.mapping.pool, entry.targetForm, entry.op.targetKey, ctx.tx.finalLsn);
    return this.router.dispatch(ctx, route, entry, (buffer) => {
      const [kind, create, row] = build(link.resolved!);
      const groupKey = `${kind}:${link.mapping.name}${link.forward ? '>' : '<'}`; // kinds with values carry their plan's id
      buffer.group(groupKey, entry.targetForm, row.targetKey, create).add(row);
      return groupKey;
    });
  }
}
