// UNIX stream sockets: listen, accept, connect, socketpair. Every fd is NONBLOCK|CLOEXEC.
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <string>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

constexpr int kSockType = SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC;

// Reads a filesystem socket path into `addr`. A path that does not fit sun_path (107 bytes plus
// the NUL) throws ENAMETOOLONG with `syscall` naming the call it was meant for.
bool ArgSocketPath(const Napi::CallbackInfo& info, const char* syscall, sockaddr_un* addr) {
  if (!info[0].IsString()) {
    ThrowArgError(info.Env(), 0, "a socket path (a string)");
    return false;
  }
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (path.empty() || path.find('\0') != std::string::npos) {
    ThrowArgError(info.Env(), 0, "a non-empty socket path without NUL characters");
    return false;
  }
  *addr = sockaddr_un{};
  addr->sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr->sun_path)) {
    ThrowErrno(info.Env(), ENAMETOOLONG, syscall);
    return false;
  }
  memcpy(addr->sun_path, path.data(), path.size());
  return true;
}

// Closes `fd` without disturbing the errno that is about to be reported.
void CloseKeepErrno(int fd) {
  int saved = errno;
  close(fd);
  errno = saved;
}

}  // namespace

// unixListen(path, backlog, mode?). With `mode`, the socket file is created with that mode less the
// umask, atomically: Linux gives the new inode the socket's own mode (masked by the umask), so
// fchmod before bind leaves no moment in which the file exists with a wider mode.
Napi::Value UnixListen(const Napi::CallbackInfo& info) {
  sockaddr_un addr;
  int64_t backlog;
  int64_t mode = -1;
  if (!ArgSocketPath(info, "bind", &addr)) return {};
  if (!ArgInteger(info, 1, 0, INT32_MAX, "a backlog (an integer >= 0)", &backlog)) return {};
  if (info.Length() > 2 && !info[2].IsUndefined() &&
      !ArgInteger(info, 2, 0, 0777, "a file mode (an integer from 0 to 0o777)", &mode)) {
    return {};
  }

  int fd = socket(AF_UNIX, kSockType, 0);
  if (fd < 0) {
    ThrowErrno(info.Env(), errno, "socket");
    return {};
  }
  if (mode >= 0 && fchmod(fd, static_cast<mode_t>(mode)) < 0) {
    CloseKeepErrno(fd);
    ThrowErrno(info.Env(), errno, "fchmod");
    return {};
  }
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    CloseKeepErrno(fd);
    ThrowErrno(info.Env(), errno, "bind");
    return {};
  }
  if (listen(fd, static_cast<int>(backlog)) < 0) {
    CloseKeepErrno(fd);
    ThrowErrno(info.Env(), errno, "listen");
    return {};
  }
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value UnixAccept(const Napi::CallbackInfo& info) {
  int listen_fd;
  if (!ArgFd(info, 0, &listen_fd)) return {};
  for (;;) {
    int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) return Napi::Number::New(info.Env(), fd);
    // A connection that was reset while queued is not an error of the listener: take the next.
    if (errno == EINTR || errno == ECONNABORTED) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(info.Env(), -1);
    ThrowErrno(info.Env(), errno, "accept4");
    return {};
  }
}

Napi::Value UnixConnect(const Napi::CallbackInfo& info) {
  sockaddr_un addr;
  if (!ArgSocketPath(info, "connect", &addr)) return {};
  int fd = socket(AF_UNIX, kSockType, 0);
  if (fd < 0) {
    ThrowErrno(info.Env(), errno, "socket");
    return {};
  }
  // A non-blocking AF_UNIX connect completes at once or fails (EAGAIN when the backlog is full);
  // it never returns EINPROGRESS.
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    CloseKeepErrno(fd);
    ThrowErrno(info.Env(), errno, "connect");
    return {};
  }
  return Napi::Number::New(info.Env(), fd);
}

Napi::Value Socketpair(const Napi::CallbackInfo& info) {
  int fds[2];
  if (socketpair(AF_UNIX, kSockType, 0, fds) < 0) {
    ThrowErrno(info.Env(), errno, "socketpair");
    return {};
  }
  Napi::Array pair = Napi::Array::New(info.Env(), 2);
  pair.Set(0u, Napi::Number::New(info.Env(), fds[0]));
  pair.Set(1u, Napi::Number::New(info.Env(), fds[1]));
  return pair;
}

}  // namespace vfu
