// Where p2pkv's native threads run. An engine often pins its compute thread to a core that its
// OpenMP threads share and spin on (vLLM on CPU binds its workers so); a thread created from it
// inherits that pinning and waits behind the spinners for the CPU, for seconds at a time. So
// every native thread of p2pkv starts by taking the CPUs in P2PKV_IO_CPUS ("2,3" or "2-3"), or
// else every CPU the process's cpuset allows.
#pragma once

namespace p2pkv {

void use_io_cpus();

}  // namespace p2pkv
