// IoUring: one io_uring instance, driven from JS in batches: prepare SQEs into numbered slots,
// submit them with one io_uring_enter, reap completions as (slot, result) pairs into an Int32Array.
//
// Raw syscalls and <linux/io_uring.h> only (no liburing): the rings are mmap'd here and their
// head/tail indexes read and written with acquire/release ordering, as the kernel expects. The
// addon only moves bytes: which fd, where, how many, and what came back. Slots are the caller's
// user_data; it owns them and never reuses one before its completion is reaped. Data buffers are
// the caller's too: it keeps them referenced until the completion arrives.
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <vector>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

constexpr napi_type_tag kUringTag = {0x41c9e0d2b3f6a817ULL, 0x9d5e3b7c1a08f642ULL};
constexpr int64_t kMaxEntries = 4096;
constexpr int64_t kMaxPosition = 9007199254740991LL;  // Number.MAX_SAFE_INTEGER
constexpr uint32_t kMaxIovecs = IOV_MAX;

int SysSetup(unsigned entries, io_uring_params* params) {
  return static_cast<int>(syscall(__NR_io_uring_setup, entries, params));
}

int SysEnter(int fd, unsigned to_submit, unsigned min_complete, unsigned flags) {
  return static_cast<int>(syscall(__NR_io_uring_enter, fd, to_submit, min_complete, flags, nullptr, 0));
}

class IoUring : public Napi::ObjectWrap<IoUring> {
 public:
  explicit IoUring(const Napi::CallbackInfo& info);
  ~IoUring() override { Release(); }

  static Napi::Value PrepRw(const Napi::CallbackInfo& info);
  static Napi::Value PrepFsync(const Napi::CallbackInfo& info);
  static Napi::Value PrepFallocate(const Napi::CallbackInfo& info);
  static Napi::Value Submit(const Napi::CallbackInfo& info);
  static Napi::Value Reap(const Napi::CallbackInfo& info);
  static Napi::Value Unconsumed(const Napi::CallbackInfo& info);
  static Napi::Value Close(const Napi::CallbackInfo& info);

 private:
  static IoUring* FromThis(const Napi::CallbackInfo& info);
  bool MapRings(Napi::Env env, const io_uring_params& p);
  // The SQE for `slot`, zeroed, or null after throwing (bad slot, ring full).
  io_uring_sqe* NextSqe(const Napi::CallbackInfo& info, int64_t* slot);
  void Release();

  int fd_ = -1;
  void* sq_ring_ = MAP_FAILED;
  size_t sq_ring_len_ = 0;
  void* cq_ring_ = MAP_FAILED;
  size_t cq_ring_len_ = 0;
  io_uring_sqe* sqes_ = static_cast<io_uring_sqe*>(MAP_FAILED);
  size_t sqes_len_ = 0;

  unsigned* sq_tail_ = nullptr;
  unsigned* sq_head_ = nullptr;
  unsigned sq_mask_ = 0;
  unsigned sq_entries_ = 0;
  unsigned* cq_head_ = nullptr;
  unsigned* cq_tail_ = nullptr;
  unsigned cq_mask_ = 0;
  io_uring_cqe* cqes_ = nullptr;

  unsigned local_tail_ = 0;  // SQEs prepared, not yet published to the kernel
  // Per slot, the iovec array of a vectored request (grown once, then reused).
  std::vector<std::vector<iovec>> iovecs_;
};

IoUring::IoUring(const Napi::CallbackInfo& info) : Napi::ObjectWrap<IoUring>(info) {
  Napi::Env env = info.Env();
  int64_t entries;
  if (!ArgInteger(info, 0, 1, kMaxEntries, "a ring size (1..4096)", &entries)) return;
  io_uring_params p{};
  // Twice as many CQEs as SQEs: with at most `entries` requests in flight the CQ cannot overflow.
  p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP;
  p.cq_entries = static_cast<unsigned>(entries) * 2;
  int fd = SysSetup(static_cast<unsigned>(entries), &p);
  if (fd < 0 && errno == EINVAL) {
    p = io_uring_params{};
    fd = SysSetup(static_cast<unsigned>(entries), &p);
  }
  if (fd < 0) {
    ThrowErrno(env, errno, "io_uring_setup");
    return;
  }
  // io_uring fds are always close-on-exec (the kernel opens them O_CLOEXEC).
  fd_ = fd;
  if (!MapRings(env, p)) {
    Release();
    return;
  }
  iovecs_.resize(sq_entries_);
  Napi::Object self = info.This().As<Napi::Object>();
  self.TypeTag(&kUringTag);
  self.DefineProperties({
      Napi::PropertyDescriptor::Value("fd", Napi::Number::New(env, fd_), napi_enumerable),
      Napi::PropertyDescriptor::Value("entries", Napi::Number::New(env, sq_entries_), napi_enumerable),
  });
}

