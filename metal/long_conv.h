// FFT long convolution: device functions shared by every back end.
//
// Written in the common subset of the Metal Shading Language, CUDA C++ and C++20. Everything that differs
// between them comes from the prelude pasted before this file (prelude_metal.h, prelude_cuda.h, prelude_cpu.h):
//   M2_FUNC              qualifiers of a device function
//   M2_TG, M2_GLOBAL,    address spaces of threadgroup memory, device memory and private (register) memory
//   M2_THREAD
//   M2_BARRIER()         threadgroup barrier over threadgroup memory
//   M2_UNROLL            full unroll of the next loop (register arrays are only indexed by unrolled counters)
//   M2_UNROLL_4,         unroll by 4, and no unrolling (where an unrolled copy would let the compiler keep each
//   M2_UNROLL_NONE       copy's addresses live: the split exchanges' loop over the two parts)
//   m2_f2(x, y)          makes a float2
// Kernel bodies also use M2_THREADGROUP_BUFFER(name, count) to declare their one float2 threadgroup array, and
// Metal's names for thread indices (thread_position_in_threadgroup, threadgroup_position_in_grid,
// threads_per_threadgroup), which the CUDA and C++ preludes map onto their own.
//
// The FFT is a Stockham transform of radix B = 16 or 8 (the plan's LOG_RADIX), with one stage of a smaller radix
// last, over rows held in threadgroup memory. Each thread keeps at most E complex values in registers between the
// two barriers of a stage, so a threadgroup of `nthreads` threads transforms up to E * nthreads values; the split
// kernel keeps them in registers throughout (see "Register-resident convolutions" below). Twiddle factors come
// from a host-side table (float64, rounded once), so every back end multiplies by the same numbers. The stage after
// sub-transforms of length ns = B^i reads block i of the table, tw[B (B^i - 1) / (B - 1) + r * ns + k] =
// exp(-2 pi i r k / (B ns)) for r < B, k < ns: adjacent threads (adjacent k) read adjacent entries.

struct m2c {
  float re;
  float im;
};

M2_FUNC m2c m2_cx(float re, float im) {
  m2c z;
  z.re = re;
  z.im = im;
  return z;
}

M2_FUNC m2c m2_add(m2c a, m2c b) {
  return m2_cx(a.re + b.re, a.im + b.im);
}

M2_FUNC m2c m2_sub(m2c a, m2c b) {
  return m2_cx(a.re - b.re, a.im - b.im);
}

M2_FUNC m2c m2_mul(m2c a, m2c b) {
  return m2_cx(a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re);
}

M2_FUNC m2c m2_conj(m2c a) {
  return m2_cx(a.re, -a.im);
}

// a * (-i)
M2_FUNC m2c m2_mul_neg_i(m2c a) {
  return m2_cx(a.im, -a.re);
}

// Threadgroup layout: with padding on (layout = log2 of the row length), one float2 is inserted every 16 values and
// one more after every row, which spreads over the banks both the strided accesses of the first radix stages and the
// accesses of adjacent threads to adjacent rows (channels); layout 0 is the plain dense layout.
M2_FUNC int m2_layout(int pad, int log_row) {
  return pad != 0 ? log_row : 0;
}

M2_FUNC int m2_slot(int i, int layout) {
  return layout != 0 ? i + (i >> 4) + (i >> layout) : i;
}

M2_FUNC m2c m2_tg_load(M2_TG float2* buf, int i, int layout) {
  float2 f = buf[m2_slot(i, layout)];
  return m2_cx(f.x, f.y);
}

M2_FUNC void m2_tg_store(M2_TG float2* buf, int i, int layout, m2c z) {
  buf[m2_slot(i, layout)] = m2_f2(z.re, z.im);
}

// Stores one real value into the real (part 0) or imaginary (part 1) half of a complex slot.
M2_FUNC void m2_tg_store_part(M2_TG float2* buf, int i, int layout, int part, float x) {
  if (part == 0) {
    buf[m2_slot(i, layout)].x = x;
  } else {
    buf[m2_slot(i, layout)].y = x;
  }
}

M2_FUNC m2c m2_load_complex(const M2_GLOBAL float* data, int i) {
  float2 f = reinterpret_cast<const M2_GLOBAL float2*>(data)[i];
  return m2_cx(f.x, f.y);
}

