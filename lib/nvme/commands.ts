/**
 * Command dword fields of the NVM command set (NVM Command Set Specification 1.0, section 3): what
 * a host encodes and a controller decodes in CDW10..CDW15 of Read, Write, Compare, Write Zeroes
 * and Dataset Management.
 *
 * @packageDocumentation
 */

/** CDW12 of Read, Write, Compare and Write Zeroes. */
export const Rw = {
  /** Number of Logical Blocks, 0's based (bits 15:0). */
  NLB_MASK: 0xffff,
  /** Deallocate (Write Zeroes, bit 25). */
  DEAC: 1 << 25,
  /** Force Unit Access (bit 30). */
  FUA: 1 << 30,
  /** Limited Retry (bit 31). */
  LR: 1 << 31,
} as const;

/** Dataset Management: CDW11 Attribute - Deallocate (bit 2); 16-byte ranges, at most 256 (CDW10 NR, 0's based). */
export const Dsm = {
  AD: 1 << 2,
  RANGE_BYTES: 16,
  MAX_RANGES: 256,
} as const;
