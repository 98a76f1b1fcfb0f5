// One server's engine: sessions one after the other until the signal aborts. A session that
// fails is followed by a new one (after a jittered backoff, or at once when a peer failed in the
// middle of a batch), which replays everything unconfirmed; an error only a DBA can fix stops
// the engine, with the fix on the server's board.
import type pg from 'pg';
import type { Logger } from 'pino';
import os from 'node:os';
import { setTimeout as delay } from 'node:timers/promises';
import { toPgClientConfig } from '../config/load.ts';
import { classifyError, type ClassifiedError } from '../applier/errors.ts';
import { refusalOf, type Refusal } from '../sql/grants.ts';
import { withClient } from '../sql/client.ts';
import { PeerFailedMidBatch } from './errors.ts';
import { isFenced } from '../sql/fencing.ts';
import { EngineSession } from './session.ts';
import type { EngineOptions, EngineStats, PeerDown } from './types.ts';

/** Counters at zero. */
export function emptyEngineStats(): EngineStats {
  return {
    transactions: 0,
    changes: 0,
    applied: 0,
    failed: 0,
    queued: 0,
    delivered: 0,
    sourceRetries: 0,
    heartbeats: 0,
    scanned: 0,
    confirmedLsn: '0/0',
    sessions: 0,
    slotLagBytes: null,
    retainedWalBytes: null,
    peersDown: [],
    stoppedBy: null,
  };
}

/** Runs one server's engine until the signal aborts, reconnecting after failures. */
export class ServerEngine {
  readonly stats: EngineStats;
  readonly server: string;
  private readonly log: Logger;
  private session: EngineSession | null = null;
  /** peers that could not be reached, across sessions: a new session does not try them before their next attempt */
  private readonly downPeers = new Map<string, PeerDown>();

  constructor(private readonly opts: EngineOptions) {
    this.server = opts.server;
    this.stats = opts.stats ?? emptyEngineStats();
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
      const session = new EngineSession(this.opts, this.log, this.stats, this.downPeers);
      let replayNow = false;
      let refused: ClassifiedError | null = null;
      this.session = session;
      const started = Date.now();
      this.stats.sessions += 1;
      try {
        await session.run(signal);
      } catch (err) {
        if (signal.aborted) break;
        // a newer owner of the operation wrote: this instance stops it (its supervisor decides what next)
        if (isFenced(err)) {
          this.log.info({ error: (err as Error).message }, 'the dso operation moved to another instance: this engine stops');
          return;
        }
        // a peer that failed mid-batch: expected, the batch goes again at once, the peer's operations to the queue
        replayNow = err instanceof PeerFailedMidBatch;
        const classified = classifyError(err);
        if (replayNow) this.log.info(classified.message);
        else if (classified.class === 'permanent') refused = classified;
        else
          this.log.warn(
            { sqlstate: classified.sqlstate, error: classified.message },
            'engine session failed; replaying from the confirmed position',
          );
      } finally {
        this.session = null;
        await session.close();
      }
      if (signal.aborted) break;
      // the server refuses the engine itself: retrying changes nothing until a DBA acts
      if (refused) return this.stopOn(refused);
      if (replayNow) continue;
      if (Date.now() - started > 60_000) wait = minMs;
      const jittered = wait / 2 + Math.random() * (wait / 2);
      await delay(jittered, undefined, { signal }).catch(() => {});
      wait = Math.min(maxMs, wait * 2);
    }
  }

  /**
   * Stops this server's engine on an error only a DBA can fix: one error-level line with the
   * statement to run, and the instance's row on the server's board says why (for `pgdso status`).
   */
  private async stopOn(classified: ClassifiedError): Promise<void> {
    const connection = toPgClientConfig(this.opts.config.servers[this.server]!.connection);
    this.stats.stoppedBy = await stopOnRefusal({ connection, server: this.server, instanceId: this.instanceId, log: this.log }, classified);
  }

  private get instanceId(): string {
    return this.opts.instanceId ?? `${os.hostname()}-${process.pid}`;
  }
}

/**
 * Stops on an error only a DBA can fix: one error-level line with the statement to run, and the
 * instance's row on the server's board says why (for `pgdso status`), when the board is reachable.
 */
export async function stopOnRefusal(
  who: { connection: pg.ClientConfig; server: string; instanceId: string; log: Logger },
  classified: ClassifiedError,
): Promise<Refusal> {
  const { connection, server, instanceId, log } = who;
  const role = String(connection.user ?? process.env.PGUSER ?? 'pgdso');
  const refusal = refusalOf(classified.sqlstate, classified.message, role, String(connection.database)) ?? {
    missing: 'access',
    fix: classified.message,
  };
  log.error(
    { sqlstate: classified.sqlstate, error: classified.message, missing: refusal.missing, fix: refusal.fix },
    `the engine of ${server} stops: PostgreSQL refuses it ${refusal.missing}. Fix: ${refusal.fix} Then start pgdso run again.`,
  );
  await withClient(connection, (client) =>
    recordStop(client, server, instanceId, `${classified.sqlstate ?? ''} ${classified.message}`.trim(), refusal.fix),
  ).catch(() => undefined);
  return refusal;
}

/** Puts a stopped instance on the board with the error that stopped it. */
async function recordStop(client: pg.ClientBase, server: string, instanceId: string, error: string, fix: string): Promise<void> {
  await client.query(
    `INSERT INTO pgdso.servgrp_board
       (instance_id, server_name, host, pid, state, operations, last_seen_at, last_error, last_error_fix, last_error_at)
     VALUES ($1, $2, $3, $4, 'stopped', '{}', now(), $5, $6, now())
     ON CONFLICT (instance_id) DO UPDATE SET state = 'stopped', operations = '{}', last_seen_at = now(),
       last_error = $5, last_error_fix = $6, last_error_at = now()`,
    [instanceId, server, os.hostname(), process.pid, error, fix],
  );
}
