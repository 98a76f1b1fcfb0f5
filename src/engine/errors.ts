// The ways a session ends on purpose, and small readings of errors the engine's modules share.
import type { ApplyFailure } from '../applier/sets.ts';

/**
 * A peer's lane failed in the middle of a batch: the session ends and the batch is replayed
 * from the slot's confirmed position, its operations for that peer going to the queue.
 */
export class PeerFailedMidBatch extends Error {}

/**
 * The control connection, which holds the server's `dso` lock, is gone: the lock is free for
 * another instance, so the session stops at once (nothing more commits) and a new one takes the
 * lock again before it decodes anything.
 */
export class ControlConnectionLost extends Error {}

/** A failure that says the target's table is not what the plan was built for. */
export function catalogChanged(f: ApplyFailure): boolean {
  return f.sqlstate === '42703' /* undefined column */ || f.sqlstate === '42804' /* datatype mismatch */;
}

/** An error's message alone (never a connection string). */
export function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
