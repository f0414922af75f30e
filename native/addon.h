// Declarations shared between the module init (addon.cc) and the per-concern sources.
#pragma once

#include <napi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <unordered_map>

namespace vfu {

struct MapRecord;

// data pointer -> record, for the mappings of one environment that are still mapped. Shared with
// every record, so that a finaliser running late in environment teardown still finds it.
using MapRegistry = std::unordered_map<void*, MapRecord*>;

// One live or retired mmap, and the finalize hint of its ArrayBuffer. The record, not the address,
// is a mapping's identity: after an explicit munmap the kernel may hand the same address to a new
// mapping while the old ArrayBuffer's finaliser is still pending.
struct MapRecord {
  void* base;    // what mmap returned (aligned)
  size_t len;    // what was passed to mmap
  void* data;    // the ArrayBuffer's data pointer: base plus the offset's distance to alignment
  bool mapped;   // false once munmap ran, explicitly or from the finaliser
  int prot;      // PROT_* it was mapped with
  std::shared_ptr<MapRegistry> registry;
  // Set by the SIGBUS guard when the file shrank under the mapping (fault.cc).
  std::atomic<bool> poisoned{false};
  // While napi_create_external_arraybuffer runs: set by the finaliser if it ran (fault path).
  bool* finalized = nullptr;
};

// fault.cc: the process-wide SIGBUS guard over every mapping mmap.cc makes.
void GuardInstall();
void GuardAdd(MapRecord* record);
void GuardRemove(MapRecord* record);
void GuardAddEpoch(std::atomic<int32_t>* epoch);
void GuardRemoveEpoch(std::atomic<int32_t>* epoch);

// Per-environment state (main thread and each worker get their own), owned by the env.
struct AddonData {
  std::shared_ptr<MapRegistry> mappings = std::make_shared<MapRegistry>();
  // Bumped by the SIGBUS guard on every poisoning; JS reads it as `faultEpoch` (an Int32Array).
  std::atomic<int32_t>* fault_epoch = new std::atomic<int32_t>(0);

  AddonData() { GuardAddEpoch(fault_epoch); }
  ~AddonData() {
    GuardRemoveEpoch(fault_epoch);
    delete fault_epoch;
  }
  AddonData(const AddonData&) = delete;
  AddonData& operator=(const AddonData&) = delete;
};

inline AddonData* GetAddonData(Napi::Env env) { return env.GetInstanceData<AddonData>(); }

// socket.cc
Napi::Value UnixListen(const Napi::CallbackInfo& info);
Napi::Value UnixAccept(const Napi::CallbackInfo& info);
Napi::Value UnixConnect(const Napi::CallbackInfo& info);
Napi::Value Socketpair(const Napi::CallbackInfo& info);
// scm.cc
Napi::Value Sendmsg(const Napi::CallbackInfo& info);
Napi::Value Recvmsg(const Napi::CallbackInfo& info);
// poller.cc
Napi::Value SchedYield(const Napi::CallbackInfo& info);
// scm.cc: the non-blocking recvmsg behind both recvmsg() and a Poller's fused receive.
ssize_t ReceiveWithFds(int fd, uint8_t* buf, size_t length, int32_t* fds_out, size_t room);
// mmap.cc
Napi::Value Mmap(const Napi::CallbackInfo& info);
Napi::Value Munmap(const Napi::CallbackInfo& info);
Napi::Value MmapPoisoned(const Napi::CallbackInfo& info);
// memfd.cc
Napi::Value MemfdCreate(const Napi::CallbackInfo& info);
Napi::Value GetSeals(const Napi::CallbackInfo& info);
Napi::Value AddSeals(const Napi::CallbackInfo& info);
Napi::Value PunchHole(const Napi::CallbackInfo& info);
// eventfd.cc
Napi::Value Eventfd(const Napi::CallbackInfo& info);
Napi::Value EventfdSignal(const Napi::CallbackInfo& info);
Napi::Value EventfdDrain(const Napi::CallbackInfo& info);
// poller.cc
Napi::Function DefinePoller(Napi::Env env);
Napi::Object PollEvents(Napi::Env env);
// uring.cc
Napi::Function DefineIoUring(Napi::Env env);

}  // namespace vfu
