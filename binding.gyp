{
  "targets": [
    {
      "target_name": "vfio_user",
      "conditions": [
        ["OS=='linux'", {
          "sources": [
            "native/addon.cc",
            "native/eventfd.cc",
            "native/fault.cc",
            "native/memfd.cc",
            "native/mmap.cc",
            "native/poller.cc",
            "native/scm.cc",
            "native/socket.cc",
            "native/uring.cc"
          ],
          "include_dirs": [
            "<!(node -p \"require('node-addon-api').include_dir\")"
          ],
          "defines": [
            # Node-API 8: ArrayBuffer Detach (>= 7), type tags and Object.freeze (>= 8).
            "NAPI_VERSION=8",
            # Exception policy: no C++ exceptions. A failure sets a pending JS exception and the
            # function returns at once (see native/errors.h); the build keeps -fno-exceptions.
            "NAPI_DISABLE_CPP_EXCEPTIONS",
            # In an environment being torn down (a terminating Worker) a JS exception cannot be
            # thrown; without this node-addon-api makes that a fatal error of the whole process.
            "NODE_API_SWALLOW_UNTHROWABLE_EXCEPTIONS"
          ],
          "cflags": ["-Wall", "-Wextra", "-O2", "-fvisibility=hidden"],
          "cflags_cc": ["-fvisibility-inlines-hidden"],
          "cflags!": ["-O3"],
          "cflags_cc!": ["-O3"]
        }, {
          # Not Linux: nothing to build. lib/native/binding.ts throws "unsupported platform".
          "type": "none"
        }]
      ]
    }
  ]
}
