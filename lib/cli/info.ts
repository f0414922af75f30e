/**
 * `vfio-user info SOCKET [--json]`: an `lspci -vv` for any vfio-user server.
 */
import { VfioUserClient } from '../client/client';
import { PciFunction } from '../client/pci';
import { DeviceFlags, IrqInfoFlags, RegionInfoFlags } from '../protocol/constants';
import { CapId, Cfg, ExtCapId, Rom } from '../pci/ids';
import type { CliCommand } from './command';
import { connectErrorMessage } from './messages';

const USAGE = `Usage: vfio-user info SOCKET [options]

Connect to the vfio-user server on SOCKET and describe its device: negotiated version and
capabilities, device flags, regions (flags, sizes, mmap-able areas), IRQ indexes, and the decoded
PCI config space (IDs, class, BARs sized by probing with their addresses, capabilities). The
device is only read, except for the standard BAR sizing probe, which restores every BAR: BARs
are shown as the server has them, 'unassigned' until a driver (or firmware) gives them an address.

Options:
  --json              one JSON document on stdout
  --timeout MS        reply timeout per request (default 5000)
  -h, --help          show this help`;

const REGION_NAMES = ['BAR0', 'BAR1', 'BAR2', 'BAR3', 'BAR4', 'BAR5', 'ROM', 'CONFIG', 'VGA'];
const IRQ_NAMES = ['INTx', 'MSI', 'MSI-X', 'ERR', 'REQ'];

function flagNames(value: number, table: Record<string, number>): string[] {
  return Object.entries(table)
    .filter(([, bit]) => (value & bit) !== 0)
    .map(([name]) => name);
}

function capName(id: number, table: Record<string, number>): string {
  return Object.entries(table).find(([, v]) => v === id)?.[0] ?? `0x${id.toString(16)}`;
}

const hex = (v: number | bigint, width = 0) => `0x${v.toString(16).padStart(width, '0')}`;

export interface DeviceReport {
  socket: string;
  version: { major: number; minor: number };
  capabilities: Record<string, unknown>;
  device: { flags: string[]; numRegions: number; numIrqs: number };
  regions: { index: number; name: string; size: number; flags: string[]; fileOffset: string; areas: { offset: number; size: number }[] }[];
  irqs: { index: number; name: string; count: number; flags: string[] }[];
  pci: {
    vendorId: string;
    deviceId: string;
    subsystemVendorId: string;
    subsystemId: string;
    classCode: string;
    revision: number;
    command: string;
    status: string;
    interruptPin: number;
    bars: { index: number; kind: string; is64: boolean; prefetchable: boolean; size: string; address: string; assigned: boolean }[];
    romSize: number;
    /** The ROM BAR's address (0x0: unassigned) and enable bit. */
    rom: { size: string; address: string; assigned: boolean; enabled: boolean } | null;
    capabilities: { offset: string; id: string; name: string }[];
    extendedCapabilities: { offset: string; id: string; name: string; version: number }[];
    msix: { tableSize: number; table: string; pba: string; enabled: boolean; functionMasked: boolean } | null;
  } | null;
}

/** Gather everything `info` shows. */
export async function describeDevice(socket: string, timeoutMs: number): Promise<DeviceReport> {
  const client = await VfioUserClient.connect(socket, { timeoutMs });
  try {
    const n = client.negotiated;
    const caps = client.serverCapabilities;
    const report: DeviceReport = {
      socket,
      version: { major: n.major, minor: n.minor },
      capabilities: {
        max_msg_fds: caps.maxMsgFds,
        max_data_xfer_size: caps.maxDataXferSize,
        max_dma_maps: caps.maxDmaMaps,
        pgsizes: Number(caps.pgsizes),
        write_multiple: caps.writeMultiple,
        twin_socket: client.twinSocket,
        ...(caps.migration ? { migration: { pgsize: caps.migration.pgsize } } : {}),
      },
      device: {
        flags: flagNames(client.device.flags, { RESET: DeviceFlags.RESET, PCI: DeviceFlags.PCI }),
        numRegions: client.device.numRegions,
        numIrqs: client.device.numIrqs,
      },
      regions: client.regions.map((r) => ({
        index: r.index,
        name: REGION_NAMES[r.index] ?? `region${r.index}`,
        size: r.size,
        flags: flagNames(r.flags, RegionInfoFlags),
        fileOffset: hex(r.fileOffset),
        areas: r.mmapFlag ? r.areas.map((a) => ({ offset: a.offset, size: a.size })) : [],
      })),
      irqs: [],
      pci: null,
    };
    for (let i = 0; i < client.device.numIrqs; i++) {
      const irq = await client.queryIrqInfo(i);
      report.irqs.push({ index: i, name: IRQ_NAMES[i] ?? `irq${i}`, count: irq.count, flags: flagNames(irq.flags, IrqInfoFlags) });
    }
    if ((client.device.flags & DeviceFlags.PCI) !== 0) {
      const pci = await PciFunction.open(client);
      const h = pci.header;
      const bars = await pci.probeBars();
      const romSize = await pci.probeRom();
      const romBar = await pci.readConfig(Cfg.ROM_ADDRESS, 4);
      const romAddress = (romBar & Rom.ADDRESS_MASK) >>> 0;
      const msix = pci.msix;
      report.pci = {
        vendorId: hex(h.vendorId, 4),
        deviceId: hex(h.deviceId, 4),
        subsystemVendorId: hex(h.subsystemVendorId, 4),
        subsystemId: hex(h.subsystemId, 4),
        classCode: hex(h.classCode, 6),
        revision: h.revisionId,
        command: hex(h.command, 4),
        status: hex(h.status, 4),
        interruptPin: h.interruptPin,
        bars: bars
          .filter((b) => b.size > 0n)
          .map((b) => ({ index: b.index, kind: b.kind, is64: b.is64, prefetchable: b.prefetchable, size: hex(b.size), address: hex(b.address), assigned: b.address !== 0n })),
        romSize,
        rom: romSize === 0 ? null : { size: hex(romSize), address: hex(romAddress), assigned: romAddress !== 0, enabled: (romBar & Rom.ENABLE) !== 0 },
        capabilities: pci.capabilities.map((c) => ({ offset: hex(c.offset, 2), id: hex(c.id, 2), name: capName(c.id, CapId) })),
        extendedCapabilities: pci.extendedCapabilities.map((c) => ({ offset: hex(c.offset, 3), id: hex(c.id, 4), name: capName(c.id, ExtCapId), version: c.version })),
        msix: msix && {
          tableSize: msix.tableSize,
          table: `BAR${msix.tableBar}+${hex(msix.tableOffset)}`,
          pba: `BAR${msix.pbaBar}+${hex(msix.pbaOffset)}`,
          enabled: msix.enabled,
          functionMasked: msix.functionMasked,
        },
      };
    }
    return report;
  } finally {
    client.close();
  }
}

