/** The addon's typed face: the only module that touches the native code. */
export {
  binding,
  WOULD_BLOCK,
  PACKAGE_ROOT,
  type NativeBinding,
  type NativeConstants,
  type Poller,
  type PollerConstructor,
  type PollEvents,
} from './binding';
export { Fd } from './fd';
export { Mapping, type MappingState } from './mapping';
export { EventFd, type EventFdListener, type EventFdOptions } from './eventfd';
export { createMemfd, isSealedAgainstShrinking, sealSize, SIZE_SEALS, type MemfdOptions } from './memfd';
export { IoUring, uringConstants, URING_MAX_IOVECS } from './uring';
