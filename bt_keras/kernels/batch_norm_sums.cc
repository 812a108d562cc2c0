// Per-channel sums and per-channel affine maps in one pass over memory: the CPU kernels behind
// bt_keras.sync_batch_norm (BatchNorm with statistics over the global batch, under several replicas).
//
// A synchronised BatchNorm layer needs, for an input x of shape [..., C] (channels last, M values per channel):
//   forward:  S1 = sum (x - k), S2 = sum (x - k)^2 per channel (k: a shift, the moving mean), returned in float64
//             (so that S2 / N - (S1 / N)^2 keeps its digits even when the mean is far from k), all-reduced across
//             replicas, then y = (x - mean) * scale + offset;
//   backward: sum dy and sum dy * (x - mean) per channel, all-reduced, then dx = dy * p + (x - mean) * q + r.
// (x - mean) is formed inside the kernels: x * q - mean * q would lose digits when |mean| >> std.
// TensorFlow's ops make a pass per op (x - k, its square, two reductions, ...); these kernels read their inputs
// once: sums in one pass (accumulated in double), affine maps in one pass. With them the synchronised layer moves
// as many bytes as TensorFlow's fused (local-statistics) BatchNorm kernel. Work is split over the op's intra-op
// thread pool in tiles of rows x channels.

#include <algorithm>
#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace bt_keras {

using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::shape_inference::InferenceContext;
using ::tensorflow::shape_inference::ShapeHandle;

namespace {

::tensorflow::Status SumsShape(InferenceContext* c) {  // [2, C], C = the last dimension of input 0
  ShapeHandle x;
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(0), 1, &x));
  c->set_output(0, c->Matrix(2, c->Dim(x, -1)));
  return ::tensorflow::OkStatus();
}

}  // namespace

REGISTER_OP("BtKerasChannelMoments")
    .Input("x: T")
    .Input("shift: T")
    .Output("sums: double")
    .Attr("T: {float, double}")
    .SetShapeFn(SumsShape)
    .Doc("[sum(x - shift), sum((x - shift)^2)] per channel (last axis), shape [2, C], in float64.");

REGISTER_OP("BtKerasChannelGradSums")
    .Input("dy: T")
    .Input("x: T")
    .Input("mean: T")
    .Output("sums: double")
    .Attr("T: {float, double}")
    .SetShapeFn(SumsShape)
    .Doc("[sum(dy), sum(dy * (x - mean))] per channel (last axis), shape [2, C], in float64.");

