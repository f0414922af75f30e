// Poller: a libuv poll watcher on one fd (which it does not own), reporting readiness to JS.
//
// The uv_poll_t lives in its own heap block, because libuv still owns it after uv_close() until
// the close callback, which may come after the JS object (and this C++ object) is gone. While
// started, the JS object holds a strong reference to itself so the GC cannot take it; close()
// (or the GC finaliser of a never-closed, inactive Poller) releases the handle.
//
// Busy polling (busyPoll(us)): a peer that answers within microseconds is best served without a
// trip through epoll and libuv per message. After a callback that returns true ("I handled
// traffic and wait for nothing but more of it"), OnPoll keeps checking the fd with a zero-timeout
// poll() for up to the window, yielding the CPU between checks so that a peer on this same CPU
// runs, and calls back directly when it turns readable. The turn ends when the window passes
// without traffic, the callback returns anything but true, or kMaxTurnNs passes (timers and other
// handles must get their turn); the level-triggered uv_poll then reports what is left.
//
// Fused receive (receiveInto(buffer, state)): for a socket, the Poller itself makes the recvmsg
// into buffer[state[0], state[0] + state[1]) before calling back, and leaves the result in state
// (see kState*), so one crossing into JS carries a wake-up and its bytes and fds. While busy
// polling, that recvmsg is also the check for traffic. The fds a receive leaves in the state are
// JS's once its callback has run; if JS can no longer run (a Worker being torn down: the call
// fails, or the environment goes before the next one), the Poller closes them itself.
#include <unistd.h>

#include <poll.h>
#include <sched.h>
#include <time.h>
#include <uv.h>

#include <memory>

#include "addon.h"
#include "errors.h"

namespace vfu {
namespace {

// Marks objects this addon wrapped, so that a method called on a foreign object is a TypeError
// and never a reinterpretation of someone else's native pointer.
constexpr napi_type_tag kPollerTag = {0x7a3c1f0e9b2d4c65ULL, 0x8e41d2a6c07f3b19ULL};

constexpr int kEventMask = UV_READABLE | UV_WRITABLE | UV_DISCONNECT;
// Layout of a fused receive's Int32Array (mirrored in lib/native/binding.ts).
constexpr size_t kStateOffset = 0;    // where in the buffer to receive (JS sets it)
constexpr size_t kStateLength = 1;    // how many bytes to receive; 0 pauses the fused receive
constexpr size_t kStateResult = 2;    // bytes received, 0 at EOF, -errno, or kNotReceived
constexpr size_t kStateFds = 3;       // fd count, then the fds (as recvmsg's fdsOut)
constexpr int32_t kNotReceived = INT32_MIN;
// Longest busy-polling turn before control returns to the event loop.
constexpr uint64_t kMaxTurnNs = 1000000;
constexpr int64_t kMaxBusyPollUs = 10000;

uint64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000u + static_cast<uint64_t>(ts.tv_nsec);
}

class Poller : public Napi::ObjectWrap<Poller> {
 public:
  explicit Poller(const Napi::CallbackInfo& info);
  ~Poller() override;

  static Napi::Value Start(const Napi::CallbackInfo& info);
  static Napi::Value Stop(const Napi::CallbackInfo& info);
  static Napi::Value Close(const Napi::CallbackInfo& info);
  static Napi::Value BusyPoll(const Napi::CallbackInfo& info);
  static Napi::Value ReceiveInto(const Napi::CallbackInfo& info);

 private:
  struct Handle {
    uv_poll_t poll;  // first member: a uv_poll_t* is a Handle*
    Poller* owner;   // null once closed
  };

  static Poller* FromThis(const Napi::CallbackInfo& info, bool require_open);
  static void OnPoll(uv_poll_t* poll, int status, int events);
  static void OnClose(uv_handle_t* handle);
  void ReleaseHandle();
  void SetActive(bool active);
  // Calls the JS callback; true if it returned true (see busy polling above).
  bool Invoke(napi_value receiver, int status, int events);
  void BusyTurn(napi_value receiver);
  // The fused recvmsg; false if it would block (or no fused receive is armed).
  bool Receive();
  void DropReceive();
  // Closes the fds a fused receive left in the state that JS never took, and clears it.
  void CloseUntakenFds();
  static void OnEnvCleanup(void* arg);

