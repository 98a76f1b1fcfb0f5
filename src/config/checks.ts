// The checks that need more than one value or more than one rule file: unique names, known
// servers and mappings, mappings used from their own form, fields, cron and time zones.

import { Cron } from 'croner';
import { escapePointerToken, isObject, type Json } from './json.ts';
import { closestName, type ProblemList } from './problems.ts';
import { rawFormRef, rawItems, type RawItem, type RuleDocument, type RuleKind } from './rule-files.ts';

const RULE_KIND_WORD: Readonly<Record<RuleKind, string>> = { mappings: 'mapping', filters: 'filter', escalations: 'escalation' };

/** The checks that need more than one value or more than one file. */
export function checkAcrossFiles(documents: readonly RuleDocument[], serverNames: readonly string[], problems: ProblemList): void {
  const mappings = rawItems(documents, 'mappings');
  const filters = rawItems(documents, 'filters');
  const escalations = rawItems(documents, 'escalations');
  const known = new Set(serverNames);
  const serverList = serverNames.length > 0 ? serverNames.map((s) => `"${s}"`).join(', ') : 'none';

  const checkServer = (file: string, pointer: string, server: Json | undefined): void => {
    if (typeof server !== 'string' || known.has(server) || problems.hasAt(file, pointer)) return;
    const suggestion = closestName(server, serverNames);
    problems.add(
      file,
      pointer,
      `unknown server "${server}"${suggestion ? ` (did you mean "${suggestion}"?)` : ''}; the config defines ${serverList}`,
    );
  };

  // unique names, per kind, across all files
  for (const items of [mappings, filters, escalations]) {
    const firstByName = new Map<string, RawItem>();
    for (const entry of items) {
      const name = entry.item.name;
      if (typeof name !== 'string') continue;
      const first = firstByName.get(name);
      if (first) {
        const where = first.file === entry.file ? `${first.pointer}/name` : `${first.file}#${first.pointer}/name`;
        problems.add(
          entry.file,
          `${entry.pointer}/name`,
          `duplicate ${RULE_KIND_WORD[entry.kind]} name "${name}": already defined at ${where}`,
        );
      } else {
        firstByName.set(name, entry);
      }
    }
  }

  const mappingsByName = new Map<string, RawItem>();
  for (const entry of mappings) {
    const { file, pointer, item } = entry;
    if (typeof item.name === 'string' && !mappingsByName.has(item.name)) mappingsByName.set(item.name, entry);
    for (const end of ['from', 'to'] as const) {
      const ref = item[end];
      if (isObject(ref)) checkServer(file, `${pointer}/${end}/server`, ref.server);
    }
    const from = rawFormRef(item.from);
    const to = rawFormRef(item.to);
    if (from && to && from.label === to.label) {
      problems.add(file, `${pointer}/to`, `a mapping cannot carry requests to the form it reads from (${from.label})`);
    }
    checkFields(file, pointer, item.fields, problems);
  }

  const checkActions = (entry: RawItem): void => {
    const { file, pointer, item } = entry;
    const kindWord = RULE_KIND_WORD[entry.kind];
    const on = rawFormRef(item.on);
    if (!Array.isArray(item.actions)) return;
    item.actions.forEach((action, i) => {
      if (!isObject(action) || typeof action.mapping !== 'string') return;
      const actionPointer = `${pointer}/actions/${i}/mapping`;
      if (problems.hasAt(file, actionPointer)) return;
      const mapping = mappingsByName.get(action.mapping);
      if (!mapping) {
        const suggestion = closestName(action.mapping, [...mappingsByName.keys()]);
        problems.add(file, actionPointer, `unknown mapping "${action.mapping}"${suggestion ? ` (did you mean "${suggestion}"?)` : ''}`);
        return;
      }
      if (action.type === 'return') {
        const to = rawFormRef(mapping.item.to);
        if (on && to && to.label !== on.label) {
          problems.add(
            file,
            actionPointer,
            `mapping "${action.mapping}" carries requests to ${to.label}, but ${kindWord} "${String(item.name)}" is on ${on.label}: ` +
              `a return action names the mapping that brought the request to the ${kindWord}'s server and form`,
          );
        }
        return;
      }
      const from = rawFormRef(mapping.item.from);
      if (on && from && from.label !== on.label) {
        problems.add(
          file,
          actionPointer,
          `mapping "${action.mapping}" reads from ${from.label}, but ${kindWord} "${String(item.name)}" is on ${on.label}: ` +
            `${action.type === 'update' ? 'an' : 'a'} ${String(action.type)} action needs a mapping ` +
            `whose "from" is the ${kindWord}'s server and form`,
        );
      }
    });
  };

  for (const entry of [...filters, ...escalations]) {
    if (isObject(entry.item.on)) checkServer(entry.file, `${entry.pointer}/on/server`, entry.item.on.server);
    checkActions(entry);
  }
  for (const entry of escalations) checkSchedule(entry, problems);
}

