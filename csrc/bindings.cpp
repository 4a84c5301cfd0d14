// pybind11 module glmrt._C: host-side (CPU, CUDA-free) hot paths of the glmrt runtime.
// Every function here has a numpy twin in the Python package that gives the same result; the
// Python side uses the twin when this extension was not built.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace glmrt {
// Defined in patchify.cpp.
void build_normalize_lut(const double* mean, const double* stdev, int64_t channels, float* lut);
void patchify_u8(const uint8_t* img, int64_t height, int64_t width, int64_t channels, const float* lut,
                 int64_t patch, int64_t temporal, int64_t merge, float* out, int64_t num_threads);
void patch_pixels_u8(const uint8_t* img, int64_t height, int64_t width, int64_t channels, int64_t patch,
                     int64_t merge, uint8_t* out, int64_t num_threads);
// Defined in contours.cpp.
std::vector<std::vector<int32_t>> external_contours(const uint8_t* mask, int64_t height, int64_t width);
std::vector<int32_t> approx_poly_dp(const int32_t* points, int64_t n, double epsilon);
}  // namespace glmrt

namespace {

// std::invalid_argument is translated to Python ValueError by pybind11.
[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument("patchify: " + msg); }

// The image's (H, W, C) after the checks both entry points share.
struct ImageShape {
    int64_t height, width, channels;
};

ImageShape check_image(const py::array& image, int64_t patch_size, int64_t temporal_patch_size, int64_t merge_size) {
    if (!py::isinstance<py::array_t<uint8_t>>(image))
        bad("image must be a uint8 array, got dtype " + std::string(py::str(image.dtype())));
    if (image.ndim() != 3) bad("image must be HWC (3 dims), got " + std::to_string(image.ndim()) + " dims");
    if (!(image.flags() & py::array::c_style)) bad("image must be C-contiguous");
    const int64_t H = image.shape(0), W = image.shape(1), C = image.shape(2);
    if (C < 1) bad("image has no channels");
    if (patch_size < 1 || temporal_patch_size < 1 || merge_size < 1)
        bad("patch_size, temporal_patch_size and merge_size must be >= 1");
    const int64_t unit = patch_size * merge_size;
    if (H < 1 || W < 1 || H % unit != 0 || W % unit != 0)
        bad("image size " + std::to_string(H) + "x" + std::to_string(W) + " is not a positive multiple of " +
            "patch_size*merge_size = " + std::to_string(unit));
    return {H, W, C};
}

py::array_t<float> patchify(const py::array& image, const std::vector<double>& mean,
                            const std::vector<double>& stdev, int64_t patch_size, int64_t temporal_patch_size,
                            int64_t merge_size, int64_t num_threads) {
    const auto [H, W, C] = check_image(image, patch_size, temporal_patch_size, merge_size);
    if (static_cast<int64_t>(mean.size()) != C || static_cast<int64_t>(stdev.size()) != C)
        bad("mean and std need " + std::to_string(C) + " values (one per channel), got " +
            std::to_string(mean.size()) + " and " + std::to_string(stdev.size()));
    for (int64_t c = 0; c < C; ++c) {
        if (!std::isfinite(mean[c])) bad("mean must be finite");
        if (!std::isfinite(stdev[c]) || stdev[c] == 0.0) bad("std must be finite and non-zero");
    }
    const int64_t rows = (H / patch_size) * (W / patch_size);
    const int64_t row_len = C * temporal_patch_size * patch_size * patch_size;
    std::vector<float> lut(static_cast<size_t>(C) * 256);
    glmrt::build_normalize_lut(mean.data(), stdev.data(), C, lut.data());

    py::array_t<float> out(std::vector<py::ssize_t>{rows, row_len});
    const auto* src = static_cast<const uint8_t*>(image.data());
    float* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        glmrt::patchify_u8(src, H, W, C, lut.data(), patch_size, temporal_patch_size, merge_size, dst,
                           num_threads);
    }
    return out;
}

