// One logical replication stream of a server's slot, on a dedicated replication connection.
//
// - It always starts at the slot's confirmed position (START_REPLICATION ... 0/0): a new stream
//   after a drop replays everything received but not confirmed.
// - It confirms only what the sink says is applied (`confirm(endLsn)`), exactly that commit-end
//   LSN, never more, monotonic.
// - Keepalives are answered with the confirmed position.
// - Flow control: messages are handled one at a time; while the sink's promise is pending the
//   socket is paused, so a slow peer bounds memory instead of growing it.
import pg from 'pg';
import type { Logger } from 'pino';
import type { RowChange, TxBegin, TxCommit, Relation } from '../change.ts';
import { formatLsn } from '../change.ts';
import { PgoutputDecoder, type DecodedMessage } from './pgoutput.ts';
import { PUBLICATION, quoteIdent } from '../sql/identifiers.ts';
import { withCanonicalText } from '../sql/session.ts';

/** What the stream feeds. Declared here, implemented by the engine. */
export interface ChangeSink {
  begin(tx: TxBegin & { origin: string | null }): void | Promise<void>;
  change(change: RowChange): void | Promise<void>;
  commit(tx: TxCommit): void | Promise<void>;
  /** A transactional message inside a transaction, or a non-transactional one. */
  message?(prefix: string, content: Buffer, lsn: bigint): void | Promise<void>;
  truncate?(relations: Relation[]): void | Promise<void>;
  /** Called when the stream has nothing more buffered (a good moment to flush). */
  idle(): void | Promise<void>;
  /** True when everything handed to the sink so far is applied and confirmed. */
  caughtUp(): boolean;
}

export interface StreamOptions {
  connection: pg.ClientConfig;
  slot: string;
  publication?: string;
  log: Logger;
  /** the walsender's application_name (default 'pgdso decoder') */
  applicationName?: string;
  /** Interval of unsolicited status updates, ms (the server drops silent receivers). */
  statusIntervalMs?: number;
}

const PG_EPOCH_MS = 946_684_800_000;
const STATUS_THROTTLE_MS = 100;

export class ReplicationStream {
  private client: pg.Client | null = null;
  private confirmed = 0n;
  /** Decoded messages waiting for the sink. Decoded on arrival: pg's parser reuses its buffer. */
  private readonly queue: QueueItem[] = [];
  private head = 0;
  private draining = false;
  private pendingBegin: (TxBegin & { origin: string | null }) | null = null;
  private inTransaction = false;
  private readonly decoder = new PgoutputDecoder();
  private statusTimer: NodeJS.Timeout | null = null;
  private fail: (err: Error) => void = () => {};
  private lastStatusAt = 0;
  private statusDue: NodeJS.Timeout | null = null;
  private stopped = false;
  private wakeUp: (() => void) | null = null;

  constructor(private readonly opts: StreamOptions) {}