M2_FUNC void m2_store_complex(M2_GLOBAL float* data, int64_t i, m2c z) {
  reinterpret_cast<M2_GLOBAL float2*>(data)[i] = m2_f2(z.re, z.im);
}

// In-register DFTs of R values (forward sign), natural order in and out.
template <int R>
M2_FUNC void m2_dft(M2_THREAD m2c* v);

template <>
M2_FUNC void m2_dft<2>(M2_THREAD m2c* v) {
  m2c a = v[0];
  v[0] = m2_add(a, v[1]);
  v[1] = m2_sub(a, v[1]);
}

template <>
M2_FUNC void m2_dft<4>(M2_THREAD m2c* v) {
  m2c t0 = m2_add(v[0], v[2]);
  m2c t1 = m2_sub(v[0], v[2]);
  m2c t2 = m2_add(v[1], v[3]);
  m2c t3 = m2_mul_neg_i(m2_sub(v[1], v[3]));
  v[0] = m2_add(t0, t2);
  v[1] = m2_add(t1, t3);
  v[2] = m2_sub(t0, t2);
  v[3] = m2_sub(t1, t3);
}

template <>
M2_FUNC void m2_dft<8>(M2_THREAD m2c* v) {
  const float h = 0.70710678118654752f;
  m2c e[4];
  m2c o[4];
  M2_UNROLL for (int r = 0; r < 4; ++r) {
    e[r] = v[2 * r];
    o[r] = v[2 * r + 1];
  }
  m2_dft<4>(e);
  m2_dft<4>(o);
  // o[q] *= exp(-2 pi i q / 8)
  o[1] = m2_cx(h * (o[1].re + o[1].im), h * (o[1].im - o[1].re));
  o[2] = m2_mul_neg_i(o[2]);
  o[3] = m2_cx(h * (o[3].im - o[3].re), -h * (o[3].re + o[3].im));
  M2_UNROLL for (int q = 0; q < 4; ++q) {
    v[q] = m2_add(e[q], o[q]);
    v[q + 4] = m2_sub(e[q], o[q]);
  }
}

// Radix 16 as 4 x 4: DFTs of 4 over the stride-4 subsequences, twiddles exp(-2 pi i b k1 / 16), DFTs of 4 across.
template <>
M2_FUNC void m2_dft<16>(M2_THREAD m2c* v) {
  const float c = 0.92387953251128674f;  // cos(pi / 8)
  const float s = 0.38268343236508978f;  // sin(pi / 8)
  const float h = 0.70710678118654752f;
  m2c x[16];
  M2_UNROLL for (int b = 0; b < 4; ++b) {
    m2c y[4];
    M2_UNROLL for (int a = 0; a < 4; ++a) {
      y[a] = v[4 * a + b];
    }
    m2_dft<4>(y);
    M2_UNROLL for (int k1 = 0; k1 < 4; ++k1) {
      x[4 * k1 + b] = y[k1];
    }
  }
  // x[4 k1 + b] *= exp(-2 pi i b k1 / 16) for b k1 in {1, 2, 3, 4, 6, 9}
  x[5] = m2_mul(x[5], m2_cx(c, -s));
  x[6] = m2_mul(x[6], m2_cx(h, -h));
  x[7] = m2_mul(x[7], m2_cx(s, -c));
  x[9] = m2_mul(x[9], m2_cx(h, -h));
  x[10] = m2_mul_neg_i(x[10]);
  x[11] = m2_mul(x[11], m2_cx(-h, -h));
  x[13] = m2_mul(x[13], m2_cx(s, -c));
  x[14] = m2_mul(x[14], m2_cx(-h, -h));
  x[15] = m2_mul(x[15], m2_cx(-c, s));
  M2_UNROLL for (int k1 = 0; k1 < 4; ++k1) {
    m2_dft<4>(x + 4 * k1);
    M2_UNROLL for (int k2 = 0; k2 < 4; ++k2) {
      v[k1 + 4 * k2] = x[4 * k1 + k2];
    }
  }
}

