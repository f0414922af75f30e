// Declarations shared between the module init (addon.cc) and the per-concern sources.
#pragma once

#include <napi.h>

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
  std::shared_ptr<MapRegistry> registry;
};

// Per-environment state (main thread and each worker get their own), owned by the env.
struct AddonData {
  std::shared_ptr<MapRegistry> mappings = std::make_shared<MapRegistry>();
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
// mmap.cc
Napi::Value Mmap(const Napi::CallbackInfo& info);
Napi::Value Munmap(const Napi::CallbackInfo& info);
// memfd.cc
Napi::Value MemfdCreate(const Napi::CallbackInfo& info);
// eventfd.cc
Napi::Value Eventfd(const Napi::CallbackInfo& info);
Napi::Value EventfdSignal(const Napi::CallbackInfo& info);
Napi::Value EventfdDrain(const Napi::CallbackInfo& info);
// poller.cc
Napi::Function DefinePoller(Napi::Env env);
Napi::Object PollEvents(Napi::Env env);

}  // namespace vfu
