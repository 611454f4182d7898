// Pieces shared by the C++ CPU kernels (*_cpu.cpp), included by them; cpu_extension.py hashes this header into
// every kernel's module name, so a change here rebuilds them all.
#pragma once

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

}  // namespace harness
