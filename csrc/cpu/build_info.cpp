// Compiled into every CPU kernel library beside tversky_cpu.cpp (see
// fasttversky/ops/_cpu_build.py): which build a library is, and the CPU-feature probe
// the loader uses to pick the best variant for the running CPU.
#include <cstring>

#ifndef TV_BUILD_KEY
#define TV_BUILD_KEY "unknown"
#endif
#ifndef TV_CPU_VARIANT
#define TV_CPU_VARIANT "unknown"
#endif

extern "C" {
// Hash of the sources and flags this library was built from: the loader rebuilds when
// the sources on disk no longer match (an edited checkout).
const char* tversky_cpu_build_key() { return TV_BUILD_KEY; }

// The variant's name: avx512, avx2, baseline or native.
const char* tversky_cpu_variant() { return TV_CPU_VARIANT; }

// 1 if the running CPU (and OS) supports the named feature, 0 if not, -1 for a name this
// probe does not know. __builtin_cpu_supports needs a literal, hence the table; it also
// checks that the OS saves the AVX/AVX-512 registers.
int tversky_cpu_has(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#define TV_FEATURE(name) \
  if (std::strcmp(feature, name) == 0) return __builtin_cpu_supports(name) ? 1 : 0;
  TV_FEATURE("avx512f")
  TV_FEATURE("avx512bw")
  TV_FEATURE("avx512dq")
  TV_FEATURE("avx512vl")
  TV_FEATURE("avx2")
  TV_FEATURE("fma")
  TV_FEATURE("f16c")
#undef TV_FEATURE
#else
  (void)feature;
#endif
  return -1;
}
}
