// Pieces shared by the C++ CPU kernels (*_cpu.cpp), included by them; cpu_extension.py hashes this header into
// every kernel's module name, so a change here rebuilds them all.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// How many leading steps of a sequence a scan's backward pass must visit: one past the last step t whose output
// gradient grad[t * stride_t + j], j < width, has an element other than zero (0 when none has). Past that step the
// adjoint is exactly zero, and so is every gradient the step would produce (for finite inputs there: an inf or
// NaN past a row's end, which the full pass would turn into NaN gradients, is not visited); a causal model trained on prefixes
// (or on all positions of right-padded rows) reads no output past a row's last item, so on amazon-beauty batches
// (8 items per row on average, padded to the longest of 256, often 50) most of each sequence is such steps.
// Zero is read from the bits (either sign), not compared: under -ffast-math a comparison may take a NaN for zero,
// and a NaN must still propagate.
template <typename T>
inline int64_t steps_reached(const T* grad, int64_t stride_t, int64_t width, int64_t seqlen) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "steps_reached: float or double");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  for (int64_t t = seqlen - 1; t >= 0; --t) {
    const T* g = grad + t * stride_t;
    Bits magnitude = 0;  // the OR of every element's bits without the sign
    for (int64_t j = 0; j < width; ++j) {
      Bits bits;
      std::memcpy(&bits, g + j, sizeof(T));
      magnitude |= bits << 1;
    }
    if (magnitude != 0) return t + 1;
  }
  return 0;
}

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