// One butterfly of a Stockham stage of radix R = 2^LOG_R whose sub-transforms of length 2^log_ns (a power of
// B = 2^LOG_B) are done, on the R values v of its position k < 2^log_ns: twiddle exp(-2 pi i r k / (R ns)), entry
// (B / R) r of the stage's block (the first stage, ns = 1, has none), then the DFT of R.
template <int LOG_R, int LOG_B>
M2_FUNC void m2_butterfly(M2_THREAD m2c* v, int k, int log_ns, const M2_GLOBAL float* tw) {
  const int B = 1 << LOG_B;
  if (log_ns != 0) {
    const int tw_block = B * ((1 << log_ns) - 1) / (B - 1);
    M2_UNROLL for (int r = 1; r < (1 << LOG_R); ++r) {
      v[r] = m2_mul(v[r], m2_load_complex(tw, tw_block + ((r << (LOG_B - LOG_R)) << log_ns) + k));
    }
  }
  m2_dft<1 << LOG_R>(v);
}

// One Stockham stage of radix R = 2^LOG_R over `total` values forming rows of length 2^log_n, with sub-transforms
// of length 2^log_ns done (m2_butterfly). Reads every value into registers, then writes every value: the two
// barriers make the stage safe in place.
template <int LOG_R, int LOG_B, int E>
M2_FUNC void m2_fft_stage(
    M2_TG float2* buf,
    int log_n,
    int total,
    int log_ns,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int R = 1 << LOG_R;
  const int log_m = log_n - LOG_R;
  const int butterflies = total >> LOG_R;
  m2c v[E];
  M2_UNROLL for (int i = 0; i < E / R; ++i) {
    const int w = tid + i * nthreads;
    if (w < butterflies) {
      const int base = (w >> log_m) << log_n;
      const int j = w & ((1 << log_m) - 1);
      M2_UNROLL for (int r = 0; r < R; ++r) {
        v[i * R + r] = m2_tg_load(buf, base + j + (r << log_m), layout);
      }
      m2_butterfly<LOG_R, LOG_B>(v + i * R, j & ((1 << log_ns) - 1), log_ns, tw);
    }
  }
  M2_BARRIER();
  M2_UNROLL for (int i = 0; i < E / R; ++i) {
    const int w = tid + i * nthreads;
    if (w < butterflies) {
      const int base = (w >> log_m) << log_n;
      const int j = w & ((1 << log_m) - 1);
      const int k = j & ((1 << log_ns) - 1);
      const int out = base + ((j >> log_ns) << (log_ns + LOG_R)) + k;
      M2_UNROLL for (int r = 0; r < R; ++r) {
        m2_tg_store(buf, out + (r << log_ns), layout, v[i * R + r]);
      }
    }
  }
  M2_BARRIER();
}

template <int E, int LOG_B>
M2_FUNC void m2_fft_rows_radix(
    M2_TG float2* buf,
    int log_n,
    int total,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  // log_n is a compile-time constant in every GPU kernel body: unrolled, each stage's index arithmetic is constant.
  M2_UNROLL for (int s = 0; s < log_n / LOG_B; ++s) {
    m2_fft_stage<LOG_B, LOG_B, E>(buf, log_n, total, LOG_B * s, tw, tid, nthreads, layout);
  }
  const int log_ns = log_n - log_n % LOG_B;
  if (log_n - log_ns == 3) {
    m2_fft_stage<3, LOG_B, E>(buf, log_n, total, log_ns, tw, tid, nthreads, layout);
  } else if (log_n - log_ns == 2) {
    m2_fft_stage<2, LOG_B, E>(buf, log_n, total, log_ns, tw, tid, nthreads, layout);
  } else if (log_n - log_ns == 1) {
    m2_fft_stage<1, LOG_B, E>(buf, log_n, total, log_ns, tw, tid, nthreads, layout);
  }
}

// Forward FFT of every row (length 2^log_n) of the `total` values in buf, in stages of radix 2^log_radix (3 or 4;
// 4 needs E >= 16). The caller puts a barrier between filling buf and this call; the result is visible to all
// threads on return. log_radix is a compile-time constant on the GPUs, so only one branch is compiled there.
template <int E>
M2_FUNC void m2_fft_rows(
    M2_TG float2* buf,
    int log_radix,
    int log_n,
    int total,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  if (log_radix == 4 && E >= 16) {
    m2_fft_rows_radix<E, 4>(buf, log_n, total, tw, tid, nthreads, layout);
  } else {
    m2_fft_rows_radix<E, 3>(buf, log_n, total, tw, tid, nthreads, layout);
  }
}

