// When a peer that could not be reached is tried again: capped exponential backoff, or DSO's
// schedule (every 5 minutes for the first 30 minutes, every 30 minutes for 24 hours, then
// hourly). Every wait is jittered, so engines that lost the same peer do not return together.
import type { RetrySchedule } from '../config/types.ts';

const MINUTE = 60_000;

/** The wait before the next attempt, after `attempts` failed ones over `downForMs`. */
export function retryDelay(schedule: RetrySchedule, attempts: number, downForMs: number, random: () => number = Math.random): number {
  if (schedule.kind === 'dso') {
    const base = downForMs < 30 * MINUTE ? 5 * MINUTE : downForMs < 24 * 60 * MINUTE ? 30 * MINUTE : 60 * MINUTE;
    return base * (0.9 + 0.2 * random());
  }
  const base = Math.min(schedule.maxMs, schedule.firstMs * 2 ** Math.max(0, Math.min(attempts - 1, 40)));
  return base / 2 + (random() * base) / 2;
}
