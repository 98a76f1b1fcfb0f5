// Helpers for the fault tests (test/faults): what a DBA checks after a fault. Row counts,
// checksums and a row-by-row comparison of a form's data columns between the source and a peer,
// and an audit of the engine's writes on a peer that shows a change applied twice.
import type { DsoEnv, EngineProcess } from './dso.ts';
import { waitFor } from './wait.ts';

/** The data columns of repair_request (no dso_* bookkeeping, which differs between copies by design). */
const ROW_TEXT = `id || ':' || item || ':' || coalesce(status, '~') || ':' || coalesce(description, '~')`;

/** Order-independent checksum of a form's data: the count and an md5 of every row, sorted by id. */
export const CHECKSUM_SQL = `SELECT count(*)::int AS n, coalesce(md5(string_agg(${ROW_TEXT}, ',' ORDER BY id)), '') AS sum
  FROM repair_request`;

export interface Checksum {
  n: number;
  sum: string;
}

export async function checksum(e: DsoEnv, server: string): Promise<Checksum> {
  return (await e.query<Checksum>(server, CHECKSUM_SQL))[0]!;
}

export async function rowCount(e: DsoEnv, server: string): Promise<number> {
  return (await e.query<{ n: number }>(server, 'SELECT count(*)::int AS n FROM repair_request'))[0]!.n;
}

/**
 * Audit of every write to repair_request: on a peer, the engine's writes (each insert or update
 * it applied, with the values it wrote); on the source, the users' writes. A source change applied
 * twice on a peer shows as the same (id, status, description) written twice, since every change
 * the tests make writes a state the request never had before.
 */
export const AUDIT_SQL = `
CREATE TABLE write_audit (n bigserial PRIMARY KEY, id text NOT NULL, op text NOT NULL, by_engine boolean NOT NULL,
  state text NOT NULL, tx xid8 NOT NULL DEFAULT pg_current_xact_id());
CREATE FUNCTION write_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO write_audit (id, op, by_engine, state)
  VALUES (NEW.id, TG_OP, pg_replication_origin_session_is_setup(), coalesce(NEW.status, '~') || ':' || coalesce(NEW.description, '~'));
  RETURN NULL;
END $$;
CREATE TRIGGER write_audit AFTER INSERT OR UPDATE ON repair_request FOR EACH ROW EXECUTE FUNCTION write_audit();`;

export interface Comparison {
  peer: string;
  /** rows of the source compared */
  checked: number;
  /** on the source, missing on the peer */
  lost: number;
  /** on the peer, not on the source */
  extra: number;
  /** on both, different data */
  differing: number;
  /** source changes the engine wrote more than once on the peer (write_audit) */
  doubled: number;
  /** the engine's writes on the peer (write_audit), and the users' writes on the source */
  engineWrites: number;
  userWrites: number;
  /** requests the engine wrote more often on the peer than users wrote them on the source */
  writtenMoreThanChanged: number;
  /** a few examples of each kind, for messages */
  examples: string[];
}

/** Compares the source's repair_request with the peer's, row by row, and counts double writes. */
export async function compareCopies(e: DsoEnv, source: string, peer: string): Promise<Comparison> {
  const rowsOf = async (server: string) =>
    new Map((await e.query<{ id: string; v: string }>(server, `SELECT id, ${ROW_TEXT} AS v FROM repair_request`)).map((r) => [r.id, r.v]));
  const [src, dst] = await Promise.all([rowsOf(source), rowsOf(peer)]);
  const examples: string[] = [];
  let lost = 0;
  let differing = 0;
  for (const [id, v] of src) {
    const there = dst.get(id);
    if (there === undefined) {
      lost += 1;
      if (examples.length < 10) examples.push(`lost on ${peer}: ${v}`);
    } else if (there !== v) {
      differing += 1;
      if (examples.length < 10) examples.push(`differs on ${peer}: ${there} (${source}: ${v})`);
    }
  }
  let extra = 0;
  for (const [id, v] of dst) {
    if (!src.has(id)) {
      extra += 1;
      if (examples.length < 10) examples.push(`extra on ${peer}: ${v}`);
    }
  }
  const doubles = await e.query<{ id: string; state: string; writes: number }>(
    peer,
    `SELECT id, state, count(*)::int AS writes FROM write_audit WHERE by_engine GROUP BY id, state HAVING count(*) > 1 ORDER BY id`,
  );
  for (const d of doubles.slice(0, 10)) examples.push(`written ${d.writes} times on ${peer}: ${d.id} ${d.state}`);
  const writesOf = async (server: string, byEngine: boolean) =>
    new Map(
      (
        await e.query<{ id: string; n: number }>(
          server,
          `SELECT id, count(*)::int AS n FROM write_audit WHERE by_engine = $1 GROUP BY id`,
          [byEngine],
        )
      ).map((r) => [r.id, r.n]),
    );
  const [userWrites, engineWrites] = await Promise.all([writesOf(source, false), writesOf(peer, true)]);
  let writtenMoreThanChanged = 0;
  for (const [id, n] of engineWrites) {
    const changes = userWrites.get(id) ?? 0;
    if (n > changes) {
      writtenMoreThanChanged += 1;
      if (examples.length < 20) examples.push(`${id} written ${n} times on ${peer}, changed ${changes} times on ${source}`);
    }
  }
  const sum = (m: Map<string, number>) => [...m.values()].reduce((a, b) => a + b, 0);
  return {
    peer,
    checked: src.size,
    lost,
    extra,
    differing,
    doubled: doubles.reduce((total, d) => total + d.writes - 1, 0),
    engineWrites: sum(engineWrites),
    userWrites: sum(userWrites),
    writtenMoreThanChanged,
    examples,
  };
}

