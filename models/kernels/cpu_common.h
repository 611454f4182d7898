// Pieces shared by the C++ CPU kernels (*_cpu.cpp), included by them; cpu_extension.py hashes this header into
// every kernel's module name, so a change here rebuilds them all.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace harness {

// Subnormal floats flushed to zero while a kernel runs on this thread. Under the prefix protocol only the last
// position's output has a gradient, so the adjoint of a scan decays towards zero down the sequence and, at
// ordinary decays, through the subnormal range, where every x86 multiply costs ~100 cycles: unflushed, the
// selective scan's backward pass took 6x as long on real amazon-beauty batches. Values below 1e-38 change
// nothing the model can see.
class FlushSubnormals {
 public:
#if defined(__SSE__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

// SplitMix64's output function: the counter-based generator of the kernels that redraw dropout masks (a counter
// seed + index * golden ratio gives 64 well-mixed bits).
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// The logistic sigmoid, written so that no exp overflows: under -ffast-math (no infinities assumed) 1 / (1 + inf)
// is not reliably 0 (it gave NaN for a float32 gate below -88.7, where torch's silu gives -0).
template <typename T>
inline T sigmoid(T x) {
  const T decay = std::exp(-std::abs(x));
  const T r = T(1) / (T(1) + decay);
  return x >= T(0) ? r : decay * r;
}

// Hardswish x * clamp(x + 3, 0, 6) / 6 and its slope as torch 2.x's CPU kernels define them (0 up to -3, x / 3 + 1/2
// below 3, 1 from 3 on), written with selects so that loops vectorise.
template <typename T>
inline T hardswish(T x) {
  return x * std::min(std::max(x + T(3), T(0)), T(6)) / T(6);
}

template <typename T>
inline T hardswish_slope(T x) {
  return x <= T(-3) ? T(0) : (x < T(3) ? x / T(3) + T(0.5) : T(1));
}

}  // namespace harness
