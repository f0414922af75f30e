// fd passing between two processes: memory and eventfds shared across the process boundary.
import { spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { describe, expect, it } from 'vitest';

import { binding, PACKAGE_ROOT } from '../../lib/native/binding';
import { EventFd } from '../../lib/native/eventfd';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { isCloexec, useFdLeakCheck } from '../helpers/fds';

useFdLeakCheck();

const { PAGE_SIZE } = binding.constants;
const script = path.join(__dirname, 'fixtures', 'peer.cjs');

/** Resolves with the next message (bytes and owned fds) on non-blocking socket `fd`. */
function receive(fd: number): Promise<{ text: string; fds: Fd[] }> {
  return new Promise((resolve, reject) => {
    const buf = Buffer.alloc(4096);
    const out = new Int32Array(8);
    const poller = new binding.Poller(fd, (status) => {
      try {
        const n = status < 0 ? 0 : binding.recvmsg(fd, buf, 0, buf.length, out);
        if (n === -1) return;
        poller.close();
        if (n === 0) throw new Error('peer closed the socket');
        const fds = Array.from(out.subarray(1, 1 + out[0]!), (raw) => new Fd(raw));
        resolve({ text: buf.subarray(0, n).toString(), fds });
      } catch (err) {
        poller.close();
        reject(err);
      }
    });
    poller.start(binding.pollEvents.READABLE);
  });
}

describe('between processes', () => {
  it('a memfd and an eventfd sent to a child: shared bytes both ways, an IRQ back, a memfd returned', async () => {
    const [ours, theirs] = binding.socketpair().map((fd) => new Fd(fd));
    const child = spawn(process.execPath, [script, PACKAGE_ROOT], {
      stdio: ['ignore', 'inherit', 'pipe', theirs!.value],
    });
    theirs!.close(); // the child has its own copy as fd 3
    let stderr = '';
    child.stderr!.on('data', (chunk) => (stderr += chunk));
    const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));

    const guest = createMemfd('guest', 4 * PAGE_SIZE);
    const mapping = Mapping.map(guest, 0, 4 * PAGE_SIZE);
    mapping.bytes.write('hello, peer', PAGE_SIZE + 7);
    const irq = EventFd.create();
    const signalled = new Promise<number>((resolve) => irq.watch(resolve));

    try {
      const request = JSON.stringify({ offset: PAGE_SIZE + 7, length: 11, replyAt: 3 * PAGE_SIZE + 1 });
      expect(binding.sendmsg(ours!.value, [Buffer.from(request)], [guest.value, irq.fd.value])).toBe(request.length);
      // Ours to close at once: the child holds its own references now.
      guest.close();

      const reply = await receive(ours!.value);
      expect(JSON.parse(reply.text)).toEqual({ seen: 'hello, peer', pid: child.pid });
      expect(await signalled).toBe(1);
      const expected = `written by ${child.pid}`;
      expect(mapping.bytes.toString('utf8', 3 * PAGE_SIZE + 1, 3 * PAGE_SIZE + 1 + expected.length)).toBe(expected);

      expect(reply.fds).toHaveLength(1);
      const theirMemfd = reply.fds[0]!;
      expect(isCloexec(theirMemfd.value)).toBe(true);
      const size = fs.fstatSync(theirMemfd.value).size;
      const theirMapping = Mapping.map(theirMemfd, 0, size, binding.constants.PROT_READ);
      expect(theirMapping.bytes.toString()).toBe(`memfd of ${child.pid}`);
      theirMapping.unmapNow();
      theirMemfd.close();
    } finally {
      irq.close();
      await mapping.unmap();
      ours!.close(); // EOF tells the child to exit
    }
    expect(await exited).toBe(0);
    expect(stderr).toBe('');
  });
});
