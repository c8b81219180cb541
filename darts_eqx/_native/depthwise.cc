// Depthwise 2D convolution of one NHWC input by E kernels (one per edge), for XLA:CPU through
// the XLA FFI: forward, input gradient and kernel gradient.
//
//   x [B, H, W, C], k [E, K, K, C] -> y [E, B, Ho, Wo, C]
//   y[e, b, ho, wo, c] = sum_ij x[b, ho*s + i*d - p, wo*s + j*d - p, c] * k[e, i, j, c]
//
// XLA:CPU's grouped convolution runs 5-10x below its dense one; these loops stream rows of
// Wo*C contiguous floats (stride 1), which the compiler vectorises for any channel count. Every
// output element is summed in a fixed order whatever the thread count, so results are
// reproducible run to run. Built on first use by darts_eqx/_native.py.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t B, H, W, C, E, K, Ho, Wo, s, p, d;
  // Output columns [lo, hi) whose tap at column offset `off` lands inside the input.
  void columns(int64_t off, int64_t* lo, int64_t* hi) const {
    int64_t l = off >= 0 ? 0 : (-off + s - 1) / s;
    int64_t h = (W - 1 - off) < 0 ? 0 : (W - 1 - off) / s + 1;
    *lo = l;
    *hi = std::min(h, Wo);
  }
};

// Runs fn(item) for every item in [0, n) on the calling thread and up to num_threads - 1 threads
// of XLA's intra-op pool. Items are claimed from a shared counter, so the caller never waits on an
// item nobody has started (no deadlock when the pool is busy): a helper that starts late finds
// nothing left and touches only the shared counters, which it keeps alive.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& fn) {
  const int64_t workers = std::min<int64_t>(pool.num_threads(), n);
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const F* body = &fn;
  auto work = [counters, body, n]() {
    for (int64_t i; (i = counters->next.fetch_add(1)) < n;) {
      (*body)(i);
      counters->done.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < workers; ++t) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load() < n) std::this_thread::yield();
}

// k[e, i, j, :] repeated across `columns` columns: a row the stride-1 loops multiply elementwise.
std::vector<float> tiled_kernels(const float* k, const Geometry& g, int64_t columns) {
  std::vector<float> t(g.E * g.K * g.K * columns * g.C);
  for (int64_t tap = 0; tap < g.E * g.K * g.K; ++tap)
    for (int64_t w = 0; w < columns; ++w) std::memcpy(&t[(tap * columns + w) * g.C], k + tap * g.C, g.C * sizeof(float));
  return t;
}

