// One LARS step for one variable, in two passes over memory: the CPU kernel behind bt_keras.optim.LARS.
//
// The update (the official Barlow Twins code's LARS, for a weight w with gradient g and momentum buffer mu):
//
//     d   = g + weight_decay * w
//     r   = eta * ||w|| / ||d||      (1 when either norm is 0; r = 1 and weight_decay = 0 when trust_ratio is false)
//     mu  = momentum * mu + r * d
//     w  -= lr * mu
//
// TensorFlow's own ops need about 14 passes over a kernel's size for this (each op reads its inputs and writes its
// output); for the 8192 x 8192 projector kernels the optimizer is then memory-bound. Here pass 1 reads w and g
// once and sums ||w||^2 and ||d||^2 without writing d; pass 2 reads w, g, mu and writes mu and w in place: 7 passes.
// Both passes are split over the op's intra-op thread pool.
//
// Variables are updated in place under their mutexes. If a variable's buffer is shared (a concurrent read still holds
// it: TensorFlow reads alias the variable's buffer), it is copied first, exactly as TensorFlow's own training ops do,
// so readers never see a half-updated tensor.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace bt_keras {

using ::tensorflow::AllocatorAttributes;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::Var;

REGISTER_OP("BtKerasLarsUpdate")
    .Input("var: resource")
    .Input("accum: resource")
    .Input("grad: T")
    .Input("lr: T")
    .Input("momentum: T")
    .Input("eta: T")
    .Input("weight_decay: T")
    .Attr("T: {float, double}")
    .Attr("trust_ratio: bool = true")
    .SetIsStateful()
    .SetShapeFn(::tensorflow::shape_inference::NoOutputs)
    .Doc("In-place LARS update of `var` and its momentum buffer `accum` (see lars_update.cc).");

constexpr int64_t kBlock = 1 << 16;  // elements per work unit: 256 KiB of float32, large enough to stream
constexpr int kLanes = 16;           // independent partial sums, so the compiler can vectorise the reduction

// Gives `var` a buffer of its own before it is written in place (TensorFlow's PrepareToUpdateVariable).
Status MakeExclusive(OpKernelContext* ctx, Var* var) {
  Tensor* tensor = var->tensor();
  if (tensor->RefCountIsOne() && !var->copy_on_read_mode.load()) return ::tensorflow::OkStatus();
  Tensor copy;
  AllocatorAttributes attr;
  TF_RETURN_IF_ERROR(ctx->allocate_temp(tensor->dtype(), tensor->shape(), &copy, attr));
  std::memcpy(copy.data(), tensor->data(), tensor->TotalBytes());
  *tensor = copy;
  return ::tensorflow::OkStatus();
}

