// A request's mapping history (dso_mapping_history, one hop per transfer or return, oldest
// first): the hops the engine adds, and what loop detection reads from it.
import type { TextRow } from '../change.ts';
import type { MappingConfig } from '../config/types.ts';
import type { FormInfo } from '../sql/form-catalog.ts';
import type { OpenTransaction } from '../engine/types.ts';

/** The request's mapping history (jsonb text) with one more hop (JSON text). */
export function withHop(historyText: string, hop: string): string {
  return historyText === '[]' ? `[${hop}]` : `${historyText.slice(0, -1)}, ${hop}]`;
}

/** The request ID of the copy a mapping's target holds: the one the source copy recorded, else the same. */
export function targetKeyOf(row: TextRow, mapping: MappingConfig, requestId: string): string {
  return row.dso_to_mapping === mapping.name && row.dso_to_request_id ? row.dso_to_request_id : requestId;
}

/** True when the history holds a return to that server. */
export function returnedBefore(historyText: string, server: string): boolean {
  if (historyText === '[]') return false;
  try {
    const hops = JSON.parse(historyText) as { operation?: unknown; toServer?: unknown }[];
    return Array.isArray(hops) && hops.some((h) => h?.operation === 'return' && h.toServer === server);
  } catch {
    return false;
  }
}

/** Servers a request has been on, from its mapping history (JSON text); null if malformed. */
export function visitedServers(historyText: string): Set<string> | null {
  const visited = new Set<string>();
  if (historyText === '[]') return visited;
  let hops: unknown;
  try {
    hops = JSON.parse(historyText);
  } catch {
    return null;
  }
  if (!Array.isArray(hops)) return null;
  for (const hop of hops as { fromServer?: unknown; toServer?: unknown; fromRequestId?: unknown }[]) {
    if (!hop || typeof hop.fromServer !== 'string' || typeof hop.fromRequestId !== 'string') return null;
    visited.add(hop.fromServer);
    if (typeof hop.toServer === 'string') visited.add(hop.toServer);
  }
  return visited;
}

/** The hops of transfers, as JSON around the request ID, kept for the transaction being decoded. */
export class HopTemplates {
  private readonly hops = new Map<string, { finalLsn: bigint; template: [string, string] }>();

  constructor(private readonly server: string) {}

  /** The hop's JSON around its request ID, the same for every request of a mapping in a transaction. */
  template(mapping: MappingConfig, form: FormInfo, tx: OpenTransaction): [string, string] {
    const cached = this.hops.get(mapping.name);
    if (cached && cached.finalLsn === tx.finalLsn) return cached.template;
    const marker = '\u0000request\u0000';
    const json = JSON.stringify({
      at: tx.commitTime.toISOString(),
      mapping: mapping.name,
      transferMode: mapping.transferMode,
      fromServer: this.server,
      fromForm: form.table,
      fromRequestId: marker,
      toServer: mapping.to.server,
      toForm: mapping.to.table,
    });
    const at = json.indexOf(JSON.stringify(marker));
    const template: [string, string] = [json.slice(0, at), json.slice(at + JSON.stringify(marker).length)];
    this.hops.set(mapping.name, { finalLsn: tx.finalLsn, template });
    return template;
  }
}