  Handle* handle_ = nullptr;
  int fd_ = -1;
  uint64_t busy_ns_ = 0;
  // Fused receive: the buffer and state array, held by these references while armed.
  Napi::Reference<Napi::Value> rx_buffer_ref_;
  Napi::Reference<Napi::Value> rx_state_ref_;
  uint8_t* rx_buffer_ = nullptr;
  size_t rx_buffer_length_ = 0;
  int32_t* rx_state_ = nullptr;
  size_t rx_fd_room_ = 0;
  bool active_ = false;
  bool in_callback_ = false;
  bool cleanup_hooked_ = false;
  Napi::FunctionReference callback_;
  std::unique_ptr<Napi::AsyncContext> context_;
};

Poller::Poller(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Poller>(info) {
  Napi::Env env = info.Env();
  int fd;
  if (!ArgFd(info, 0, &fd)) return;
  if (!info[1].IsFunction()) {
    ThrowArgError(env, 1, "a callback function");
    return;
  }
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    Napi::Error::New(env, "Poller: no event loop").ThrowAsJavaScriptException();
    return;
  }
  Handle* handle = new Handle{};
  // uv_poll_init fails (EBADF, EPERM for regular files, EEXIST when the fd is watched already)
  // before it registers the handle, so a failed handle is plain memory.
  int status = uv_poll_init(loop, &handle->poll, fd);
  if (status != 0) {
    delete handle;
    ThrowUvError(env, status, "uv_poll_init");
    return;
  }
  handle->owner = this;
  handle_ = handle;
  fd_ = fd;
  callback_ = Napi::Persistent(info[1].As<Napi::Function>());
  context_ = std::make_unique<Napi::AsyncContext>(env, "vfio-user:Poller");
  info.This().As<Napi::Object>().TypeTag(&kPollerTag);
  cleanup_hooked_ = napi_add_env_cleanup_hook(env, OnEnvCleanup, this) == napi_ok;
}

Poller::~Poller() {
  if (cleanup_hooked_) napi_remove_env_cleanup_hook(Env(), OnEnvCleanup, this);
  if (handle_ != nullptr) {
    handle_->owner = nullptr;
    uv_close(reinterpret_cast<uv_handle_t*>(&handle_->poll), OnClose);
    handle_ = nullptr;
  }
}

Poller* Poller::FromThis(const Napi::CallbackInfo& info, bool require_open) {
  Napi::Env env = info.Env();
  Napi::Value self = info.This();
  if (!self.IsObject() || !self.As<Napi::Object>().CheckTypeTag(&kPollerTag)) {
    Napi::TypeError::New(env, "Expected this to be a Poller").ThrowAsJavaScriptException();
    return nullptr;
  }
  Poller* poller = Unwrap(self.As<Napi::Object>());
  if (poller == nullptr) return nullptr;
  if (require_open && poller->handle_ == nullptr) {
    Napi::Error::New(env, "Poller is closed").ThrowAsJavaScriptException();
    return nullptr;
  }
  return poller;
}

void Poller::SetActive(bool active) {
  if (active == active_) return;
  active_ = active;
  if (active) {
    Ref();
  } else {
    Unref();
  }
}

Napi::Value Poller::Start(const Napi::CallbackInfo& info) {
  Poller* self = FromThis(info, true);
  if (self == nullptr) return {};
  int64_t events;
  if (!ArgInteger(info, 0, 1, kEventMask, "a mask of pollEvents", &events)) return {};
  if ((events & ~kEventMask) != 0) {
    ThrowArgError(info.Env(), 0, "a mask of pollEvents", true);
    return {};
  }
  int status = uv_poll_start(&self->handle_->poll, static_cast<int>(events), OnPoll);
  if (status != 0) {
    ThrowUvError(info.Env(), status, "uv_poll_start");
    return {};
  }
  self->SetActive(true);
  return info.Env().Undefined();
}

Napi::Value Poller::Stop(const Napi::CallbackInfo& info) {
  Poller* self = FromThis(info, true);
  if (self == nullptr) return {};
  uv_poll_stop(&self->handle_->poll);
  self->SetActive(false);
  return info.Env().Undefined();
}

Napi::Value Poller::Close(const Napi::CallbackInfo& info) {
  Poller* self = FromThis(info, false);
  if (self == nullptr) return {};
  self->ReleaseHandle();
  return info.Env().Undefined();
}

Napi::Value Poller::BusyPoll(const Napi::CallbackInfo& info) {
  Poller* self = FromThis(info, true);
  if (self == nullptr) return {};
  int64_t us;
  if (!ArgInteger(info, 0, 0, kMaxBusyPollUs, "a window in microseconds (0 to 10000)", &us)) return {};
  self->busy_ns_ = static_cast<uint64_t>(us) * 1000u;
  return info.Env().Undefined();
}

// receiveInto(buffer: Uint8Array, state: Int32Array) arms the fused receive; receiveInto(null)
// disarms it. The state array needs room for kStateFds + 1 entries (then one per fd).
Napi::Value Poller::ReceiveInto(const Napi::CallbackInfo& info) {
  Poller* self = FromThis(info, true);
  if (self == nullptr) return {};
  Napi::Env env = info.Env();
  if (info[0].IsNull() || info[0].IsUndefined()) {
    self->DropReceive();
    return env.Undefined();
  }
  if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowArgError(env, 0, "a Uint8Array or null");
    return {};
  }
  if (!info[1].IsTypedArray() || info[1].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
      info[1].As<Napi::TypedArray>().ElementLength() < kStateFds + 1) {
    ThrowArgError(env, 1, "an Int32Array of length >= 4");
    return {};
  }
  Napi::Uint8Array buffer = info[0].As<Napi::Uint8Array>();
  Napi::Int32Array state = info[1].As<Napi::Int32Array>();
  self->DropReceive();
  self->rx_buffer_ref_ = Napi::Persistent(info[0]);
  self->rx_state_ref_ = Napi::Persistent(info[1]);
  // Backing stores of ArrayBuffers never move, and the references keep them alive.
  self->rx_buffer_ = buffer.Data();
  self->rx_buffer_length_ = buffer.ByteLength();
  self->rx_state_ = state.Data();
  self->rx_fd_room_ = state.ElementLength() - kStateFds - 1;
  self->rx_state_[kStateResult] = kNotReceived;
  return env.Undefined();
}