REGISTER_OP("BtKerasChannelAffine")
    .Input("x: T")
    .Input("shift: T")
    .Input("scale: T")
    .Input("offset: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc("y = (x - shift) * scale + offset, shift, scale and offset per channel (last axis).");

REGISTER_OP("BtKerasChannelAffine2")
    .Input("a: T")
    .Input("a_scale: T")
    .Input("b: T")
    .Input("b_shift: T")
    .Input("b_scale: T")
    .Input("offset: T")
    .Output("y: T")
    .Attr("T: {float, double}")
    .SetShapeFn(::tensorflow::shape_inference::UnchangedShape)
    .Doc("y = a * a_scale + (b - b_shift) * b_scale + offset, the scales, shift and offset per channel (last axis).");

namespace {

constexpr int64_t kTileChannels = 1024;  // channels per work unit: the accumulators stay in L1
constexpr int64_t kUnitElements = 1 << 15;  // about 32 K values per work unit
constexpr int64_t kMaxRowBlocks = 256;  // bounds the partial-sum buffers

struct Tiling {
  int64_t rows, channels, row_block, row_blocks, tile, tiles;
};

Tiling MakeTiling(int64_t rows, int64_t channels) {
  Tiling t;
  t.rows = rows;
  t.channels = channels;
  t.tile = std::max<int64_t>(1, std::min(channels, kTileChannels));
  t.tiles = (channels + t.tile - 1) / t.tile;
  t.row_block = std::max<int64_t>(1, kUnitElements / t.tile);
  t.row_blocks = std::max<int64_t>(1, (rows + t.row_block - 1) / t.row_block);
  if (t.row_blocks > kMaxRowBlocks) {
    t.row_block = (rows + kMaxRowBlocks - 1) / kMaxRowBlocks;
    t.row_blocks = (rows + t.row_block - 1) / t.row_block;
  }
  return t;
}

// Checks that input `i` is a vector of `channels` values; sets the op's error and returns false if not.
bool CheckVector(OpKernelContext* ctx, int i, int64_t channels) {
  const Tensor& v = ctx->input(i);
  if (v.dims() == 1 && v.dim_size(0) == channels) return true;
  ctx->CtxFailure(__FILE__, __LINE__,
                  ::tensorflow::errors::InvalidArgument("input ", i, " must be a vector of ", channels,
                                                        " per-channel values, got shape ", v.shape().DebugString()));
  return false;
}

// Row count and channel count of x ([..., C]); false (with the op's error set) if x has rank 0.
bool RowsAndChannels(OpKernelContext* ctx, const Tensor& x, int64_t* rows, int64_t* channels) {
  if (x.dims() < 1) {
    ctx->CtxFailure(__FILE__, __LINE__,
                    ::tensorflow::errors::InvalidArgument("the input must have a channel axis, got a scalar"));
    return false;
  }
  *channels = x.dim_size(x.dims() - 1);
  *rows = *channels == 0 ? 0 : x.NumElements() / *channels;
  return true;
}

// Per-channel sums of two functions of each row (`Accumulate(row, c0, c1, acc1, acc2)`), in double, over tiles.
// The partial sums live in a temporary tensor from the op's allocator (TensorFlow's pool), not the C++ heap: blocks
// of a few hundred KiB from glibc malloc are mmap'ed and unmapped on every call, and page-fault back each step.
template <typename Accumulate>
bool ChannelSums(OpKernelContext* ctx, int64_t rows, int64_t channels, Accumulate accumulate, double* out1,
                 double* out2) {
  const Tiling t = MakeTiling(rows, channels);
  Tensor partials;
  ::tensorflow::Status status =
      ctx->allocate_temp(::tensorflow::DT_DOUBLE, TensorShape({2, t.row_blocks, channels}), &partials);
  if (!status.ok()) {
    ctx->CtxFailure(__FILE__, __LINE__, status);
    return false;
  }
  double* part1 = partials.flat<double>().data();
  double* part2 = part1 + t.row_blocks * channels;
  std::fill(part1, part1 + 2 * t.row_blocks * channels, 0.0);
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  using Params = ::tensorflow::thread::ThreadPool::SchedulingParams;
  const int64_t cost = 4 * t.row_block * t.tile;  // ~cycles per unit: memory-bound, a few per value
  pool->ParallelFor(t.row_blocks * t.tiles, Params::Adaptive(cost), [&](int64_t lo, int64_t hi) {
    for (int64_t unit = lo; unit < hi; ++unit) {
      const int64_t block = unit / t.tiles, tile = unit % t.tiles;
      const int64_t r0 = block * t.row_block, r1 = std::min(rows, r0 + t.row_block);
      const int64_t c0 = tile * t.tile, c1 = std::min(channels, c0 + t.tile);
      double* acc1 = part1 + block * channels;
      double* acc2 = part2 + block * channels;
      for (int64_t r = r0; r < r1; ++r) accumulate(r, c0, c1, acc1, acc2);
    }
  });
  for (int64_t c = 0; c < channels; ++c) {
    double s1 = 0, s2 = 0;
    for (int64_t b = 0; b < t.row_blocks; ++b) {
      s1 += part1[b * channels + c];
      s2 += part2[b * channels + c];
    }
    out1[c] = s1;
    out2[c] = s2;
  }
  return true;
}

// Runs `map(r0, r1)` over blocks of rows on the intra-op pool (for the elementwise affine maps).
template <typename Map>
void OverRows(OpKernelContext* ctx, int64_t rows, int64_t channels, Map map) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  using Params = ::tensorflow::thread::ThreadPool::SchedulingParams;
  const int64_t block = std::max<int64_t>(1, kUnitElements / std::max<int64_t>(1, channels));
  const int64_t blocks = (rows + block - 1) / block;
  pool->ParallelFor(blocks, Params::Adaptive(4 * block * channels), [&](int64_t lo, int64_t hi) {
    map(lo * block, std::min(rows, hi * block));
  });
}

}  // namespace

template <typename T>
class ChannelMomentsOp : public OpKernel {
 public:
  explicit ChannelMomentsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    int64_t rows, channels;
    if (!RowsAndChannels(ctx, x, &rows, &channels) || !CheckVector(ctx, 1, channels)) return;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({2, channels}), &out));
    const T* __restrict xs = x.flat<T>().data();
    const T* __restrict k = ctx->input(1).flat<T>().data();
    double* o = out->flat<double>().data();
    ChannelSums(ctx, rows, channels, [&](int64_t r, int64_t c0, int64_t c1, double* a1, double* a2) {
      const T* row = xs + r * channels;
      for (int64_t c = c0; c < c1; ++c) {
        const double v = double(row[c]) - double(k[c]);
        a1[c] += v;
        a2[c] += v * v;
      }
    }, o, o + channels);
  }
};

