// The escalations of one server, run by the owner of its `escalation` operation (or in-process by
// `pgdso escalate` when no instance runs): at each fire time, a run scans the form and hands the
// matching requests to the engine (src/scan). A run interrupted anywhere (kill -9, a failover)
// is resumed by the next owner from its last batch; a fire time that passed while nobody owned
// the operation runs once, at takeover, not once per missed tick.
import type { Logger } from 'pino';
import type pg from 'pg';
import type { CompiledEscalation, CompiledRules } from '../rules/index.ts';
import { withClient } from '../sql/client.ts';
import { scanForm, ScanFenced, type ScanProgress } from '../scan/scanner.ts';
import { claimRun, createRun, firstSeen, lastScheduledFire, unfinishedRun, type OwnerGate, type ScanRun } from '../scan/runs.ts';
import { fireTimes, systemClock, type Clock, type FireTimes } from './schedule.ts';

export interface EscalationsOptions {
  server: string;
  connection: pg.ClientConfig;
  instanceId: string;
  log: Logger;
  /** the rules in force now (a published set replaces them) */
  rules: () => CompiledRules;
  clock?: Clock;
  batchRows?: number;
  /** the longest wait between two looks at the schedule, ms (rules may change meanwhile) */
  idleMs?: number;
}

/** What one run did. */
export interface RunSummary {
  escalation: string;
  run: number;
  fireTime: string;
  trigger: ScanRun['trigger'];
  instanceId: string;
  scanned: number;
  matched: number;
  errors: number;
}

export class Escalations {
  private readonly clock: Clock;
  private readonly schedules = new Map<string, { key: string; times: FireTimes }>();
  /** the runs this process carries out now: a tick meanwhile must not take one as interrupted */
  private readonly active = new Set<number>();
  /** escalations whose manual run is being created here: visible in the table before its id is known */
  private readonly creating = new Map<string, number>();

  constructor(private readonly opts: EscalationsOptions) {
    this.clock = opts.clock ?? systemClock;
  }

  /** Runs the server's escalations while `gate` (this instance's ownership) holds, until the signal. */
  async run(gate: OwnerGate | null, signal: AbortSignal): Promise<void> {
    const { log } = this.opts;
    let failures = 0;
    while (!signal.aborted) {
      try {
        await this.tick(gate, signal);
        failures = 0;
      } catch (err) {
        if (signal.aborted) break;
        failures += 1;
        log.error({ error: (err as Error).message }, 'the escalations could not run; trying again');
        await realDelay(Math.min(30_000, 500 * 2 ** Math.min(failures, 6)), signal);
        continue;
      }
      await this.clock.sleepUntil(this.wakeAt(), signal);
    }
  }

  /** Resumes an interrupted run and starts the due one, for each escalation of the server. */
  async tick(gate: OwnerGate | null, signal: AbortSignal): Promise<RunSummary[]> {
    const escalations = this.opts.rules().escalationsFor(this.opts.server);
    if (escalations.length === 0) return [];
    // what to run, read on one connection: an interrupted run of each, then its due fire time
    const todo = await withClient(this.opts.connection, async (client) => {
      const list: { escalation: CompiledEscalation; run: ScanRun }[] = [];
      for (const escalation of escalations) {
        // a run this process carries out now (`pgdso escalate` meanwhile) is not interrupted
        const unfinished = await unfinishedRun(client, 'escalation', escalation.name, this.active);
        if (unfinished && !this.active.has(unfinished.id) && !this.creating.has(escalation.name))
          list.push({ escalation, run: unfinished });
        const now = this.clock.now();
        const first = await firstSeen(client, escalation.name, now);
        const last = await lastScheduledFire(client, escalation.name);
        const due = this.timesOf(escalation).lastDue(last && last > first ? last : first, now);
        if (due) {
          const run = await createRun(client, {
            kind: 'escalation',
            name: escalation.name,
            fireTime: due,
            trigger: 'schedule',
            form: formOf(escalation),
          });
          list.push({ escalation, run });
        }
      }
      return list;
    });
    const done: RunSummary[] = [];
    for (const { escalation, run } of todo) {
      if (signal.aborted) break;
      const summary = await this.carryOut(escalation, run, gate, signal);
      if (summary) done.push(summary);
    }
    return done;
  }

