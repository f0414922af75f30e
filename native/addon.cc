// Module init: one table of functions, one table of constants, per-environment instance data.
// Node-API modules are context-aware, so this loads in worker_threads and in several at once.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>

#include "addon.h"

namespace vfu {
namespace {

// Linux's SCM_MAX_FD (include/net/scm.h): the most fds one sendmsg may carry. Not in libc headers.
constexpr int kScmMaxFd = 253;

#define VFU_FUNCTIONS(V)          \
  V("unixListen", UnixListen)     \
  V("unixAccept", UnixAccept)     \
  V("unixConnect", UnixConnect)   \
  V("socketpair", Socketpair)     \
  V("sendmsg", Sendmsg)           \
  V("recvmsg", Recvmsg)           \
  V("mmap", Mmap)                 \
  V("munmap", Munmap)             \
  V("memfdCreate", MemfdCreate)   \
  V("eventfd", Eventfd)           \
  V("eventfdSignal", EventfdSignal) \
  V("eventfdDrain", EventfdDrain)

#define VFU_CONSTANTS(V)                      \
  V("PAGE_SIZE", sysconf(_SC_PAGESIZE))       \
  V("PROT_READ", PROT_READ)                   \
  V("PROT_WRITE", PROT_WRITE)                 \
  V("EFD_NONBLOCK", EFD_NONBLOCK)             \
  V("EFD_SEMAPHORE", EFD_SEMAPHORE)           \
  V("MFD_ALLOW_SEALING", MFD_ALLOW_SEALING)   \
  V("SCM_MAX_FD", kScmMaxFd)                  \
  V("EAGAIN", EAGAIN)

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  env.SetInstanceData(new AddonData());

#define V(name, fn) exports.Set(name, Napi::Function::New(env, fn, name));
  VFU_FUNCTIONS(V)
#undef V

  Napi::Object constants = Napi::Object::New(env);
#define V(name, value) constants.Set(name, Napi::Number::New(env, static_cast<double>(value)));
  VFU_CONSTANTS(V)
#undef V
  constants.Freeze();
  exports.Set("constants", constants);

  exports.Set("pollEvents", PollEvents(env));
  exports.Set("Poller", DefinePoller(env));
  return exports;
}

}  // namespace
}  // namespace vfu

static Napi::Object InitVfioUser(Napi::Env env, Napi::Object exports) {
  return vfu::Init(env, exports);
}

NODE_API_MODULE(vfio_user, InitVfioUser)