  /**
   * Streams into `sink` until `stop()` (resolves) or a failure (rejects). One call per object:
   * reconnect by creating a new ReplicationStream, which starts from the confirmed position.
   */
  async run(sink: ChangeSink): Promise<void> {
    const { log } = this.opts;
    const client = new pg.Client({
      ...withCanonicalText(this.opts.connection),
      replication: 'database',
      application_name: this.opts.applicationName ?? 'pgdso decoder',
    } as pg.ClientConfig);
    this.client = client;
    const failed = new Promise<never>((_, reject) => {
      this.fail = reject;
    });
    failed.catch(() => {});
    client.on('error', (err) => this.fail(err));
    await client.connect();
    const connection = (client as unknown as { connection: PgConnection }).connection;
    connection.on('copyData', ({ chunk }: { chunk: Buffer }) => {
      try {
        const item = this.read(chunk);
        if (!item) return;
        this.queue.push(item);
      } catch (err) {
        this.fail(err instanceof Error ? err : new Error(String(err)));
        return;
      }
      if (!this.draining) void this.drain(sink, connection);
    });
    this.wakeUp = () => {
      if (!this.draining && !this.stopped) void this.drain(sink, connection);
    };
    log.debug({ slot: this.opts.slot }, 'starting replication from the confirmed position');
    const publication = this.opts.publication ?? PUBLICATION;
    const names = quoteIdent(publication).replace(/'/g, "''");
    const options = `proto_version '1', publication_names '${names}', messages 'true'`;
    const sql = `START_REPLICATION SLOT ${quoteIdent(this.opts.slot)} LOGICAL 0/0 (${options})`;
    const streaming = client.query(sql);
    this.statusTimer = setInterval(() => this.sendStatus(), this.opts.statusIntervalMs ?? 10_000);
    try {
      await Promise.race([streaming, failed]);
      if (!this.stopped) throw new Error('replication stream ended by the server');
    } catch (err) {
      if (this.stopped) return;
      throw err;
    } finally {
      this.cleanup();
    }
  }

  /**
   * Gives the sink a turn even though nothing arrived (its `idle()` runs between transactions,
   * with the socket paused while it works): for work on a timer, such as a delivery retry.
   */
  wake(): void {
    this.wakeUp?.();
  }

  /** Confirms `lsn` (a commit-end LSN whose transaction is applied everywhere it goes). */
  confirm(lsn: bigint): void {
    if (lsn <= this.confirmed) return;
    this.confirmed = lsn;
    // at most one status update per STATUS_THROTTLE_MS: many small transactions in a row
    // would otherwise send one each
    const since = Date.now() - this.lastStatusAt;
    if (since >= STATUS_THROTTLE_MS) this.sendStatus();
    else
      this.statusDue ??= setTimeout(() => {
        this.statusDue = null;
        this.sendStatus();
      }, STATUS_THROTTLE_MS - since);
  }

  async stop(): Promise<void> {
    if (this.stopped) return;
    // the last confirmation reaches the server before the connection ends
    if (this.statusDue) this.sendStatus();
    this.stopped = true;
    const client = this.client;
    this.cleanup();
    if (client) await client.end().catch(() => {});
  }

  private cleanup(): void {
    this.wakeUp = null;
    if (this.statusTimer) clearInterval(this.statusTimer);
    this.statusTimer = null;
    if (this.statusDue) clearTimeout(this.statusDue);
    this.statusDue = null;
    this.queue.length = 0;
    this.head = 0;
  }

  private get queued(): number {
    return this.queue.length - this.head;
  }

  private shift(): QueueItem {
    const item = this.queue[this.head]!;
    this.head += 1;
    if (this.head === this.queue.length) {
      this.queue.length = 0;
      this.head = 0;
    } else if (this.head > 4096) {
      this.queue.splice(0, this.head);
      this.head = 0;
    }
    return item;
  }

  /** Decodes one CopyData message at once (its buffer is only valid during the event). */
  private read(chunk: Buffer): QueueItem | null {
    const type = chunk[0];
    if (type === 0x6b /* k: primary keepalive */) {
      return { kind: 'keepalive', walEnd: chunk.readBigUInt64BE(1), replyRequested: chunk[17] === 1 };
    }
    if (type !== 0x77 /* w: XLogData */) return null;
    const msg = this.decoder.decode(chunk.subarray(25), chunk.readBigUInt64BE(1));
    return msg.kind === 'ignored' || msg.kind === 'relation' ? null : msg;
  }

  private async drain(sink: ChangeSink, connection: PgConnection): Promise<void> {
    this.draining = true;
    let paused = false;
    const pause = () => {
      if (!paused) connection.stream.pause();
      paused = true;
    };
    try {
      while (!this.stopped) {
        if (this.queued > 0) {
          const result = this.handle(this.shift(), sink);
          if (result) {
            pause();
            await result;
          }
          continue;
        }
        if (paused) {
          // let the socket deliver what it has before declaring the stream idle
          connection.stream.resume();
          paused = false;
          await new Promise<void>((resolve) => setImmediate(resolve));
          continue;
        }
        if (!this.inTransaction) {
          const idle = sink.idle();
          if (idle) {
            // the socket stays paused while the sink flushes: memory stays bounded
            pause();
            await idle;
            continue;
          }
        }
        break;
      }
    } catch (err) {
      this.fail(err instanceof Error ? err : new Error(String(err)));
    } finally {
      if (paused && !this.stopped) connection.stream.resume();
      this.draining = false;
    }
  }

  /** Handles one message; returns a promise only when the sink returned one. */
  private handle(msg: QueueItem, sink: ChangeSink): void | Promise<void> {
    if (msg.kind === 'keepalive') {
      // Nothing in flight and everything handed over is applied: the sender has nothing
      // before walEnd that we still need, so the slot may move on (keeps quiet slots moving).
      if (!this.inTransaction && this.queued === 0 && sink.caughtUp() && msg.walEnd > this.confirmed) {
        this.confirmed = msg.walEnd;
      }
      if (msg.replyRequested) this.sendStatus();
      return;
    }
    switch (msg.kind) {
      case 'begin':
        this.inTransaction = true;
        this.pendingBegin = { xid: msg.xid, finalLsn: msg.finalLsn, commitTime: msg.commitTime, origin: null };
        return;
      case 'origin':
        if (this.pendingBegin) this.pendingBegin.origin = msg.name;
        return;
      case 'change':
        return this.chain(this.flushBegin(sink), () => sink.change(msg.change));
      case 'truncate':
        return this.chain(this.flushBegin(sink), () => sink.truncate?.(msg.relations));
      case 'message':
        if (msg.transactional) return this.chain(this.flushBegin(sink), () => sink.message?.(msg.prefix, msg.content, msg.lsn));
        return sink.message?.(msg.prefix, msg.content, msg.lsn);
      case 'commit': {
        const begun = this.flushBegin(sink);
        this.inTransaction = false;
        return this.chain(begun, () => sink.commit({ finalLsn: msg.finalLsn, endLsn: msg.endLsn, commitTime: msg.commitTime }));
      }
      default:
        return;
    }
  }

  private flushBegin(sink: ChangeSink): void | Promise<void> {
    const begin = this.pendingBegin;
    if (!begin) return;
    this.pendingBegin = null;
    return sink.begin(begin);
  }

  private chain(first: void | Promise<void>, next: () => void | Promise<void>): void | Promise<void> {
    if (first) return first.then(next);
    return next();
  }

  private sendStatus(): void {
    const connection = (this.client as unknown as { connection?: PgConnection } | null)?.connection;
    if (!connection || this.stopped) return;
    const lsn = this.confirmed;
    this.lastStatusAt = Date.now();
    const buf = Buffer.alloc(34);
    buf[0] = 0x72; // r: standby status update
    buf.writeBigUInt64BE(lsn, 1); // written
    buf.writeBigUInt64BE(lsn, 9); // flushed: what the server may release
    buf.writeBigUInt64BE(lsn, 17); // applied
    buf.writeBigInt64BE(BigInt(Date.now() - PG_EPOCH_MS) * 1000n, 25);
    buf[33] = 0; // no reply requested
    try {
      connection.sendCopyFromChunk(buf);
    } catch (err) {
      this.opts.log.debug({ err, lsn: formatLsn(lsn) }, 'could not send status update');
    }
  }
}

type QueueItem =
  | Exclude<DecodedMessage, { kind: 'ignored' } | { kind: 'relation' }>
  | { kind: 'keepalive'; walEnd: bigint; replyRequested: boolean };

interface PgConnection {
  on(event: 'copyData', listener: (msg: { chunk: Buffer }) => void): void;
  sendCopyFromChunk(buf: Buffer): void;
  stream: { pause(): void; resume(): void };
}