/** What the peer's write_audit says of each request against the source's (writeSequences). */
export interface WriteSequences {
  peer: string;
  /** requests the users wrote on the source */
  requests: number;
  /** requests whose writes on the peer are exactly the states the source's transactions committed, in order */
  same: number;
  /** requests written with fewer states (changes of a batch carried as the latest), in order, ending with the last */
  coalesced: number;
  /** requests with a state written twice on the peer */
  doubled: number;
  /** requests whose last state on the source was not the engine's last write on the peer (or never written) */
  lost: number;
  /** requests written out of order, or with a state the source never committed */
  other: number;
  examples: string[];
}

/**
 * Compares, request by request, the states the engine wrote on a peer (write_audit, in order)
 * with the states the users' transactions committed on the source (the last state each source
 * transaction wrote). Every change the tests make writes a state the request never had, so a
 * change applied twice shows as a state written twice (a replay writing it again), one applied
 * out of order as states in another order, and a lost one as a last write that is not the
 * source's last state. The engine may carry several changes of a request in one batch as the
 * latest: fewer states, in order, is counted apart (coalesced), not as a loss.
 */
export async function writeSequences(e: DsoEnv, source: string, peer: string): Promise<WriteSequences> {
  const sequencesOf = async (server: string, sql: string) =>
    new Map((await e.query<{ id: string; states: string[] }>(server, sql)).map((r) => [r.id, r.states]));
  const [users, engine] = await Promise.all([
    sequencesOf(
      source,
      `SELECT id, array_agg(state ORDER BY n) AS states
                           FROM (SELECT DISTINCT ON (id, tx) id, n, state FROM write_audit WHERE NOT by_engine ORDER BY id, tx, n DESC) last
                          GROUP BY id`,
    ),
    sequencesOf(peer, `SELECT id, array_agg(state ORDER BY n) AS states FROM write_audit WHERE by_engine GROUP BY id`),
  ]);
  const result: WriteSequences = { peer, requests: users.size, same: 0, coalesced: 0, doubled: 0, lost: 0, other: 0, examples: [] };
  const example = (text: string) => {
    if (result.examples.length < 20) result.examples.push(text);
  };
  for (const [id, wanted] of users) {
    const got = engine.get(id) ?? [];
    const shown = `${got.join(' ') || '(nothing)'} on ${peer}; committed on ${source}: ${wanted.join(' ')}`;
    if (new Set(got).size < got.length) {
      result.doubled += 1;
      example(`${id} has a state written twice: ${shown}`);
    } else if (got[got.length - 1] !== wanted[wanted.length - 1]) {
      result.lost += 1;
      example(`${id}'s last change is not the engine's last write: ${shown}`);
    } else if (got.length === wanted.length && got.every((state, i) => state === wanted[i])) {
      result.same += 1;
    } else {
      // in order: each state written is found after the one before in the source's sequence
      let at = 0;
      const inOrder = got.every((state) => (at = wanted.indexOf(state, at) + 1) > 0);
      if (inOrder) result.coalesced += 1;
      else {
        result.other += 1;
        example(`${id} written out of order, or with a state never committed: ${shown}`);
      }
    }
  }
  for (const [id, got] of engine) {
    if (!users.has(id)) {
      result.other += 1;
      example(`${id} written on ${peer} (${got.join(' ')}), never on ${source}`);
    }
  }
  return result;
}

/** Every engine's output, for failure messages. */
export function outputs(engines: readonly EngineProcess[]): string {
  return engines
    .map((engine, i) => `--- engine ${i + 1}${engine.running ? ' (running)' : ''} ---\n${engine.output.slice(-20_000)}`)
    .join('\n');
}

/**
 * Waits (with a deadline) until each peer's checksum equals the source's. Returns false at the
 * deadline rather than failing, so that the caller's row-by-row comparison says what differs.
 */
export async function untilSameData(e: DsoEnv, source: string, peers: readonly string[], timeoutMs: number): Promise<boolean> {
  const same = async () => {
    const want = await checksum(e, source);
    for (const peer of peers) {
      const got = await checksum(e, peer);
      if (got.n !== want.n || got.sum !== want.sum) return false;
    }
    return true;
  };
  return waitFor(same, { timeoutMs, intervalMs: 250 }).then(
    () => true,
    () => false,
  );
}