/** fields.map and fields.set name each target column once, never an excluded or a distributed column. */
function checkFields(file: string, pointer: string, fields: Json | undefined, problems: ProblemList): void {
  if (!isObject(fields)) return;
  const exclude = new Set(Array.isArray(fields.exclude) ? fields.exclude.filter((c): c is string => typeof c === 'string') : []);
  const mapTargets = isObject(fields.map) ? Object.keys(fields.map) : [];
  const setTargets = isObject(fields.set) ? Object.keys(fields.set) : [];
  const mapped = new Set(mapTargets);
  for (const [section, targets] of [
    ['map', mapTargets],
    ['set', setTargets],
  ] as const) {
    for (const column of targets) {
      const columnPointer = `${pointer}/fields/${section}/${escapePointerToken(column)}`;
      if (section === 'set' && mapped.has(column)) {
        problems.add(file, columnPointer, `target column "${column}" is given twice, in "fields.map" and in "fields.set"`);
      }
      if (exclude.has(column)) {
        problems.add(file, columnPointer, `column "${column}" is both in "fields.exclude" and a target of "fields.${section}"`);
      }
      if (column.startsWith('dso_')) {
        problems.add(file, columnPointer, `column "${column}" is a distributed column that pgdso maintains itself`);
      }
    }
  }
}

/** The cron expression parses and fires some day; the time zone is known. */
function checkSchedule(entry: RawItem, problems: ProblemList): void {
  const schedule = entry.item.schedule;
  if (!isObject(schedule)) return;
  const { file, pointer } = entry;
  const hasCron = schedule.cron !== undefined;
  if (hasCron === (schedule.everySeconds !== undefined)) {
    problems.add(file, `${pointer}/schedule`, 'a schedule names either "cron" (with an optional "timezone") or "everySeconds", not both');
    return;
  }
  if (!hasCron) {
    if (schedule.timezone !== undefined)
      problems.add(file, `${pointer}/schedule/timezone`, '"timezone" goes with "cron"; "everySeconds" counts seconds in UTC');
    return;
  }
  let timezone: string | undefined;
  if (typeof schedule.timezone === 'string' && !problems.hasAt(file, `${pointer}/schedule/timezone`)) {
    if (isKnownTimeZone(schedule.timezone)) timezone = schedule.timezone;
    else
      problems.add(
        file,
        `${pointer}/schedule/timezone`,
        `unknown time zone "${schedule.timezone}" (use an IANA name such as "America/Los_Angeles" or "UTC")`,
      );
  }
  if (typeof schedule.cron !== 'string' || problems.hasAt(file, `${pointer}/schedule/cron`)) return;
  try {
    const job = new Cron(schedule.cron, { paused: true, ...(timezone ? { timezone } : {}) });
    const next = job.nextRun();
    job.stop();
    if (next === null) problems.add(file, `${pointer}/schedule/cron`, `the cron expression "${schedule.cron}" never fires`);
  } catch (err) {
    const reason = (err instanceof Error ? err.message : String(err)).replace(/^CronPattern: /, '');
    problems.add(file, `${pointer}/schedule/cron`, `invalid cron expression "${schedule.cron}": ${reason}`);
  }
}

function isKnownTimeZone(timeZone: string): boolean {
  try {
    new Intl.DateTimeFormat('en-US', { timeZone });
    return true;
  } catch {
    return false;
  }
}
