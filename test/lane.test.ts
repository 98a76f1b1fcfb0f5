// An apply lane's transaction, run optimistically (no savepoints) and pipelined (statements sent
// before the results ahead of them are in): whatever goes wrong in it, the outcome is that of
// groups run isolated from the start (good rows applied, bad rows failures, each once), and the
// source position commits only with them. The groups here are test-only: plain INSERTs (and a
// COPY) into a table of their own, against real PostgreSQL.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import pino from 'pino';
import pg from 'pg';
import { dsoSuite } from './support/dso.ts';
import { ApplyLane, type OpGroup, type PipedStatement } from '../src/applier/lane.ts';
import { copyField, copyIn } from '../src/applier/copy.ts';
import { FencedError } from '../src/sql/fencing.ts';
import { sqlstateOf } from '../src/applier/errors.ts';
import { waitFor, within } from './support/wait.ts';

const suite = dsoSuite(1);
const log = pino({ level: process.env.LANE_LOG ?? 'silent' });

const ITEM_SQL = `
CREATE TABLE item (
  id text PRIMARY KEY,
  qty int NOT NULL CHECK (qty >= 0),
  code text UNIQUE,
  note text
)`;

interface Row {
  id: string;
  qty: number;
  code?: string;
  /** the row needs a second statement (as a duplicate request ID does): its group cannot be piped alone */
  more?: boolean;
}
/** A row not applied: `exists` (its ID is there already, as a pending duplicate) or the SQLSTATE that refused it. */
type Failure = { id: string; reason: string };

function insert(rows: readonly Row[]): pg.QueryConfig {
  return {
    text: `INSERT INTO item (id, qty, code)
             SELECT * FROM unnest($1::text[], $2::int[], $3::text[])
           ON CONFLICT (id) DO NOTHING RETURNING id`,
    values: [rows.map((r) => r.id), rows.map((r) => r.qty), rows.map((r) => r.code ?? null)],
  };
}

/** Rows inserted by one statement; `copy`: by COPY, which never runs pipelined. */
class Items implements OpGroup<Failure> {
  /** statements run by execute(), isolated or not (a group run again counts again) */
  executions = 0;
  constructor(
    readonly rows: Row[],
    private readonly kind: 'insert' | 'copy' = 'insert',
  ) {}
  get size(): number {
    return this.rows.length;
  }
  has(): boolean {
    return false;
  }
  async execute(client: pg.ClientBase, isolated = true): Promise<Failure[]> {
    this.executions += 1;
    if (!isolated) return this.apply(client, this.rows);
    const failures: Failure[] = [];
    for (const row of this.rows) {
      await client.query('SAVEPOINT item');
      try {
        failures.push(...(await this.apply(client, [row])));
        await client.query('RELEASE SAVEPOINT item');
      } catch (err) {
        await client.query('ROLLBACK TO SAVEPOINT item');
        failures.push({ id: row.id, reason: (err as { code?: string }).code ?? String(err) });
      }
    }
    return failures;
  }
  private async apply(client: pg.ClientBase, rows: readonly Row[]): Promise<Failure[]> {
    if (this.kind === 'copy') {
      const data = rows.map((r) => `${copyField(r.id)}\t${r.qty}\t${copyField(r.code)}\n`).join('');
      await copyIn(client, 'COPY item (id, qty, code) FROM STDIN', data);
      return [];
    }
    const failed = this.missing(rows, await client.query(insert(rows)));
    const more = rows.filter((r) => r.more).map((r) => r.id);
    if (more.length) await client.query(`UPDATE item SET note = 'second statement' WHERE id = ANY($1)`, [more]);
    return failed;
  }
  private missing(rows: readonly Row[], result: pg.QueryResult): Failure[] {
    const written = new Set(result.rows.map((r: { id: string }) => r.id));
    return rows.filter((r) => !written.has(r.id)).map((r) => ({ id: r.id, reason: 'exists' }));
  }
  piped(): PipedStatement<Failure> | null {
    if (this.kind === 'copy') return null;
    return {
      query: insert(this.rows),
      check: (result) => (this.rows.some((r) => r.more) ? null : this.missing(this.rows, result)),
    };
  }
}

const rows = (prefix: string, n: number, extra: Partial<Row> = {}): Row[] =>
  Array.from({ length: n }, (_, i) => ({ id: `${prefix}${i + 1}`, qty: i + 1, ...extra }));

/** A user's uncommitted insert of L: a lane's insert of L waits on it until the user ends. */
async function holdingL(url: string): Promise<pg.Client> {
  const user = new pg.Client({ connectionString: url });
  await user.connect();
  await user.query(`BEGIN; INSERT INTO item (id, qty) VALUES ('L', 1)`);
  return user;
}