function formatReport(r: DeviceReport): string {
  const lines: string[] = [];
  lines.push(`vfio-user ${r.version.major}.${r.version.minor} server at ${r.socket}`);
  lines.push(`  capabilities: ${Object.entries(r.capabilities).map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : String(v)}`).join(' ')}`);
  lines.push(`  device: ${r.device.flags.join('|') || '-'}, ${r.device.numRegions} regions, ${r.device.numIrqs} IRQ indexes`);
  if (r.pci) {
    const p = r.pci;
    lines.push(`PCI ${p.vendorId}:${p.deviceId} (subsystem ${p.subsystemVendorId}:${p.subsystemId}) class ${p.classCode} rev ${p.revision}`);
    lines.push(`  command ${p.command} status ${p.status} interrupt pin ${p.interruptPin ? 'INT' + 'ABCD'[p.interruptPin - 1] : 'none'}`);
    const at = (b: { address: string; assigned: boolean }) => (b.assigned ? `at ${b.address}` : 'unassigned');
    for (const b of p.bars) lines.push(`  BAR${b.index}: ${b.kind}${b.is64 ? ' 64-bit' : ''}${b.prefetchable ? ' prefetchable' : ''} size ${b.size} ${at(b)}`);
    if (p.rom) lines.push(`  ROM: size ${p.rom.size} ${at(p.rom)}${p.rom.enabled ? ', enabled' : ''}`);
    for (const c of p.capabilities) lines.push(`  capability [${c.offset}] ${c.name}`);
    for (const c of p.extendedCapabilities) lines.push(`  extended capability [${c.offset}] ${c.name} v${c.version}`);
    if (p.msix) lines.push(`  MSI-X: ${p.msix.tableSize} vectors, table ${p.msix.table}, PBA ${p.msix.pba}${p.msix.enabled ? ', enabled' : ''}${p.msix.functionMasked ? ', masked' : ''}`);
  }
  lines.push('Regions:');
  for (const g of r.regions) {
    if (g.size === 0) continue;
    const areas = g.areas.length ? ` mmap ${g.areas.map((a) => `[${hex(a.offset)}+${hex(a.size)}]`).join(' ')}` : '';
    lines.push(`  ${String(g.index).padStart(2)} ${g.name.padEnd(6)} size ${hex(g.size)} ${g.flags.join('|')}${areas}`);
  }
  lines.push('IRQs:');
  for (const i of r.irqs) lines.push(`  ${i.index} ${i.name.padEnd(5)} count ${i.count}${i.flags.length ? ' ' + i.flags.join('|') : ''}`);
  return lines.join('\n');
}

export const infoCommand: CliCommand = {
  name: 'info',
  summary: 'describe the device behind a vfio-user socket (like lspci -vv)',
  usage: USAGE,
  options: { json: { type: 'boolean' }, timeout: { type: 'string' } },
  async run(positionals, values) {
    if (positionals.length !== 1) {
      const why = positionals.length === 0 ? 'SOCKET is required' : `unexpected argument '${positionals[1]!}' (info takes one SOCKET)`;
      console.error(`vfio-user info: ${why}\n\n${USAGE}`);
      return 2;
    }
    const timeoutMs = values.timeout === undefined ? 5000 : Number(values.timeout);
    if (!Number.isInteger(timeoutMs) || timeoutMs <= 0) {
      console.error(`vfio-user info: --timeout must be a positive integer, got '${String(values.timeout)}'`);
      return 2;
    }
    let report: DeviceReport;
    try {
      report = await describeDevice(positionals[0]!, timeoutMs);
    } catch (err) {
      console.error(`vfio-user info: ${positionals[0]!}: ${connectErrorMessage(err, positionals[0]!)}`);
      return 1;
    }
    console.log(values.json ? JSON.stringify(report, null, 2) : formatReport(report));
    return 0;
  },
};