// The spectral product of two real rows c, d packed as z = u_c + i u_d, with Z = FFT(z).
// For bins k and k' = N - k (k <= k'), a = Z[k], b = Z[k'] and the packed filter (G, F) of bin k, where
// G = (H_c + H_d) / 2N and F = (H_c - H_d) / 2N, the output spectrum W = FFT(y_c + i y_d) / N is
//   W[k] = a G + conj(b) F,   W[k'] = b conj(G) + conj(a) conj(F).
// The kernels store conj(W): a forward FFT of it is conj(y_c + i y_d), so no inverse transform is needed.
M2_FUNC m2c m2_product_at_k(m2c a, m2c b, m2c g, m2c f) {
  return m2_add(m2_mul(m2_conj(a), m2_conj(g)), m2_mul(b, m2_conj(f)));
}

M2_FUNC m2c m2_product_at_partner(m2c a, m2c b, m2c g, m2c f) {
  return m2_add(m2_mul(m2_conj(b), g), m2_mul(a, f));
}

// Applies the spectral product to the pair of bins held at buffer slots e (bin k) and ep (bin k' = N - k), with the
// packed filter gf = (G.re, G.im, F.re, F.im) of bin k.
M2_FUNC void m2_spectral_product(M2_TG float2* buf, int e, int ep, int layout, float4 gf) {
  const m2c g = m2_cx(gf.x, gf.y);
  const m2c f = m2_cx(gf.z, gf.w);
  const m2c a = m2_tg_load(buf, e, layout);
  const m2c b = m2_tg_load(buf, ep, layout);
  m2_tg_store(buf, e, layout, m2_product_at_k(a, b, g, f));
  if (ep != e) {
    m2_tg_store(buf, ep, layout, m2_product_at_partner(a, b, g, f));
  }
}

M2_FUNC float4 m2_load_float4(const M2_GLOBAL float* data, int i) {
  return reinterpret_cast<const M2_GLOBAL float4*>(data)[i];
}

// The packed filter of FFT row `pair` at entry i of its spectrum: the long convolution's, or with `mixer` set, the
// mixer's (long_conv.h's mixer rows): even pairs take `spectrum`, odd pairs `residual`, each by channel pair.
M2_FUNC float4 m2_row_filter(
    const M2_GLOBAL float* spectrum,
    const M2_GLOBAL float* residual,
    int mixer,
    int pair,
    int pair_entries,
    int i) {
  const M2_GLOBAL float* filter = mixer != 0 && (pair & 1) != 0 ? residual : spectrum;
  const int row = mixer != 0 ? pair >> 1 : pair;
  return m2_load_float4(filter, row * pair_entries + i);
}

// The single-pass convolution of the 2^log_p rows of length n = 2^log_n in buf (rows of pairs pair0 + row, up to
// `pairs`), from the filled buffer to conj(y_c + i y_d) in it: FFT, spectral product (filters as m2_row_filter
// reads them), FFT. The caller's barrier after filling buf is this function's first statement; the result is
// visible to all threads on return.
template <int E>
M2_FUNC void m2_convolve_rows(
    M2_TG float2* buf,
    int log_radix,
    int log_n,
    int log_p,
    int pair0,
    int pairs,
    const M2_GLOBAL float* spectrum,
    const M2_GLOBAL float* residual,
    int mixer,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int n = 1 << log_n;
  const int total = n << log_p;
  M2_BARRIER();
  m2_fft_rows<E>(buf, log_radix, log_n, total, tw, tid, nthreads, layout);
  M2_UNROLL_4 for (int s = 0; s < E; ++s) {
    const int e = tid + s * nthreads;
    if (e < total) {
      const int row = e >> log_n;
      const int k = e & (n - 1);
      const int kp = (n - k) & (n - 1);
      if (k <= kp && pair0 + row < pairs) {
        const float4 gf = m2_row_filter(spectrum, residual, mixer, pair0 + row, (n >> 1) + 1, k);
        m2_spectral_product(buf, e, e - k + kp, layout, gf);
      }
    }
  }
  M2_BARRIER();
  m2_fft_rows<E>(buf, log_radix, log_n, total, tw, tid, nthreads, layout);
}

