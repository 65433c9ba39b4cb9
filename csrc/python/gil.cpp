#include "gil.h"

#include <mutex>
#include <vector>

namespace pyloader::python {

namespace {

struct Graveyard {
  std::mutex mu;
  std::vector<std::unique_ptr<Grave>> graves;  // under mu
  bool scheduled = false;                      // under mu: a flush is pending
};

// Never destroyed: at process exit its graves must not be touched without the GIL.
Graveyard& graveyard() {
  static Graveyard* g = new Graveyard;
  return *g;
}

// A pending call: runs on the main thread with the GIL held.
int flush(void*) {
  Graveyard& g = graveyard();
  std::vector<std::unique_ptr<Grave>> graves;
  {
    std::lock_guard lock(g.mu);
    graves.swap(g.graves);
    g.scheduled = false;
  }
  graves.clear();  // the references die here, with the GIL
  return 0;
}

}  // namespace

void bury(std::unique_ptr<Grave> grave) noexcept {
  Graveyard& g = graveyard();
  {
    std::lock_guard lock(g.mu);
    g.graves.push_back(std::move(grave));
    if (g.scheduled) return;
    g.scheduled = true;
  }
  // Needs neither the GIL nor a thread state. When the queue of pending calls is full, the next
  // burial tries again.
  if (Py_AddPendingCall(&flush, nullptr) != 0) {
    std::lock_guard lock(g.mu);
    g.scheduled = false;
  }
}

}  // namespace pyloader::python