void Poller::CloseUntakenFds() {
  if (rx_state_ == nullptr || rx_state_[kStateResult] == kNotReceived) return;
  // As the JS side does: a receive that failed or met the end has closed its fds already.
  if (rx_state_[kStateResult] > 0) {
    int64_t count = rx_state_[kStateFds];
    for (int64_t k = 1; k <= count && static_cast<size_t>(k) <= rx_fd_room_; k++) {
      close(rx_state_[kStateFds + k]);
    }
  }
  rx_state_[kStateFds] = 0;
  rx_state_[kStateResult] = kNotReceived;
}

// The environment is going (a Worker ends): JS will not take what the last receive brought. The
// state's ArrayBuffer is still alive here (held by rx_state_ref_; the references go later).
void Poller::OnEnvCleanup(void* arg) {
  Poller* self = static_cast<Poller*>(arg);
  self->cleanup_hooked_ = false;
  self->CloseUntakenFds();
}

void Poller::DropReceive() {
  rx_buffer_ = nullptr;
  rx_state_ = nullptr;
  rx_buffer_length_ = rx_fd_room_ = 0;
  rx_buffer_ref_.Reset();
  rx_state_ref_.Reset();
}

bool Poller::Receive() {
  if (rx_state_ == nullptr || rx_state_[kStateResult] != kNotReceived) return false;
  int64_t offset = rx_state_[kStateOffset];
  int64_t length = rx_state_[kStateLength];
  if (length <= 0 || offset < 0 || static_cast<uint64_t>(offset + length) > rx_buffer_length_) return false;
  ssize_t got = ReceiveWithFds(fd_, rx_buffer_ + offset, static_cast<size_t>(length),
                               rx_state_ + kStateFds, rx_fd_room_);
  if (got == -EAGAIN) return false;
  rx_state_[kStateResult] = static_cast<int32_t>(got);
  return true;
}

// Closes the handle and drops every reference this Poller holds; idempotent.
void Poller::ReleaseHandle() {
  if (handle_ == nullptr) return;
  handle_->owner = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(&handle_->poll), OnClose);  // also stops it
  handle_ = nullptr;
  SetActive(false);
  callback_.Reset();
  DropReceive();
  // The async context is in use while the callback runs; OnPoll drops it afterwards.
  if (!in_callback_) context_.reset();
}

void Poller::OnPoll(uv_poll_t* poll, int status, int events) {
  Poller* self = reinterpret_cast<Handle*>(poll)->owner;
  if (self == nullptr || self->callback_.IsEmpty()) return;
  Napi::Env env = self->Env();
  Napi::HandleScope scope(env);
  Napi::Object receiver = self->Value();  // kept alive by this scope while callbacks run
  if (status == 0 && (events & (UV_READABLE | UV_DISCONNECT)) != 0) self->Receive();
  bool again = self->Invoke(receiver, status, status < 0 ? 0 : events);
  if (again && self->busy_ns_ != 0 && self->handle_ != nullptr) self->BusyTurn(receiver);
}

