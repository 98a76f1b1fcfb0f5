// DSO's use 2 in `pgdso demo`: follow the sun. Three sites, San Francisco, Tokyo and Paris; at the
// end of each site's working day (17:00 local, an escalation), the open requests it owns move on
// to the next site with ownership. The demo's clock is injected and moved from one 17:00 to the
// next, so a day passes in seconds; the engines and the SQL are real.
import type { Logger } from 'pino';
import type { LocalCluster } from '../embedded/cluster.ts';
import { ManualClock } from '../escalation/schedule.ts';
import { DemoUse, until } from './use.ts';

const SITES = [
  { server: 'sf', zone: 'America/Los_Angeles', city: 'San Francisco' },
  { server: 'tokyo', zone: 'Asia/Tokyo', city: 'Tokyo' },
  { server: 'paris', zone: 'Europe/Paris', city: 'Paris' },
] as const;

function local(at: Date, timeZone: string): string {
  return new Intl.DateTimeFormat('en-GB', { timeZone, weekday: 'short', hour: '2-digit', minute: '2-digit', hourCycle: 'h23' }).format(at);
}

function clockLine(at: Date): string {
  return SITES.map((s) => `${local(at, s.zone)} in ${s.city}`).join(', ');
}

export async function followTheSun(cluster: LocalCluster, say: (text?: string) => void, log: Logger): Promise<DemoUse> {
  say('\nUse 2, follow the sun (rules: examples/follow-the-sun/rules/follow-the-sun.json). Three sites');
  say('(databases fts_sf, fts_tokyo, fts_paris) hand their open requests on at the end of their working');
  say('day: an escalation per site, cron "0 17 * * 1-5" in its own time zone, transfers the open requests');
  say('it owns to the next site with ownership. The demo moves an injected clock from one 17:00 to the');
  say('next instead of waiting for it; the escalations scan the form and the engines carry the requests.\n');
  const use = await DemoUse.create(
    cluster,
    'follow-the-sun',
    'fts_',
    SITES.map((s) => s.server),
  );
  const clock = new ManualClock(new Date('2026-03-09T16:00:00Z'));
  await use.start(log, clock);
  await until(async () => clock.sleeping === SITES.length);
  say(`clock: ${clockLine(clock.now())}`);
  const insert = `INSERT INTO repair_request (id, item, status) VALUES ('SF-30', 'laptop', 'open'), ('SF-31', 'phone', 'open'),
    ('SF-32', 'monitor', 'closed')`;
  say(`sf> ${insert.replace(/\s+/g, ' ')}`);
  await use.pool('sf').query(insert);
  const master = async (id: string, server: string) => (await use.copy(server, id))?.dso_master === true;

  clock.set(new Date('2026-03-10T00:00:00Z'));
  say(`\nclock: ${clockLine(clock.now())}: San Francisco's day ends`);
  await until(async () => (await master('SF-30', 'tokyo')) && (await master('SF-31', 'tokyo')) && !(await master('SF-30', 'sf')));
  await use.table(say, ['SF-30', 'SF-31', 'SF-32']);
  say('\nSF-32 is closed: it stays in San Francisco. In Tokyo, a user closes SF-31 (Tokyo owns it now):');
  say("tokyo> UPDATE repair_request SET status = 'closed' WHERE id = 'SF-31'");
  await use.pool('tokyo').query(`UPDATE repair_request SET status = 'closed' WHERE id = 'SF-31'`);

  clock.set(new Date('2026-03-10T08:00:00Z'));
  say(`\nclock: ${clockLine(clock.now())}: Tokyo's day ends`);
  await until(async () => (await master('SF-30', 'paris')) && !(await master('SF-30', 'tokyo')));
  clock.set(new Date('2026-03-10T16:00:00Z'));
  say(`clock: ${clockLine(clock.now())}: Paris's day ends`);
  await until(async () => (await master('SF-30', 'sf')) && !(await master('SF-30', 'paris')));
  say('\nA day later SF-30, still open, is back where it started; its history shows the trip:\n');
  await use.table(say, ['SF-30', 'SF-31']);
  await until(async () => clock.sleeping === SITES.length);
  say('\nEach run of an escalation is recorded (pgdso.scan_runs on its server), with its fire time:');
  for (const { server, zone } of SITES) {
    const runs = await use.pool(server).query('SELECT name, fire_time, scanned, matched FROM pgdso.scan_runs ORDER BY id');
    for (const r of runs.rows)
      say(
        `  ${server.padEnd(6)} ${String(r.name).padEnd(22)} fired ${local(r.fire_time as Date, zone)} local, ` +
          `matched ${r.matched} of ${r.scanned}`,
      );
  }
  return use;
}
