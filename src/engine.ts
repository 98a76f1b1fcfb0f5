// The composition root of one server's engine: decoder -> rules -> applier lanes.
//
// Per source transaction: each change meets only the filters indexed for its (server, form, op);
// each fired action becomes operations in apply lanes (one per target server and pool, each with
// its own replication origin). At a transaction boundary, when enough work is buffered or the
// stream is idle, the engine flushes: target lanes apply and commit (recording the source
// position), rows that could not be applied are recorded in the source's pending_errors, the
// source copies get their bookkeeping, and only then is the commit-end LSN confirmed.
// Any other failure ends the session: everything unconfirmed is replayed by a new one, and what
// a lane had committed is skipped by its progress (pgdso.apply_progress). Nothing is lost or
// applied twice.
//
// Where each part lives:
// - src/engine/server-engine.ts  the restart loop (ServerEngine), a stop on an error a DBA must fix
// - src/engine/session.ts        one session: the control connection and the lanes, the stream, the ChangeSink
// - src/engine/control.ts        the control connection: the `dso` lock, and the fence once it is lost
// - src/engine/timers.ts         heartbeats, the slot check, the delivery wake-up
// - src/engine/topology.ts       forms, links, catalogs and column plans (read again after a table changed)
// - src/engine/peers.ts          the neighbours: their lanes, their reachability and backoff
// - src/engine/router.ts         where an operation goes: skipped, a lane, or the queue
// - src/engine/batch.ts          the open batch and its flush (targets commit, then the source's bookkeeping)
// - src/engine/source-tail.ts    the batches' source transactions, pipelined, each confirmed after its own
// - src/engine/checkpoint.ts     the only code that confirms WAL positions
// - src/dso/                     DSO's operations (actions), the chain kept in step, the mapping history,
//                                changes that cannot be carried whole (refusals)
// - src/queue/                   pgdso.pending's SQL, and the delivery of queued operations
export { emptyEngineStats, ServerEngine, stopOnRefusal } from './engine/server-engine.ts';
export { keptInStep } from './engine/topology.ts';
export type { EngineOptions, EngineStats } from './engine/types.ts';
