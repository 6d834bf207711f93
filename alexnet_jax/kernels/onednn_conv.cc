// oneDNN's convolutions as XLA FFI handlers, called from inside jitted CPU code.
//
// Three handlers, one per direction of a 2-D convolution without bias (the model adds
// its bias itself): forward, backward-data (input gradient) and backward-weights
// (kernel gradient). Layouts are the model's: activations NHWC, kernels HWIO, row-major,
// float32 or bfloat16 (oneDNN accumulates in float32; the kernel gradient is computed in
// float32 and rounded once into the kernel's dtype). Symmetric strides, padding
// (before, after) applied to both spatial axes; the geometry comes from the buffers'
// shapes and three integer attributes: stride, pad_lo, pad_hi.
//
// Primitives (and the reorders between our HWIO kernels and the blocked layout oneDNN
// picks for them) are built once per geometry and kept in a map guarded by a mutex. The
// same mutex serialises execution: each call already uses every core through oneDNN's
// OpenMP team, so two at once (two towers, or two fake devices) would only oversubscribe
// the cores, and one at a time also makes oneDNN's library-managed scratchpad safe.

#include <omp.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dt = dnnl::memory::data_type;
using tag = dnnl::memory::format_tag;
using dims = dnnl::memory::dims;

enum Kind : int { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Everything that selects a primitive: direction, dtype and the full geometry.
using Key = std::array<int64_t, 13>;

struct Geometry {
  int64_t n, h, w, c, kh, kw, o, oh, ow, stride, pad_lo, pad_hi;
};

struct Entry {
  dnnl::primitive conv;
  dnnl::memory::desc src, weights, dst;  // what the primitive takes (weights: its layout)
  dnnl::memory::desc user_weights;       // HWIO, in the call's dtype
  bool reorder_weights = false;
  dnnl::reorder weights_reorder;         // HWIO -> blocked, or blocked(f32) -> HWIO
  dnnl::memory weights_buffer;           // the blocked kernel (or its gradient)
};

std::mutex g_mutex;
std::map<Key, std::unique_ptr<Entry>> g_cache;
std::atomic<int> g_threads{0};  // 0: OpenMP's default (OMP_NUM_THREADS or all cores)

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

dnnl::stream& Stream() {
  static dnnl::stream stream(Engine());
  return stream;
}

dnnl::memory::desc Activations(int64_t n, int64_t c, int64_t h, int64_t w, dt type) {
  return dnnl::memory::desc({n, c, h, w}, type, tag::nhwc);
}

// oneDNN wants the right padding that makes the output size exact:
// oh = (h + pad_lo + pad_r - kh) / stride + 1 with no remainder. Ours is XLA's, whose
// floor division drops rows past the last window; the exact one may be negative.
int64_t ExactPadHi(int64_t in, int64_t k, int64_t out, const Geometry& g) {
  return (out - 1) * g.stride + k - in - g.pad_lo;
}

dnnl::convolution_forward::primitive_desc ForwardPd(const Geometry& g, dt type) {
  dims strides = {g.stride, g.stride};
  dims pad_l = {g.pad_lo, g.pad_lo};
  dims pad_r = {ExactPadHi(g.h, g.kh, g.oh, g), ExactPadHi(g.w, g.kw, g.ow, g)};
  auto weights = dnnl::memory::desc({g.o, g.c, g.kh, g.kw}, type, tag::any);
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
      Activations(g.n, g.c, g.h, g.w, type), weights, Activations(g.n, g.o, g.oh, g.ow, type),
      strides, pad_l, pad_r);
}

