/**
 * The NVM Express specification as data: opcodes and statuses, controller registers, command
 * dword fields and data structure layouts. The controller model (lib/devices/nvme) and the host
 * driver (lib/drivers/nvme) both speak it; neither imports the other.
 *
 * @packageDocumentation
 */
export * from './constants';
export * from './registers';
export * from './commands';
export * from './structs';
