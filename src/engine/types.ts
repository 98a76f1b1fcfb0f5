// The shapes the engine's modules share: its options and statistics, a source transaction and a
// change on their way through the actions, a mapping's link, a peer and an operation's route.
import type { Logger } from 'pino';
import type { RowChange } from '../change.ts';
import type { MappingConfig, PgdsoConfig } from '../config/types.ts';
import type { CompiledRules } from '../rules/index.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import type { Link } from '../applier/chain.ts';
import type { ApplyFailure } from '../applier/sets.ts';
import type { ErrorClass } from '../applier/errors.ts';
import type { Refusal } from '../sql/grants.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import type { PendingEntry } from '../queue/sql.ts';

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
  /** this instance on the server's board (default host-pid) */
  instanceId?: string;
  /**
   * The term under which this instance owns the server's dso operation (server groups): every
   * write carries it, and fails once a newer owner has written; the session frees what a former
   * owner still holds (the dso lock, its lanes, the slot's walsender).
   */
  fence?: { term: number };
  /** counters to keep counting in (across runs of the operation) */
  stats?: EngineStats;
}

export interface EngineStats {
  transactions: number;
  changes: number;
  applied: number;
  failed: number;
  /** operations written to pgdso.pending */
  queued: number;
  /** queued operations delivered */
  delivered: number;
  /** source transactions run again after a deadlock or serialization failure with the source's users */
  sourceRetries: number;
  /** heartbeat messages written into the source's WAL */
  heartbeats: number;
  /** requests of scan batches (escalations, sync) met in the stream */
  scanned: number;
  confirmedLsn: string;
  sessions: number;
  /** the slot's lag and the WAL it holds, bytes, at the last check */
  slotLagBytes: number | null;
  retainedWalBytes: number | null;
  /** peers that cannot be reached now */
  peersDown: string[];
  /** set when the engine stopped on an error a DBA must fix */
  stoppedBy: Refusal | null;
}

export interface OpenTransaction {
  finalLsn: bigint;
  commitTime: Date;
  /** the server whose engine wrote this transaction, or null for a user's */
  writer: string | null;
}

/** One decoded change on its way through the actions. */
export interface ChangeContext {
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

/** A mapping used in one direction; its column plan once the neighbour's catalog was read. */
export interface LinkRef {
  mapping: MappingConfig;
  forward: boolean;
  server: string;
  resolved: Link | null;
}

/** A neighbour server: its apply lanes while it can be reached, and its share of the queue. */
export interface Peer {
  name: string;
  /** apply lanes by pool; empty while the peer cannot be reached */
  lanes: Map<string, LaneBuffer<ApplyFailure>>;
  pools: string[];
  up: boolean;
  /** target copies (requestKey) with queued operations: their next operations queue behind */
  queued: Set<string>;
  /** this batch's operations for the queue, in order; index of each request's last one */
  batch: PendingEntry[];
  lastInBatch: Map<string, number>;
  /** each lane's committed source position, once known in this session */
  progress: Map<string, bigint>;
  attempts: number;
  downSince: number | null;
  nextAttemptAt: number;
  lastError: string | null;
  lastClass: ErrorClass | null;
}

/** A peer that could not be reached: its delivery attempts so far and the next one. */
export type PeerDown = Pick<Peer, 'attempts' | 'downSince' | 'nextAttemptAt' | 'lastError' | 'lastClass'>;

/** Where an operation goes: skipped (applied before: a replay), a lane, or the queue. */
export type Route = { to: 'skip' } | { to: 'lane'; buffer: LaneBuffer<ApplyFailure> } | { to: 'queue'; peer: Peer; unsure: boolean };