std::unique_ptr<Entry> Build(Kind kind, const Geometry& g, dt type) {
  auto e = std::make_unique<Entry>();
  e->user_weights = dnnl::memory::desc({g.o, g.c, g.kh, g.kw}, type, tag::hwio);
  dims strides = {g.stride, g.stride};
  dims pad_l = {g.pad_lo, g.pad_lo};
  dims pad_r = {ExactPadHi(g.h, g.kh, g.oh, g), ExactPadHi(g.w, g.kw, g.ow, g)};
  auto fwd = ForwardPd(g, type);
  dnnl::memory::desc weights;
  if (kind == kForward) {
    e->conv = dnnl::convolution_forward(fwd);
    e->src = fwd.src_desc();
    e->dst = fwd.dst_desc();
    weights = fwd.weights_desc();
  } else if (kind == kBackwardData) {
    auto pd = dnnl::convolution_backward_data::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Activations(g.n, g.c, g.h, g.w, type),
        dnnl::memory::desc({g.o, g.c, g.kh, g.kw}, type, tag::any),
        Activations(g.n, g.o, g.oh, g.ow, type), strides, pad_l, pad_r, fwd);
    e->conv = dnnl::convolution_backward_data(pd);
    e->src = pd.diff_src_desc();
    e->dst = pd.diff_dst_desc();
    weights = pd.weights_desc();
  } else {
    // The kernel gradient sums over the whole batch: in float32, rounded once at the end.
    auto pd = dnnl::convolution_backward_weights::primitive_desc(
        Engine(), dnnl::algorithm::convolution_direct, Activations(g.n, g.c, g.h, g.w, type),
        dnnl::memory::desc({g.o, g.c, g.kh, g.kw}, dt::f32, tag::any),
        Activations(g.n, g.o, g.oh, g.ow, type), strides, pad_l, pad_r, fwd);
    e->conv = dnnl::convolution_backward_weights(pd);
    e->src = pd.src_desc();
    e->dst = pd.diff_dst_desc();
    weights = pd.diff_weights_desc();
  }
  e->weights = weights;
  e->reorder_weights = weights != e->user_weights;
  if (e->reorder_weights) {
    // Forward and backward-data read the kernel in oneDNN's layout; backward-weights
    // writes its gradient there and reorders it back into the caller's HWIO.
    bool out = kind == kBackwardWeights;
    e->weights_reorder = dnnl::reorder(dnnl::reorder::primitive_desc(
        Engine(), out ? weights : e->user_weights, Engine(), out ? e->user_weights : weights));
    e->weights_buffer = dnnl::memory(weights, Engine());
  }
  return e;
}

ffi::Error Run(Kind kind, const Geometry& g, ffi::DataType type, void* src, void* weights,
               void* dst) {
  dt dtype;
  if (type == ffi::DataType::F32) {
    dtype = dt::f32;
  } else if (type == ffi::DataType::BF16) {
    dtype = dt::bf16;
  } else {
    return ffi::Error::InvalidArgument("oneDNN conv: float32 or bfloat16 only");
  }
  if (g.stride < 1 || g.oh < 1 || g.ow < 1)
    return ffi::Error::InvalidArgument("oneDNN conv: bad geometry");
  // src/dst: the activations' side (x or dx; y or dy); weights: w or dw.
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g.n == 0) return ffi::Error::Success();  // nothing to compute
  int threads = g_threads.load();
  if (threads > 0) omp_set_num_threads(threads);  // this (XLA) thread's OpenMP team size
  try {
    Key key = {kind, static_cast<int64_t>(dtype), g.n, g.h, g.w, g.c, g.kh, g.kw, g.o,
               g.stride, g.pad_lo, g.pad_hi, g.oh * 100000 + g.ow};
    auto it = g_cache.find(key);
    if (it == g_cache.end()) it = g_cache.emplace(key, Build(kind, g, dtype)).first;
    Entry& e = *it->second;
    auto& stream = Stream();
    dnnl::memory src_m(e.src, Engine(), src), dst_m(e.dst, Engine(), dst);
    dnnl::memory user_w(e.user_weights, Engine(), weights);
    dnnl::memory w_m = e.reorder_weights ? e.weights_buffer : user_w;
    if (kind == kForward) {
      if (e.reorder_weights) e.weights_reorder.execute(stream, user_w, w_m);
      e.conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_WEIGHTS, w_m},
                              {DNNL_ARG_DST, dst_m}});
    } else if (kind == kBackwardData) {
      if (e.reorder_weights) e.weights_reorder.execute(stream, user_w, w_m);
      e.conv.execute(stream, {{DNNL_ARG_DIFF_SRC, src_m}, {DNNL_ARG_WEIGHTS, w_m},
                              {DNNL_ARG_DIFF_DST, dst_m}});
    } else {
      e.conv.execute(stream, {{DNNL_ARG_SRC, src_m}, {DNNL_ARG_DIFF_WEIGHTS, w_m},
                              {DNNL_ARG_DIFF_DST, dst_m}});
      if (e.reorder_weights) e.weights_reorder.execute(stream, w_m, user_w);
    }
    stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  } catch (const std::exception& err) {
    return ffi::Error::Internal(std::string("oneDNN conv: ") + err.what());
  }
  return ffi::Error::Success();
}

