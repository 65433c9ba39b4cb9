// fork.h: OwnerProcess, which tells an object whether it runs in the process that made it.
//
// fork() copies the calling thread and the memory, and shares the kernel objects behind the file
// descriptors. So a process the user forks while a loader runs holds copies of the core's objects
// whose threads do not exist there, and whose shared memory (the process-mode arena) and stop
// eventfd are the parent's, still in use. Python orphans such copies in the child (they are
// never used there), but they are destroyed at the child's exit, and destruction must then
// touch nothing of the parent's:
//   ThreadPool  does not join or detach handles of threads that are not there (ESRCH, terminate);
//   Arena       does not punch holes in the shared memfd (that would free the parent's batches);
//   ProcLoader  does not signal the shared stop eventfd (that would stop the parent's loader).
// Each records its OwnerProcess when it starts and asks here() before such a step.
#pragma once

#include <sys/types.h>
#include <unistd.h>

namespace pyloader {

class OwnerProcess {
 public:
  OwnerProcess() noexcept : pid_(::getpid()) {}
  // Is this the process that made the object? False in a forked child.
  bool here() const noexcept { return ::getpid() == pid_; }

 private:
  pid_t pid_;
};

}  // namespace pyloader