// Register-resident convolutions ("split" tiles). A thread keeps its E values in registers from the load to the
// store, and threadgroup memory only carries values between threads, one part at a time (all real parts, then all
// imaginary parts): a threadgroup convolves twice the values its memory holds as complex numbers (on Metal, one row
// of N = 8192 in 32 KB; long_conv_single_pass_split.inc, the long convolution only). The buffer is a float array of
// the rows' values (m2_slot layout); total = E * nthreads.
//
// An arrangement says which value index register slot s of a thread holds: the inputs of a Stockham stage of radix
// 2^LOG_R (STAGE_IN), its outputs after sub-transforms of 2^log_ns (STAGE_OUT), or the bin pairs of the spectral
// product (BINS: slots 2i and 2i + 1 hold bins p and N - p, or 0 and N / 2 for p = 0, of pair q = tid + i nthreads
// of the rows). The outputs of a row's last stage are in natural order at their STAGE_IN indices of the same radix.
#define M2_STAGE_IN 0
#define M2_STAGE_OUT 1
#define M2_BINS 2

template <int KIND, int LOG_R>
M2_FUNC int m2_arranged_index(int s, int log_n, int log_ns, int tid, int nthreads) {
  if (KIND == M2_BINS) {
    const int q = tid + (s >> 1) * nthreads;
    const int mid = 1 << (log_n - 1);
    const int p = q & (mid - 1);
    const int base = (q >> (log_n - 1)) << log_n;
    return base + ((s & 1) == 0 ? p : (p == 0 ? mid : 2 * mid - p));
  }
  const int w = tid + (s >> LOG_R) * nthreads;
  const int r = s & ((1 << LOG_R) - 1);
  const int log_m = log_n - LOG_R;
  const int base = (w >> log_m) << log_n;
  const int j = w & ((1 << log_m) - 1);
  if (KIND == M2_STAGE_IN) {
    return base + j + (r << log_m);
  }
  return base + ((j >> log_ns) << (log_ns + LOG_R)) + (j & ((1 << log_ns) - 1)) + (r << log_ns);
}

// Writes part `part` (0: real, 1: imaginary) of every register value at its index in the arrangement.
template <int KIND, int LOG_R, int E>
M2_FUNC void m2_split_put(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int part,
    int log_n,
    int log_ns,
    int tid,
    int nthreads,
    int layout) {
  M2_UNROLL for (int s = 0; s < E; ++s) {
    buf[m2_slot(m2_arranged_index<KIND, LOG_R>(s, log_n, log_ns, tid, nthreads), layout)] =
        part == 0 ? v[s].re : v[s].im;
  }
}

// Reads part `part` of every register value from its index in the arrangement; the other part keeps its value, so
// that the values of the previous arrangement can still put it.
template <int KIND, int LOG_R, int E>
M2_FUNC void m2_split_get(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int part,
    int log_n,
    int log_ns,
    int tid,
    int nthreads,
    int layout) {
  M2_UNROLL for (int s = 0; s < E; ++s) {
    const float x = buf[m2_slot(m2_arranged_index<KIND, LOG_R>(s, log_n, log_ns, tid, nthreads), layout)];
    if (part == 0) {
      v[s].re = x;
    } else {
      v[s].im = x;
    }
  }
}

// Moves the register values from arrangement OUT to arrangement IN, one part at a time. The caller has put a
// barrier after the buffer's last read; the exchange ends with one.
template <int KIND_OUT, int LOG_R_OUT, int KIND_IN, int LOG_R_IN, int E>
M2_FUNC void m2_split_exchange(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int log_n,
    int log_ns_out,
    int log_ns_in,
    int tid,
    int nthreads,
    int layout) {
  M2_UNROLL_NONE for (int part = 0; part < 2; ++part) {
    m2_split_put<KIND_OUT, LOG_R_OUT, E>(buf, v, part, log_n, log_ns_out, tid, nthreads, layout);
    M2_BARRIER();
    m2_split_get<KIND_IN, LOG_R_IN, E>(buf, v, part, log_n, log_ns_in, tid, nthreads, layout);
    M2_BARRIER();
  }
}

// One Stockham stage on the register values, in the stage's STAGE_IN arrangement.
template <int LOG_R, int LOG_B, int E>
M2_FUNC void m2_split_stage(M2_THREAD m2c* v, int log_n, int log_ns, const M2_GLOBAL float* tw, int tid, int nthreads) {
  const int log_m = log_n - LOG_R;
  M2_UNROLL for (int i = 0; i < (E >> LOG_R); ++i) {
    const int w = tid + i * nthreads;
    m2_butterfly<LOG_R, LOG_B>(v + (i << LOG_R), w & ((1 << log_m) - 1) & ((1 << log_ns) - 1), log_ns, tw);
  }
}

