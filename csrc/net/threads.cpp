// See threads.h.
#include "threads.h"

#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

namespace p2pkv {

namespace {

// "0,2-3" into `set`; false if malformed or empty.
bool parse_cpus(const char* text, cpu_set_t& set) {
  CPU_ZERO(&set);
  std::string s(text);
  size_t i = 0;
  bool any = false;
  while (i < s.size()) {
    size_t end = s.find(',', i);
    if (end == std::string::npos) end = s.size();
    std::string item = s.substr(i, end - i);
    char* rest = nullptr;
    long lo = std::strtol(item.c_str(), &rest, 10), hi = lo;
    if (rest == item.c_str()) return false;
    if (*rest == '-') {
      const char* from = rest + 1;
      hi = std::strtol(from, &rest, 10);
      if (rest == from) return false;
    }
    if (*rest != '\0' || lo < 0 || hi < lo || hi >= CPU_SETSIZE) return false;
    for (long c = lo; c <= hi; ++c) CPU_SET(int(c), &set);
    any = true;
    i = end + 1;
  }
  return any;
}

const cpu_set_t& io_cpus() {
  static cpu_set_t set;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* env = std::getenv("P2PKV_IO_CPUS");
    if (env != nullptr && *env != '\0' && parse_cpus(env, set)) return;
    CPU_ZERO(&set);
    long n = sysconf(_SC_NPROCESSORS_CONF);
    for (long c = 0; c < n && c < CPU_SETSIZE; ++c) CPU_SET(int(c), &set);
  });
  return set;
}

}  // namespace

void use_io_cpus() {
  // The kernel keeps the thread inside the process's cpuset; where none of these CPUs is in it, the
  // call fails and the thread keeps what it inherited.
  (void)pthread_setaffinity_np(pthread_self(), sizeof(cpu_set_t), &io_cpus());
}

}  // namespace p2pkv
