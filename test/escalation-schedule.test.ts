// The fire times of escalations: an end-of-day rule at 17:00 local fires once per working day in
// every site's zone, also on the days daylight saving time starts and ends; a gap (no instance
// owned the operation) gives one fire, the latest; everySeconds counts from the epoch.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fireTimes, ManualClock } from '../src/escalation/schedule.ts';

const ZONES = ['America/Los_Angeles', 'Asia/Tokyo', 'Europe/Paris', 'Australia/Sydney'];

function localParts(at: Date, timeZone: string): { day: string; weekday: string; time: string } {
  const parts = Object.fromEntries(
    new Intl.DateTimeFormat('en-CA', {
      timeZone,
      year: 'numeric',
      month: '2-digit',
      day: '2-digit',
      weekday: 'short',
      hour: '2-digit',
      minute: '2-digit',
      hourCycle: 'h23',
    })
      .formatToParts(at)
      .map((p) => [p.type, p.value]),
  );
  return { day: `${parts.year}-${parts.month}-${parts.day}`, weekday: parts.weekday!, time: `${parts.hour}:${parts.minute}` };
}

/** Every local working day between two instants, in a zone. */
function workingDays(from: Date, to: Date, timeZone: string): string[] {
  const days = new Set<string>();
  for (let t = from.getTime(); t <= to.getTime(); t += 3_600_000) {
    const { day, weekday } = localParts(new Date(t), timeZone);
    if (weekday !== 'Sat' && weekday !== 'Sun') days.add(day);
  }
  return [...days];
}

for (const [label, from, to] of [
  ['March (DST starts: US on the 8th, Europe on the 29th; Sydney ends on April 5)', '2026-03-02T00:00:00Z', '2026-04-08T00:00:00Z'],
  ['October and November (DST ends: Europe on Oct 25, US on Nov 1; Sydney starts Oct 4)', '2026-09-28T00:00:00Z', '2026-11-06T00:00:00Z'],
] as const) {
  test(`17:00 local on working days fires once per working day in each zone, at 17:00 local: ${label}`, () => {
    for (const timeZone of ZONES) {
      const times = fireTimes({ cron: '0 17 * * 1-5', timezone: timeZone });
      // a clock that moves in 10-minute steps, as a runner would see it; each due fire is taken once
      const fired: Date[] = [];
      let last: Date | null = new Date(from);
      for (let t = new Date(from).getTime(); t <= new Date(to).getTime(); t += 600_000) {
        const due = times.lastDue(last, new Date(t));
        if (due) {
          fired.push(due);
          last = due;
        }
      }
      const local = fired.map((at) => localParts(at, timeZone));
      assert.deepEqual(
        local.filter((l) => l.time !== '17:00'),
        [],
        `${timeZone}: every fire at 17:00 local`,
      );
      // the first day may have started before `from` in zones east of UTC: compare from the first fire on
      const expected = workingDays(new Date(from), new Date(to), timeZone).filter((d) => d >= local[0]!.day && d <= local.at(-1)!.day);
      assert.deepEqual(
        local.map((l) => l.day),
        expected,
        `${timeZone}: one fire per working day`,
      );
      assert.ok(local.length >= 25, `${timeZone}: ${local.length} fires`);
    }
  });
}

test('a gap of several days gives one fire, the latest; nothing is due twice or before its time', () => {
  const times = fireTimes({ cron: '0 17 * * 1-5', timezone: 'America/Los_Angeles' });
  const tuesday = new Date('2026-03-10T00:00:00Z'); // Monday 17:00 PDT
  assert.equal(times.lastDue(null, tuesday)?.toISOString(), tuesday.toISOString(), 'due at the very instant');
  assert.equal(times.lastDue(tuesday, tuesday), null, 'not twice');
  assert.equal(times.lastDue(tuesday, new Date('2026-03-10T23:59:59Z')), null, 'the next one not before its time');
  const friday = new Date('2026-03-13T12:00:00Z');
  assert.equal(times.lastDue(tuesday, friday)?.toISOString(), '2026-03-13T00:00:00.000Z', 'the latest of the missed ones');
  assert.equal(times.next(tuesday)?.toISOString(), '2026-03-11T00:00:00.000Z');
  // Friday 17:00 PDT is Saturday 00:00 UTC; the next one is Monday's
  assert.equal(times.next(new Date('2026-03-14T00:00:00Z'))?.toISOString(), '2026-03-17T00:00:00.000Z');
});

test('everySeconds fires at the multiples of N seconds since the epoch', () => {
  const times = fireTimes({ everySeconds: 60 });
  assert.equal(times.lastDue(null, new Date('2026-03-10T10:00:59.999Z'))?.toISOString(), '2026-03-10T10:00:00.000Z');
  assert.equal(times.lastDue(new Date('2026-03-10T10:00:00Z'), new Date('2026-03-10T10:00:59Z')), null);
  assert.equal(
    times.lastDue(new Date('2026-03-10T10:00:00Z'), new Date('2026-03-10T10:05:30Z'))?.toISOString(),
    '2026-03-10T10:05:00.000Z',
  );
  assert.equal(times.next(new Date('2026-03-10T10:00:00Z'))?.toISOString(), '2026-03-10T10:01:00.000Z');
});

test('the manual clock wakes a sleeper when time reaches it, and on abort', async () => {
  const clock = new ManualClock(new Date('2026-03-10T00:00:00Z'));
  const abort = new AbortController();
  let woke = false;
  const sleeping = clock.sleepUntil(new Date('2026-03-10T01:00:00Z'), abort.signal).then(() => (woke = true));
  assert.equal(clock.sleeping, 1);
  clock.advance(30 * 60_000);
  await Promise.resolve();
  assert.equal(woke, false, 'not before its time');
  clock.advance(30 * 60_000);
  await sleeping;
  assert.equal(clock.sleeping, 0);
  const aborted = clock.sleepUntil(new Date('2026-03-11T00:00:00Z'), abort.signal);
  abort.abort();
  await aborted;
  assert.equal(clock.sleeping, 0);
});
