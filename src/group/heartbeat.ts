// The heartbeat that a busy engine cannot hold back: a worker thread with its own connection
// raises the instance's interval count every interval while the main thread answers (a main
// thread silent for `maxSilenceMs` is stuck: the beats stop and the instance turns delinquent).
// The main thread's own heartbeat still does the rest (operations, signals, the rule version);
// this one keeps an instance that decodes or applies a large batch from turning delinquent.
// A frozen (SIGSTOP) or killed process stops both.
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import type pg from 'pg';
import type { Logger } from 'pino';

// CommonJS, run with eval: no file to find, from a checkout (tsx) or a build alike
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const pg = require(workerData.pgPath);
const { intervalMs, maxSilenceMs, instanceId } = workerData;
let alive = Date.now();
let client = null;
let stopped = false;
let timer = null;
parentPort.on('message', (m) => {
  if (m === 'alive') alive = Date.now();
  if (m === 'stop') stop();
});
async function beat() {
  if (stopped) return;
  if (Date.now() - alive <= maxSilenceMs) {
    try {
      if (!client) {
        client = new pg.Client(workerData.connection);
        client.on('error', () => {});
        await client.connect();
      }
      await client.query(
        "UPDATE pgdso.servgrp_board SET interval_count = interval_count + 1, last_seen_at = now() " +
          "WHERE instance_id = $1 AND state = 'online'",
        [instanceId],
      );
    } catch {
      const old = client;
      client = null;
      if (old) old.end().catch(() => {});
    }
  }
  if (!stopped) timer = setTimeout(beat, intervalMs);
}
function stop() {
  stopped = true;
  if (timer) clearTimeout(timer);
  const old = client;
  client = null;
  Promise.resolve(old && old.end()).catch(() => {}).finally(() => parentPort.close());
}
beat();
`;

export interface HeartbeatOptions {
  connection: pg.ClientConfig;
  instanceId: string;
  intervalMs: number;
  log: Logger;
  /** a main thread silent this long is stuck: the beats stop (default: 10 intervals, at least 30 s) */
  maxSilenceMs?: number;
}

export class HeartbeatThread {
  private worker: Worker | null = null;
  private timer: NodeJS.Timeout | null = null;
  /** true while the thread beats (the main heartbeat then leaves the interval count to it) */
  get running(): boolean {
    return this.worker !== null;
  }

  constructor(private readonly opts: HeartbeatOptions) {}

  start(): void {
    const { connection, instanceId, intervalMs, log } = this.opts;
    try {
      const pgPath = createRequire(import.meta.url).resolve('pg');
      const workerData = {
        pgPath,
        connection: { ...connection, application_name: `pgdso heartbeat ${instanceId}`.slice(0, 63) },
        instanceId,
        intervalMs,
        maxSilenceMs: this.opts.maxSilenceMs ?? Math.max(30_000, intervalMs * 10),
      };
      const worker = new Worker(WORKER_SOURCE, { eval: true, workerData });
      worker.unref();
      worker.on('error', (err) => {
        if (this.worker === worker) this.worker = null;
        log.warn({ error: err.message }, 'the heartbeat thread failed: heartbeats come from the main thread only');
      });
      worker.on('exit', () => {
        if (this.worker === worker) this.worker = null;
      });
      this.worker = worker;
      this.timer = setInterval(() => worker.postMessage('alive'), Math.max(100, intervalMs / 2));
      this.timer.unref();
    } catch (err) {
      log.warn({ error: (err as Error).message }, 'no heartbeat thread: heartbeats come from the main thread only');
    }
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    const worker = this.worker;
    this.worker = null;
    if (!worker) return;
    // (ref'd while it ends: an unref'd worker and timer alone would let the process exit mid-await)
    worker.ref();
    const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
    worker.postMessage('stop');
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([exited, new Promise((resolve) => (timer = setTimeout(resolve, 2000)))]);
    clearTimeout(timer);
    await worker.terminate().catch(() => undefined);
  }
}
