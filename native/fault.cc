// SIGBUS guard for shared mappings: a peer that truncates a file we mapped must not end the process.
//
// Touching a page of a MAP_SHARED mapping that lies past the end of its file raises SIGBUS. The
// peer controls that file (a client's guest memory, a server's sparse-mmap area), so every
// mapping made by mmap.cc is registered here. The handler looks the faulting address up; if it
// lies in a registered mapping it replaces that whole mapping with anonymous zero pages (same
// address, same protection), marks it poisoned and bumps every environment's fault epoch, then
// returns: the faulting access is retried against the new pages and succeeds. JS notices the
// epoch change, asks which mappings are poisoned, and fails the I/O that touched them. A fault
// outside every registered mapping is passed to the handler that was installed before ours (or
// the default action, which ends the process as it would have without us).
//
// The registry is read from a signal handler, so it is guarded by a spinlock rather than a mutex,
// and no code touches mapped memory while holding it (the only way a thread could fault into the
// handler with the lock held).
#include <signal.h>
#include <sys/mman.h>

#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <vector>

#include "addon.h"

namespace vfu {
namespace {

struct Guarded {
  size_t len;
  int prot;
  MapRecord* record;
};


class SpinLock {
 public:
  void lock() {
    while (flag_.test_and_set(std::memory_order_acquire)) {
    }
  }
  void unlock() { flag_.clear(std::memory_order_release); }

 private:
  std::atomic_flag flag_ = ATOMIC_FLAG_INIT;
};

// Leaked on purpose: the handler may run during static destruction at exit.
SpinLock& Lock() {
  static SpinLock* lock = new SpinLock();
  return *lock;
}
std::map<uintptr_t, Guarded>& Mappings() {
  static auto* mappings = new std::map<uintptr_t, Guarded>();
  return *mappings;
}
std::vector<std::atomic<int32_t>*>& Epochs() {
  static auto* epochs = new std::vector<std::atomic<int32_t>*>();
  return *epochs;
}

struct sigaction g_previous;
std::once_flag g_installed;

void PassOn(int sig, siginfo_t* info, void* context) {
  if (g_previous.sa_flags & SA_SIGINFO) {
    if (g_previous.sa_sigaction != nullptr) {
      g_previous.sa_sigaction(sig, info, context);
      return;
    }
  } else if (g_previous.sa_handler != SIG_DFL && g_previous.sa_handler != SIG_IGN &&
             g_previous.sa_handler != nullptr) {
    g_previous.sa_handler(sig);
    return;
  }
  // Default action: uninstall ourselves; returning retries the access, which faults again and
  // ends the process with the signal, exactly as without the guard.
  signal(sig, SIG_DFL);
}

void OnSigbus(int sig, siginfo_t* info, void* context) {
  int saved_errno = errno;
  uintptr_t addr = reinterpret_cast<uintptr_t>(info->si_addr);
  bool handled = false;
  Lock().lock();
  auto& mappings = Mappings();
  auto it = mappings.upper_bound(addr);
  if (it != mappings.begin()) {
    --it;
    if (addr - it->first < it->second.len) {
      void* fresh = mmap(reinterpret_cast<void*>(it->first), it->second.len, it->second.prot,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (fresh != MAP_FAILED) {
        handled = true;
        it->second.record->poisoned.store(true, std::memory_order_release);
        for (auto* epoch : Epochs()) epoch->fetch_add(1, std::memory_order_acq_rel);
      }
    }
  }
  Lock().unlock();
  errno = saved_errno;
  if (!handled) PassOn(sig, info, context);
}

void Install() {
  struct sigaction action {};
  action.sa_sigaction = OnSigbus;
  action.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&action.sa_mask);
  sigaction(SIGBUS, &action, &g_previous);
}

}  // namespace

void GuardInstall() { std::call_once(g_installed, Install); }

void GuardAdd(MapRecord* record) {
  std::lock_guard<SpinLock> hold(Lock());
  Mappings()[reinterpret_cast<uintptr_t>(record->base)] = Guarded{record->len, record->prot, record};
}

void GuardRemove(MapRecord* record) {
  std::lock_guard<SpinLock> hold(Lock());
  auto& mappings = Mappings();
  auto it = mappings.find(reinterpret_cast<uintptr_t>(record->base));
  if (it != mappings.end() && it->second.record == record) mappings.erase(it);
}

void GuardAddEpoch(std::atomic<int32_t>* epoch) {
  std::lock_guard<SpinLock> hold(Lock());
  Epochs().push_back(epoch);
}

void GuardRemoveEpoch(std::atomic<int32_t>* epoch) {
  std::lock_guard<SpinLock> hold(Lock());
  auto& epochs = Epochs();
  for (auto it = epochs.begin(); it != epochs.end(); ++it) {
    if (*it == epoch) {
      epochs.erase(it);
      return;
    }
  }
}

}  // namespace vfu
