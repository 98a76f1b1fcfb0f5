// Timers beside the stream: a peer's next delivery attempt wakes the stream (deliveries run
// between transactions, with the stream paused); a quiet source gets a heartbeat message in its
// WAL so its slot keeps moving; the slot's lag and retained WAL are checked.
import type pg from 'pg';
import { errorText } from './errors.ts';
import type { SessionState } from './state.ts';

export class Timers {
  private readonly timers: NodeJS.Timeout[] = [];
  private lastActivity = Date.now();

  constructor(
    private readonly state: SessionState,
    /** true when the queue's delivery has work now */
    private readonly deliveryDue: () => boolean,
  ) {}

  /** A source transaction was decoded: no heartbeat is needed for a while. */
  activity(): void {
    this.lastActivity = Date.now();
  }

  start(control: pg.Client, slot: string): void {
    const { stats, log } = this.state;
    const { heartbeatMs, retainedWalWarnBytes } = this.state.opts.config.pending;
    const every = (ms: number, work: () => Promise<void> | void) => {
      const timer = setInterval(() => {
        Promise.resolve()
          .then(work)
          .catch((err) => log.debug({ err: errorText(err) }, 'background check failed'));
      }, ms);
      timer.unref();
      this.timers.push(timer);
    };
    every(250, () => {
      if (this.deliveryDue()) this.state.stream?.wake();
    });
    if (heartbeatMs > 0) {
      every(heartbeatMs, async () => {
        if (Date.now() - this.lastActivity < heartbeatMs) return;
        await control.query(`SELECT pg_logical_emit_message(false, 'pgdso.heartbeat', now()::text)`);
        stats.heartbeats += 1;
      });
    }
    let warnedAt = 0;
    const checkSlot = async () => {
      const res = await control.query(
        `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::float8 AS lag,
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::float8 AS retained
           FROM pg_replication_slots WHERE slot_name = $1`,
        [slot],
      );
      const row = res.rows[0] as { lag: number | null; retained: number | null } | undefined;
      stats.slotLagBytes = row?.lag ?? null;
      stats.retainedWalBytes = row?.retained ?? null;
      if (row?.retained != null && row.retained > retainedWalWarnBytes && Date.now() - warnedAt > 5 * 60_000) {
        warnedAt = Date.now();
        log.warn(
          { slot, retainedWalBytes: row.retained, thresholdBytes: retainedWalWarnBytes },
          'the replication slot holds more WAL than the threshold (pending.retainedWalWarnBytes): is the engine falling behind?',
        );
      }
    };
    every(Math.max(1000, Math.min(heartbeatMs || 10_000, 10_000)), checkSlot);
    void checkSlot().catch(() => {});
  }

  stop(): void {
    for (const timer of this.timers) clearInterval(timer);
  }
}