py::array_t<uint8_t> patch_pixels(const py::array& image, int64_t patch_size, int64_t merge_size,
                                  int64_t num_threads) {
    const auto [H, W, C] = check_image(image, patch_size, 1, merge_size);
    py::array_t<uint8_t> out(std::vector<py::ssize_t>{(H / patch_size) * (W / patch_size), C * patch_size * patch_size});
    const auto* src = static_cast<const uint8_t*>(image.data());
    uint8_t* dst = out.mutable_data();
    {
        py::gil_scoped_release release;
        glmrt::patch_pixels_u8(src, H, W, C, patch_size, merge_size, dst, num_threads);
    }
    return out;
}

// A flat (x, y, x, y, ...) list -> an int32 [K, 2] array.
py::array_t<int32_t> as_points(const std::vector<int32_t>& flat) {
    py::array_t<int32_t> out(std::vector<py::ssize_t>{static_cast<py::ssize_t>(flat.size() / 2), 2});
    if (!flat.empty()) std::memcpy(out.mutable_data(), flat.data(), flat.size() * sizeof(int32_t));
    return out;
}

py::list external_contours(const py::array& mask) {
    if (!py::isinstance<py::array_t<uint8_t>>(mask) || mask.ndim() != 2 || !(mask.flags() & py::array::c_style))
        throw std::invalid_argument("external_contours: mask must be a C-contiguous 2-D uint8 array");
    std::vector<std::vector<int32_t>> contours;
    {
        py::gil_scoped_release release;
        contours = glmrt::external_contours(static_cast<const uint8_t*>(mask.data()), mask.shape(0), mask.shape(1));
    }
    py::list out;
    for (const auto& contour : contours) out.append(as_points(contour));
    return out;
}

py::array_t<int32_t> approx_poly_dp(const py::array& points, double epsilon) {
    if (!py::isinstance<py::array_t<int32_t>>(points) || points.ndim() != 2 || points.shape(1) != 2 ||
        points.shape(0) < 1 || !(points.flags() & py::array::c_style))
        throw std::invalid_argument("approx_poly_dp: points must be a C-contiguous int32 [K >= 1, 2] array");
    std::vector<int32_t> flat;
    {
        py::gil_scoped_release release;
        flat = glmrt::approx_poly_dp(static_cast<const int32_t*>(points.data()), points.shape(0), epsilon);
    }
    return as_points(flat);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "glmrt host-side extension (CPU only)";
    m.def("patchify", &patchify, py::arg("image"), py::arg("mean"), py::arg("std"), py::arg("patch_size") = 14,
          py::arg("temporal_patch_size") = 2, py::arg("merge_size") = 2, py::arg("num_threads") = 1,
          "Normalize and patchify a uint8 HWC C-contiguous image into float32 [N, C*T*P*P]: rows in "
          "merge-block-major order, row vector order (c, t, py, px), temporal copies identical, "
          "x = (pixel - 255*mean_c) / (255*std_c) in fp32. The GIL is released during the loop; "
          "num_threads > 1 splits the work over that many threads. Bad input raises ValueError.");
    m.def("patch_pixels", &patch_pixels, py::arg("image"), py::arg("patch_size") = 14, py::arg("merge_size") = 2,
          py::arg("num_threads") = 1,
          "patchify's layout without normalization or temporal copies: uint8 [N, C*P*P], the raw pixels "
          "of each patch in (c, py, px) order, for the device to normalize. GIL released; bad input "
          "raises ValueError.");
    m.def("external_contours", &external_contours, py::arg("mask"),
          "cv2.findContours(mask, RETR_EXTERNAL, CHAIN_APPROX_SIMPLE)'s contours of a uint8 [H, W] mask "
          "(non-zero = foreground): a list of int32 [K, 2] (x, y) arrays, last found first. GIL released.");
    m.def("approx_poly_dp", &approx_poly_dp, py::arg("points"), py::arg("epsilon"),
          "cv2.approxPolyDP(points, epsilon, closed=True) of an int32 [K, 2] closed curve -> int32 [M, 2]. "
          "GIL released.");
}
