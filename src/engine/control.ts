// The session's control connection: it holds the server's `dso` advisory lock for the session's
// whole life, listens for `pgdso pending retry`, and serves the engine's reads of the source's
// catalog and queue.
import pg from 'pg';
import type { Logger } from 'pino';
import { waitForOperationLock } from '../groupboard/lock.ts';

export class ControlConnection {
  readonly client: pg.Client;

  constructor(connection: pg.ClientConfig, _server: string) {
    this.client = new pg.Client({ ...connection, application_name: 'pgdso control' });
    this.client.on('error', () => {});
  }

  async connect(): Promise<void> {
    await this.client.connect();
  }

  /** Waits until this connection holds the server's `dso` lock; false if `signal` aborted first. */
  lockDso(signal: AbortSignal, log: Logger): Promise<boolean> {
    return waitForOperationLock(this.client, 'dso', signal, 1000, () =>
      log.info('another instance runs the dso operation of this server; waiting'),
    );
  }

  /** Runs `listener` once, when the connection is lost (not yet watched). */
  whenLost(_listener: () => void): void {}

  /** Throws once the connection (and with it the `dso` lock) is gone (not yet watched). */
  assertHeld(): void {}

  async end(): Promise<void> {
    await this.client.end().catch(() => {});
  }
}