// Forward FFT of every row (2^log_n >= 2^LOG_B values) in registers: from the first stage's STAGE_IN arrangement
// (radix 2^LOG_B) to the last stage's outputs, which m2_split_put_spectrum writes.
template <int E, int LOG_B>
M2_FUNC void m2_split_fft(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int log_n,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int stages = log_n / LOG_B;
  M2_UNROLL for (int s = 0; s < stages; ++s) {
    if (s > 0) {
      m2_split_exchange<M2_STAGE_OUT, LOG_B, M2_STAGE_IN, LOG_B, E>(
          buf, v, log_n, LOG_B * (s - 1), LOG_B * s, tid, nthreads, layout);
    }
    m2_split_stage<LOG_B, LOG_B, E>(v, log_n, LOG_B * s, tw, tid, nthreads);
  }
  const int log_ns = LOG_B * stages;
  if (log_n - log_ns == 3) {
    m2_split_exchange<M2_STAGE_OUT, LOG_B, M2_STAGE_IN, 3, E>(
        buf, v, log_n, log_ns - LOG_B, log_ns, tid, nthreads, layout);
    m2_split_stage<3, LOG_B, E>(v, log_n, log_ns, tw, tid, nthreads);
  } else if (log_n - log_ns == 2) {
    m2_split_exchange<M2_STAGE_OUT, LOG_B, M2_STAGE_IN, 2, E>(
        buf, v, log_n, log_ns - LOG_B, log_ns, tid, nthreads, layout);
    m2_split_stage<2, LOG_B, E>(v, log_n, log_ns, tw, tid, nthreads);
  } else if (log_n - log_ns == 1) {
    m2_split_exchange<M2_STAGE_OUT, LOG_B, M2_STAGE_IN, 1, E>(
        buf, v, log_n, log_ns - LOG_B, log_ns, tid, nthreads, layout);
    m2_split_stage<1, LOG_B, E>(v, log_n, log_ns, tw, tid, nthreads);
  }
}

// Writes part `part` of the values an m2_split_fft left in registers at their natural-order indices.
template <int E, int LOG_B>
M2_FUNC void m2_split_put_spectrum(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int part,
    int log_n,
    int tid,
    int nthreads,
    int layout) {
  const int tail = log_n % LOG_B;
  if (tail == 3) {
    m2_split_put<M2_STAGE_IN, 3, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  } else if (tail == 2) {
    m2_split_put<M2_STAGE_IN, 2, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  } else if (tail == 1) {
    m2_split_put<M2_STAGE_IN, 1, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  } else {
    m2_split_put<M2_STAGE_IN, LOG_B, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  }
}

// m2_convolve_rows on register values in the first stage's STAGE_IN arrangement: FFT, spectral product in the BINS
// arrangement, FFT; the result, conj(y_c + i y_d), is left for m2_split_put_spectrum.
template <int E, int LOG_B>
M2_FUNC void m2_split_convolve_rows_radix(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int log_n,
    int pair0,
    int pairs,
    const M2_GLOBAL float* spectrum,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int mid = 1 << (log_n - 1);
  m2_split_fft<E, LOG_B>(buf, v, log_n, tw, tid, nthreads, layout);
  M2_UNROLL_NONE for (int part = 0; part < 2; ++part) {
    m2_split_put_spectrum<E, LOG_B>(buf, v, part, log_n, tid, nthreads, layout);
    M2_BARRIER();
    m2_split_get<M2_BINS, 1, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
    M2_BARRIER();
  }
  M2_UNROLL for (int i = 0; i < E / 2; ++i) {
    const int q = tid + i * nthreads;
    const int row = q >> (log_n - 1);
    const int p = q & (mid - 1);
    if (pair0 + row < pairs) {
      const float4 gf = m2_load_float4(spectrum, (pair0 + row) * (mid + 1) + p);
      const m2c g = m2_cx(gf.x, gf.y);
      const m2c f = m2_cx(gf.z, gf.w);
      const m2c a = v[2 * i];
      const m2c b = v[2 * i + 1];
      if (p == 0) {
        // Bins 0 and N / 2, each its own partner.
        const float4 gh = m2_load_float4(spectrum, (pair0 + row) * (mid + 1) + mid);
        v[2 * i] = m2_product_at_k(a, a, g, f);
        v[2 * i + 1] = m2_product_at_k(b, b, m2_cx(gh.x, gh.y), m2_cx(gh.z, gh.w));
      } else {
        v[2 * i] = m2_product_at_k(a, b, g, f);
        v[2 * i + 1] = m2_product_at_partner(a, b, g, f);
      }
    }
  }
  m2_split_exchange<M2_BINS, 1, M2_STAGE_IN, LOG_B, E>(buf, v, log_n, 0, 0, tid, nthreads, layout);
  m2_split_fft<E, LOG_B>(buf, v, log_n, tw, tid, nthreads, layout);
}

