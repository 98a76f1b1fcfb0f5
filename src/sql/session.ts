// Session settings every pgdso connection that reads or writes form values uses, so that the
// text of a value means the same on every server whatever the databases' own settings
// (datestyle DMY, sql_standard intervals, rounded floats would otherwise change values).
import type pg from 'pg';

const CANONICAL_TEXT = '-c datestyle=ISO,MDY -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex';
/** Apply connections also commit durably: a source position is confirmed once COMMIT returns. */
const DURABLE = '-c synchronous_commit=on';

function withOptions(config: pg.ClientConfig, extra: string): pg.ClientConfig {
  const options = (config as { options?: string }).options;
  return { ...config, options: options ? `${options} ${extra}` : extra } as pg.ClientConfig;
}

export function withCanonicalText(config: pg.ClientConfig): pg.ClientConfig {
  return withOptions(config, CANONICAL_TEXT);
}

/** For connections that apply changes: canonical text and durable commits. */
export function forApplying(config: pg.ClientConfig): pg.ClientConfig {
  return withOptions(config, `${CANONICAL_TEXT} ${DURABLE}`);
}
