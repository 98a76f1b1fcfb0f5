// A network link between two sites for workload `link`: a TCP proxy on this machine that holds
// every chunk for the one-way delay (half the round-trip time) before passing it on, both ways;
// the bandwidth is the machine's. Native and pgdso cross the same link: a subscription connects
// from the peer's cluster to the source through it (its walsender's stream crosses it), pgdso
// runs beside the source and reaches the peer through it (its apply lanes' statements cross it).
import net from 'node:net';

export interface Link {
  host: string;
  port: number;
  rttMs: number;
  /** `url` (a postgres:// URL to the far end) through the link */
  through(url: string): string;
  close(): Promise<void>;
}

/** A link to `host:port` with a round-trip time of `rttMs` (timers of the same delay fire in order: chunks keep theirs). */
export async function startLink(host: string, port: number, rttMs: number): Promise<Link> {
  const oneWay = Math.round(rttMs / 2);
  const sockets = new Set<net.Socket>();
  const carry = (from: net.Socket, to: net.Socket) => {
    from.on('data', (chunk) => setTimeout(() => to.destroyed || to.write(chunk), oneWay));
    from.on('end', () => setTimeout(() => to.end(), oneWay));
    from.on('close', () => setTimeout(() => to.destroy(), oneWay));
    from.on('error', () => to.destroy());
  };
  const server = net.createServer((near) => {
    const far = net.connect(port, host);
    for (const socket of [near, far]) {
      socket.setNoDelay(true);
      sockets.add(socket);
      socket.on('close', () => sockets.delete(socket));
    }
    carry(near, far);
    carry(far, near);
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const { port: linkPort } = server.address() as net.AddressInfo;
  return {
    host: '127.0.0.1',
    port: linkPort,
    rttMs,
    through(url: string): string {
      const u = new URL(url);
      u.hostname = '127.0.0.1';
      u.port = String(linkPort);
      return u.toString();
    },
    close: () =>
      new Promise<void>((resolve) => {
        for (const socket of sockets) socket.destroy();
        server.close(() => resolve());
      }),
  };
}
