// Errors and argument checks shared by every native file.
//
// Exception policy: the addon is built with NAPI_DISABLE_CPP_EXCEPTIONS. A failure sets a
// pending JS exception and the function returns an empty value at once; nothing here throws a
// C++ exception. Every helper below returns false (or an empty value) after throwing, so call
// sites read `if (!ArgFd(info, 0, &fd)) return {};`.
#pragma once

#include <napi.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

namespace vfu {

// Throws an Error shaped like Node's own system errors:
//   message "EBADF: Bad file descriptor, sendmsg", code 'EBADF', errno 9 (positive), syscall.
inline void ThrowErrno(Napi::Env env, int err, const char* syscall) {
  const char* code = strerrorname_np(err);
  const char* desc = strerrordesc_np(err);
  std::string name = code != nullptr ? code : "E" + std::to_string(err);
  std::string message = name + ": " + (desc != nullptr ? desc : "Unknown error") + ", " + syscall;
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, name));
  error.Set("errno", Napi::Number::New(env, err));
  error.Set("syscall", Napi::String::New(env, syscall));
  error.ThrowAsJavaScriptException();
}

// libuv reports errors as negative errno values on Unix.
inline void ThrowUvError(Napi::Env env, int status, const char* syscall) {
  ThrowErrno(env, -status, syscall);
}

inline const char* Ordinal(size_t index) {
  static const char* const kNames[] = {"first", "second", "third", "fourth", "fifth", "sixth"};
  return index < sizeof(kNames) / sizeof(kNames[0]) ? kNames[index] : "an";
}

// "Expected first argument to be a file descriptor"
inline void ThrowArgError(Napi::Env env, size_t index, const char* what, bool range = false) {
  std::string message = std::string("Expected ") + Ordinal(index) + " argument to be " + what;
  if (range) {
    Napi::RangeError::New(env, message).ThrowAsJavaScriptException();
  } else {
    Napi::TypeError::New(env, message).ThrowAsJavaScriptException();
  }
}

// An integer-valued Number in [min, max]. `what` names the expectation in the message.
inline bool ArgInteger(const Napi::CallbackInfo& info, size_t index, int64_t min, int64_t max,
                       const char* what, int64_t* out) {
  Napi::Value value = info[index];
  if (!value.IsNumber()) {
    ThrowArgError(info.Env(), index, what);
    return false;
  }
  double d = value.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::trunc(d) != d || d < static_cast<double>(min) ||
      d > static_cast<double>(max)) {
    ThrowArgError(info.Env(), index, what, true);
    return false;
  }
  *out = static_cast<int64_t>(d);
  return true;
}

// A file descriptor: an integer in [0, INT32_MAX]. Closed fds are left to the kernel (EBADF).
inline bool ArgFd(const Napi::CallbackInfo& info, size_t index, int* out) {
  int64_t v;
  if (!ArgInteger(info, index, 0, INT32_MAX, "a file descriptor (an integer >= 0)", &v)) {
    return false;
  }
  *out = static_cast<int>(v);
  return true;
}

// Optional flags: undefined means 0; otherwise an integer in [0, INT32_MAX].
inline bool ArgFlags(const Napi::CallbackInfo& info, size_t index, int* out) {
  if (info[index].IsUndefined()) {
    *out = 0;
    return true;
  }
  int64_t v;
  if (!ArgInteger(info, index, 0, INT32_MAX, "a flags integer >= 0", &v)) return false;
  *out = static_cast<int>(v);
  return true;
}

}  // namespace vfu
