// A short-lived connection for one piece of work, closed whatever happens.
import pg from 'pg';

export async function withClient<T>(config: pg.ClientConfig | string, use: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client(typeof config === 'string' ? { connectionString: config } : config);
  client.on('error', () => undefined); // reported through the failing query instead
  await client.connect();
  try {
    return await use(client);
  } finally {
    await client.end().catch(() => undefined);
  }
}

/**
 * Ends a client's connection: at once when statements are still under way (pg's end() waits for
 * pipelined ones, and one may wait on a lock for ever), else gracefully, and cut all the same
 * if the goodbye has not completed within `ms` (a half-open socket). The server rolls back
 * whatever was left open.
 */
export async function endClient(client: pg.Client, now = false, ms = 5000): Promise<void> {
  const cut = () => (client as unknown as { connection: { stream: { destroy(): void } } }).connection.stream.destroy();
  if (now) cut();
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      cut();
      resolve();
    }, ms);
  });
  try {
    await Promise.race([client.end().catch(() => undefined), late]);
  } finally {
    clearTimeout(timer);
  }
}
