/**
 * A minimal virtio device for transport tests: it copies each chain's device-readable bytes into
 * its device-writable buffers (as many as fit) and reports them as written. `hold` keeps chains
 * in flight until `release()`, to test resets and completion order.
 */
import { VirtioPciDevice, type VirtioPciOptions } from '../../lib/virtio/pci';
import { VirtqElement, type SplitVirtqueue } from '../../lib/virtio/virtqueue';

/** What the device saw of a chain. */
export interface SeenChain {
  queue: number;
  head: number;
  bufs: { addr: number; len: number; write: boolean }[];
}

export const ECHO_DEVICE_TYPE = 0x3f;
/** Device feature bit 0 (offered), for negotiation tests. */
export const ECHO_F_TEST = 0;

export class EchoDevice extends VirtioPciDevice<VirtqElement> {
  readonly configBytes = Buffer.from([1, 2, 3, 4, 5, 6, 7, 8]);
  readonly seen: SeenChain[] = [];
  hold = false;
  readonly held: VirtqElement[] = [];
  resets = 0;
  private readonly scratch = Buffer.alloc(1 << 20);

  constructor(options: Partial<VirtioPciOptions> = {}) {
    super({ deviceType: ECHO_DEVICE_TYPE, classCode: 0xff0000, features: 1n << BigInt(ECHO_F_TEST), queues: 2, queueSize: 16, configSize: 8, ...options });
  }

  protected createElement(queue: SplitVirtqueue<VirtqElement>): VirtqElement {
    return new VirtqElement(queue as unknown as SplitVirtqueue);
  }

  protected handle(e: VirtqElement): void {
    const bufs = [];
    for (let i = 0; i < e.count; i++) bufs.push({ addr: e.addr[i]!, len: e.len[i]!, write: i >= e.readableCount });
    this.seen.push({ queue: e.queue.index, head: e.head, bufs });
    if (this.hold) {
      this.held.push(e);
      return;
    }
    this.echo(e);
  }

  echo(e: VirtqElement): void {
    const n = Math.min(e.readable, e.writable, this.scratch.length);
    const mem = e.queue.mem;
    e.written = e.readInto(mem, 0, this.scratch.subarray(0, n)) && e.writeFrom(mem, 0, this.scratch.subarray(0, n)) ? n : 0;
    this.complete(e);
  }

  /** Completes every held chain (echoing it). */
  release(): void {
    for (const e of this.held.splice(0)) this.echo(e);
  }

  protected readDeviceConfig(offset: number, dst: Buffer): void {
    this.configBytes.copy(dst, 0, offset, offset + dst.length);
  }

  protected override writeDeviceConfig(offset: number, src: Buffer): void {
    src.copy(this.configBytes, offset);
  }

  protected override onVirtioReset(): void {
    this.resets++;
  }

  /** Test access to the device-initiated configuration change. */
  changeConfig(): void {
    this.configBytes[0] = (this.configBytes[0]! + 1) & 0xff;
    this.configChanged();
  }
}