template <typename T>
class LarsUpdateOp : public OpKernel {
 public:
  explicit LarsUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("trust_ratio", &trust_ratio_));
  }

  void Compute(OpKernelContext* ctx) override {
    ::tensorflow::core::RefCountPtr<Var> var, accum;
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 0), &var));
    OP_REQUIRES_OK(ctx, LookupResource(ctx, HandleFromInput(ctx, 1), &accum));
    OP_REQUIRES(ctx, var.get() != accum.get(),
                ::tensorflow::errors::InvalidArgument("LARS: var and accum must be different variables"));
    // Lock in address order, as TensorFlow does, so two ops on the same pair can never deadlock.
    ::tensorflow::mutex* first = std::min(var->mu(), accum->mu());
    ::tensorflow::mutex* second = std::max(var->mu(), accum->mu());
    ::tensorflow::mutex_lock lock_first(*first);
    ::tensorflow::mutex_lock lock_second(*second);

    const Tensor& grad = ctx->input(2);
    for (Var* v : {var.get(), accum.get()}) {
      OP_REQUIRES(ctx, v->tensor()->IsInitialized(),
                  ::tensorflow::errors::FailedPrecondition("LARS: a variable is not initialized"));
      OP_REQUIRES(ctx, v->tensor()->dtype() == grad.dtype() && v->tensor()->shape() == grad.shape(),
                  ::tensorflow::errors::InvalidArgument("LARS: variable ", v->tensor()->DebugString(),
                                                        " and gradient ", grad.DebugString(), " differ"));
    }
    for (int i = 3; i < 7; ++i) {
      OP_REQUIRES(ctx, ::tensorflow::TensorShapeUtils::IsScalar(ctx->input(i).shape()),
                  ::tensorflow::errors::InvalidArgument("LARS: hyperparameter input ", i, " must be a scalar"));
    }
    OP_REQUIRES_OK(ctx, MakeExclusive(ctx, var.get()));
    OP_REQUIRES_OK(ctx, MakeExclusive(ctx, accum.get()));

    const T lr = ctx->input(3).scalar<T>()();
    const T momentum = ctx->input(4).scalar<T>()();
    const T eta = ctx->input(5).scalar<T>()();
    const T weight_decay = trust_ratio_ ? ctx->input(6).scalar<T>()() : T(0);
    T* __restrict w = var->tensor()->flat<T>().data();
    T* __restrict mu = accum->tensor()->flat<T>().data();
    const T* __restrict g = grad.flat<T>().data();
    const int64_t n = grad.NumElements();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
    using Params = ::tensorflow::thread::ThreadPool::SchedulingParams;

    T ratio = T(1);
    if (trust_ratio_) {  // pass 1: ||w||^2 and ||d||^2, partial sums per block, added in float64
      std::vector<double> w_sq(blocks), d_sq(blocks);
      pool->ParallelFor(blocks, Params::Adaptive(2 * kBlock), [&](int64_t lo, int64_t hi) {
        for (int64_t b = lo; b < hi; ++b) {
          const int64_t begin = b * kBlock, end = std::min(n, begin + kBlock);
          T lane_w[kLanes] = {}, lane_d[kLanes] = {};
          int64_t i = begin;
          for (; i + kLanes <= end; i += kLanes) {
            for (int j = 0; j < kLanes; ++j) {
              const T wi = w[i + j], di = g[i + j] + weight_decay * wi;
              lane_w[j] += wi * wi;
              lane_d[j] += di * di;
            }
          }
          double sum_w = 0, sum_d = 0;
          for (; i < end; ++i) {
            const T di = g[i] + weight_decay * w[i];
            sum_w += double(w[i]) * w[i];
            sum_d += double(di) * di;
          }
          for (int j = 0; j < kLanes; ++j) {
            sum_w += lane_w[j];
            sum_d += lane_d[j];
          }
          w_sq[b] = sum_w;
          d_sq[b] = sum_d;
        }
      });
      double sum_w = 0, sum_d = 0;
      for (int64_t b = 0; b < blocks; ++b) {
        sum_w += w_sq[b];
        sum_d += d_sq[b];
      }
      if (sum_w > 0 && sum_d > 0) ratio = T(double(eta) * std::sqrt(sum_w) / std::sqrt(sum_d));
    }

    const T ratio_decay = ratio * weight_decay;
    pool->ParallelFor(blocks, Params::Adaptive(5 * kBlock), [&](int64_t lo, int64_t hi) {  // pass 2: the update
      const int64_t begin = lo * kBlock, end = std::min(n, hi * kBlock);
      for (int64_t i = begin; i < end; ++i) {
        const T m = momentum * mu[i] + ratio * g[i] + ratio_decay * w[i];
        mu[i] = m;
        w[i] -= lr * m;
      }
    });
  }

 private:
  bool trust_ratio_;
};

REGISTER_KERNEL_BUILDER(Name("BtKerasLarsUpdate").Device(::tensorflow::DEVICE_CPU).TypeConstraint<float>("T"),
                        LarsUpdateOp<float>);
REGISTER_KERNEL_BUILDER(Name("BtKerasLarsUpdate").Device(::tensorflow::DEVICE_CPU).TypeConstraint<double>("T"),
                        LarsUpdateOp<double>);

}  // namespace bt_keras