// out[n] (+)= sum_t a[t][n] * b[t][n] for n in [0, len). Blocks of 64 outputs are summed in
// registers over all terms, so a product costs two loads (row after row it costs three and a
// store); the terms are added in their given order, the same on every run.
void sum_of_products(float* out, int64_t len, const float* const* a, const float* const* b, int64_t terms,
                     bool accumulate) {
  typedef float v16 __attribute__((vector_size(64)));  // GCC/Clang vectors: AVX-512, or pairs of AVX2
  constexpr int64_t V = 4, L = 16 * V;
  auto load = [](const float* p) {
    v16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  int64_t n = 0;
  for (; n + L <= len; n += L) {
    v16 acc[V];
    for (int64_t u = 0; u < V; ++u) acc[u] = accumulate ? load(out + n + 16 * u) : v16{};
    for (int64_t t = 0; t < terms; ++t) {
      const float* ap = a[t] + n;
      const float* bp = b[t] + n;
      for (int64_t u = 0; u < V; ++u) acc[u] += load(ap + 16 * u) * load(bp + 16 * u);
    }
    for (int64_t u = 0; u < V; ++u) std::memcpy(out + n + 16 * u, &acc[u], sizeof(v16));
  }
  if (n < len) {
    const int64_t r = len - n;
    float acc[L];
    for (int64_t v = 0; v < r; ++v) acc[v] = accumulate ? out[n + v] : 0.0f;
    for (int64_t t = 0; t < terms; ++t)
      for (int64_t v = 0; v < r; ++v) acc[v] += a[t][n + v] * b[t][n + v];
    for (int64_t v = 0; v < r; ++v) out[n + v] = acc[v];
  }
}

// One [H, W, C] image inside a zero border of `pad` pixels: [H + 2 pad, W + 2 pad, C].
void pad_image(const float* src, int64_t H, int64_t W, int64_t C, int64_t pad, std::vector<float>& dst) {
  const int64_t wp = W + 2 * pad;
  dst.assign((H + 2 * pad) * wp * C, 0.0f);
  for (int64_t h = 0; h < H; ++h) std::memcpy(&dst[((h + pad) * wp + pad) * C], src + h * W * C, W * C * sizeof(float));
}

Geometry geometry(const int64_t* xd, const int64_t* kd, int64_t s, int64_t p, int64_t d) {
  Geometry g{xd[0], xd[1], xd[2], xd[3], kd[0], kd[1], 0, 0, s, p, d};
  g.Ho = (g.H + 2 * p - d * (g.K - 1) - 1) / s + 1;
  g.Wo = (g.W + 2 * p - d * (g.K - 1) - 1) / s + 1;
  return g;
}

// The general (stride 2, or wide padding) paths: calls fn(i, j, hi, off, lo, hi_) for each tap
// (i, j) of output row `ho` whose input row `hi` lies in the image, with the output columns
// [lo, hi_) whose input column wo * s + off does too.
template <class F>
void for_each_tap(const Geometry& g, int64_t ho, const F& fn) {
  for (int64_t i = 0; i < g.K; ++i) {
    const int64_t hi = ho * g.s + i * g.d - g.p;
    if (hi < 0 || hi >= g.H) continue;
    for (int64_t j = 0; j < g.K; ++j) {
      const int64_t off = j * g.d - g.p;
      int64_t lo, hi_;
      g.columns(off, &lo, &hi_);
      fn(i, j, hi, off, lo, hi_);
    }
  }
}

// Stride-1 forms: each image (or cotangent) is first copied into a zero border, so every tap
// covers a whole output row and a row is one `sum_of_products` over the taps.

void forward_stride1(ffi::ThreadPool& pool, const Geometry& g, const float* xp, const float* kp, float* yp) {
  const int64_t row = g.Wo * g.C, wp = g.W + 2 * g.p, taps = g.K * g.K;
  std::vector<float> tiles = tiled_kernels(kp, g, g.Wo);
  parallel_for(pool, g.B, [&](int64_t b) {
    std::vector<float> image;
    pad_image(xp + b * g.H * g.W * g.C, g.H, g.W, g.C, g.p, image);
    std::vector<const float*> a(taps), k(taps);
    for (int64_t e = 0; e < g.E; ++e)
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t i = t / g.K, j = t % g.K;
          a[t] = image.data() + ((ho + i * g.d) * wp + j * g.d) * g.C;
          k[t] = tiles.data() + (e * taps + t) * row;
        }
        sum_of_products(yp + ((e * g.B + b) * g.Ho + ho) * row, row, a.data(), k.data(), taps, false);
      }
  });
}

// dx[h, w] = sum over edges and taps of dy[e, h + p - i d, w + p - j d] k[e, i, j]: with the
// cotangent in a border of q = d (K - 1) - p (so this form needs p <= d (K - 1)), a gather.
void input_gradient_stride1(ffi::ThreadPool& pool, const Geometry& g, const float* kp, const float* gp, float* xp) {
  const int64_t q = g.d * (g.K - 1) - g.p, wq = g.Wo + 2 * q, taps = g.K * g.K;
  std::vector<float> tiles = tiled_kernels(kp, g, g.W);
  parallel_for(pool, g.B, [&](int64_t b) {
    std::vector<std::vector<float>> padded(g.E);
    for (int64_t e = 0; e < g.E; ++e) pad_image(gp + (e * g.B + b) * g.Ho * g.Wo * g.C, g.Ho, g.Wo, g.C, q, padded[e]);
    std::vector<const float*> a(g.E * taps), k(g.E * taps);
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t e = 0; e < g.E; ++e)
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t i = t / g.K, j = t % g.K;
          a[e * taps + t] = padded[e].data() + ((h + (g.K - 1 - i) * g.d) * wq + (g.K - 1 - j) * g.d) * g.C;
          k[e * taps + t] = tiles.data() + (e * taps + t) * g.W * g.C;
        }
      sum_of_products(xp + (b * g.H + h) * g.W * g.C, g.W * g.C, a.data(), k.data(), g.E * taps, false);
    }
  });
}

