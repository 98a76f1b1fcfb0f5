// The options pgdso's long-running commands want from node, given where node starts: by the
// shebang of bin/pgdso (keep the two in step), and by whatever else starts the engine (the tests,
// the benchmark, a service unit that runs node itself).
//
// --max-semi-space-size=8: a young generation of 8 MB semi-spaces instead of 16. The rows of a
// large transaction live until their group is written, so each young collection copies what is
// live whatever its size; the smaller one holds less garbage between collections. Measured on the
// bulk load (`npm run bench`, 200k rows): peak RSS 242-251 MB -> 216-223 MB, time unchanged.
// (V8 reads it only at start: v8.setFlagsFromString at run time has no effect on it.)
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=8'];
