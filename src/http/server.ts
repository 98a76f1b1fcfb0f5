// What a running instance serves on `http.port`: GET /healthz (JSON: the operations it owns per
// server; 200 while it is connected to every server and streams where it owns dso, else 503) and
// GET /metrics (Prometheus text, names start with pgdso_).
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client';
import type { EngineStats } from '../engine.ts';

export interface EngineView {
  server: string;
  stats: EngineStats;
  /** true while a session streams (false between a failure and the reconnect) */
  streaming(): boolean;
  /** the operations this instance owns for the server now (all of them without a group) */
  operations?(): string[];
  /** false while the instance's control connection to the server is down */
  connected?(): boolean;
}

/** Healthy: connected, and streaming wherever this instance owns the server's dso operation. */
function healthy(e: EngineView): boolean {
  if (e.connected && !e.connected()) return false;
  return e.operations && !e.operations().includes('dso') ? true : e.streaming();
}

/** Metrics read from the engines' counters at scrape time (nothing on the per-row path). */
function registry(engines: readonly EngineView[]): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: 'pgdso_' });
  const counter = (name: string, help: string, read: (s: EngineStats) => number) =>
    new Counter({
      name,
      help,
      labelNames: ['server'],
      registers: [registry],
      collect() {
        this.reset();
        for (const e of engines) this.inc({ server: e.server }, read(e.stats));
      },
    });
  counter('pgdso_transactions_total', 'Source transactions decoded', (s) => s.transactions);
  counter('pgdso_changes_total', 'Row changes decoded', (s) => s.changes);
  counter('pgdso_operations_applied_total', 'Operations applied on peers and source copies', (s) => s.applied);
  counter('pgdso_operations_failed_total', 'Operations recorded in pending_errors', (s) => s.failed);
  counter('pgdso_sessions_total', 'Engine sessions started (a new one after each failure)', (s) => s.sessions);
  counter(
    'pgdso_operations_queued_total',
    'Operations written to pgdso.pending (a peer that cannot be reached, or a request with queued operations)',
    (s) => s.queued,
  );
  counter('pgdso_operations_delivered_total', 'Queued operations delivered', (s) => s.delivered);
  counter(
    'pgdso_heartbeats_total',
    "Heartbeat messages written into the source's WAL while it was quiet (pending.heartbeatSeconds)",
    (s) => s.heartbeats,
  );
  counter('pgdso_scanned_requests_total', 'Requests of escalation and sync batches met in the stream and acted on', (s) => s.scanned);
  counter(
    'pgdso_source_transactions_retried_total',
    "Source transactions run again after a lock conflict with the source's users (40P01, 40001)",
    (s) => s.sourceRetries,
  );
  const gauge = (name: string, help: string, read: (s: EngineStats) => number | null) =>
    new Gauge({
      name,
      help,
      labelNames: ['server'],
      registers: [registry],
      collect() {
        this.reset();
        for (const e of engines) {
          const value = read(e.stats);
          if (value !== null) this.set({ server: e.server }, value);
        }
      },
    });
  gauge('pgdso_slot_lag_bytes', "WAL between the server's current position and what its slot confirmed", (s) => s.slotLagBytes);
  gauge('pgdso_slot_retained_wal_bytes', "WAL the server's slot holds back (from its restart position)", (s) => s.retainedWalBytes);
  gauge('pgdso_peers_down', 'Peers that cannot be reached now (their operations wait in pgdso.pending)', (s) => s.peersDown.length);
  new Gauge({
    name: 'pgdso_streaming',
    help: '1 while the engine of a server streams its slot',
    labelNames: ['server'],
    registers: [registry],
    collect() {
      for (const e of engines) this.set({ server: e.server }, e.streaming() ? 1 : 0);
    },
  });
  return registry;
}

export interface HttpServer {
  port: number;
  close(): Promise<void>;
}

export async function startHttpServer(port: number, engines: readonly EngineView[], instanceId?: string): Promise<HttpServer> {
  const metrics = registry(engines);
  const server = http.createServer((req, res) => {
    if (req.method === 'GET' && req.url === '/healthz') {
      const servers = Object.fromEntries(
        engines.map((e) => [
          e.server,
          {
            streaming: e.streaming(),
            operations: e.operations?.() ?? ['dso', 'escalation', 'admin'],
            confirmedLsn: e.stats.confirmedLsn,
            sessions: e.stats.sessions,
            peersDown: e.stats.peersDown,
          },
        ]),
      );
      const ok = engines.every(healthy);
      res.writeHead(ok ? 200 : 503, { 'content-type': 'application/json' });
      res.end(JSON.stringify({ status: ok ? 'ok' : 'degraded', instanceId, servers }));
      return;
    }
    if (req.method === 'GET' && req.url === '/metrics') {
      metrics.metrics().then(
        (text) => {
          res.writeHead(200, { 'content-type': metrics.contentType });
          res.end(text);
        },
        (err: Error) => {
          res.writeHead(500);
          res.end(err.message);
        },
      );
      return;
    }
    res.writeHead(404);
    res.end();
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '0.0.0.0', () => resolve());
  });
  return {
    port: (server.address() as AddressInfo).port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
