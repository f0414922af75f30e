// memfd_create: anonymous shared memory with an fd, e.g. guest memory to pass to a peer; its seals
// (F_SEAL_SHRINK and F_SEAL_GROW make a size the peer can no longer change); and punching holes,
// which gives a sparse memfd's (or file's) pages back instead of storing zeros in them.
#include <fcntl.h>
#include <sys/mman.h>

#include <string>

#include "addon.h"
#include "errors.h"

namespace vfu {

// memfdCreate(name, flags?) -> fd; MFD_CLOEXEC is always added.
Napi::Value MemfdCreate(const Napi::CallbackInfo& info) {
  int flags;
  if (!info[0].IsString()) {
    ThrowArgError(info.Env(), 0, "a name (a string)");
    return {};
  }
  std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name.find('\0') != std::string::npos) {
    ThrowArgError(info.Env(), 0, "a name without NUL characters");
    return {};
  }
  if (!ArgFlags(info, 1, &flags)) return {};
  int fd = memfd_create(name.c_str(), static_cast<unsigned>(flags) | MFD_CLOEXEC);
  if (fd < 0) {
    ThrowErrno(info.Env(), errno, "memfd_create");
    return {};
  }
  return Napi::Number::New(info.Env(), fd);
}

// getSeals(fd) -> the F_SEAL_* bits of a memfd (F_GET_SEALS). EINVAL for a file that cannot carry
// seals; a memfd made without MFD_ALLOW_SEALING reports F_SEAL_SEAL.
Napi::Value GetSeals(const Napi::CallbackInfo& info) {
  int fd;
  if (!ArgFd(info, 0, &fd)) return {};
  int seals = fcntl(fd, F_GET_SEALS);
  if (seals < 0) {
    ThrowErrno(info.Env(), errno, "fcntl");
    return {};
  }
  return Napi::Number::New(info.Env(), seals);
}

// addSeals(fd, seals): F_ADD_SEALS. EPERM once F_SEAL_SEAL is set; EBUSY for F_SEAL_WRITE while a
// writable shared mapping exists.
Napi::Value AddSeals(const Napi::CallbackInfo& info) {
  int fd;
  int seals;
  if (!ArgFd(info, 0, &fd)) return {};
  if (!ArgFlags(info, 1, &seals)) return {};
  if (fcntl(fd, F_ADD_SEALS, seals) < 0) {
    ThrowErrno(info.Env(), errno, "fcntl");
    return {};
  }
  return info.Env().Undefined();
}

// punchHole(fd, offset, length): fallocate(PUNCH_HOLE | KEEP_SIZE). The range reads back as zeros
// and its memory (or disk blocks) is freed. Throws EOPNOTSUPP where the file system cannot.
Napi::Value PunchHole(const Napi::CallbackInfo& info) {
  constexpr int64_t kMaxSafe = (int64_t{1} << 53) - 1;
  int fd;
  int64_t offset;
  int64_t length;
  if (!ArgFd(info, 0, &fd)) return {};
  if (!ArgInteger(info, 1, 0, kMaxSafe, "an offset (an integer >= 0)", &offset)) return {};
  if (!ArgInteger(info, 2, 1, kMaxSafe, "a length (an integer >= 1)", &length)) return {};
  if (fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) < 0) {
    ThrowErrno(info.Env(), errno, "fallocate");
    return {};
  }
  return info.Env().Undefined();
}

}  // namespace vfu