bool IoUring::MapRings(Napi::Env env, const io_uring_params& p) {
  sq_ring_len_ = p.sq_off.array + p.sq_entries * sizeof(unsigned);
  cq_ring_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && cq_ring_len_ > sq_ring_len_) sq_ring_len_ = cq_ring_len_;
  sq_ring_ = mmap(nullptr, sq_ring_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                  IORING_OFF_SQ_RING);
  if (sq_ring_ == MAP_FAILED) {
    ThrowErrno(env, errno, "mmap");
    return false;
  }
  if (single) {
    cq_ring_ = sq_ring_;
    cq_ring_len_ = 0;  // shares the SQ ring mapping
  } else {
    cq_ring_ = mmap(nullptr, cq_ring_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                    IORING_OFF_CQ_RING);
    if (cq_ring_ == MAP_FAILED) {
      ThrowErrno(env, errno, "mmap");
      return false;
    }
  }
  sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
  void* sqes = mmap(nullptr, sqes_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_,
                    IORING_OFF_SQES);
  if (sqes == MAP_FAILED) {
    ThrowErrno(env, errno, "mmap");
    return false;
  }
  sqes_ = static_cast<io_uring_sqe*>(sqes);
  char* sq = static_cast<char*>(sq_ring_);
  char* cq = static_cast<char*>(cq_ring_);
  sq_head_ = reinterpret_cast<unsigned*>(sq + p.sq_off.head);
  sq_tail_ = reinterpret_cast<unsigned*>(sq + p.sq_off.tail);
  sq_mask_ = *reinterpret_cast<unsigned*>(sq + p.sq_off.ring_mask);
  sq_entries_ = p.sq_entries;
  cq_head_ = reinterpret_cast<unsigned*>(cq + p.cq_off.head);
  cq_tail_ = reinterpret_cast<unsigned*>(cq + p.cq_off.tail);
  cq_mask_ = *reinterpret_cast<unsigned*>(cq + p.cq_off.ring_mask);
  cqes_ = reinterpret_cast<io_uring_cqe*>(cq + p.cq_off.cqes);
  // The SQ index array maps ring positions to SQEs one to one, once for all.
  unsigned* array = reinterpret_cast<unsigned*>(sq + p.sq_off.array);
  for (unsigned i = 0; i < p.sq_entries; i++) array[i] = i;
  local_tail_ = *sq_tail_;
  return true;
}

