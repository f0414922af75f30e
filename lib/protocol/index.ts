/**
 * vfio-user protocol layer: constants, errors, the header, and one pure encode/decode pair per
 * message. No I/O, no state. See `shared/vfio-user-protocol.md` for the reference.
 *
 * @packageDocumentation
 */
export * from './constants';
export * from './errors';
export * from './codec';
export * from './header';
export * from './json';
export * from './capabilities';
export * from './registry';
export * from './messages/version';
export * from './messages/dma';
export * from './messages/device';
export * from './messages/region';
export * from './messages/irq';
export * from './messages/access';
export * from './messages/reset';
export * from './messages/dirty';
export * from './messages/feature';
export * from './messages/migration';