/** pgdso.pending and pgdso.pending_errors on a server, for an assertion that they are empty. */
export async function queues(e: DsoEnv, server: string): Promise<{ pending: unknown[]; errors: unknown[] }> {
  return {
    pending: await e.query(
      server,
      'SELECT id, type, mapping, request_id, status, attempts, last_error FROM pgdso.pending ORDER BY id LIMIT 10',
    ),
    errors: await e.query(server, 'SELECT id, type, mapping, request_id, error FROM pgdso.pending_errors ORDER BY id LIMIT 10'),
  };
}

const idOf = (n: number | string) => `'R' || lpad((${n})::text, 6, '0')`;

/**
 * Source transaction k of a load: inserts rows k*n .. k*n+n-1; odd k also updates a tenth of the
 * previous transaction's rows in the same transaction; every tenth also updates every hundredth
 * row loaded so far (so some rows change several times and only the last value may remain, and
 * the order of changes matters). Every update writes a state the row never had, so a change
 * applied twice shows in the peers' write_audit.
 */
export function loadTransactionSql(k: number, perTransaction: number): string {
  const first = k * perTransaction;
  const last = first + perTransaction - 1;
  const statements = [
    `INSERT INTO repair_request (id, item, status, description)
       SELECT ${idOf('g')}, CASE WHEN g % 3 = 0 THEN 'chair' WHEN g % 3 = 1 THEN 'desk' ELSE 'lamp' END, 'new', md5(g::text)
         FROM generate_series(${first}, ${last}) g`,
  ];
  if (k % 2 === 1) {
    statements.push(`UPDATE repair_request SET status = 's${k}', description = md5(id || ':s${k}')
                      WHERE id BETWEEN ${idOf(first - perTransaction)} AND ${idOf(first - 1)} AND right(id, 1) = '0'`);
  }
  if (k % 10 === 9) {
    statements.push(`UPDATE repair_request SET status = 'e${k}', description = md5(id || ':e${k}') WHERE right(id, 2) = '00'`);
  }
  return `BEGIN; ${statements.join('; ')}; COMMIT`;
}

export interface LoadOptions {
  transactions: number;
  perTransaction: number;
  /** the load stays at most this many rows ahead of `behind()` (backpressure, not a pause) */
  maxAhead: number;
  /** rows on the slowest peer */
  behind: () => Promise<number>;
  /** for messages: the engines' output */
  describe: () => string;
}

/**
 * A load of the source in transactions (loadTransactionSql), as an application runs it: a
 * transaction chosen as a deadlock victim is run again. pause() holds it between two
 * transactions (while the test restarts the source's cluster, say), resume() lets it go on.
 */
export class Load {
  loaded = 0;
  running = true;
  failed = false;
  /** user transactions rolled back as deadlock victims, and run again */
  readonly deadlocks: string[] = [];
  readonly done: Promise<void>;
  private gate: { opened: Promise<void>; open: () => void; reached: () => void } | null = null;

  constructor(
    private readonly e: DsoEnv,
    private readonly server: string,
    private readonly opts: LoadOptions,
  ) {
    this.done = this.run();
    this.done.catch(() => undefined); // reported by whoever awaits it
  }

  get total(): number {
    return this.opts.transactions * this.opts.perTransaction;
  }

  private async run(): Promise<void> {
    const { transactions, perTransaction, maxAhead, behind, describe } = this.opts;
    try {
      for (let k = 0; k < transactions; k++) {
        await waitFor(async () => this.loaded - (await behind()) < maxAhead, {
          timeoutMs: 90_000,
          intervalMs: 100,
          message: () => `the peers stopped receiving rows (${this.loaded} loaded); ${describe()}`,
        });
        if (this.gate) {
          this.gate.reached();
          await this.gate.opened;
        }
        for (let attempt = 1; ; attempt++) {
          try {
            await this.e.query(this.server, loadTransactionSql(k, perTransaction));
            break;
          } catch (err) {
            if ((err as { code?: string }).code !== '40P01' || attempt >= 5) throw err;
            this.deadlocks.push(`transaction ${k}: ${(err as Error).message}; ${(err as { detail?: string }).detail ?? ''}`);
          }
        }
        this.loaded += perTransaction;
      }
    } catch (err) {
      this.failed = true;
      throw err;
    } finally {
      this.running = false;
      this.gate?.reached();
    }
  }

  /** Resolves once the load waits between two transactions (or has ended). */
  pause(): Promise<void> {
    let open!: () => void;
    let reached!: () => void;
    const opened = new Promise<void>((resolve) => (open = resolve));
    const atGate = new Promise<void>((resolve) => (reached = resolve));
    this.gate = { opened, open, reached };
    if (!this.running) reached();
    return atGate;
  }

  resume(): void {
    const gate = this.gate;
    this.gate = null;
    gate?.open();
  }
}

/**
 * Waits until the slowest peer has at least `rows` rows (or the load failed: -1, the load
 * reports why). Returns the count seen.
 */
export async function untilPeersReach(load: Load, rows: number, describe: () => string, behind: () => Promise<number>): Promise<number> {
  return waitFor(
    async () => {
      if (load.failed) return -1;
      const n = await behind();
      return n >= rows ? n : 0;
    },
    { timeoutMs: 90_000, intervalMs: 25, message: () => `the peers did not reach ${rows} rows; ${describe()}` },
  );
}
