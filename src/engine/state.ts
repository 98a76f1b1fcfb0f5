// What every part of one engine session reads: its options, log and statistics, the source's
// connection settings, and the session's own connections to the source once they are open (the
// control connection, the source lane for the source copies' bookkeeping, the stream).
import type pg from 'pg';
import type { Logger } from 'pino';
import { toPgClientConfig } from '../config/load.ts';
import type { ApplyLane } from '../applier/lane.ts';
import type { LaneBuffer } from '../applier/buffer.ts';
import type { ReplicationStream } from '../decoder/stream.ts';
import type { ControlConnection } from './control.ts';
import type { EngineOptions, EngineStats } from './types.ts';
import type { Fence } from '../sql/fencing.ts';

export class SessionState {
  readonly server: string;
  readonly connection: pg.ClientConfig;
  readonly batchRows: number;
  readonly chunkRows: number;
  controlConnection: ControlConnection | null = null;
  sourceLane: ApplyLane<never> | null = null;
  sourceBuffer: LaneBuffer<never> | null = null;
  stream: ReplicationStream | null = null;

  constructor(
    readonly opts: EngineOptions,
    readonly log: Logger,
    readonly stats: EngineStats,
  ) {
    this.server = opts.server;
    const server = opts.config.servers[opts.server];
    if (!server) throw new Error(`unknown server ${opts.server}`);
    this.connection = toPgClientConfig(server.connection);
    this.batchRows = opts.batchRows ?? 20_000;
    this.chunkRows = opts.chunkRows ?? 5_000;
  }

  /** The fence of this session's writes, when it runs as the owner of the dso operation. */
  get fence(): Fence | undefined {
    const { fence, instanceId } = this.opts;
    return fence && instanceId ? { term: fence.term, instanceId } : undefined;
  }

  /** The control connection's client (open from the session's start). */
  get control(): pg.Client {
    return this.controlConnection!.client;
  }

  /** The source lane (open once the session's lanes are). */
  get source(): ApplyLane<never> {
    return this.sourceLane!;
  }

  /** Throws once the control connection, and with it the `dso` lock, is gone: nothing may commit then. */
  assertHeld(): void {
    this.controlConnection?.assertHeld();
  }
}