void IoUring::Release() {
  if (sqes_ != MAP_FAILED) munmap(sqes_, sqes_len_);
  if (cq_ring_ != MAP_FAILED && cq_ring_ != sq_ring_) munmap(cq_ring_, cq_ring_len_);
  if (sq_ring_ != MAP_FAILED) munmap(sq_ring_, sq_ring_len_);
  sqes_ = static_cast<io_uring_sqe*>(MAP_FAILED);
  cq_ring_ = sq_ring_ = MAP_FAILED;
  sq_tail_ = sq_head_ = cq_head_ = cq_tail_ = nullptr;
  cqes_ = nullptr;
  // Closing the ring cancels or waits out (in the kernel) whatever is still in flight.
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

IoUring* IoUring::FromThis(const Napi::CallbackInfo& info) {
  Napi::Value self = info.This();
  if (!self.IsObject() || !self.As<Napi::Object>().CheckTypeTag(&kUringTag)) {
    Napi::TypeError::New(info.Env(), "Expected this to be an IoUring").ThrowAsJavaScriptException();
    return nullptr;
  }
  IoUring* ring = Unwrap(self.As<Napi::Object>());
  if (ring != nullptr && ring->fd_ < 0) {
    Napi::Error::New(info.Env(), "IoUring is closed").ThrowAsJavaScriptException();
    return nullptr;
  }
  return ring;
}

io_uring_sqe* IoUring::NextSqe(const Napi::CallbackInfo& info, int64_t* slot) {
  if (!ArgInteger(info, 0, 0, sq_entries_ - 1, "a slot index below the ring size", slot)) {
    return nullptr;
  }
  unsigned head = __atomic_load_n(sq_head_, __ATOMIC_ACQUIRE);
  if (local_tail_ - head >= sq_entries_) {
    Napi::RangeError::New(info.Env(), "IoUring submission queue is full").ThrowAsJavaScriptException();
    return nullptr;
  }
  io_uring_sqe* sqe = &sqes_[local_tail_ & sq_mask_];
  *sqe = io_uring_sqe{};
  sqe->user_data = static_cast<uint64_t>(*slot);
  return sqe;
}

// prepRw(slot, write, fd, position, buffers, rwFlags): one read or write of a Uint8Array (READ/
// WRITE) or an array of them (READV/WRITEV). rwFlags are RWF_* (e.g. RWF_DSYNC for a FUA write).
Napi::Value IoUring::PrepRw(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  Napi::Env env = info.Env();
  int fd;
  int64_t position;
  int rw_flags;
  if (!ArgFd(info, 2, &fd)) return {};
  if (!ArgInteger(info, 3, 0, kMaxPosition, "a file position (a safe integer >= 0)", &position)) return {};
  if (!ArgFlags(info, 5, &rw_flags)) return {};
  bool write = info[1].ToBoolean().Value();
  Napi::Value bufs = info[4];
  void* data = nullptr;
  size_t length = 0;
  uint32_t count = 0;
  bool vectored = bufs.IsArray();
  if (vectored) {
    Napi::Array list = bufs.As<Napi::Array>();
    count = list.Length();
    if (count == 0 || count > kMaxIovecs) {
      ThrowArgError(env, 4, "1..IOV_MAX Uint8Arrays", true);
      return {};
    }
  } else if (!bufs.IsTypedArray()) {
    ThrowArgError(env, 4, "a Uint8Array or an array of them");
    return {};
  }
  int64_t slot;
  io_uring_sqe* sqe = self->NextSqe(info, &slot);
  if (sqe == nullptr) return {};
  if (vectored) {
    Napi::Array list = bufs.As<Napi::Array>();
    std::vector<iovec>& iov = self->iovecs_[slot];
    if (iov.size() < count) iov.resize(count);
    for (uint32_t i = 0; i < count; i++) {
      napi_value element;
      napi_typedarray_type type;
      size_t len;
      void* base;
      if (napi_get_element(env, list, i, &element) != napi_ok ||
          napi_get_typedarray_info(env, element, &type, &len, &base, nullptr, nullptr) != napi_ok ||
          type != napi_uint8_array) {
        ThrowArgError(env, 4, "an array of Uint8Arrays");
        return {};
      }
      iov[i] = iovec{base, len};
    }
    data = iov.data();
    length = count;
    sqe->opcode = write ? IORING_OP_WRITEV : IORING_OP_READV;
  } else {
    napi_typedarray_type type;
    if (napi_get_typedarray_info(env, bufs, &type, &length, &data, nullptr, nullptr) != napi_ok ||
        type != napi_uint8_array || length > UINT32_MAX) {
      ThrowArgError(env, 4, "a Uint8Array of at most 4 GiB");
      return {};
    }
    sqe->opcode = write ? IORING_OP_WRITE : IORING_OP_READ;
  }
  sqe->fd = fd;
  sqe->off = static_cast<uint64_t>(position);
  sqe->addr = reinterpret_cast<uint64_t>(data);
  sqe->len = static_cast<uint32_t>(length);
  sqe->rw_flags = rw_flags;
  self->local_tail_++;
  return env.Undefined();
}

// prepFsync(slot, fd, datasync): fsync, or fdatasync when datasync is true.
Napi::Value IoUring::PrepFsync(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  int fd;
  if (!ArgFd(info, 1, &fd)) return {};
  int64_t slot;
  io_uring_sqe* sqe = self->NextSqe(info, &slot);
  if (sqe == nullptr) return {};
  sqe->opcode = IORING_OP_FSYNC;
  sqe->fd = fd;
  sqe->fsync_flags = info[2].ToBoolean().Value() ? IORING_FSYNC_DATASYNC : 0;
  self->local_tail_++;
  return info.Env().Undefined();
}

// prepFallocate(slot, fd, mode, offset, length): fallocate(2) with FALLOC_FL_* `mode`.
Napi::Value IoUring::PrepFallocate(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  int fd;
  int mode;
  int64_t offset;
  int64_t length;
  if (!ArgFd(info, 1, &fd) || !ArgFlags(info, 2, &mode)) return {};
  if (!ArgInteger(info, 3, 0, kMaxPosition, "an offset (a safe integer >= 0)", &offset)) return {};
  if (!ArgInteger(info, 4, 1, kMaxPosition, "a length (a safe integer > 0)", &length)) return {};
  int64_t slot;
  io_uring_sqe* sqe = self->NextSqe(info, &slot);
  if (sqe == nullptr) return {};
  // The kernel reads fallocate's mode from len and its length from addr.
  sqe->opcode = IORING_OP_FALLOCATE;
  sqe->fd = fd;
  sqe->off = static_cast<uint64_t>(offset);
  sqe->addr = static_cast<uint64_t>(length);
  sqe->len = static_cast<uint32_t>(mode);
  self->local_tail_++;
  return info.Env().Undefined();
}

// submit() -> how many prepared SQEs are still unsubmitted (0 normally). One io_uring_enter for
// all of them; a busy kernel (EAGAIN, EBUSY) leaves the rest for the next call.
Napi::Value IoUring::Submit(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  __atomic_store_n(self->sq_tail_, self->local_tail_, __ATOMIC_RELEASE);
  unsigned pending = self->local_tail_ - __atomic_load_n(self->sq_head_, __ATOMIC_ACQUIRE);
  while (pending > 0) {
    int n = SysEnter(self->fd_, pending, 0, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EBUSY) break;
      ThrowErrno(info.Env(), errno, "io_uring_enter");
      return {};
    }
    pending = self->local_tail_ - __atomic_load_n(self->sq_head_, __ATOMIC_ACQUIRE);
    if (n == 0) break;
  }
  return Napi::Number::New(info.Env(), pending);
}

