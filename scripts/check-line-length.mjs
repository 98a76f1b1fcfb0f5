// Fails (exit 1) with file:line for every line over MAX_LENGTH characters in the git-tracked
// .ts and .mjs files. Run by `npm run lint`, after biome (whose formatter
// keeps code within the same width but cannot break strings, template literals or comments).
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';

const MAX_LENGTH = 140;

const files = execFileSync('git', ['ls-files', '-z', '--', '*.ts', '*.mjs'], { encoding: 'utf8' })
  .split('\0')
  .filter((file) => file !== '');

const problems = [];
for (const file of files) {
  let text;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    if (err.code === 'ENOENT') continue; // tracked but deleted in the work tree
    throw err;
  }
  text.split('\n').forEach((line, index) => {
    const length = [...line.replace(/\r$/, '')].length;
    if (length > MAX_LENGTH) problems.push(`${file}:${index + 1}: ${length} characters (at most ${MAX_LENGTH})`);
  });
}

if (problems.length > 0) {
  process.stderr.write(`${problems.join('\n')}\n${problems.length} line(s) over ${MAX_LENGTH} characters\n`);
  process.exit(1);
}
