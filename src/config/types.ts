// The resolved, validated configuration. Produced once by loadConfig(); frozen; nothing else
// reads process.env or the raw files.

export type TransferMode = 'data-only' | 'data+ownership' | 'independent-copy';
export type WhenToUpdate = 'never' | 'immediately' | 'on-return';
export type DuplicateRequestId = 'error' | 'new-id' | 'overwrite';
export type ConflictPolicy = 'source-wins' | 'newer-wins' | 'target-wins';
export type Op = 'insert' | 'update' | 'delete';

/** Connection settings for one server, resolved (env substituted). Never log it as is. */
export interface ConnectionSettings {
  host: string;
  port: number;
  database: string;
  user: string;
  password?: string;
  /** Any other libpq-style parameters given in a URL query string or object (sslmode, ...). */
  options?: Record<string, string>;
}

export interface ServerConfig {
  name: string;
  connection: ConnectionSettings;
}

/** A form reference: table name, schema defaulting to "public". */
export interface FormRef {
  server: string;
  schema: string;
  table: string;
}

export interface FieldsConfig {
  byName: boolean;
  exclude: readonly string[];
  /** target column -> source column */
  map: Readonly<Record<string, string>>;
  /** target column -> constant (JSON value; strings, numbers, booleans, null) */
  set: Readonly<Record<string, unknown>>;
}

export interface MappingConfig {
  name: string;
  from: FormRef;
  to: FormRef;
  transferMode: TransferMode;
  whenToUpdate: WhenToUpdate;
  duplicateRequestId: DuplicateRequestId;
  /** 'request-id' or match by the listed target fields */
  match: 'request-id' | { fields: readonly string[] };
  fields: FieldsConfig;
  afterTransfer: 'keep' | 'delete';
  conflict: ConflictPolicy;
  pool: string;
  /** where the mapping was defined, for error messages */
  source: { file: string; pointer: string };
}

export type ActionConfig =
  | { type: 'transfer'; mapping: string; overrideLoopDetection: boolean }
  | { type: 'update'; mapping: string }
  | { type: 'return'; mapping?: string; overrideLoopDetection: boolean }
  | { type: 'delete'; mapping: string };

/** json-rules-engine TopLevelCondition, kept as the author wrote it. */
export type Conditions = Record<string, unknown>;

export interface FilterConfig {
  name: string;
  on: { server: string; schema: string; table: string; ops: readonly Op[]; transitions: boolean };
  conditions: Conditions | null;
  actions: readonly ActionConfig[];
  source: { file: string; pointer: string };
}

/** When an escalation fires: a cron expression in a time zone (default the engine's), or every N seconds. */
export type EscalationSchedule = { cron: string; timezone?: string } | { everySeconds: number };

export interface EscalationConfig {
  name: string;
  on: { server: string; schema: string; table: string };
  schedule: EscalationSchedule;
  conditions: Conditions | null;
  actions: readonly ActionConfig[];
  source: { file: string; pointer: string };
}

export interface GroupConfig {
  checkIntervalSeconds: number;
  delinquentThreshold: number;
}

/** When queued operations for a peer are tried again. */
export type RetrySchedule = { kind: 'dso' } | { kind: 'backoff'; firstMs: number; maxMs: number };

export interface PendingConfig {
  retry: RetrySchedule;
  /** a heartbeat message in a quiet source's WAL this often (0: none) */
  heartbeatMs: number;
  retainedWalWarnBytes: number;
}

export interface PgdsoConfig {
  /** absolute path of the config file */
  file: string;
  servers: Readonly<Record<string, ServerConfig>>;
  /** absolute paths of the rule files that were read */
  ruleFiles: readonly string[];
  mappings: Readonly<Record<string, MappingConfig>>;
  filters: readonly FilterConfig[];
  escalations: readonly EscalationConfig[];
  group: GroupConfig;
  pending: PendingConfig;
  http: { port: number | null };
}

/** One problem found while loading config or rules. */
export interface ConfigProblem {
  file: string;
  /** JSON pointer inside the file ('' for the whole file) */
  pointer: string;
  message: string;
}

export class ConfigError extends Error {
  readonly problems: readonly ConfigProblem[];
  constructor(problems: readonly ConfigProblem[]) {
    super(problems.map((p) => `${p.file}${p.pointer ? `#${p.pointer}` : ''}: ${p.message}`).join('\n'));
    this.name = 'ConfigError';
    this.problems = problems;
  }
}
