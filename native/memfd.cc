// memfd_create: anonymous shared memory with an fd, e.g. guest memory to pass to a peer.
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

}  // namespace vfu
