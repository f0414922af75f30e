// Poller: a libuv poll watcher on one fd (which it does not own), reporting readiness to JS.
//
// The uv_poll_t lives in its own heap block, because libuv still owns it after uv_close() until
// the close callback, which may come after the JS object (and this C++ object) is gone. While
// started, the JS object holds a strong reference to itself so the GC cannot take it; close()
// (or the GC finaliser of a never-closed, inactive Poller) releases the handle.
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

class Poller : public Napi::ObjectWrap<Poller> {
 public:
  explicit Poller(const Napi::CallbackInfo& info);
  ~Poller() override;

  static Napi::Value Start(const Napi::CallbackInfo& info);
  static Napi::Value Stop(const Napi::CallbackInfo& info);
  static Napi::Value Close(const Napi::CallbackInfo& info);

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

  Handle* handle_ = nullptr;
  bool active_ = false;
  bool in_callback_ = false;
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
  callback_ = Napi::Persistent(info[1].As<Napi::Function>());
  context_ = std::make_unique<Napi::AsyncContext>(env, "vfio-user:Poller");
  info.This().As<Napi::Object>().TypeTag(&kPollerTag);
}

Poller::~Poller() {
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

// Closes the handle and drops every reference this Poller holds; idempotent.
void Poller::ReleaseHandle() {
  if (handle_ == nullptr) return;
  handle_->owner = nullptr;
  uv_close(reinterpret_cast<uv_handle_t*>(&handle_->poll), OnClose);  // also stops it
  handle_ = nullptr;
  SetActive(false);
  callback_.Reset();
  // The async context is in use while the callback runs; OnPoll drops it afterwards.
  if (!in_callback_) context_.reset();
}

void Poller::OnPoll(uv_poll_t* poll, int status, int events) {
  Poller* self = reinterpret_cast<Handle*>(poll)->owner;
  if (self == nullptr || self->callback_.IsEmpty()) return;
  Napi::Env env = self->Env();
  Napi::HandleScope scope(env);
  Napi::Object receiver = self->Value();  // kept alive by this scope while the callback runs
  napi_value argv[2] = {Napi::Number::New(env, status),
                        Napi::Number::New(env, status < 0 ? 0 : events)};
  self->in_callback_ = true;
  // Raw napi_make_callback, not FunctionReference::MakeCallback: that one throws a new JS error
  // when the call fails, and in an environment that is being torn down (a Worker terminating or
  // exiting) throwing is itself impossible, which node-addon-api turns into a fatal error.
  napi_value result;
  napi_status call = napi_make_callback(env, static_cast<napi_async_context>(*self->context_),
                                        receiver, self->callback_.Value(), 2, argv, &result);
  self->in_callback_ = false;
  if (self->handle_ == nullptr) self->context_.reset();
  if (call == napi_ok || call == napi_pending_exception) {
    bool pending = false;
    if (napi_is_exception_pending(env, &pending) == napi_ok && pending) {
      // Nothing on the stack can catch it: report it as uncaught, like any event-loop callback.
      napi_value error;
      if (napi_get_and_clear_last_exception(env, &error) == napi_ok) napi_fatal_exception(env, error);
    }
  }
  // Any other status means the environment can no longer run JS: nothing to report to.
}

void Poller::OnClose(uv_handle_t* handle) {
  delete reinterpret_cast<Handle*>(handle);
}

}  // namespace

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