bool Poller::Invoke(napi_value receiver, int status, int events) {
  napi_env env = Env();
  napi_handle_scope scope;
  if (napi_open_handle_scope(env, &scope) != napi_ok) return false;
  napi_value argv[2];
  napi_create_int32(env, status, &argv[0]);
  napi_create_int32(env, events, &argv[1]);
  in_callback_ = true;
  // Raw napi_make_callback, not FunctionReference::MakeCallback: that one throws a new JS error
  // when the call fails, and in an environment that is being torn down (a Worker terminating or
  // exiting) throwing is itself impossible, which node-addon-api turns into a fatal error.
  napi_value result = nullptr;
  napi_status call = napi_make_callback(env, static_cast<napi_async_context>(*context_), receiver,
                                        callback_.Value(), 2, argv, &result);
  in_callback_ = false;
  if (handle_ == nullptr) context_.reset();
  bool again = false;
  if (call == napi_ok && result != nullptr) {
    napi_valuetype type;
    if (napi_typeof(env, result, &type) == napi_ok && type == napi_boolean) {
      napi_get_value_bool(env, result, &again);
    }
  }
  if (call == napi_ok || call == napi_pending_exception) {
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      // Nothing on the stack can catch it: report it as uncaught, like any event-loop callback.
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
      again = false;
    }
  }
  // Any other status means the environment can no longer run JS: nothing to report to, and
  // nobody to take the fds that came with this wake-up.
  if (call != napi_ok && call != napi_pending_exception) CloseUntakenFds();
  napi_close_handle_scope(env, scope);
  return again;
}

void Poller::BusyTurn(napi_value receiver) {
  const uint64_t start = NowNs();
  uint64_t last_traffic = start;
  for (;;) {
    if (handle_ == nullptr || busy_ns_ == 0) return;
    int events = 0;
    if (rx_state_ != nullptr) {
      // The receive is the check: one syscall, and the bytes come with the wake-up.
      if (Receive()) events = UV_READABLE;
    } else {
      pollfd p{fd_, POLLIN, 0};
      int ready = ::poll(&p, 1, 0);
      if (ready < 0 && errno != EINTR) return;
      if (ready > 0) {
        if (p.revents & POLLNVAL) return;
        events = (p.revents & POLLIN) ? UV_READABLE : 0;
        if (p.revents & (POLLHUP | POLLERR)) events |= UV_DISCONNECT;
      }
    }
    uint64_t now = NowNs();
    if (events != 0) {
      // Bytes already taken are always handed over; the turn's budget is checked after.
      if (!Invoke(receiver, 0, events) || now - start >= kMaxTurnNs) return;
      last_traffic = NowNs();
      continue;
    }
    if (now - last_traffic >= busy_ns_ || now - start >= kMaxTurnNs) return;
    sched_yield();
  }
}

void Poller::OnClose(uv_handle_t* handle) {
  delete reinterpret_cast<Handle*>(handle);
}

}  // namespace

// schedYield(): gives the CPU to another runnable task, if any; for JS-side polling loops, so a
// peer sharing this CPU (a VMM's vCPU or main loop) runs instead of waiting for the spin to end.
Napi::Value SchedYield(const Napi::CallbackInfo& info) {
  sched_yield();
  return info.Env().Undefined();
}

Napi::Function DefinePoller(Napi::Env env) {
  // The methods are plain functions on the prototype rather than ObjectWrap instance methods:
  // those unwrap `this` before any check of ours could run, and FromThis checks the type tag first.
  Napi::Function constructor = Poller::DefineClass(env, "Poller", {});
  Napi::Object prototype = constructor.Get("prototype").As<Napi::Object>();
  prototype.DefineProperties({
      Napi::PropertyDescriptor::Function(env, prototype, "start", Poller::Start,
                                         napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "stop", Poller::Stop,
                                         napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "close", Poller::Close,
                                         napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "busyPoll", Poller::BusyPoll,
                                         napi_default_method),
      Napi::PropertyDescriptor::Function(env, prototype, "receiveInto", Poller::ReceiveInto,
                                         napi_default_method),
  });
  return constructor;
}

Napi::Object PollEvents(Napi::Env env) {
  Napi::Object events = Napi::Object::New(env);
  events.Set("READABLE", Napi::Number::New(env, UV_READABLE));
  events.Set("WRITABLE", Napi::Number::New(env, UV_WRITABLE));
  events.Set("DISCONNECT", Napi::Number::New(env, UV_DISCONNECT));
  events.Freeze();
  return events;
}

}  // namespace vfu
