// "Passwords never appear in logs, errors or status output" (the contract's config section),
// when connections fail: peers that cannot be reached (a closed port), a wrong password on a
// real server (28P01) and a connection URL that does not parse. Every command's output and the
// engine's log lines must name the server (and host:port) that failed, never the password.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { readFile, writeFile } from 'node:fs/promises';
import { dsoSuite, REPAIR_REQUEST_SQL, mapping, filter, until, type CliResult, type DsoEnv } from '../support/dso.ts';
import { waitFor } from '../support/wait.ts';

const suite = dsoSuite(2);

const URL_PASSWORD = 'S3cr3t-Pw-123';
const _OBJECT_PASSWORD = 'Obj3ct@Pw-456!';
const ENV_PASSWORD = 'Env-S3cr3t-789';
const WRONG_PASSWORD = 'Wr0ng-Pw-1011';
const TOKYO_PASSWORD_VARIABLE = 'PGDSO_TEST_SECRETS_TOKYO_PASSWORD';

/**
 * Commands that read every server (or the one named). Each must fail (exit non-zero) while a
 * configured server cannot be reached or refuses the password. `pending list` also prints the
 * queue of sf, whose rows carry the engine's record of the failed connection attempts.
 */
const COMMANDS: { args: string[] }[] = [
  { args: ['status'] },
  { args: ['status', '--json'] },
  { args: ['rules', 'check'] },
  { args: ['migrate'] },
  { args: ['forms', 'enable', '--server', 'chicago', '--form', 'repair_request'] },
  { args: ['pending', 'list'] },
];

/** A port nothing listens on (the kernel gave it out and it was closed again). */
function closedPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address() as net.AddressInfo;
      probe.close(() => resolve(port));
    });
  });
}

/** Every form a secret could take in output: as is, percent-encoded, JSON-escaped. */
function secretForms(secrets: readonly string[]): string[] {
  return [...new Set(secrets.flatMap((s) => [s, encodeURIComponent(s), JSON.stringify(s).slice(1, -1)]))];
}

function assertNoSecret(text: string, secrets: readonly string[], where: string): void {
  for (const secret of secretForms(secrets)) {
    const at = text.indexOf(secret);
    assert.equal(
      at,
      -1,
      `${where} shows a password (${JSON.stringify(secret)}): ...${text.slice(Math.max(0, at - 200), at + secret.length + 100)}...`,
    );
  }
}

/** The real password of a server's superuser URL in this environment (it must not leak either). */
function passwordOf(e: DsoEnv, server: string): string {
  return decodeURIComponent(new URL(e.urls[server]!).password);
}

/** Replaces servers in the environment's config file. */
async function setServers(e: DsoEnv, servers: Record<string, unknown>): Promise<void> {
  const config = JSON.parse(await readFile(e.configPath, 'utf8')) as { servers: Record<string, unknown> };
  Object.assign(config.servers, servers);
  await writeFile(e.configPath, JSON.stringify(config, null, 2));
}

const rules = (peers: string[]) => ({
  mappings: peers.map((peer) => mapping(`sf-to-${peer}`, 'sf', peer, { transferMode: 'data-only' })),
  filters: [
    filter(
      'copy-requests',
      'sf',
      null,
      peers.map((peer) => ({ type: 'transfer', mapping: `sf-to-${peer}` })),
      ['insert', 'update'],
    ),
  ],
});

type Mention = { text: string | RegExp; what: string };

/**
 * Runs the commands. A password in an output fails at once; an output that does not say what
 * failed (`mentions`, and `more` for a command by its name) or an exit code 0 is added to
 * `problems`, so that one run lists them all.
 */
async function checkCommands(
  e: DsoEnv,
  secrets: string[],
  mentions: Mention[],
  problems: string[],
  more: Record<string, Mention[]> = {},
): Promise<void> {
  for (const command of COMMANDS) {
    const name = `pgdso ${command.args.join(' ')}`;
    const result: CliResult = await e.cli(command.args);
    const output = `${result.stdout}\n${result.stderr}`;
    assertNoSecret(output, secrets, name);
    if (result.code === 0) problems.push(`${name} exited 0 though a server could not be reached:\n${output}`);
    if (result.code === 2 && /unknown command|error: /i.test(result.stderr)) problems.push(`${name} did not run (exit 2):\n${output}`);
    for (const m of [...mentions, ...(more[name] ?? [])]) {
      if (!(typeof m.text === 'string' ? output.includes(m.text) : m.text.test(output)))
        problems.push(`${name} does not say ${m.what}:\n${output}`);
    }
    if (command.args.includes('--json')) {
      const parsed = JSON.parse(result.stdout) as { servers: Record<string, { error?: string }> };
      if (!parsed.servers.chicago?.error) problems.push(`${name} has no error for chicago: ${result.stdout}`);
      if (parsed.servers.sf?.error !== undefined) problems.push(`${name} has an error for sf, which is reachable: ${result.stdout}`);
    }
  }
}

