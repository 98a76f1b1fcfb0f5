// Transfers sent in this session along a mapping that keeps its chain in step, per request of
// a source form, until the source copy's bookkeeping (coming back through the WAL) shows them.
// Keyed form by form (no key built per row); bounded: past `limit` requests, the oldest of the
// form go first, a sixteenth of the limit at a time.

export interface SentTransfer {
  mapping: string;
  targetKey: string;
  /** with ownership: where the master is from now on */
  master: readonly [string, string] | null;
}

/** a full set forgets 1/EVICTED_PART of its limit at once (see evict) */
const EVICTED_PART = 16;

interface FormRef {
  schema: string;
  table: string;
}

/**
 * A transfer whose target copy has the request's own ID (the common case): one record per
 * mapping and master, shared by all such requests, not an object per request (200,000 of them
 * in a large transaction, each kept until its bookkeeping comes back, so every full collection
 * marks them).
 */
interface SameKey {
  readonly sameKey: true;
  readonly mapping: string;
  readonly master: readonly [string, string] | null;
}

type Kept = SentTransfer | SameKey;

export class InFlight {
  private readonly forms = new Map<string, Map<string, Map<string, Kept>>>();
  private readonly shared = new Map<string, SameKey>();
  private count = 0;

  constructor(private readonly limit: number) {}

  get size(): number {
    return this.count;
  }

  get(form: FormRef, requestId: string): SentTransfer | undefined {
    const kept = this.requestsOf(form)?.get(requestId);
    if (!kept || !('sameKey' in kept)) return kept;
    return { mapping: kept.mapping, targetKey: requestId, master: kept.master };
  }

  /** The mapping of the transfer in flight for that request, if any (no record built). */
  mappingOf(form: FormRef, requestId: string): string | undefined {
    return this.requestsOf(form)?.get(requestId)?.mapping;
  }

  private requestsOf(form: FormRef): Map<string, Kept> | undefined {
    return this.forms.get(form.schema)?.get(form.table);
  }

  set(form: FormRef, requestId: string, sent: SentTransfer): void {
    let tables = this.forms.get(form.schema);
    if (!tables) this.forms.set(form.schema, (tables = new Map()));
    let requests = tables.get(form.table);
    if (!requests) tables.set(form.table, (requests = new Map()));
    if (!requests.has(requestId)) {
      if (this.count >= this.limit && requests.size > 0) this.evict(requests);
      this.count += 1;
    }
    requests.set(requestId, sent.targetKey === requestId ? this.sharedFor(sent) : sent);
  }

  private sharedFor(sent: SentTransfer): SameKey {
    const key = sent.master ? `${sent.mapping}\u0000${sent.master[0]}\u0000${sent.master[1]}` : sent.mapping;
    let shared = this.shared.get(key);
    if (!shared) this.shared.set(key, (shared = { sameKey: true, mapping: sent.mapping, master: sent.master }));
    return shared;
  }

  /**
   * Forgets the form's oldest sixteenth of the limit in one pass. One at a time would cost a walk
   * over every entry deleted before it (a Map keeps them until it is rebuilt): quadratic once a
   * large backlog keeps the set full.
   */
  private evict(requests: Map<string, Kept>): void {
    let n = Math.min(requests.size, Math.max(1, Math.ceil(this.limit / EVICTED_PART)));
    for (const key of requests.keys()) {
      if (n-- <= 0) break;
      requests.delete(key);
      this.count -= 1;
    }
  }

  delete(form: FormRef, requestId: string): void {
    if (this.requestsOf(form)?.delete(requestId)) this.count -= 1;
  }
}