  /** Runs one escalation now (`pgdso escalate`), whatever its schedule. */
  async runNow(name: string, gate: OwnerGate | null, signal: AbortSignal): Promise<RunSummary> {
    const escalation = this.opts.rules().escalation(name);
    if (!escalation || escalation.on.server !== this.opts.server)
      throw new Error(`no escalation "${name}" on server ${this.opts.server} in the rules in force`);
    // the run is in the table before its id is known here: a tick meanwhile must not take it
    this.creating.set(name, (this.creating.get(name) ?? 0) + 1);
    let run: ScanRun;
    try {
      run = await withClient(this.opts.connection, (client) =>
        createRun(client, { kind: 'escalation', name, fireTime: this.clock.now(), trigger: 'manual', form: formOf(escalation) }),
      );
      this.active.add(run.id);
    } finally {
      const n = (this.creating.get(name) ?? 1) - 1;
      if (n > 0) this.creating.set(name, n);
      else this.creating.delete(name);
    }
    try {
      const summary = await this.claimAndScan(escalation, run, gate, signal);
      if (!summary) throw new Error(`escalation "${name}": run ${run.id} was taken over by another instance`);
      return summary;
    } finally {
      this.active.delete(run.id);
    }
  }

  private async carryOut(
    escalation: CompiledEscalation,
    run: ScanRun,
    gate: OwnerGate | null,
    signal: AbortSignal,
  ): Promise<RunSummary | null> {
    if (this.active.has(run.id)) return null;
    this.active.add(run.id);
    try {
      return await this.claimAndScan(escalation, run, gate, signal);
    } finally {
      this.active.delete(run.id);
    }
  }

  private async claimAndScan(
    escalation: CompiledEscalation,
    run: ScanRun,
    gate: OwnerGate | null,
    signal: AbortSignal,
  ): Promise<RunSummary | null> {
    const { log, instanceId } = this.opts;
    const claimed = await withClient(this.opts.connection, (client) => claimRun(client, run, instanceId, gate));
    if (!claimed) return null;
    const resumed = claimed.lastKey !== null;
    log.info(
      {
        escalation: escalation.name,
        run: claimed.id,
        fireTime: claimed.fireTime.toISOString(),
        trigger: claimed.trigger,
        ...(resumed ? { after: claimed.lastKey } : {}),
      },
      resumed ? `escalation "${escalation.name}" resumes its run after request ${claimed.lastKey}` : `escalation "${escalation.name}" runs`,
    );
    let totals: ScanProgress;
    try {
      totals = await scanForm({
        server: this.opts.server,
        connection: this.opts.connection,
        run: claimed,
        kind: 'escalation',
        name: escalation.name,
        schema: escalation.on.schema,
        table: escalation.on.table,
        predicate: escalation.predicate,
        columns: escalation.columns,
        readsOrigin: escalation.readsOrigin,
        actions: escalation.actions,
        batchRows: this.opts.batchRows ?? 500,
        log,
        signal,
      });
    } catch (err) {
      if (!(err instanceof ScanFenced)) throw err;
      log.warn({ escalation: escalation.name, run: claimed.id }, err.message);
      return null;
    }
    const summary: RunSummary = {
      escalation: escalation.name,
      run: claimed.id,
      fireTime: claimed.fireTime.toISOString(),
      trigger: claimed.trigger,
      instanceId,
      scanned: totals.scanned,
      matched: totals.matched,
      errors: totals.errors,
    };
    log.info(summary, `escalation "${escalation.name}" matched ${totals.matched} of ${totals.scanned} requests`);
    return summary;
  }

  /** The next fire time of any escalation of the server, at most idleMs away. */
  private wakeAt(): Date {
    const now = this.clock.now();
    let at = now.getTime() + (this.opts.idleMs ?? 30_000);
    for (const escalation of this.opts.rules().escalationsFor(this.opts.server)) {
      const next = this.timesOf(escalation).next(now);
      if (next && next.getTime() < at) at = next.getTime();
    }
    return new Date(at);
  }

  private timesOf(escalation: CompiledEscalation): FireTimes {
    const key = JSON.stringify(escalation.schedule);
    const known = this.schedules.get(escalation.name);
    if (known?.key === key) return known.times;
    const times = fireTimes(escalation.schedule);
    this.schedules.set(escalation.name, { key, times });
    return times;
  }
}

function formOf(escalation: CompiledEscalation): string {
  return `${escalation.on.schema}.${escalation.on.table}`;
}

function realDelay(ms: number, signal: AbortSignal): Promise<void> {
  return systemClock.sleepUntil(new Date(Date.now() + ms), signal);
}