let lanes = 0;
async function setup(opts: { fence?: boolean; namedStatements?: boolean } = {}) {
  const e = await suite.env({ servers: ['sf'], schemaSql: ITEM_SQL, rules: { mappings: [], filters: [] } });
  // origins are the cluster's: one per lane of a test
  const origin = `pgdso:test:lane:${++lanes}`;
  const lane = new ApplyLane<Failure>({
    connection: { connectionString: e.urls.sf },
    origin,
    name: `test->sf/lane${lanes}`,
    log,
    namedStatements: opts.namedStatements,
    fence: opts.fence ? { instanceId: 'sf-a', term: 1 } : undefined,
  });
  await lane.open();
  const ids = async () => (await e.query<{ id: string }>('sf', `SELECT id FROM item ORDER BY id`)).map((r) => r.id);
  const progress = async () =>
    (await e.query<{ lsn: string }>('sf', `SELECT source_lsn::text AS lsn FROM pgdso.apply_progress WHERE origin = $1`, [origin]))[0]?.lsn;
  return { e, lane, ids, progress, origin };
}

test('a bad row in a pipelined transaction: run again isolated, the good rows commit, each failure recorded once', async () => {
  const { lane, ids, progress, e } = await setup({ namedStatements: true });
  await e.query('sf', `INSERT INTO item (id, qty) VALUES ('a1', 100)`);
  const groups = [new Items(rows('a', 3)), new Items([...rows('b', 2), { id: 'bad', qty: -1 }, ...rows('c', 1)]), new Items(rows('d', 2))];
  for (const group of groups) lane.submit(group);
  lane.recordPipelined(0x10n, new Date());
  await lane.commit(0x10n, new Date());

  assert.equal(lane.rerun, 1, 'the transaction ran again once');
  assert.deepEqual(
    lane.takeFailures().sort((x, y) => x.id.localeCompare(y.id)),
    [
      { id: 'a1', reason: 'exists' },
      { id: 'bad', reason: '23514' },
    ],
    'each failure once: the one the pipelined result showed is not kept beside the rerun one',
  );
  assert.deepEqual(await ids(), ['a1', 'a2', 'a3', 'b1', 'b2', 'c1', 'd1', 'd2']);
  assert.equal(await progress(), '0/10');
  assert.deepEqual(
    groups.map((g) => g.executions),
    [1, 1, 1],
    'after the pipeline each group ran once more, isolated',
  );

  // the next transactions run isolated (no pipeline, no rerun), and commit
  lane.submit(new Items([{ id: 'bad2', qty: -2 }, ...rows('e', 1)]));
  await lane.commit(0x20n, new Date());
  assert.equal(lane.rerun, 1);
  assert.deepEqual(lane.takeFailures(), [{ id: 'bad2', reason: '23514' }]);
  assert.deepEqual(await ids(), ['a1', 'a2', 'a3', 'b1', 'b2', 'c1', 'd1', 'd2', 'e1']);
  assert.equal(await progress(), '0/20');
  await lane.close();
});

test('pipelined groups, then a COPY and a group after it: one transaction, committed once with its source position', async () => {
  const { lane, ids, progress, e } = await setup();
  const groups = [new Items(rows('a', 2)), new Items(rows('b', 2)), new Items(rows('c', 3), 'copy'), new Items(rows('d', 1))];
  for (const group of groups) lane.submit(group);
  await lane.commit(0x30n, new Date());
  assert.equal(lane.rerun, 0);
  assert.deepEqual(
    groups.map((g) => g.executions),
    [0, 0, 1, 1],
    'the first two were sent pipelined, the COPY and what follows it in the open transaction ran one after another',
  );
  assert.deepEqual(lane.takeFailures(), []);
  assert.deepEqual(await ids(), ['a1', 'a2', 'b1', 'b2', 'c1', 'c2', 'c3', 'd1']);
  const [{ transactions }] = await e.query<{ transactions: number }>(
    'sf',
    `SELECT count(DISTINCT xmin::text)::int AS transactions FROM item`,
  );
  assert.equal(transactions, 1, 'the groups and the COPY committed in one transaction');
  assert.equal(await progress(), '0/30');
  await lane.close();
});

test('a duplicate key and a group needing a second statement, pipelined: run again isolated, the duplicate recorded', async () => {
  const { lane, ids, e } = await setup({ namedStatements: true });
  await e.query('sf', `INSERT INTO item (id, qty, code) VALUES ('x', 1, 'K-1')`);
  const more = new Items([{ id: 'm1', qty: 1, more: true }]);
  lane.submit(new Items(rows('a', 2)));
  lane.submit(new Items([{ id: 'dup', qty: 1, code: 'K-1' }, ...rows('b', 1)]));
  lane.submit(more);
  await lane.commit(0x40n, new Date());
  assert.equal(lane.rerun, 1);
  assert.deepEqual(lane.takeFailures(), [{ id: 'dup', reason: '23505' }]);
  assert.deepEqual(await ids(), ['a1', 'a2', 'b1', 'm1', 'x']);
  const [m1] = await e.query<{ note: string | null }>('sf', `SELECT note FROM item WHERE id = 'm1'`);
  assert.equal(m1?.note, 'second statement', 'the group that needed more ran again, isolated');
  await lane.close();
});

