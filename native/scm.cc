// sendmsg/recvmsg on a stream socket, with fds passed as SCM_RIGHTS.
//
// Both are one non-blocking system call. "Would block" returns -1; every other failure throws.
// recvmsg closes every fd it received on each of its error paths, so the caller owns exactly the
// fds it was told about and no others.
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

constexpr int kScmMaxFd = 253;    // Linux SCM_MAX_FD
constexpr uint32_t kMaxIov = 64;  // room to coalesce several queued messages into one call

// Room for the largest SCM_RIGHTS message, aligned for cmsghdr.
union ControlBuffer {
  cmsghdr align;
  char bytes[CMSG_SPACE(sizeof(int) * kScmMaxFd)];
};

// Data pointer and length of a Uint8Array, or false if `value` is not one. Runs no JS.
bool Uint8View(napi_env env, napi_value value, uint8_t** data, size_t* length) {
  bool is_typed_array = false;
  if (napi_is_typedarray(env, value, &is_typed_array) != napi_ok || !is_typed_array) return false;
  napi_typedarray_type type;
  void* ptr = nullptr;
  if (napi_get_typedarray_info(env, value, &type, length, &ptr, nullptr, nullptr) != napi_ok ||
      type != napi_uint8_array) {
    return false;
  }
  *data = static_cast<uint8_t*>(ptr);
  return true;
}

// Reads the optional fd list (argument 2) into `fds`. Array elements are read first, before any
// buffer pointer is taken, because reading them may run JS (getters).
bool ArgFdList(const Napi::CallbackInfo& info, int* fds, size_t* count) {
  constexpr const char* kWhat = "an array of file descriptors, null or undefined";
  Napi::Value value = info[2];
  *count = 0;
  if (value.IsUndefined() || value.IsNull()) return true;
  if (!value.IsArray() && !value.IsTypedArray()) {
    ThrowArgError(info.Env(), 2, kWhat);
    return false;
  }
  Napi::Object list = value.As<Napi::Object>();
  Napi::Value length_value = list.Get("length");
  if (info.Env().IsExceptionPending()) return false;
  double length = length_value.IsNumber() ? length_value.As<Napi::Number>().DoubleValue() : -1;
  if (!(length >= 0 && std::trunc(length) == length)) {
    ThrowArgError(info.Env(), 2, kWhat);
    return false;
  }
  if (length > kScmMaxFd) {
    ThrowArgError(info.Env(), 2, "an array of at most 253 (SCM_MAX_FD) file descriptors", true);
    return false;
  }
  for (uint32_t i = 0; i < static_cast<uint32_t>(length); i++) {
    Napi::Value item = list.Get(i);
    if (info.Env().IsExceptionPending()) return false;
    double d = item.IsNumber() ? item.As<Napi::Number>().DoubleValue() : -1;
    if (!(d >= 0 && d <= INT32_MAX && std::trunc(d) == d)) {
      ThrowArgError(info.Env(), 2, kWhat);
      return false;
    }
    fds[i] = static_cast<int>(d);
  }
  *count = static_cast<size_t>(length);
  return true;
}

void CloseAll(const int* fds, size_t count) {
  for (size_t i = 0; i < count; i++) close(fds[i]);
}

}  // namespace

// One non-blocking recvmsg of up to `length` bytes into `buf`, collecting SCM_RIGHTS fds into
// fds_out[1..] (count in fds_out[0], at most `room`). Returns the bytes received (0 at end of
// stream), or -errno (-EAGAIN: would block). On every error and at end of stream, any fds that
// came are closed, so the caller owns exactly the fds reported.
ssize_t ReceiveWithFds(int fd, uint8_t* buf, size_t length, int32_t* fds_out, size_t room) {
  fds_out[0] = 0;
  room = std::min<size_t>(room, kScmMaxFd);
  iovec iov{buf, length};
  ControlBuffer control;
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (room > 0) {
    // CMSG_LEN, not CMSG_SPACE: the kernel fits (controllen - header) / sizeof(int) fds, and
    // CMSG_SPACE's padding could make room for one more than fds_out holds.
    msg.msg_control = control.bytes;
    msg.msg_controllen = CMSG_LEN(sizeof(int) * room);
  }
  ssize_t received;
  do {
    received = recvmsg(fd, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
  } while (received < 0 && errno == EINTR);
  if (received < 0) return errno == EWOULDBLOCK ? -EAGAIN : -errno;

  // Collect the fds of every SCM_RIGHTS message. From here on every exit closes them or reports
  // them in fds_out.
  int fds[kScmMaxFd];
  size_t count = 0;
  int error = 0;
  if (msg.msg_flags & MSG_CTRUNC) error = EMSGSIZE;
  if (msg.msg_controllen > 0) {
    for (cmsghdr* cmsg = CMSG_FIRSTHDR(&msg); cmsg != nullptr; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
      if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS) continue;
      size_t payload = cmsg->cmsg_len >= CMSG_LEN(0) ? cmsg->cmsg_len - CMSG_LEN(0) : 0;
      if (payload % sizeof(int) != 0 && error == 0) error = EPROTO;
      const unsigned char* data = CMSG_DATA(cmsg);
      for (size_t i = 0; i < payload / sizeof(int); i++) {
        int received_fd;
        memcpy(&received_fd, data + i * sizeof(int), sizeof(int));
        if (count < room) {
          fds[count++] = received_fd;
        } else {
          close(received_fd);
          if (error == 0) error = EMSGSIZE;
        }
      }
    }
  }
  if (error != 0 || received == 0) {
    // End of stream carries no fds on Linux; if some came anyway nobody can own them.
    CloseAll(fds, count);
    return error != 0 ? -error : 0;
  }
  fds_out[0] = static_cast<int32_t>(count);
  memcpy(fds_out + 1, fds, count * sizeof(int));
  return received;
}