// Per edge and fixed block of images, per tap, the products summed over output rows in one
// `sum_of_products` (terms: the rows); blocks are added in a fixed order by the caller.
void kernel_gradient_stride1(ffi::ThreadPool& pool, const Geometry& g, const float* xp, const float* gp,
                             int64_t blocks, float* partial) {
  const int64_t row = g.Wo * g.C, wp = g.W + 2 * g.p, taps = g.K * g.K;
  parallel_for(pool, g.E * blocks, [&](int64_t item) {
    const int64_t e = item / blocks, block = item % blocks;
    std::vector<float> image;
    std::vector<const float*> a(g.Ho), d(g.Ho);
    for (int64_t b = block * g.B / blocks; b < (block + 1) * g.B / blocks; ++b) {
      pad_image(xp + b * g.H * g.W * g.C, g.H, g.W, g.C, g.p, image);
      for (int64_t ho = 0; ho < g.Ho; ++ho) d[ho] = gp + ((e * g.B + b) * g.Ho + ho) * row;
      for (int64_t t = 0; t < taps; ++t) {
        const int64_t i = t / g.K, j = t % g.K;
        for (int64_t ho = 0; ho < g.Ho; ++ho) a[ho] = image.data() + ((ho + i * g.d) * wp + j * g.d) * g.C;
        sum_of_products(partial + (item * taps + t) * row, row, a.data(), d.data(), g.Ho, true);
      }
    }
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                   ffi::ResultBuffer<ffi::F32> y, int64_t stride, int64_t padding, int64_t dilation) {
  Geometry g = geometry(x.dimensions().begin(), k.dimensions().begin(), stride, padding, dilation);
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  if (g.s == 1) {
    forward_stride1(pool, g, xp, kp, yp);
    return ffi::Error::Success();
  }
  // Stride 2 (reduction cells): direct loops over the taps that land inside the image.
  const int64_t row = g.Wo * g.C;
  parallel_for(pool, g.E * g.B, [&](int64_t item) {
    const int64_t e = item / g.B, b = item % g.B;
    for (int64_t ho = 0; ho < g.Ho; ++ho) {
      float* __restrict__ out = yp + ((e * g.B + b) * g.Ho + ho) * row;
      std::fill(out, out + row, 0.0f);
      for_each_tap(g, ho, [&](int64_t i, int64_t j, int64_t hi, int64_t off, int64_t lo, int64_t hi_) {
        const float* xrow = xp + (b * g.H + hi) * g.W * g.C;
        const float* __restrict__ kk = kp + ((e * g.K + i) * g.K + j) * g.C;
        for (int64_t wo = lo; wo < hi_; ++wo) {
          const float* __restrict__ xs = xrow + (wo * g.s + off) * g.C;
          for (int64_t c = 0; c < g.C; ++c) out[wo * g.C + c] += xs[c] * kk[c];
        }
      });
    }
  });
  return ffi::Error::Success();
}

ffi::Error InputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> dy,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t stride, int64_t padding, int64_t dilation) {
  auto dxd = dx->dimensions();
  Geometry g = geometry(dxd.begin(), k.dimensions().begin(), stride, padding, dilation);
  const float* kp = k.typed_data();
  const float* gp = dy.typed_data();
  float* xp = dx->typed_data();
  if (g.s == 1 && g.p <= g.d * (g.K - 1)) {
    input_gradient_stride1(pool, g, kp, gp, xp);
    return ffi::Error::Success();
  }
  const int64_t row = g.Wo * g.C;
  // One item per image: every edge's cotangent scatters into the same input gradient.
  parallel_for(pool, g.B, [&](int64_t b) {
    float* image = xp + b * g.H * g.W * g.C;
    std::fill(image, image + g.H * g.W * g.C, 0.0f);
    for (int64_t e = 0; e < g.E; ++e) {
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        const float* __restrict__ grow = gp + ((e * g.B + b) * g.Ho + ho) * row;
        for_each_tap(g, ho, [&](int64_t i, int64_t j, int64_t hi, int64_t off, int64_t lo, int64_t hi_) {
          float* xrow = image + hi * g.W * g.C;
          const float* __restrict__ kk = kp + ((e * g.K + i) * g.K + j) * g.C;
          for (int64_t wo = lo; wo < hi_; ++wo) {
            float* __restrict__ xs = xrow + (wo * g.s + off) * g.C;
            for (int64_t c = 0; c < g.C; ++c) xs[c] += grow[wo * g.C + c] * kk[c];
          }
        });
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t padding, int64_t dilation) {
  Geometry g = geometry(x.dimensions().begin(), dk->dimensions().begin(), stride, padding, dilation);
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  const int64_t row = g.Wo * g.C, taps = g.K * g.K;
  // Partial sums per edge and fixed block of images, one row per tap over the output columns,
  // added up in a fixed order at the end: the result does not depend on which thread ran what.
  const int64_t blocks = std::min<int64_t>(g.B, 8);
  std::vector<float> partial(g.E * blocks * taps * row, 0.0f);
  if (g.s == 1) kernel_gradient_stride1(pool, g, xp, gp, blocks, partial.data());
  else parallel_for(pool, g.E * blocks, [&](int64_t item) {
    const int64_t e = item / blocks, block = item % blocks;
    float* sums = partial.data() + item * taps * row;
    for (int64_t b = block * g.B / blocks; b < (block + 1) * g.B / blocks; ++b) {
      for (int64_t ho = 0; ho < g.Ho; ++ho) {
        const float* __restrict__ grow = gp + ((e * g.B + b) * g.Ho + ho) * row;
        for_each_tap(g, ho, [&](int64_t i, int64_t j, int64_t hi, int64_t off, int64_t lo, int64_t hi_) {
          const float* xrow = xp + (b * g.H + hi) * g.W * g.C;
          float* __restrict__ acc = sums + (i * g.K + j) * row;
          for (int64_t wo = lo; wo < hi_; ++wo) {
            const float* __restrict__ xs = xrow + (wo * g.s + off) * g.C;
            for (int64_t c = 0; c < g.C; ++c) acc[wo * g.C + c] += xs[c] * grow[wo * g.C + c];
          }
        });
      }
    }
  });
  float* kp = dk->typed_data();
  std::fill(kp, kp + g.E * taps * g.C, 0.0f);
  for (int64_t e = 0; e < g.E; ++e)
    for (int64_t block = 0; block < blocks; ++block)
      for (int64_t tap = 0; tap < taps; ++tap) {
        const float* acc = partial.data() + ((e * blocks + block) * taps + tap) * row;
        float* out = kp + (e * taps + tap) * g.C;
        for (int64_t wo = 0; wo < g.Wo; ++wo)
          for (int64_t c = 0; c < g.C; ++c) out[c] += acc[wo * g.C + c];
      }
  return ffi::Error::Success();
}

}  // namespace

// All three take two f32 buffers and the geometry, and run on XLA's intra-op thread pool.
auto Binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride")
      .Attr<int64_t>("padding")
      .Attr<int64_t>("dilation");
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DartsEqxDepthwiseForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DartsEqxDepthwiseInputGradient, InputGradient, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DartsEqxDepthwiseKernelGradient, KernelGradient, Binding());