bool Rank4(const ffi::AnyBuffer& b) { return b.dimensions().size() == 4; }

// y[n, oh, ow, o] = sum x[n, oh*s + i - pad_lo, ow*s + j - pad_lo, c] w[i, j, c, o]
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   int64_t stride, int64_t pad_lo, int64_t pad_hi) {
  if (!Rank4(x) || !Rank4(w) || !Rank4(*y) || x.element_type() != w.element_type() ||
      y->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("oneDNN conv forward: x, w, y must be rank 4, one dtype");
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
             stride, pad_lo, pad_hi};
  return Run(kForward, g, x.element_type(), x.untyped_data(), w.untyped_data(),
             y->untyped_data());
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t stride, int64_t pad_lo, int64_t pad_hi) {
  if (!Rank4(dy) || !Rank4(w) || !Rank4(*dx) || dy.element_type() != w.element_type() ||
      dx->element_type() != dy.element_type())
    return ffi::Error::InvalidArgument("oneDNN conv backward-data: rank 4, one dtype");
  auto xd = dx->dimensions(), wd = w.dimensions(), yd = dy.dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
             stride, pad_lo, pad_hi};
  return Run(kBackwardData, g, dy.element_type(), dx->untyped_data(), w.untyped_data(),
             dy.untyped_data());
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           int64_t stride, int64_t pad_lo, int64_t pad_hi) {
  if (!Rank4(x) || !Rank4(dy) || !Rank4(*dw) || x.element_type() != dy.element_type() ||
      dw->element_type() != x.element_type())
    return ffi::Error::InvalidArgument("oneDNN conv backward-weights: rank 4, one dtype");
  auto xd = x.dimensions(), wd = dw->dimensions(), yd = dy.dimensions();
  Geometry g{xd[0], xd[1], xd[2], xd[3], wd[0], wd[1], wd[3], yd[1], yd[2],
             stride, pad_lo, pad_hi};
  if (g.n == 0) {  // an empty batch: the gradient is zero
    std::memset(dw->untyped_data(), 0, dw->size_bytes());
    return ffi::Error::Success();
  }
  return Run(kBackwardWeights, g, x.element_type(), x.untyped_data(), dw->untyped_data(),
             dy.untyped_data());
}

}  // namespace

#define ALEXNET_CONV_BINDING(fn)                                                    \
  ffi::Ffi::Bind()                                                                  \
      .Arg<ffi::AnyBuffer>()                                                        \
      .Arg<ffi::AnyBuffer>()                                                        \
      .Ret<ffi::AnyBuffer>()                                                        \
      .Attr<int64_t>("stride")                                                      \
      .Attr<int64_t>("pad_lo")                                                      \
      .Attr<int64_t>("pad_hi")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvForward, Forward,
                              ALEXNET_CONV_BINDING(Forward));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvBackwardData, BackwardData,
                              ALEXNET_CONV_BINDING(BackwardData));
XLA_FFI_DEFINE_HANDLER_SYMBOL(AlexnetOnednnConvBackwardWeights, BackwardWeights,
                              ALEXNET_CONV_BINDING(BackwardWeights));

extern "C" {

// OpenMP team size for oneDNN's calls (0: OpenMP's default). Applied on each call, to
// the XLA thread that makes it (OpenMP's thread count is a per-thread setting).
__attribute__((visibility("default"))) void AlexnetOnednnSetThreads(int threads) {
  g_threads.store(threads < 0 ? 0 : threads);
}

// Primitives built so far (one per direction, dtype and geometry): for tests.
__attribute__((visibility("default"))) int AlexnetOnednnCacheSize() {
  std::lock_guard<std::mutex> lock(g_mutex);
  return static_cast<int>(g_cache.size());
}

// oneDNN's version, major*10000 + minor*100 + patch.
__attribute__((visibility("default"))) int AlexnetOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}

}  // extern "C"
