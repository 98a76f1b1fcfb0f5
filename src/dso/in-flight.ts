// Transfers sent in this session along a mapping that keeps its chain in step, per request of
// a source form, until the source copy's bookkeeping (coming back through the WAL) shows them.
// Keyed form by form (no key built per row); bounded: past `limit` requests, the oldest of the
// form goes first.

export interface SentTransfer {
  mapping: string;
  targetKey: string;
  /** with ownership: where the master is from now on */
  master: readonly [string, string] | null;
}

interface FormRef {
  schema: string;
  table: string;
}

export class InFlight {
  private readonly forms = new Map<string, Map<string, Map<string, SentTransfer>>>();
  private count = 0;

  constructor(private readonly limit: number) {}

  get size(): number {
    return this.count;
  }

  get(form: FormRef, requestId: string): SentTransfer | undefined {
    return this.forms.get(form.schema)?.get(form.table)?.get(requestId);
  }

  set(form: FormRef, requestId: string, sent: SentTransfer): void {
    let tables = this.forms.get(form.schema);
    if (!tables) this.forms.set(form.schema, (tables = new Map()));
    let requests = tables.get(form.table);
    if (!requests) tables.set(form.table, (requests = new Map()));
    if (!requests.has(requestId)) {
      if (this.count >= this.limit && requests.size > 0) {
        requests.delete(requests.keys().next().value!);
        this.count -= 1;
      }
      this.count += 1;
    }
    requests.set(requestId, sent);
  }

  delete(form: FormRef, requestId: string): void {
    const requests = this.forms.get(form.schema)?.get(form.table);
    if (requests?.delete(requestId)) this.count -= 1;
  }
}