test('a group that needs a second statement alone makes a pipelined transaction run again', async () => {
  const { lane, e } = await setup();
  lane.submit(new Items(rows('a', 1)));
  lane.submit(new Items([{ id: 'm1', qty: 1, more: true }]));
  await lane.commit(0x50n, new Date());
  assert.equal(lane.rerun, 1);
  const [m1] = await e.query<{ note: string | null }>('sf', `SELECT note FROM item WHERE id = 'm1'`);
  assert.equal(m1?.note, 'second statement');
  await lane.close();
});

test('a fenced lane whose term was superseded: its pipelined source position fails the commit, nothing is written', async () => {
  const { lane, ids, progress, e, origin } = await setup({ fence: true });
  lane.submit(new Items(rows('a', 1)));
  lane.recordPipelined(0x10n, new Date());
  await lane.commit(0x10n, new Date());
  assert.equal(await progress(), '0/10');
  // a newer owner's term, recorded by another connection
  await e.query('sf', `UPDATE pgdso.apply_progress SET term = 2, instance_id = 'sf-b' WHERE origin = $1`, [origin]);
  lane.submit(new Items(rows('b', 2)));
  lane.submit(new Items(rows('c', 1)));
  lane.recordPipelined(0x20n, new Date());
  await assert.rejects(lane.commit(0x20n, new Date()), (err) => err instanceof FencedError);
  await lane.close();
  assert.deepEqual(await ids(), ['a1'], 'the fenced transaction wrote nothing');
  assert.equal(await progress(), '0/10');
});

test('without pipelining (COPY groups), a bad row rolls the optimistic transaction back: its groups run again isolated', async () => {
  const { lane, ids, progress } = await setup();
  const groups = [
    new Items(rows('a', 2), 'copy'),
    new Items([...rows('b', 1), { id: 'bad', qty: -1 }], 'copy'),
    new Items(rows('c', 1), 'copy'),
  ];
  for (const group of groups) lane.submit(group);
  await lane.commit(0x60n, new Date());
  assert.equal(lane.rerun, 1);
  assert.deepEqual(lane.takeFailures(), [{ id: 'bad', reason: '23514' }]);
  assert.deepEqual(await ids(), ['a1', 'a2', 'b1', 'c1']);
  assert.deepEqual(
    groups.map((g) => g.executions),
    [2, 2, 1],
    'the groups before the failure ran twice (without a savepoint, then isolated), the one after once',
  );
  assert.equal(await progress(), '0/60');
  await lane.close();
});

test('the backend terminated while pipelined statements wait (57P01): the commit fails, nothing is written, the lane closes', async () => {
  const { lane, ids, progress, e } = await setup();
  const user = await holdingL(e.urls.sf!);
  try {
    lane.submit(new Items(rows('a', 1)));
    lane.submit(new Items([{ id: 'L', qty: 2 }]));
    lane.submit(new Items(rows('b', 1)));
    lane.recordPipelined(0x70n, new Date());
    const committed = lane.commit(0x70n, new Date()).then(
      () => 'committed',
      (err) => err,
    );
    const [waiting] = await waitFor(
      () =>
        e.query<{ pid: number }>(
          'sf',
          `SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgdso apply%' AND wait_event_type = 'Lock'`,
        ),
      { message: 'the lane never waited on the lock' },
    ).then((found) => (found.length ? found : Promise.reject(new Error('no waiting lane'))));
    await e.query('sf', 'SELECT pg_terminate_backend($1)', [waiting!.pid]);
    const outcome = await waitFor(() => Promise.race([committed, new Promise((r) => setTimeout(() => r(null), 100))]), {
      message: 'the commit neither failed nor succeeded after the backend was terminated',
      timeoutMs: 10_000,
    });
    assert.ok(outcome instanceof Error, `the commit: ${String(outcome)}`);
    assert.equal(sqlstateOf(outcome), '57P01');
    await lane.close();
  } finally {
    await user.query('ROLLBACK');
    await user.end();
  }
  assert.deepEqual(await ids(), []);
  assert.equal(await progress(), undefined);
});

test('a lane closed while its pipelined statement waits on a lock closes at once; its transaction is rolled back', async () => {
  const { lane, ids, e } = await setup();
  const user = await holdingL(e.urls.sf!);
  try {
    lane.submit(new Items(rows('a', 1)));
    lane.submit(new Items([{ id: 'L', qty: 2 }]));
    const waiting = `SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgdso apply%' AND wait_event_type = 'Lock'`;
    await waitFor(async () => (await e.query('sf', waiting)).length > 0, { message: 'the lane never waited on the lock' });
    await within(lane.close(), 2_000, () => 'the lane did not close while its statement waited');
  } finally {
    await user.query('ROLLBACK');
    await user.end();
  }
  // the backend notices the closed connection once the lock is free (PostgreSQL does not watch
  // the socket of a backend waiting on a lock), and its transaction ends rolled back
  const lanes = `SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'pgdso apply%'`;
  await waitFor(async () => (await e.query('sf', lanes)).length === 0, { message: 'the lane backend did not end' });
  assert.deepEqual(await ids(), []);
});
