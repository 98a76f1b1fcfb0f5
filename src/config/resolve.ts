// The frozen PgdsoConfig built from a config and rule documents without any problem (the schema
// guarantees the shapes), with the contract's defaults applied.

import { isObject, type Json, type JsonObject } from './json.ts';
import { parseForm, rawItems, type RuleDocument } from './rule-files.ts';
import type {
  ActionConfig,
  ConnectionSettings,
  EscalationConfig,
  FilterConfig,
  FormRef,
  MappingConfig,
  Op,
  PgdsoConfig,
  ServerConfig,
} from './types.ts';

const DEFAULT_GROUP = { checkIntervalSeconds: 2, delinquentThreshold: 3 } as const;
const DEFAULT_FILTER_OPS: readonly Op[] = ['insert', 'update'];

export function resolveConfig(
  file: string,
  config: JsonObject,
  connections: ReadonlyMap<string, ConnectionSettings>,
  ruleFiles: readonly string[],
  documents: readonly RuleDocument[],
): PgdsoConfig {
  const servers: Record<string, ServerConfig> = {};
  for (const [name, connection] of connections) servers[name] = { name, connection };

  const mappings: Record<string, MappingConfig> = {};
  for (const { file: source, pointer, item } of rawItems(documents, 'mappings')) {
    const mapping = resolveMapping(item, { file: source, pointer });
    mappings[mapping.name] = mapping;
  }
  const filters: FilterConfig[] = rawItems(documents, 'filters').map(({ file: source, pointer, item }) => {
    const on = item.on as JsonObject;
    const form = parseForm(on.form as string)!;
    return {
      name: item.name as string,
      on: {
        server: on.server as string,
        ...form,
        ops: (on.ops as Op[] | undefined) ?? [...DEFAULT_FILTER_OPS],
        transitions: on.transitions === true,
      },
      conditions: (item.conditions as Record<string, unknown> | null | undefined) ?? null,
      actions: (item.actions as JsonObject[]).map(resolveAction),
      source: { file: source, pointer },
    };
  });
  const escalations: EscalationConfig[] = rawItems(documents, 'escalations').map(({ file: source, pointer, item }) => {
    const on = item.on as JsonObject;
    const schedule = item.schedule as JsonObject;
    return {
      name: item.name as string,
      on: { server: on.server as string, ...parseForm(on.form as string)! },
      schedule:
        typeof schedule.everySeconds === 'number'
          ? { everySeconds: schedule.everySeconds }
          : { cron: schedule.cron as string, ...(typeof schedule.timezone === 'string' ? { timezone: schedule.timezone } : {}) },
      conditions: (item.conditions as Record<string, unknown> | null | undefined) ?? null,
      actions: (item.actions as JsonObject[]).map(resolveAction),
      source: { file: source, pointer },
    };
  });

  const group = (config.group as JsonObject | undefined) ?? {};
  const http = config.http as JsonObject | undefined;
  const pending = (config.pending as JsonObject | undefined) ?? {};
  const retry = pending.retry as Json | undefined;
  return {
    file,
    servers,
    ruleFiles: [...ruleFiles],
    mappings,
    filters,
    escalations,
    group: {
      checkIntervalSeconds: (group.checkIntervalSeconds as number | undefined) ?? DEFAULT_GROUP.checkIntervalSeconds,
      delinquentThreshold: (group.delinquentThreshold as number | undefined) ?? DEFAULT_GROUP.delinquentThreshold,
    },
    pending: {
      retry:
        retry === 'dso'
          ? { kind: 'dso' }
          : {
              kind: 'backoff',
              firstMs: (((retry as JsonObject | undefined)?.firstSeconds as number | undefined) ?? 1) * 1000,
              maxMs: (((retry as JsonObject | undefined)?.maxSeconds as number | undefined) ?? 60) * 1000,
            },
      heartbeatMs: ((pending.heartbeatSeconds as number | undefined) ?? 10) * 1000,
      retainedWalWarnBytes: (pending.retainedWalWarnBytes as number | undefined) ?? 1024 ** 3,
    },
    http: { port: (http?.port as number | undefined) ?? null },
  };
}

function resolveFormRef(value: Json | undefined): FormRef {
  const ref = value as JsonObject;
  return { server: ref.server as string, ...parseForm(ref.form as string)! };
}

function resolveMapping(item: JsonObject, source: { file: string; pointer: string }): MappingConfig {
  const fields = (item.fields as JsonObject | undefined) ?? {};
  const match = item.match as Json | undefined;
  return {
    name: item.name as string,
    from: resolveFormRef(item.from),
    to: resolveFormRef(item.to),
    transferMode: (item.transferMode as MappingConfig['transferMode'] | undefined) ?? 'data+ownership',
    whenToUpdate: (item.whenToUpdate as MappingConfig['whenToUpdate'] | undefined) ?? 'immediately',
    duplicateRequestId: (item.duplicateRequestId as MappingConfig['duplicateRequestId'] | undefined) ?? 'error',
    match: isObject(match) ? { fields: [...(match.fields as string[])] } : 'request-id',
    fields: {
      byName: (fields.byName as boolean | undefined) ?? true,
      exclude: [...((fields.exclude as string[] | undefined) ?? [])],
      map: { ...((fields.map as Record<string, string> | undefined) ?? {}) },
      set: { ...((fields.set as Record<string, unknown> | undefined) ?? {}) },
    },
    afterTransfer: (item.afterTransfer as MappingConfig['afterTransfer'] | undefined) ?? 'keep',
    conflict: (item.conflict as MappingConfig['conflict'] | undefined) ?? 'source-wins',
    pool: (item.pool as string | undefined) ?? 'default',
    source,
  };
}

function resolveAction(action: JsonObject): ActionConfig {
  const overrideLoopDetection = action.overrideLoopDetection === true;
  switch (action.type) {
    case 'transfer':
      return { type: 'transfer', mapping: action.mapping as string, overrideLoopDetection };
    case 'return':
      return typeof action.mapping === 'string'
        ? { type: 'return', mapping: action.mapping, overrideLoopDetection }
        : { type: 'return', overrideLoopDetection };
    case 'update':
      return { type: 'update', mapping: action.mapping as string };
    default:
      return { type: 'delete', mapping: action.mapping as string };
  }
}

/** Freezes a value and everything it holds. */
export function deepFreeze<T>(value: T): T {
  if (typeof value === 'object' && value !== null && !Object.isFrozen(value)) {
    Object.freeze(value);
    for (const key of Object.keys(value)) deepFreeze((value as Record<string, unknown>)[key]);
  }
  return value;
}