// reap(out: Int32Array) -> n: the completions available now, as (slot, result) pairs in
// out[0..2n); result is the syscall's return value, or -errno. No system call.
Napi::Value IoUring::Reap(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  Napi::Env env = info.Env();
  napi_typedarray_type type;
  size_t capacity;
  void* data;
  if (!info[0].IsTypedArray() ||
      napi_get_typedarray_info(env, info[0], &type, &capacity, &data, nullptr, nullptr) != napi_ok ||
      type != napi_int32_array) {
    ThrowArgError(env, 0, "an Int32Array");
    return {};
  }
  int32_t* out = static_cast<int32_t*>(data);
  unsigned head = *self->cq_head_;
  unsigned tail = __atomic_load_n(self->cq_tail_, __ATOMIC_ACQUIRE);
  size_t n = 0;
  while (head != tail && 2 * n + 1 < capacity) {
    const io_uring_cqe& cqe = self->cqes_[head & self->cq_mask_];
    out[2 * n] = static_cast<int32_t>(cqe.user_data);
    out[2 * n + 1] = cqe.res;
    n++;
    head++;
  }
  __atomic_store_n(self->cq_head_, head, __ATOMIC_RELEASE);
  return Napi::Number::New(env, static_cast<double>(n));
}

// unconsumed() -> how many prepared SQEs the kernel has not taken yet: the newest ones, which it
// never will unless submit() is called again. No system call. After a failed submit() this says
// which requests can be failed at once and which the kernel may still be working on.
Napi::Value IoUring::Unconsumed(const Napi::CallbackInfo& info) {
  IoUring* self = FromThis(info);
  if (self == nullptr) return {};
  unsigned taken = __atomic_load_n(self->sq_head_, __ATOMIC_ACQUIRE);
  return Napi::Number::New(info.Env(), self->local_tail_ - taken);
}

// close(): unmap the rings and close the fd; idempotent. In-flight requests are the caller's to
// wait for first (the kernel finishes or cancels them, but their completions are lost).
Napi::Value IoUring::Close(const Napi::CallbackInfo& info) {
  Napi::Value self = info.This();
  if (!self.IsObject() || !self.As<Napi::Object>().CheckTypeTag(&kUringTag)) {
    Napi::TypeError::New(info.Env(), "Expected this to be an IoUring").ThrowAsJavaScriptException();
    return {};
  }
  IoUring* ring = Unwrap(self.As<Napi::Object>());
  if (ring != nullptr) ring->Release();
  return info.Env().Undefined();
}

}  // namespace

Napi::Function DefineIoUring(Napi::Env env) {
  // Prototype functions rather than instance methods, so that FromThis checks the tag first.
  Napi::Function constructor = IoUring::DefineClass(env, "IoUring", {});
  Napi::Object prototype = constructor.Get("prototype").As<Napi::Object>();
  prototype.DefineProperties({
      Napi::PropertyDescriptor::Function(env, prototype, "prepRw", IoUring::PrepRw, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "prepFsync", IoUring::PrepFsync, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "prepFallocate", IoUring::PrepFallocate, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "submit", IoUring::Submit, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "reap", IoUring::Reap, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "unconsumed", IoUring::Unconsumed, napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "close", IoUring::Close, napi_default_method),
  });
  return constructor;
}

}  // namespace vfu
