// The one place that confirms WAL positions to the server. A position is confirmed only once
// what comes before it is applied everywhere it goes (or sits in pgdso.pending): a commit-end LSN
// after its batch committed (or when the transaction gave the engine nothing to do), or a
// heartbeat's position when nothing is in flight. Within a session the positions only rise;
// once the control connection (the `dso` lock) is lost, nothing more is confirmed.
import { formatLsn } from '../change.ts';
import type { SessionState } from './state.ts';

export class Checkpoint {
  private confirmed = 0n;

  constructor(private readonly state: SessionState) {}

  /** Confirms a source transaction's commit-end LSN: everything up to it is applied (or queued). */
  commit(endLsn: bigint): void {
    this.confirm(endLsn);
    this.state.stats.confirmedLsn = formatLsn(endLsn);
  }

  /** Confirms a heartbeat's position, taken with nothing in flight. */
  heartbeat(lsn: bigint): void {
    this.confirm(lsn);
  }

  private confirm(lsn: bigint): void {
    this.state.assertHeld();
    if (lsn < this.confirmed)
      throw new Error(`a confirmed WAL position would go back, from ${formatLsn(this.confirmed)} to ${formatLsn(lsn)}: a bug in pgdso`);
    this.confirmed = lsn;
    this.state.stream?.confirm(lsn);
  }
}
