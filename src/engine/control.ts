// The session's control connection: it holds the server's `dso` advisory lock for the session's
// whole life, listens for `pgdso pending retry`, and serves the engine's reads of the source's
// catalog and queue. The lock lives and dies with the connection, so the connection is also the
// session's fence: once it is gone (an error, its end) another instance may hold the lock, and
// nothing of this session may commit any more (`assertHeld`).
import pg from 'pg';
import type { Logger } from 'pino';
import { assertOwner, takeOperationLock, waitForOperationLock, type Fence } from '../sql/fencing.ts';
import { ControlConnectionLost, errorText } from './errors.ts';

export class ControlConnection {
  readonly client: pg.Client;
  private lost: ControlConnectionLost | null = null;
  private ending = false;
  /** a connection that never opened is a failure of its own, not a lost lock */
  private connected = false;
  private readonly onLost: (() => void)[] = [];

  constructor(
    connection: pg.ClientConfig,
    private readonly server: string,
    private readonly fence?: Fence,
  ) {
    const name = fence ? `pgdso control ${fence.instanceId}` : 'pgdso control';
    this.client = new pg.Client({ ...connection, application_name: name });
    this.client.on('error', (err) => this.lose(errorText(err)));
    this.client.on('end', () => this.lose('the connection ended'));
  }

  async connect(): Promise<void> {
    await this.client.connect();
    this.connected = true;
  }

  /** Waits until this connection holds the server's `dso` lock; false if `signal` aborted first. */
  async lockDso(signal: AbortSignal, log: Logger): Promise<boolean> {
    const { fence } = this;
    if (fence) {
      // the owner of the operation: it checks that it still is, and takes the lock from a former owner
      await assertOwner(this.client, 'dso', fence);
      if (!(await takeOperationLock(this.client, 'dso', signal))) return false;
      await assertOwner(this.client, 'dso', fence);
      return true;
    }
    return waitForOperationLock(this.client, 'dso', signal, 1000, () =>
      log.info('another instance runs the dso operation of this server; waiting'),
    );
  }

  /** Runs `listener` once, when the connection is lost (not when the session closes it). */
  whenLost(listener: () => void): void {
    this.onLost.push(listener);
  }

  /** Throws once the connection (and with it the `dso` lock) is gone. */
  assertHeld(): void {
    if (this.lost) throw this.lost;
  }

  async end(): Promise<void> {
    this.ending = true;
    await this.client.end().catch(() => {});
  }

  private lose(reason: string): void {
    if (!this.connected || this.ending || this.lost) return;
    this.lost = new ControlConnectionLost(
      `the control connection of ${this.server} was lost (${reason}); it held the dso lock, ` +
        'so the session ends now and a new one takes the lock again',
    );
    for (const listener of this.onLost) listener();
  }
}
