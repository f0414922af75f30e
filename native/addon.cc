// Module init: one table of functions, one table of constants, per-environment instance data.
// Node-API modules are context-aware, so this loads in worker_threads and in several at once.
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
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
  V("mmapPoisoned", MmapPoisoned) \
  V("memfdCreate", MemfdCreate)   \
  V("getSeals", GetSeals)         \
  V("addSeals", AddSeals)         \
  V("punchHole", PunchHole)       \
  V("eventfd", Eventfd)           \
  V("eventfdSignal", EventfdSignal) \
  V("eventfdDrain", EventfdDrain)   \
  V("schedYield", SchedYield)

#define VFU_CONSTANTS(V)                      \
  V("PAGE_SIZE", sysconf(_SC_PAGESIZE))       \
  V("PROT_READ", PROT_READ)                   \
  V("PROT_WRITE", PROT_WRITE)                 \
  V("EFD_NONBLOCK", EFD_NONBLOCK)             \
  V("EFD_SEMAPHORE", EFD_SEMAPHORE)           \
  V("MFD_ALLOW_SEALING", MFD_ALLOW_SEALING)   \
  V("F_SEAL_SEAL", F_SEAL_SEAL)               \
  V("F_SEAL_SHRINK", F_SEAL_SHRINK)           \
  V("F_SEAL_GROW", F_SEAL_GROW)               \
  V("F_SEAL_WRITE", F_SEAL_WRITE)             \
  V("SCM_MAX_FD", kScmMaxFd)                  \
  V("EAGAIN", EAGAIN)                         \
  V("RWF_DSYNC", RWF_DSYNC)                   \
  V("FALLOC_FL_KEEP_SIZE", FALLOC_FL_KEEP_SIZE) \
  V("FALLOC_FL_PUNCH_HOLE", FALLOC_FL_PUNCH_HOLE) \
  V("FALLOC_FL_ZERO_RANGE", FALLOC_FL_ZERO_RANGE)

void NoopFinalize(Napi::Env /*env*/, void* /*data*/) {}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  GuardInstall();
  AddonData* data = new AddonData();
  env.SetInstanceData(data);

#define V(name, fn) exports.Set(name, Napi::Function::New(env, fn, name));
  VFU_FUNCTIONS(V)
#undef V

  Napi::Object constants = Napi::Object::New(env);
#define V(name, value) constants.Set(name, Napi::Number::New(env, static_cast<double>(value)));
  VFU_CONSTANTS(V)
#undef V
  constants.Freeze();
  exports.Set("constants", constants);

  // The SIGBUS guard's counter for this environment, read from JS without a call (fault.cc). The
  // memory belongs to AddonData, which outlives every use of the buffer.
  Napi::ArrayBuffer epoch = Napi::ArrayBuffer::New(env, data->fault_epoch, sizeof(int32_t), NoopFinalize);
  exports.Set("faultEpoch", Napi::TypedArrayOf<int32_t>::New(env, 1, epoch, 0, napi_int32_array));
  exports.Set("pollEvents", PollEvents(env));
  exports.Set("Poller", DefinePoller(env));
  exports.Set("IoUring", DefineIoUring(env));
  return exports;
}

}  // namespace
}  // namespace vfu

static Napi::Object InitVfioUser(Napi::Env env, Napi::Object exports) {
  return vfu::Init(env, exports);
}

NODE_API_MODULE(vfio_user, InitVfioUser)
