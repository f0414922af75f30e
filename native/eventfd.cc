// eventfd: create, signal (add 1) and drain (read and reset) the 8-byte counter.
//
// Signal and drain must never block the event loop, even on an eventfd that a peer created
// without EFD_NONBLOCK (O_NONBLOCK belongs to the peer's open file description, so we cannot set
// it). Each first asks poll() with a zero timeout whether the call would block.
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cstdint>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

// 1: ready, 0: would block, -1: error (errno set). POLLERR/POLLNVAL count as ready so that the
// following read or write reports the real error.
int Ready(int fd, short events) {
  pollfd p{fd, events, 0};
  int n;
  do {
    n = poll(&p, 1, 0);
  } while (n < 0 && errno == EINTR);
  if (n < 0) return -1;
  if (n > 0 && (p.revents & POLLNVAL)) {
    errno = EBADF;
    return -1;
  }
  return n > 0 ? 1 : 0;
}

}  // namespace

// eventfd(initval, flags?) -> fd; EFD_CLOEXEC is always added.
Napi::Value Eventfd(const Napi::CallbackInfo& info) {
  int64_t initval;
  int flags;
  if (!ArgInteger(info, 0, 0, UINT32_MAX, "an initial value (an integer >= 0)", &initval)) {
    return {};
  }
  if (!ArgFlags(info, 1, &flags)) return {};
  int fd = eventfd(static_cast<unsigned>(initval), flags | EFD_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(info.Env(), errno, "eventfd");
    return {};
  }
  return Napi::Number::New(info.Env(), fd);
}

// eventfdSignal(fd) -> true, or false if the counter is full (the write would block)
Napi::Value EventfdSignal(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return {};
  int ready = Ready(fd, POLLOUT);
  if (ready < 0) {
    ThrowErrno(env, errno, "write");
    return {};
  }
  if (ready == 0) return Napi::Boolean::New(env, false);
  const uint64_t one = 1;
  ssize_t n;
  do {
    n = write(fd, &one, sizeof(one));
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Napi::Boolean::New(env, false);
  if (n != static_cast<ssize_t>(sizeof(one))) {
    ThrowErrno(env, n < 0 ? errno : EIO, "write");
    return {};
  }
  return Napi::Boolean::New(env, true);
}

// eventfdDrain(fd) -> the counter (as a Number), or 0 if it was zero
Napi::Value EventfdDrain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return {};
  int ready = Ready(fd, POLLIN);
  if (ready < 0) {
    ThrowErrno(env, errno, "read");
    return {};
  }
  if (ready == 0) return Napi::Number::New(env, 0);
  uint64_t count = 0;
  ssize_t n;
  do {
    n = read(fd, &count, sizeof(count));
  } while (n < 0 && errno == EINTR);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return Napi::Number::New(env, 0);
  if (n != static_cast<ssize_t>(sizeof(count))) {
    ThrowErrno(env, n < 0 ? errno : EIO, "read");
    return {};
  }
  return Napi::Number::New(env, static_cast<double>(count));
}

}  // namespace vfu
