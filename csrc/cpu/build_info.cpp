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
#if defined(__clang__) ? __clang_major__ >= 18 : __GNUC__ >= 12
  TV_FEATURE("x86-64-v4")
  TV_FEATURE("x86-64-v3")
  TV_FEATURE("x86-64-v2")
#else  // older compilers know single features only: the ones the levels add
  const bool v2 = __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("sse4.2");
  const bool v3 = v2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool v4 = v3 && __builtin_cpu_supports("avx512f") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512cd");
  if (std::strcmp(feature, "x86-64-v4") == 0) return v4;
  if (std::strcmp(feature, "x86-64-v3") == 0) return v3;
  if (std::strcmp(feature, "x86-64-v2") == 0) return v2;
#endif
#undef TV_FEATURE
#else
  (void)feature;
#endif
  return -1;
}
}
