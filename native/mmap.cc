// mmap of an fd into an external, detachable ArrayBuffer; explicit, idempotent munmap.
//
// Each mapping has a heap MapRecord that is both the ArrayBuffer's finalize hint and the entry in
// the environment's registry (keyed by the buffer's data pointer). munmap marks the record
// unmapped and drops it from the registry, detaches the buffer (every view then has length 0),
// then unmaps. The finaliser unmaps only a record that is still mapped, and always frees it.
// Every mapping is also registered with the SIGBUS guard (fault.cc) while it is mapped.
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

constexpr int64_t kMaxSafeInteger = (int64_t{1} << 53) - 1;

// A file offset: a Number (a safe integer) or a BigInt, >= 0 and within off_t.
bool ArgOffset(const Napi::CallbackInfo& info, size_t index, uint64_t* out) {
  constexpr const char* kWhat = "an offset (a Number or BigInt >= 0)";
  if (info[index].IsBigInt()) {
    bool lossless = false;
    uint64_t v = info[index].As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless || v > static_cast<uint64_t>(INT64_MAX)) {
      ThrowArgError(info.Env(), index, kWhat, true);
      return false;
    }
    *out = v;
    return true;
  }
  int64_t v;
  if (!ArgInteger(info, index, 0, kMaxSafeInteger, kWhat, &v)) return false;
  *out = static_cast<uint64_t>(v);
  return true;
}

// mmap's offset must be a multiple of the page size, and on hugetlbfs of the huge page size,
// which fstat reports as st_blksize.
uint64_t MapAlignment(int fd) {
  uint64_t page = static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
  struct stat st;
  if (fstat(fd, &st) != 0) return page;
  uint64_t block = static_cast<uint64_t>(st.st_blksize);
  bool power_of_two = block != 0 && (block & (block - 1)) == 0;
  return power_of_two && block > page && block <= (uint64_t{1} << 30) ? block : page;
}

void FinalizeMapping(napi_env /*env*/, void* /*data*/, void* hint) {
  MapRecord* record = static_cast<MapRecord*>(hint);
  auto it = record->registry->find(record->data);
  if (it != record->registry->end() && it->second == record) record->registry->erase(it);
  if (record->finalized != nullptr) *record->finalized = true;
  if (record->mapped) {
    GuardRemove(record);
    munmap(record->base, record->len);
  }
  delete record;
}

// The largest ArrayBuffer V8 makes here; longer mappings are made of several (lib/native/mapping.ts).
constexpr int64_t kMaxBufferLength = int64_t{1} << 32;

}  // namespace

// mmap(fd, offset, length, prot) -> ArrayBuffer of exactly `length` bytes starting at `offset`
Napi::Value Mmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int fd;
  uint64_t offset;
  int64_t length;
  int64_t prot;
  if (!ArgFd(info, 0, &fd)) return {};
  if (!ArgOffset(info, 1, &offset)) return {};
  if (!ArgInteger(info, 2, 1, kMaxBufferLength, "a length (an integer from 1 to 2^32)", &length)) {
    return {};
  }
  if (!ArgInteger(info, 3, 0, INT32_MAX, "PROT_READ, optionally | PROT_WRITE", &prot)) return {};
  // An ArrayBuffer over memory JS cannot read would crash on first use; PROT_EXEC has no place.
  if ((prot & PROT_READ) == 0 || (prot & ~(PROT_READ | PROT_WRITE)) != 0) {
    ThrowArgError(env, 3, "PROT_READ, optionally | PROT_WRITE", true);
    return {};
  }

  uint64_t aligned = offset & ~(MapAlignment(fd) - 1);
  size_t map_len = static_cast<size_t>(offset - aligned) + static_cast<size_t>(length);
  void* base = mmap(nullptr, map_len, static_cast<int>(prot), MAP_SHARED, fd,
                    static_cast<off_t>(aligned));
  if (base == MAP_FAILED) {
    ThrowErrno(env, errno, "mmap");
    return {};
  }
  void* data = static_cast<char*>(base) + (offset - aligned);
  MapRecord* record = new MapRecord();
  record->base = base;
  record->len = map_len;
  record->data = data;
  record->mapped = true;
  record->prot = static_cast<int>(prot);
  record->registry = GetAddonData(env)->mappings;

  // V8 may run the finaliser itself when it cannot make the buffer; then it has unmapped and
  // freed the record already, and doing so again here would be a double free.
  bool finalized = false;
  record->finalized = &finalized;
  napi_value buffer;
  napi_status status = napi_create_external_arraybuffer(
      env, data, static_cast<size_t>(length), FinalizeMapping, record, &buffer);
  if (!finalized) record->finalized = nullptr;
  if (status != napi_ok) {
    if (!finalized) {
      munmap(base, map_len);
      delete record;
    }
    if (env.IsExceptionPending()) return {};
    if (status == napi_no_external_buffers_allowed) {
      Napi::Error::New(env,
                       "mmap: this runtime forbids external ArrayBuffers (e.g. Electron's V8 "
                       "memory cage); mapped memory needs Node.js")
          .ThrowAsJavaScriptException();
    } else {
      Napi::Error::New(env, "mmap: could not create the external ArrayBuffer")
          .ThrowAsJavaScriptException();
    }
    return {};
  }
  GuardAdd(record);
  (*record->registry)[data] = record;
  return Napi::Value(env, buffer);
}

// munmap(buffer): detach, then unmap. A detached buffer is a no-op; a foreign one a TypeError.
Napi::Value Munmap(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  constexpr const char* kWhat = "an ArrayBuffer returned by mmap";
  if (!info[0].IsArrayBuffer()) {
    ThrowArgError(env, 0, kWhat);
    return {};
  }
  Napi::ArrayBuffer buffer = info[0].As<Napi::ArrayBuffer>();
  if (buffer.IsDetached() || buffer.ByteLength() == 0) return env.Undefined();

  MapRegistry& registry = *GetAddonData(env)->mappings;
  auto it = registry.find(buffer.Data());
  if (it == registry.end()) {
    ThrowArgError(env, 0, kWhat);
    return {};
  }
  MapRecord* record = it->second;
  void* base = record->base;
  size_t len = record->len;
  registry.erase(it);
  record->mapped = false;
  GuardRemove(record);

  // Detach first, so no JS view can reach the memory once it is gone. Detaching may release the
  // backing store and so queue (or run) the finaliser, which frees `record`: do not touch it after.
  buffer.Detach();
  if (env.IsExceptionPending()) {
    record->mapped = true;
    registry[record->data] = record;
    GuardAdd(record);
    return {};
  }
  if (munmap(base, len) != 0) {
    ThrowErrno(env, errno, "munmap");
    return {};
  }
  return env.Undefined();
}

// mmapPoisoned(buffer) -> true if the SIGBUS guard replaced this mapping's pages (its file shrank).
// A detached or unmapped buffer is not poisoned.
Napi::Value MmapPoisoned(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (!info[0].IsArrayBuffer()) {
    ThrowArgError(env, 0, "an ArrayBuffer returned by mmap");
    return {};
  }
  Napi::ArrayBuffer buffer = info[0].As<Napi::ArrayBuffer>();
  if (buffer.IsDetached() || buffer.ByteLength() == 0) return Napi::Boolean::New(env, false);
  MapRegistry& registry = *GetAddonData(env)->mappings;
  auto it = registry.find(buffer.Data());
  bool poisoned = it != registry.end() && it->second->poisoned.load(std::memory_order_acquire);
  return Napi::Boolean::New(env, poisoned);
}

}  // namespace vfu
