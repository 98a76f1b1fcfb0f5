// When escalations fire: a cron expression in an IANA time zone (croner, which handles daylight
// saving time: a 17:00 rule fires at 17:00 local on the days the clocks change too), or every N
// seconds at the multiples of N since the epoch (so every instance agrees on the fire times).
// The clock is injectable: tests and the demo move time instead of waiting for it.
import { Cron } from 'croner';
import type { EscalationSchedule } from '../config/types.ts';

export interface FireTimes {
  /** The latest fire time t with after < t <= now, or null (no fire is due). */
  lastDue(after: Date | null, now: Date): Date | null;
  /** The first fire time after `after`, or null when the schedule never fires again. */
  next(after: Date): Date | null;
}

export function fireTimes(schedule: EscalationSchedule): FireTimes {
  if ('everySeconds' in schedule) {
    const every = schedule.everySeconds * 1000;
    return {
      lastDue(after, now) {
        const at = Math.floor(now.getTime() / every) * every;
        return after === null || at > after.getTime() ? new Date(at) : null;
      },
      next: (after) => new Date((Math.floor(after.getTime() / every) + 1) * every),
    };
  }
  const cron = new Cron(schedule.cron, { paused: true, ...(schedule.timezone ? { timezone: schedule.timezone } : {}) });
  return {
    lastDue(after, now) {
      // previousRuns counts a run in the reference's own second: one past `now` is never returned
      const [at] = cron.previousRuns(1, new Date(now.getTime() + 1));
      if (!at || at.getTime() > now.getTime()) return null;
      return after === null || at.getTime() > after.getTime() ? at : null;
    },
    next: (after) => cron.nextRun(after),
  };
}

/** The time escalations run by, and the wait for it. */
export interface Clock {
  now(): Date;
  /** Resolves at `until` on this clock (or earlier, on abort). */
  sleepUntil(until: Date, signal: AbortSignal): Promise<void>;
}

export const systemClock: Clock = {
  now: () => new Date(),
  sleepUntil: (until, signal) =>
    new Promise<void>((resolve) => {
      const timer = setTimeout(done, Math.max(0, until.getTime() - Date.now()));
      function done() {
        clearTimeout(timer);
        signal.removeEventListener('abort', done);
        resolve();
      }
      signal.addEventListener('abort', done, { once: true });
    }),
};

/** A clock that moves only when told to (tests, the demo): sleepers wake when time reaches them. */
export class ManualClock implements Clock {
  private sleepers: { until: number; wake: () => void }[] = [];

  constructor(private at: Date) {}

  now(): Date {
    return new Date(this.at);
  }

  /** How many waits are pending: each runner sleeps once it is done with the time it was given. */
  get sleeping(): number {
    return this.sleepers.length;
  }

  /** Moves the clock to `to` and wakes every sleeper whose time has come. */
  set(to: Date): void {
    this.at = new Date(to);
    const due = this.sleepers.filter((s) => s.until <= to.getTime());
    this.sleepers = this.sleepers.filter((s) => s.until > to.getTime());
    for (const s of due) s.wake();
  }

  advance(ms: number): void {
    this.set(new Date(this.at.getTime() + ms));
  }

  sleepUntil(until: Date, signal: AbortSignal): Promise<void> {
    if (until.getTime() <= this.at.getTime() || signal.aborted) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const onAbort = () => {
        this.sleepers = this.sleepers.filter((s) => s !== sleeper);
        resolve();
      };
      const sleeper = {
        until: until.getTime(),
        wake: () => {
          signal.removeEventListener('abort', onAbort);
          resolve();
        },
      };
      this.sleepers.push(sleeper);
      signal.addEventListener('abort', onAbort, { once: true });
    });
  }
}