// The split kernel's entry points, radix 2^log_radix (3 or 4, 4 needs E >= 16; a compile-time constant on the GPUs):
// the load's arrangement, the convolution, and the store's.
template <int E>
M2_FUNC void m2_split_get_rows(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int part,
    int log_radix,
    int log_n,
    int tid,
    int nthreads,
    int layout) {
  if (log_radix == 4 && E >= 16) {
    m2_split_get<M2_STAGE_IN, 4, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  } else {
    m2_split_get<M2_STAGE_IN, 3, E>(buf, v, part, log_n, 0, tid, nthreads, layout);
  }
}

template <int E>
M2_FUNC void m2_split_convolve_rows(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int log_radix,
    int log_n,
    int pair0,
    int pairs,
    const M2_GLOBAL float* spectrum,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  if (log_radix == 4 && E >= 16) {
    m2_split_convolve_rows_radix<E, 4>(buf, v, log_n, pair0, pairs, spectrum, tw, tid, nthreads, layout);
  } else {
    m2_split_convolve_rows_radix<E, 3>(buf, v, log_n, pair0, pairs, spectrum, tw, tid, nthreads, layout);
  }
}

template <int E>
M2_FUNC void m2_split_put_rows(
    M2_TG float* buf,
    M2_THREAD m2c* v,
    int part,
    int log_radix,
    int log_n,
    int tid,
    int nthreads,
    int layout) {
  if (log_radix == 4 && E >= 16) {
    m2_split_put_spectrum<E, 4>(buf, v, part, log_n, tid, nthreads, layout);
  } else {
    m2_split_put_spectrum<E, 3>(buf, v, part, log_n, tid, nthreads, layout);
  }
}

// Four-step pass 1, after the columns are loaded: the length-N1 FFTs, then element i = (pair, k1, q), q fastest,
// times exp(-2 pi i n2 k1 / N) into scratch[b, pair, k1, n2]: each (pair, k1) writes Q adjacent complex values.
template <int E>
M2_FUNC void m2_columns_forward(
    M2_TG float2* buf,
    M2_GLOBAL float* scratch,
    int log_radix,
    int log_n1,
    int log_n2,
    int log_p,
    int log_q,
    int tw_n,
    int pair0,
    int col0,
    int b,
    int pairs,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int total = 1 << (log_p + log_q + log_n1);
  M2_BARRIER();
  m2_fft_rows<E>(buf, log_radix, log_n1, total, tw, tid, nthreads, layout);
  M2_UNROLL_4 for (int s = 0; s < E; ++s) {
    const int i = tid + s * nthreads;
    const int p = i >> (log_q + log_n1);
    if (i < total && pair0 + p < pairs) {
      const int q = i & ((1 << log_q) - 1);
      const int k1 = (i >> log_q) & ((1 << log_n1) - 1);
      const int n2 = col0 + q;
      const m2c z = m2_tg_load(buf, (((p << log_q) + q) << log_n1) + k1, layout);
      const m2c w = m2_load_complex(tw, tw_n + n2 * k1);
      const int64_t row = (static_cast<int64_t>(b) * pairs + pair0 + p) << log_n1;
      m2_store_complex(scratch, ((row + k1) << log_n2) + n2, m2_mul(z, w));
    }
  }
}