template <typename T>
class ChannelGradSumsOp : public OpKernel {
 public:
  explicit ChannelGradSumsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& dy = ctx->input(0);
    const Tensor& x = ctx->input(1);
    OP_REQUIRES(ctx, dy.shape() == x.shape(),
                ::tensorflow::errors::InvalidArgument("dy ", dy.shape().DebugString(), " and x ",
                                                      x.shape().DebugString(), " differ in shape"));
    int64_t rows, channels;
    if (!RowsAndChannels(ctx, x, &rows, &channels) || !CheckVector(ctx, 2, channels)) return;
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({2, channels}), &out));
    const T* __restrict g = dy.flat<T>().data();
    const T* __restrict xs = x.flat<T>().data();
    const T* __restrict m = ctx->input(2).flat<T>().data();
    double* o = out->flat<double>().data();
    ChannelSums(ctx, rows, channels, [&](int64_t r, int64_t c0, int64_t c1, double* a1, double* a2) {
      const T* grow = g + r * channels;
      const T* xrow = xs + r * channels;
      for (int64_t c = c0; c < c1; ++c) {
        const double gv = double(grow[c]);
        a1[c] += gv;
        a2[c] += gv * (double(xrow[c]) - double(m[c]));
      }
    }, o, o + channels);
  }
};

template <typename T>
class ChannelAffineOp : public OpKernel {
 public:
  explicit ChannelAffineOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& x = ctx->input(0);
    int64_t rows, channels;
    if (!RowsAndChannels(ctx, x, &rows, &channels)) return;
    for (int i = 1; i < 4; ++i) {
      if (!CheckVector(ctx, i, channels)) return;
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    const T* xs = x.flat<T>().data();  // may alias y (forwarded buffer): element i is read before it is written
    const T* __restrict k = ctx->input(1).flat<T>().data();
    const T* __restrict s = ctx->input(2).flat<T>().data();
    const T* __restrict b = ctx->input(3).flat<T>().data();
    T* ys = y->flat<T>().data();
    OverRows(ctx, rows, channels, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xrow = xs + r * channels;
        T* yrow = ys + r * channels;
        for (int64_t c = 0; c < channels; ++c) yrow[c] = (xrow[c] - k[c]) * s[c] + b[c];
      }
    });
  }
};

template <typename T>
class ChannelAffine2Op : public OpKernel {
 public:
  explicit ChannelAffine2Op(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    const Tensor& a = ctx->input(0);
    const Tensor& b = ctx->input(2);
    OP_REQUIRES(ctx, a.shape() == b.shape(),
                ::tensorflow::errors::InvalidArgument("a ", a.shape().DebugString(), " and b ",
                                                      b.shape().DebugString(), " differ in shape"));
    int64_t rows, channels;
    if (!RowsAndChannels(ctx, a, &rows, &channels)) return;
    for (int i : {1, 3, 4, 5}) {
      if (!CheckVector(ctx, i, channels)) return;
    }
    Tensor* y = nullptr;
    OP_REQUIRES_OK(ctx, ctx->forward_input_or_allocate_output({0, 2}, 0, a.shape(), &y));
    const T* as = a.flat<T>().data();  // a or b may alias y: element i is read before it is written
    const T* bs = b.flat<T>().data();
    const T* __restrict sa = ctx->input(1).flat<T>().data();
    const T* __restrict kb = ctx->input(3).flat<T>().data();
    const T* __restrict sb = ctx->input(4).flat<T>().data();
    const T* __restrict off = ctx->input(5).flat<T>().data();
    T* ys = y->flat<T>().data();
    OverRows(ctx, rows, channels, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t base = r * channels;
        for (int64_t c = 0; c < channels; ++c) {
          ys[base + c] = as[base + c] * sa[c] + (bs[base + c] - kb[c]) * sb[c] + off[c];
        }
      }
    });
  }
};

#define BT_KERAS_REGISTER(T)                                                                                    \
  REGISTER_KERNEL_BUILDER(                                                                                      \
      Name("BtKerasChannelMoments").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), ChannelMomentsOp<T>); \
  REGISTER_KERNEL_BUILDER(Name("BtKerasChannelGradSums").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
                          ChannelGradSumsOp<T>);                                                                \
  REGISTER_KERNEL_BUILDER(Name("BtKerasChannelAffine").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),   \
                          ChannelAffineOp<T>);                                                                  \
  REGISTER_KERNEL_BUILDER(Name("BtKerasChannelAffine2").Device(::tensorflow::DEVICE_CPU).TypeConstraint<T>("T"),  \
                          ChannelAffine2Op<T>);

BT_KERAS_REGISTER(float)
BT_KERAS_REGISTER(double)

#undef BT_KERAS_REGISTER

}  // namespace bt_keras
