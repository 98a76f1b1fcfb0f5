// `pgdso sync --mapping M [--where JSON] [--batch N] [--restart] [--no-wait]`: carries the
// requests that exist on the mapping's source (the initial load), resuming an unfinished run by
// default. A progress bar on a terminal (cli-progress: rows per second, time left), progress lines
// otherwise. Then, while an instance of the source server is online, waits until its engine has
// carried them all.
import os from 'node:os';
import { SingleBar } from 'cli-progress';
import { toPgClientConfig } from '../../config/load.ts';
import { withClient } from '../../sql/client.ts';
import { liveInstances } from '../../group/requests.ts';
import { mappingOf, runSync, syncConditions, SyncUsageError, waitCarried } from '../../scan/sync.ts';
import { boundHeapGrowth, configFrom, loggerFrom, print, UsageError, type GlobalOptions } from '../common.ts';

export interface SyncCommandOptions {
  mapping: string;
  where?: string;
  batch?: string;
  restart?: boolean;
  wait?: boolean;
}

export async function syncCommand(opts: GlobalOptions, cmd: SyncCommandOptions): Promise<void> {
  boundHeapGrowth();
  const config = await configFrom(opts);
  const batchRows = cmd.batch === undefined ? 1000 : Number(cmd.batch);
  if (!Number.isInteger(batchRows) || batchRows < 1 || batchRows > 100_000)
    throw new UsageError(`--batch takes a whole number of requests from 1 to 100000, not "${cmd.batch}"`);
  let where: ReturnType<typeof syncConditions>;
  try {
    where = syncConditions(cmd.where);
    mappingOf(config, cmd.mapping);
  } catch (err) {
    if (err instanceof SyncUsageError) throw new UsageError(err.message);
    throw err;
  }
  const mapping = config.mappings[cmd.mapping]!;
  const server = mapping.from.server;
  const abort = new AbortController();
  const onSignal = () => abort.abort(new Error('interrupted: run pgdso sync again to resume after the last batch'));
  process.once('SIGINT', onSignal).once('SIGTERM', onSignal);
  const tty = process.stderr.isTTY === true;
  const bar = tty
    ? new SingleBar({
        stream: process.stderr,
        format: `${cmd.mapping} {bar} {percentage}% | {value}/{total} requests | {rate} rows/s | {eta_formatted} left | matched {matched}`,
        etaBuffer: 20,
        hideCursor: true,
      })
    : null;
  const started = Date.now();
  let startedFrom = 0;
  let total = 0;
  let lastLine = 0;
  try {
    const result = await runSync({
      config,
      mapping: cmd.mapping,
      where,
      batchRows,
      restart: cmd.restart === true,
      instanceId: `cli ${os.hostname()}-${process.pid}`,
      log: loggerFrom({ ...opts, logLevel: opts.logLevel === 'info' ? 'warn' : opts.logLevel }),
      signal: abort.signal,
      onStart: (run, remaining) => {
        startedFrom = run.scanned;
        total = run.scanned + remaining;
        const resumed = run.lastKey !== null ? `, resuming run ${run.id} after request ${run.lastKey}` : `, run ${run.id}`;
        print(`sync ${cmd.mapping}: ${server} -> ${mapping.to.server}, ${remaining} requests to scan${resumed}`);
        bar?.start(Math.max(total, 1), run.scanned, { rate: 0, matched: run.matched });
      },
      onBatch: (p) => {
        total = Math.max(total, p.scanned);
        const seconds = (Date.now() - started) / 1000;
        const rate = Math.round((p.scanned - startedFrom) / Math.max(seconds, 0.001));
        if (bar) {
          bar.setTotal(Math.max(total, 1));
          bar.update(p.scanned, { rate, matched: p.matched });
        } else if (Date.now() - lastLine >= 5000 || p.done) {
          lastLine = Date.now();
          const left = rate > 0 ? Math.max(0, Math.round((total - p.scanned) / rate)) : null;
          print(
            `sync ${cmd.mapping}: ${p.scanned} of ${total} requests scanned, ${p.matched} matched, ${rate} rows/s` +
              `${left !== null && !p.done ? `, about ${left} s left` : ''}`,
          );
        }
      },
    });
    bar?.stop();
    const { progress } = result;
    const errors = progress.errors ? `, ${progress.errors} could not be evaluated (see the log)` : '';
    print(`sync ${cmd.mapping}: ${progress.matched} of ${progress.scanned} requests handed to the engine of ${server}${errors}`);
    if (cmd.wait === false) return;
    const connection = toPgClientConfig(config.servers[server]!.connection);
    const live = await withClient(connection, (client) =>
      liveInstances(client, config.group.checkIntervalSeconds, config.group.delinquentThreshold),
    );
    if (live.length === 0) {
      print(`sync ${cmd.mapping}: no instance of ${server} is online: they are carried once one runs (pgdso run)`);
      return;
    }
    await waitCarried(connection, abort.signal, (left) => print(`sync ${cmd.mapping}: the engine has ${left} bytes of WAL to go`));
    print(
      `sync ${cmd.mapping}: carried to ${mapping.to.server} by the engine of ${server} in ${((Date.now() - started) / 1000).toFixed(1)} s`,
    );
  } catch (err) {
    bar?.stop();
    if (err instanceof SyncUsageError) throw new UsageError(err.message);
    throw err;
  } finally {
    process.off('SIGINT', onSignal).off('SIGTERM', onSignal);
  }
}