// sendmsg(fd, iov: Uint8Array[], fds?) -> bytes sent, or -1 (would block)
Napi::Value Sendmsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int fds[kScmMaxFd];
  size_t fd_count;
  if (!ArgFd(info, 0, &fd)) return {};
  if (!info[1].IsArray()) {
    ThrowArgError(env, 1, "an array of Uint8Array");
    return {};
  }
  Napi::Array list = info[1].As<Napi::Array>();
  uint32_t iov_count = list.Length();
  if (iov_count > kMaxIov) {
    ThrowArgError(env, 1, "an array of at most 64 Uint8Array", true);
    return {};
  }
  if (!ArgFdList(info, fds, &fd_count)) return {};

  // First every element (may run JS), then every pointer (runs none), so no pointer goes stale.
  napi_value views[kMaxIov];
  for (uint32_t i = 0; i < iov_count; i++) {
    Napi::Value item = list.Get(i);
    if (env.IsExceptionPending()) return {};
    views[i] = item;
  }
  iovec iov[kMaxIov];
  size_t total = 0;
  for (uint32_t i = 0; i < iov_count; i++) {
    uint8_t* data;
    size_t length;
    if (!Uint8View(env, views[i], &data, &length)) {
      ThrowArgError(env, 1, "an array of Uint8Array");
      return {};
    }
    iov[i].iov_base = data;
    iov[i].iov_len = length;
    total += length;
  }
  if (total == 0) {
    ThrowArgError(env, 1, "an array of Uint8Array holding at least one byte", true);
    return {};
  }

  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = iov_count;
  ControlBuffer control;
  if (fd_count > 0) {
    size_t payload = sizeof(int) * fd_count;
    memset(control.bytes, 0, CMSG_SPACE(payload));
    msg.msg_control = control.bytes;
    msg.msg_controllen = CMSG_SPACE(payload);
    cmsghdr* cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(payload);
    memcpy(CMSG_DATA(cmsg), fds, payload);
  }

  for (;;) {
    ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent >= 0) return Napi::Number::New(env, static_cast<double>(sent));
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
    ThrowErrno(env, errno, "sendmsg");
    return {};
  }
}

// recvmsg(fd, buf, offset, length, fdsOut: Int32Array) -> bytes, 0 (EOF) or -1 (would block)
Napi::Value Recvmsg(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  int64_t offset;
  int64_t length;
  uint8_t* buf;
  size_t buf_length;
  if (!ArgFd(info, 0, &fd)) return {};
  if (!Uint8View(env, info[1], &buf, &buf_length)) {
    ThrowArgError(env, 1, "a Uint8Array");
    return {};
  }
  constexpr int64_t kMaxSafeInteger = (int64_t{1} << 53) - 1;
  if (!ArgInteger(info, 2, 0, kMaxSafeInteger, "an offset (an integer >= 0)", &offset)) return {};
  if (!ArgInteger(info, 3, 1, INT32_MAX, "a length (an integer >= 1)", &length)) return {};
  if (static_cast<uint64_t>(offset) + static_cast<uint64_t>(length) > buf_length) {
    ThrowArgError(env, 3, "a length that fits the buffer after offset", true);
    return {};
  }
  bool is_typed_array = false;
  napi_typedarray_type type;
  size_t out_length = 0;
  void* out_data = nullptr;
  if (napi_is_typedarray(env, info[4], &is_typed_array) != napi_ok || !is_typed_array ||
      napi_get_typedarray_info(env, info[4], &type, &out_length, &out_data, nullptr, nullptr) !=
          napi_ok ||
      type != napi_int32_array || out_length < 1) {
    ThrowArgError(env, 4, "an Int32Array of length >= 1");
    return {};
  }
  int32_t* fds_out = static_cast<int32_t*>(out_data);
  fds_out[0] = 0;
  size_t room = std::min<size_t>(out_length - 1, kScmMaxFd);

  ssize_t received = ReceiveWithFds(fd, buf + offset, static_cast<size_t>(length), fds_out, room);
  if (received == -EAGAIN) return Napi::Number::New(env, -1);
  if (received < 0) {
    ThrowErrno(env, static_cast<int>(-received), "recvmsg");
    return {};
  }
  return Napi::Number::New(env, static_cast<double>(received));
}

}  // namespace vfu