// Four-step pass 3, up to its output: loads scratch[b, pair, k1, n2] of the group's pairs and columns and runs the
// length-N1 FFTs over k1; value n1 of row (pair, q) is then conj(y_c + i y_d) at t = n1 N2 + n2, visible to all.
template <int E>
M2_FUNC void m2_columns_inverse(
    M2_TG float2* buf,
    const M2_GLOBAL float* scratch,
    int log_radix,
    int log_n1,
    int log_n2,
    int log_p,
    int log_q,
    int pair0,
    int col0,
    int b,
    int pairs,
    const M2_GLOBAL float* tw,
    int tid,
    int nthreads,
    int layout) {
  const int total = 1 << (log_p + log_q + log_n1);
  M2_UNROLL_4 for (int s = 0; s < E; ++s) {
    const int i = tid + s * nthreads;
    if (i < total) {
      const int q = i & ((1 << log_q) - 1);
      const int k1 = (i >> log_q) & ((1 << log_n1) - 1);
      const int p = i >> (log_q + log_n1);
      m2c z = m2_cx(0.0f, 0.0f);
      if (pair0 + p < pairs) {
        const int64_t row = (static_cast<int64_t>(b) * pairs + pair0 + p) << log_n1;
        z = m2_load_complex(scratch, ((row + k1) << log_n2) + col0 + q);
      }
      m2_tg_store(buf, (((p << log_q) + q) << log_n1) + k1, layout, z);
    }
  }
  M2_BARRIER();
  m2_fft_rows<E>(buf, log_radix, log_n1, total, tw, tid, nthreads, layout);
}

// The Monarch mixer kernels convolve two inputs of C channels at once, as rows of 2C "mixer channels": for the
// channel pair j (channels 2j, 2j+1), mixer pair 2j holds the gated v * x1 of the pair and mixer pair 2j + 1 the
// layer input u, so a threadgroup of 2^LOG_P >= 2 mixer pairs holds both rows of 2^(LOG_P - 1) channel pairs.
// Mixer channel m is channel 2 (m >> 2) + (m & 1) of input (m >> 1) & 1 (0: v * x1, 1: u).
M2_FUNC int m2_mixer_channel(int m) {
  return ((m >> 2) << 1) + (m & 1);
}

// One causal short-conv output (Conv1d k=3, padding 2, first L kept) at step t: w0 x[t-2] + w1 x[t-1] + w2 x[t] + b,
// with w = (w0, w1, w2, b) and x[t] at z[at], x[t-1] at z[at - step]. Z, the type of z here and below, is a pointer
// of either address space MLX gives an input: constant where it has fewer than 8 elements (B L 3C < 8), else device.
template <typename Z>
M2_FUNC float m2_short_conv(Z z, int64_t at, int64_t step, int t, float4 w) {
  float x = 0.0f;
  if (t >= 2) {
    x = w.x * static_cast<float>(z[at - 2 * step]);
  }
  if (t >= 1) {
    x += w.y * static_cast<float>(z[at - step]);
  }
  return x + w.z * static_cast<float>(z[at]) + w.w;
}

// The gated value v * x1 of channel c at step t, from in_linear's output z (B, L, 3C) = (x1, x2, v): `at` is the
// offset of z[b, t, 0], `step` and `col` its time and channel strides; short_conv holds (w0, w1, w2, b) per z channel.
template <typename Z>
M2_FUNC float m2_gated_input(
    Z z,
    int64_t at,
    int64_t step,
    int64_t col,
    int t,
    int c,
    int channels,
    const M2_GLOBAL float* short_conv) {
  const float x1 = m2_short_conv(z, at + c * col, step, t, m2_load_float4(short_conv, c));
  const int cv = 2 * channels + c;
  return m2_short_conv(z, at + cv * col, step, t, m2_load_float4(short_conv, cv)) * x1;
}

// The mixer's output at (t, c) from its two convolutions: conv(v * x1) * x2 + conv(u), x2 the short conv of z's
// channel C + c, and conv_v, conv_u the stored conj(y_c + i y_d) of the pair (part: 0 for channel c = 2j, else 1).
template <typename Z>
M2_FUNC float m2_mixer_output(
    Z z,
    int64_t at,
    int64_t step,
    int64_t col,
    int t,
    int c,
    int channels,
    const M2_GLOBAL float* short_conv,
    m2c conv_v,
    m2c conv_u,
    int part) {
  const float x2 = m2_short_conv(z, at + (channels + c) * col, step, t, m2_load_float4(short_conv, channels + c));
  const float yv = part != 0 ? -conv_v.im : conv_v.re;
  const float yu = part != 0 ? -conv_u.im : conv_u.re;
  return yv * x2 + yu;
}
