// fastml._C: one line per exported kernel and dtype. Every call releases the GIL.
//
// A dispatch build (setup.py, FASTML_CPU_ARCH=dispatch) compiles these sources once per x86-64
// level into fastml._C_x86_64_v2, _v3 and _v4; Python imports a module by the name its init
// function carries, so setup.py passes that name as FASTML_MODULE_NAME.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>  // lists of pointers and sizes for the multi-tensor optimizer steps

#include <string>

#include "kernels.h"
#include "simd.h"

namespace py = pybind11;
using namespace fastml;

#define FASTML_DEF(name, fn) m.def(name, &fn, py::call_guard<py::gil_scoped_release>())

#ifndef FASTML_MODULE_NAME
#define FASTML_MODULE_NAME _C
#endif

PYBIND11_MODULE(FASTML_MODULE_NAME, m) {
    m.doc() = "fastml C++ CPU kernels (pybind11, OpenMP); pointers in, nothing allocated";
    m.attr("openmp_max_threads") = omp_get_max_threads();
    // The vector extensions the compiler was allowed to use, so Python (and the tests) can tell
    // which build of the kernels was loaded.
    const std::string isa = std::string(""
#if defined(__SSE4_2__)
                                " sse4_2"
#endif
#if defined(__AVX2__)
                                " avx2"
#endif
#if defined(__FMA__)
                                " fma"
#endif
#if defined(__AVX512F__)
                                " avx512f"
#endif
#if defined(__AVX512VNNI__)
                                " avx512vnni"
#endif
#if defined(__ARM_NEON)
                                " neon"
#endif
    );
    m.attr("isa") = isa.empty() ? isa : isa.substr(1);  // without the leading space
    // What the register tiles and block sizes were derived from (simd.h, common.h).
    m.attr("vector_bytes") = kVectorBytes;
    m.attr("vector_registers") = kVectorRegisters;
    m.def("cache_sizes", [] {
        const CacheSizes& c = cache_sizes();
        return py::dict(py::arg("l1d") = c.l1d, py::arg("l2") = c.l2);
    });
    // Before any kernel runs (fastml/_cpp.py calls it at load): kernels read the sizes unlocked,
    // some more than once a call (a buffer's size, then its use).
    m.def("_set_cache_sizes", &set_cache_sizes, py::arg("l1d"), py::arg("l2"));

    FASTML_DEF("linear_mse_forward_f32", linear_mse_forward<float>);
    FASTML_DEF("linear_mse_forward_f64", linear_mse_forward<double>);
    FASTML_DEF("linear_regression_sgd_epoch_f32", linear_regression_sgd_epoch<float>);
    FASTML_DEF("linear_regression_sgd_epoch_f64", linear_regression_sgd_epoch<double>);

    FASTML_DEF("linear_forward_f32", linear_forward<float>);
    FASTML_DEF("linear_forward_f64", linear_forward<double>);
    FASTML_DEF("linear_backward_input_f32", linear_backward_input<float>);
    FASTML_DEF("linear_backward_input_f64", linear_backward_input<double>);
    FASTML_DEF("linear_backward_weight_f32", linear_backward_weight<float>);
    FASTML_DEF("linear_backward_weight_f64", linear_backward_weight<double>);

    FASTML_DEF("mse_loss_forward_f32", mse_loss_forward<float>);
    FASTML_DEF("mse_loss_forward_f64", mse_loss_forward<double>);
    FASTML_DEF("mse_loss_backward_f32", mse_loss_backward<float>);
    FASTML_DEF("mse_loss_backward_f64", mse_loss_backward<double>);

    FASTML_DEF("sgd_step_f32", sgd_step<float>);
    FASTML_DEF("sgd_step_f64", sgd_step<double>);
    FASTML_DEF("sgd_course_step_f32", sgd_course_step<float>);
    FASTML_DEF("sgd_course_step_f64", sgd_course_step<double>);

    FASTML_DEF("adam_step_f32", adam_step<float>);
    FASTML_DEF("adam_step_f64", adam_step<double>);

    FASTML_DEF("cdist_forward_f32", cdist_forward<float>);
    FASTML_DEF("cdist_forward_f64", cdist_forward<double>);
    FASTML_DEF("knn_forward_f32", knn_forward<float>);
    FASTML_DEF("knn_forward_f64", knn_forward<double>);

    FASTML_DEF("batch_norm_forward_f32", batch_norm_forward<float>);
    FASTML_DEF("batch_norm_forward_f64", batch_norm_forward<double>);
    FASTML_DEF("batch_norm_backward_f32", batch_norm_backward<float>);
    FASTML_DEF("batch_norm_backward_f64", batch_norm_backward<double>);

    FASTML_DEF("max_pool2d_forward_f32", max_pool2d_forward<float>);
    FASTML_DEF("max_pool2d_forward_f64", max_pool2d_forward<double>);
    FASTML_DEF("max_pool2d_backward_f32", max_pool2d_backward<float>);
    FASTML_DEF("max_pool2d_backward_f64", max_pool2d_backward<double>);

    FASTML_DEF("conv2d_forward_f32", conv2d_forward<float>);
    FASTML_DEF("conv2d_forward_f64", conv2d_forward<double>);
    FASTML_DEF("conv2d_backward_input_f32", conv2d_backward_input<float>);
    FASTML_DEF("conv2d_backward_input_f64", conv2d_backward_input<double>);
    FASTML_DEF("conv2d_backward_weight_f32", conv2d_backward_weight<float>);
    FASTML_DEF("conv2d_backward_weight_f64", conv2d_backward_weight<double>);
    FASTML_DEF("conv2d_relu_max_pool2d_forward_f32", conv2d_relu_max_pool2d_forward<float>);
    FASTML_DEF("conv2d_relu_max_pool2d_forward_f64", conv2d_relu_max_pool2d_forward<double>);
    FASTML_DEF("conv2d_relu_max_pool2d_backward_f32", conv2d_relu_max_pool2d_backward<float>);
    FASTML_DEF("conv2d_relu_max_pool2d_backward_f64", conv2d_relu_max_pool2d_backward<double>);
    FASTML_DEF("relu_max_pool2d_backward_f32", relu_max_pool2d_backward<float>);
    FASTML_DEF("relu_max_pool2d_backward_f64", relu_max_pool2d_backward<double>);
    FASTML_DEF("relu_max_pool2d_forward_f32", relu_max_pool2d_forward<float>);
    FASTML_DEF("relu_max_pool2d_forward_f64", relu_max_pool2d_forward<double>);
    FASTML_DEF("winograd_f2_weight_f32", winograd_f2_weight<float>);
    FASTML_DEF("winograd_f2_weight_f64", winograd_f2_weight<double>);
    FASTML_DEF("winograd_f2_input_f32", winograd_f2_input<float>);
    FASTML_DEF("winograd_f2_input_f64", winograd_f2_input<double>);
    FASTML_DEF("winograd_f2_output_f32", winograd_f2_output<float>);
    FASTML_DEF("winograd_f2_output_f64", winograd_f2_output<double>);
    FASTML_DEF("grouped_conv_forward_f32", grouped_conv_forward<float>);
    FASTML_DEF("grouped_conv_forward_f64", grouped_conv_forward<double>);
    FASTML_DEF("depthwise_conv_backward_input_f32", depthwise_conv_backward_input<float>);
    FASTML_DEF("depthwise_conv_backward_input_f64", depthwise_conv_backward_input<double>);
    FASTML_DEF("depthwise_conv_backward_weight_f32", depthwise_conv_backward_weight<float>);
    FASTML_DEF("depthwise_conv_backward_weight_f64", depthwise_conv_backward_weight<double>);

    FASTML_DEF("cross_entropy_rows_f32", cross_entropy_rows<float>);
    FASTML_DEF("cross_entropy_rows_f64", cross_entropy_rows<double>);
    FASTML_DEF("cross_entropy_target_total_f32", cross_entropy_target_total<float>);
    FASTML_DEF("cross_entropy_target_total_f64", cross_entropy_target_total<double>);
    FASTML_DEF("cross_entropy_forward_f32", cross_entropy_forward<float>);
    FASTML_DEF("cross_entropy_forward_f64", cross_entropy_forward<double>);
    FASTML_DEF("linear_cross_entropy_forward_f32", linear_cross_entropy_forward<float>);
    FASTML_DEF("linear_cross_entropy_forward_f64", linear_cross_entropy_forward<double>);
}
