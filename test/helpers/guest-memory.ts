/**
 * Guest memory for device rigs: a memfd mapped here and DMA-mapped whole at iova 0 into a
 * DmaSpace, as a client's DMA_MAP would, with a bump allocator (page 0 stays unused) and a way to
 * unmap and map it again as SeaBIOS-era clients do.
 */
import * as fs from 'node:fs';
import { Fd } from '../../lib/native/fd';
import { Mapping } from '../../lib/native/mapping';
import { createMemfd } from '../../lib/native/memfd';
import { DmaMapFlags } from '../../lib/protocol/constants';
import type { DmaSpace } from '../../lib/server/dma';

const PAGE = 4096;

export class GuestMemory {
  /** The memory, as the test (the "driver") sees it. */
  readonly bytes: Buffer;
  private readonly mapping: Mapping;
  /** A second fd of the memfd (reopened through /proc), to map it again. */
  private readonly fd: Fd;
  private next = PAGE;

  constructor(
    private readonly dma: DmaSpace,
    name: string,
    readonly size: number,
  ) {
    const fd = createMemfd(name, size);
    this.mapping = Mapping.map(fd, 0, size);
    this.bytes = this.mapping.bytes;
    this.fd = new Fd(fs.openSync(`/proc/self/fd/${fd.value}`, 'r+'));
    this.mapInto(fd);
  }

  /** Aligned memory (zeroed). */
  alloc(bytes: number, align = PAGE): number {
    const at = Math.ceil(this.next / align) * align;
    if (at + bytes > this.size) throw new Error('rig: out of guest memory');
    this.next = at + bytes;
    this.bytes.fill(0, at, at + bytes);
    return at;
  }

  /**
   * DMA_UNMAP all of it, then DMA_MAP it again: a new mapping of the same memory, or of `source`'s
   * memory (a migration destination sharing the source's guest RAM).
   */
  async remap(source: GuestMemory = this): Promise<void> {
    await this.dma.removeAll();
    this.mapInto(new Fd(fs.openSync(`/proc/self/fd/${source.fd.value}`, 'r+')));
  }

  /** After the DmaSpace let go of it. */
  close(): void {
    this.mapping.unmapNow();
    this.fd.close();
  }

  private mapInto(fd: Fd): void {
    const errno = this.dma.add({ iova: 0n, size: BigInt(this.size), offset: 0n, flags: DmaMapFlags.READ | DmaMapFlags.WRITE }, fd);
    if (errno !== 0) throw new Error(`DMA map of guest memory failed: ${errno}`);
  }
}
