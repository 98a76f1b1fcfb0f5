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