test("a connection failure's log lines and errors carry no password: peers on closed ports (URL and object forms, a password from the \
environment)", {
  timeout: 120_000,
}, async (t) => {
  const e = await suite.env({
    servers: ['sf'],
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: rules(['chicago', 'tokyo']),
  });
  const [chicagoPort, tokyoPort] = [await closedPort(), await closedPort()];
  await setServers(e, {
    chicago: { connection: `postgres://pgdso:${URL_PASSWORD}@127.0.0.1:${chicagoPort}/x` },
    tokyo: {
      connection: { host: '127.0.0.1', port: tokyoPort, database: 'ar', user: 'pgdso', password: `\${env:${TOKYO_PASSWORD_VARIABLE}}` },
    },
  });
  // the engine and the commands read it from their environment (inherited)
  process.env[TOKYO_PASSWORD_VARIABLE] = ENV_PASSWORD;
  t.after(() => delete process.env[TOKYO_PASSWORD_VARIABLE]);
  const secrets = [URL_PASSWORD, ENV_PASSWORD, passwordOf(e, 'sf')];

  // The engine: peers that cannot be reached are logged with their name and address; a request
  // for them waits in the queue, whose recorded error carries no password either.
  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item, description) VALUES ('S-1', 'chair', 'for the peers that are down')`);
  await until(
    engine,
    'the engine did not log the failure to reach chicago and tokyo',
    () =>
      engine.output.includes('chicago') &&
      engine.output.includes(String(chicagoPort)) &&
      engine.output.includes('tokyo') &&
      engine.output.includes(String(tokyoPort)),
  );
  const queued = await until(engine, 'S-1 did not wait in pgdso.pending for chicago and tokyo', async () => {
    const rows = await e.query<{ target_server: string; last_error: string | null }>(
      'sf',
      `SELECT target_server, last_error FROM pgdso.pending WHERE request_id = 'S-1'`,
    );
    return new Set(rows.map((r) => r.target_server)).size === 2 ? rows : undefined;
  });
  const exit = await engine.stop();
  assertNoSecret(engine.output, secrets, 'the log of pgdso run');
  assertNoSecret(JSON.stringify(queued), secrets, 'pgdso.pending.last_error');
  assertNoSecret(JSON.stringify(await e.query('sf', 'SELECT * FROM pgdso.pending_errors')), secrets, 'pgdso.pending_errors');
  assert.equal(exit, 0, `pgdso run did not stop cleanly:\n${engine.output.slice(-3000)}`);

  const problems: string[] = [];
  await checkCommands(
    e,
    secrets,
    [
      { text: 'chicago', what: 'which server failed (chicago)' },
      { text: String(chicagoPort), what: `where chicago is (127.0.0.1:${chicagoPort})` },
    ],
    problems,
    {
      // the queue's rows, with the engine's record of each failed attempt (what a leak would carry)
      'pgdso pending list': (['chicago', 'tokyo'] as const).map((server) => ({
        text: new RegExp(`request S-1 -> ${server} .*last error: .*127\\.0\\.0\\.1:${server === 'chicago' ? chicagoPort : tokyoPort}`),
        what: `S-1 waiting for ${server} with the error of the attempt to reach it`,
      })),
    },
  );
  // status and rules check say where each server that failed is (migrate may stop at the first)
  for (const args of [['status'], ['rules', 'check'], ['migrate']]) {
    const { stdout, stderr } = await e.cli(args);
    for (const [server, port] of [
      ['chicago', chicagoPort],
      ['tokyo', tokyoPort],
    ] as const) {
      if (args[0] === 'migrate' && server === 'tokyo') continue;
      if (!new RegExp(`${server}[^\\n]*127\\.0\\.0\\.1:${port}`).test(`${stdout}${stderr}`))
        problems.push(`pgdso ${args.join(' ')} does not name ${server} at 127.0.0.1:${port}:\n${stdout}${stderr}`);
    }
  }
  assert.deepEqual(problems, [], problems.join('\n\n'));
});

test('a wrong password on a real server (28P01): the failure is reported as an authentication failure of that server, without the \
password', {
  timeout: 120_000,
}, async () => {
  // The harness's clusters take passwords on TCP (scram-sha-256): a wrong one is refused.
  const e = await suite.env({
    servers: ['sf', 'chicago'],
    placement: { sf: 0, chicago: 1 },
    schemaSql: REPAIR_REQUEST_SQL,
    forms: ['repair_request'],
    rules: rules(['chicago']),
  });
  const real = new URL(e.urls.chicago!);
  const secrets = [WRONG_PASSWORD, passwordOf(e, 'sf'), passwordOf(e, 'chicago')];
  const wrong = new URL(real);
  wrong.password = WRONG_PASSWORD;
  await setServers(e, { chicago: { connection: wrong.toString() } });
  // The embedded clusters (and postgres:18 containers) take passwords on TCP: a wrong one is
  // refused. A server given by PGDSO_TEST_URLS that trusts TCP connections cannot run this test:
  // it fails here rather than passing without checking anything.
  const probe = await e.cli(['status']);
  assert.match(
    probe.stdout + probe.stderr,
    /password authentication failed|28P01/,
    `chicago accepted a wrong password (trust authentication on TCP?): this test needs password ` +
      `authentication\n${probe.stdout}${probe.stderr}`,
  );
  assert.equal(probe.code, 1, 'status exit code while chicago refuses the password');

  const engine = e.engine();
  await e.query('sf', `INSERT INTO repair_request (id, item) VALUES ('W-1', 'desk')`);
  await until(
    engine,
    'the engine did not log the authentication failure of chicago',
    () => /password authentication failed|28P01/.test(engine.output) && engine.output.includes('chicago'),
  );
  await waitFor(async () => (await e.query('sf', `SELECT 1 FROM pgdso.pending WHERE request_id = 'W-1'`)).length > 0, {
    message: () => `W-1 did not wait in pgdso.pending:\n${engine.output}`,
  });
  const exit = await engine.stop();
  assertNoSecret(engine.output, secrets, 'the log of pgdso run');
  assertNoSecret(JSON.stringify(await e.query('sf', 'SELECT last_error FROM pgdso.pending')), secrets, 'pgdso.pending.last_error');
  // chicago's own engine cannot log in: it stops with one error line (sf's engine queues for chicago), and the run exits 1
  assert.match(
    engine.output,
    /"level":50[^\n]*the engine of chicago stops: PostgreSQL refuses it the password of role/,
    engine.output.slice(-3000),
  );
  assert.equal(exit, 1, `pgdso run should exit 1 after an engine stopped on a refused password:\n${engine.output.slice(-3000)}`);

  const problems: string[] = [];
  await checkCommands(
    e,
    secrets,
    [
      { text: 'chicago', what: 'which server failed (chicago)' },
      { text: /password authentication failed|28P01/, what: 'that the password was refused' },
    ],
    problems,
    {
      'pgdso pending list': [
        {
          text: /request W-1 -> chicago .*last error: .*(password authentication failed|28P01)/,
          what: 'W-1 waiting for chicago with the refusal of its password',
        },
      ],
    },
  );
  assert.deepEqual(problems, [], problems.join('\n\n'));
});

test('a connection URL that does not parse: the config error names the file and the server, not the password', {
  timeout: 60_000,
}, async () => {
  const e = await suite.env({ servers: ['sf'], schemaSql: REPAIR_REQUEST_SQL, forms: ['repair_request'], rules: rules(['chicago']) });
  await setServers(e, { chicago: { connection: `postgres://pgdso:${URL_PASSWORD}@127.0.0.1:not-a-port/x` } });
  const secrets = [URL_PASSWORD, passwordOf(e, 'sf')];
  for (const args of [['rules', 'check'], ['status'], ['run']]) {
    let code: number | null;
    let output: string;
    if (args[0] === 'run') {
      // as an engine process, so that it is killed if it starts after all
      const engine = e.engine();
      const ended = await Promise.race([
        engine.exited.then(() => true),
        new Promise<false>((resolve) => setTimeout(resolve, 20_000, false)),
      ]);
      if (!ended) await engine.kill9();
      [code, output] = [ended ? engine.child.exitCode : null, engine.output];
    } else {
      const result = await e.cli(args);
      [code, output] = [result.code, `${result.stdout}\n${result.stderr}`];
    }
    assertNoSecret(output, secrets, `pgdso ${args.join(' ')}`);
    assert.equal(code, 2, `pgdso ${args.join(' ')}: exit code for a bad config:\n${output}`);
    assert.match(output, /pgdso\.config\.json/, `pgdso ${args.join(' ')} does not name the config file:\n${output}`);
    assert.match(output, /\/servers\/chicago/, `pgdso ${args.join(' ')} does not point at the server:\n${output}`);
  }
});
